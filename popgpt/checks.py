"""Checks of config fields: every error names the field and the value it got."""

import dataclasses
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
