"""Seeds derived by name, never from ad-hoc offsets.

A post-hoc tool (``vaccine``, ``revival``, ``cure``, ``grok`` ...) run with
its own ``seed`` on a run of ``run_seed`` draws stream ``stream`` from
``tool_seed``; fresh members it makes get ``fresh_member_seeds``, at or above
2**62, where no run member's seed ``(k * 137 + 42)`` can reach.
"""

import hashlib


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
