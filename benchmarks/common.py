"""Shared by the benchmarks: flags, environment facts, timing, result files."""

import argparse
import os
import time

import torch

from popgpt import __version__
from popgpt.device import retain_freed_memory
from popgpt.runio import environment as run_environment
from popgpt.runio import format_table, write_atomic, write_json


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default="results", help="folder for the JSON and markdown results")
    return parser


def setup(args) -> torch.device:
    retain_freed_memory()  # as the popgpt command does (popgpt/device.py)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    name = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device")
    return device


def environment(device: torch.device) -> dict:
    """Versions, device, threads and git commit, as a run's config.json records them."""
    return run_environment(device, __version__)


def describe(env: dict) -> str:
    return (f"device {env['device']} ({env['device_name']}) | torch {env['torch']} | "
            f"threads {env['threads']} of {env['cpus']} CPUs | python {env['python']}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds ``fn()`` takes, with the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def significant(value) -> str:
    """Three significant figures, whole numbers above 1,000 (rates and timings)."""
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    return format_table(rows, columns, cell=significant)


def write_results(out_dir: str, name: str, payload: dict, table: str) -> None:
    """``name.json`` for programs and ``name.md`` for people, written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"{name}.json"), payload)
    write_atomic(os.path.join(out_dir, f"{name}.md"), table + "\n")
    print(f"wrote {os.path.join(out_dir, name)}.json and .md")
