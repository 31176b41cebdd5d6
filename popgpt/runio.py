"""The run folder: atomic writes, checkpoints, the generations table.

A run folder holds ``config.json``, ``generations.csv``, ``samples.txt``,
``results.json`` and ``checkpoints/gen_NNN.pt``. Every file is written to a
temporary name and renamed into place, so an interrupted run never leaves a
half-written file; checkpoints load with ``torch.load(weights_only=True)``.
"""

import csv
import io
import json
import math
import os
import platform
import re
import subprocess

import torch

CHECKPOINT_RE = re.compile(r"gen_(\d{3,})\.pt$")

COLUMNS = ["generation", "replicate", "immune_frac", "n_immune", "fitness_all", "fitness_immune",
           "fitness_vulnerable", "fitness_best", "nll_mean", "payload_prob_mean",
           "trigger", "virus_generation"]


class RunError(RuntimeError):
    """A run folder that cannot be started or resumed as asked; the message says why."""


def write_atomic(path: str, data: str | bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def format_cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_csv(path: str, rows: list[dict], columns: list[str] | None = None) -> None:
    """Rows (dicts) as CSV, atomically; columns default to ``COLUMNS`` (generations.csv)."""
    columns = columns or COLUMNS
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([format_cell(row[c]) for c in columns])
    write_atomic(path, buf.getvalue())


def checkpoint_path(run_dir: str, generation: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"gen_{generation:03d}.pt")


def list_checkpoints(run_dir: str) -> dict[int, str]:
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return {}
    found = {}
    for name in os.listdir(folder):
        m = CHECKPOINT_RE.match(name)
        if m:
            found[int(m.group(1))] = os.path.join(folder, name)
    return dict(sorted(found.items()))


def save_checkpoint(run_dir: str, generation: int, state: dict, keep_all: bool) -> None:
    """Write generation's state; keep generation 0 and the newest unless ``keep_all``."""
    path = checkpoint_path(run_dir, generation)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getvalue())
    if not keep_all:
        for gen, old in list_checkpoints(run_dir).items():
            if gen not in (0, generation):
                os.remove(old)


def load_checkpoint(run_dir: str, generation: int | None = None) -> dict:
    """The state saved for ``generation`` (default: the newest)."""
    found = list_checkpoints(run_dir)
    if not found:
        raise RunError(f"{run_dir}: no checkpoints (expected {os.path.join(run_dir, 'checkpoints', 'gen_NNN.pt')})")
    if generation is None:
        generation = max(found)
    if generation not in found:
        raise RunError(f"{run_dir}: no checkpoint for generation {generation}; saved: {sorted(found)}")
    return torch.load(found[generation], map_location="cpu", weights_only=True)


def three_decimals(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict], columns=None, cell=three_decimals) -> str:
    """A markdown table of rows (dicts) in the given column order; ``cell`` formats each value."""
    columns = columns or COLUMNS
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def environment(device: torch.device, version: str) -> dict:
    """Facts a result depends on: versions (``version``: popgpt's), device, threads, git commit."""
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git = None
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"torch": torch.__version__, "python": platform.python_version(), "popgpt": version,
            "device": str(device), "device_name": name, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "git": git}
