"""What configurations share: checks of their fields, and seeds derived by name.

Checks: every error names the field and the value it got.

Seeds never come from ad-hoc offsets. A post-hoc tool (``vaccine``,
``revival``, ``cure``, ``grok`` ...) run with its own ``seed`` on a run of
``run_seed`` draws stream ``stream`` from ``tool_seed``; fresh members it
makes get ``fresh_member_seeds``, at or above 2**62, where no run member's
seed ``(k * 137 + 42)`` can reach.
"""

import dataclasses
import hashlib
import math


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_finite(config) -> None:
    """Every float field of a config dataclass must be a finite number (no nan, no inf)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")


def in_range(config, name: str, low, high, low_open=False, high_open=False) -> None:
    value = getattr(config, name)
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    require(ok, f"{name} must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}, got {value}")


def at_least(config, names, low) -> None:
    for name in names:
        require(getattr(config, name) >= low, f"{name} must be >= {low}, got {getattr(config, name)}")


def _digest(*parts) -> int:
    """A 62-bit integer determined by ``parts`` (stable across processes and machines)."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 2


def tool_seed(run_seed: int, tool: str, seed: int, stream: str) -> int:
    """Seed of stream ``stream`` of a post-hoc tool (``vaccine``, ``revival``, ``retest``, ...)
    run with its own ``seed`` on a run of ``run_seed``."""
    return _digest("tool", run_seed, tool, seed, stream)


# Run members' init seeds are (k * 137 + 42) for small k; fresh members made by
# tools get seeds at or above 2**62, so the two can never coincide.
FRESH_SEED_BASE = 2 ** 62


def fresh_member_seeds(run_seed: int, purpose: str, seed: int, n: int) -> list[int]:
    """Init seeds of ``n`` fresh members that no run member uses (``purpose``: the tool's name)."""
    start = FRESH_SEED_BASE + _digest("fresh", run_seed, purpose, seed) % (2 ** 61)
    return [start + i for i in range(n)]
