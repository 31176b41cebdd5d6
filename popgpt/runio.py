"""The run folder: atomic writes, checkpoints, the generations table.

A run folder holds ``config.json``, ``generations.csv``, ``samples.txt``,
``results.json`` and ``checkpoints/gen_NNN.pt``. Every file is written to a
temporary name and renamed into place, so an interrupted run never leaves a
half-written file; checkpoints load with ``torch.load(weights_only=True)``.
"""

import csv
import fcntl
import hashlib
import io
import json
import math
import os
import platform
import re
import subprocess
import time

import torch

CHECKPOINT_RE = re.compile(r"gen_(\d{3,})\.pt$")

class RunError(RuntimeError):
    """A run folder that cannot be started or resumed as asked; the message says why."""


LOCK_FILE = ".popgpt.lock"


class RunLock:
    """An exclusive lock on a run folder, held while a command writes into it.

    ``flock`` on ``RUN_DIR/.popgpt.lock``: the kernel releases it when the
    holder exits in any way (a crash or ``kill -9`` included), so a lock of a
    dead process is never in the way; the file itself may stay behind and
    names the last holder. Taking a lock held by another process fails at
    once with a RunError naming that process.
    """

    def __init__(self, run_dir: str, command: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.command = command
        self._file = None

    def __enter__(self) -> "RunLock":
        if not os.path.isdir(os.path.dirname(self.path)):
            raise RunError(f"{os.path.dirname(self.path)}: no such run folder")
        try:
            f = open(self.path, "a+")
        except OSError as e:
            raise RunError(f"{os.path.dirname(self.path)}: cannot write there ({e.strerror})") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunError(f"{os.path.dirname(self.path)} is in use by {holder}; wait for it to finish "
                           f"(or stop it), then try again") from None
        f.seek(0)
        f.truncate()
        f.write(f"{self.command} (pid {os.getpid()} on {platform.node()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None


def is_run_folder(path: str) -> bool:
    """Whether ``path`` holds a config.json written by popgpt evolve."""
    try:
        info = read_json(os.path.join(path, "config.json"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and {"config", "environment"} <= set(info)


def claim_run_folder(run_dir: str) -> None:
    """Make sure a new run may write into ``run_dir``: create it, or accept it if it is empty or a
    popgpt run folder. Never a folder holding files popgpt did not write."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunError(f"--out {run_dir}: is a file, not a folder")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except (NotADirectoryError, FileExistsError):
        raise RunError(f"--out {run_dir}: a part of that path is a file") from None
    except OSError as e:
        raise RunError(f"--out {run_dir}: cannot create it ({e.strerror})") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RunError(f"--out {run_dir}: not writable")
    others = [f for f in os.listdir(run_dir) if f != LOCK_FILE]
    if others and not is_run_folder(run_dir):
        raise RunError(f"--out {run_dir}: the folder holds files popgpt did not write ({', '.join(sorted(others)[:3])}"
                       f"{', ...' if len(others) > 3 else ''}); popgpt never overwrites them: choose another folder")


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes (what a run records of the data it reads)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    """A JSON file's content; a damaged file raises ValueError naming it (with line and column)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not text (binary content)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def format_cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_csv(path: str, rows: list[dict], columns: list[str]) -> None:
    """Rows (dicts) as CSV in the given column order, atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([format_cell(row[c]) for c in columns])
    write_atomic(path, buf.getvalue())


MANIFEST = "manifest.json"  # in checkpoints/: generation -> sha256 of its file


def checkpoint_path(run_dir: str, generation: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"gen_{generation:03d}.pt")


def _manifest_path(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints", MANIFEST)


def _read_manifest(run_dir: str) -> dict[int, str]:
    path = _manifest_path(run_dir)
    if not os.path.isfile(path):
        return {}
    try:
        return {int(k): v for k, v in read_json(path).items()}
    except (ValueError, AttributeError, TypeError) as e:
        raise RunError(f"{path}: damaged checkpoint manifest ({e})") from None


def list_checkpoints(run_dir: str) -> dict[int, str]:
    """Recorded checkpoints: generation -> path. A file the manifest does not list (a write
    interrupted before it was recorded) does not count."""
    found = {}
    for gen in sorted(_read_manifest(run_dir)):
        path = checkpoint_path(run_dir, gen)
        if os.path.isfile(path):
            found[gen] = path
    return found


def save_checkpoint(run_dir: str, generation: int, state: dict, keep_all: bool) -> None:
    """Write generation's state and record its checksum; keep generation 0 and the newest unless ``keep_all``.

    Order: the file (atomically), then the manifest that records it, then the
    removal of older files (first from the manifest, then from disk), so an
    interruption at any point leaves a manifest that lists only complete files.
    """
    path = checkpoint_path(run_dir, generation)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    write_atomic(path, data)
    manifest = _read_manifest(run_dir)
    manifest[generation] = hashlib.sha256(data).hexdigest()
    write_json(_manifest_path(run_dir), {str(k): v for k, v in sorted(manifest.items())})
    if not keep_all:
        old = [g for g in manifest if g not in (0, generation)]
        if old:
            write_json(_manifest_path(run_dir), {str(k): v for k, v in sorted(manifest.items()) if k not in old})
            for g in old:
                if os.path.exists(checkpoint_path(run_dir, g)):
                    os.remove(checkpoint_path(run_dir, g))


def load_checkpoint(run_dir: str, generation: int | None = None) -> dict:
    """The state saved for ``generation`` (default: the newest), its checksum verified."""
    found = list_checkpoints(run_dir)
    if not found:
        raise RunError(f"{run_dir}: no checkpoints (expected {checkpoint_path(run_dir, 0)} "
                       f"recorded in {_manifest_path(run_dir)})")
    if generation is None:
        generation = max(found)
    if generation not in found:
        raise RunError(f"{run_dir}: no checkpoint for generation {generation}; saved: {sorted(found)}")
    path = found[generation]
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != _read_manifest(run_dir)[generation]:
        raise RunError(f"{path}: checksum mismatch: the file changed after popgpt wrote it (corrupted or edited)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling can fail in many ways; none may run code or leak a hint to bypass safety
        raise RunError(f"{path}: not a readable popgpt checkpoint ({type(e).__name__})") from None


def three_decimals(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict], columns: list[str], cell=three_decimals) -> str:
    """A markdown table of rows (dicts) in the given column order; ``cell`` formats each value."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


class Progress:
    """One line per stage of a long command, with the seconds since it started: ``step("training")``."""

    def __init__(self, log, what: str):
        self.log, self.what, self.start = log, what, time.perf_counter()

    def __call__(self, message: str) -> None:
        self.log(f"{self.what}: {message} ({time.perf_counter() - self.start:.1f} s)")


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
