"""What every subcommand shares: argument types, --device and --threads, the names file."""

import argparse
import math
import os
from contextlib import contextmanager

import torch

from ..data import NAMES_FILE


def finite_float(text: str) -> float:
    """argparse type: a float that is a finite number (nan and inf are errors naming the flag)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def int_at_least(low: int):
    """argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


positive_int, count_int = int_at_least(1), int_at_least(0)


def float_list(flag: str, text: str) -> tuple:
    """``--flag 0.5,1,2`` -> (0.5, 1.0, 2.0); errors name the flag."""
    try:
        return tuple(finite_float(v) for v in text.split(",") if v.strip())
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"argument {flag}: {e}") from None


def add_runtime(parser: argparse.ArgumentParser, threads: bool = True) -> None:
    """``--device`` (default auto) and ``--threads``, the same on every command."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when present)")
    if threads:
        parser.add_argument("--threads", type=positive_int,
                            help="torch CPU threads (default: torch's; they change float rounding)")


@contextmanager
def threads(n: int | None):
    """Run with ``n`` torch CPU threads (None: as they are), restoring them after."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def default_names_path() -> str:
    """./names.txt when there is one, else the names that ship with popgpt."""
    return "names.txt" if os.path.exists("names.txt") else NAMES_FILE


def resolve_device(name: str) -> str:
    """'auto' -> cuda when present, else cpu; anything else checked to exist here."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"argument --device: unknown device {name!r} (choose cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"argument --device: {name!r} asked for, but torch sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"argument --device: {name!r}: there are {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"argument --device: {name!r} asked for, but torch sees no MPS device")
    elif device.type != "cpu":
        raise ValueError(f"argument --device: {name!r} cannot run popgpt (choose cpu, cuda, cuda:N or auto)")
    return name
