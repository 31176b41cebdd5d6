"""Shared by the benchmarks: flags, environment facts, timing, result files."""

import argparse
import json
import os
import time

import torch

from popgpt.runio import environment  # noqa: F401  (re-exported for the benchmarks)


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default="results", help="folder for the JSON and markdown results")
    return parser


def setup(args) -> torch.device:
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    name = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device")
    return device


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


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: str, name: str, payload: dict, table: str) -> None:
    """``name.json`` for programs and ``name.md`` for people, written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    for ext, text in (("json", json.dumps(payload, indent=2) + "\n"), ("md", table + "\n")):
        path = os.path.join(out_dir, f"{name}.{ext}")
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    print(f"wrote {os.path.join(out_dir, name)}.json and .md")
