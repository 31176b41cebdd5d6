"""Moving small host values to the device without stalling it, and marking the reads that must.

A generation on a GPU is a queue of kernels the host keeps filled; every
blocking copy or read makes the host wait for the queue to drain. Two tools
keep that visible:

- ``to_device``: a host tensor copied from pinned memory, asynchronously (a
  plain ``torch.tensor(values, device="cuda")`` copies from pageable memory,
  which blocks until the device has caught up).
- ``host_read``: a context for the one intended device-to-host read of a
  generation. Under ``torch.cuda.set_sync_debug_mode("error")`` (the test
  suite's check on CUDA) every other synchronising call raises.

It also holds the measured sizes that keep a CPU's caches warm, and
``retain_freed_memory``, the allocator setting the command line uses.
"""

import ctypes
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

# Members trained together per block on a CPU: a (P, B, T, 4C) activation
# must stay in cache. P=200 on a 2-core CPU, 2 threads: 284 member-steps/s in
# one block, 609 in blocks of 25; 1 thread: 197 vs 295 (blocks of 25).
CPU_MEMBER_BLOCK = 24

# Floats of (P, b, T, V) logits evaluated at once: small chunks stay in a CPU's
# cache (P=200 on a 2-core CPU: 4.9 s at 2**21 vs 14.9 s at 2**25); a GPU wants few, big launches.
LOGIT_BUDGET = {"cpu": 2 ** 21, "cuda": 2 ** 25}


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """``tensor`` on ``device``; from the host to a CUDA device without blocking the host."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def tensor(values, device, dtype=None) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``, copied as ``to_device`` copies."""
    return to_device(torch.tensor(values, dtype=dtype), device)


@contextmanager
def host_read():
    """An intended synchronising read: allowed even under ``set_sync_debug_mode("error")``."""
    if not torch.cuda.is_available():
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


# glibc mallopt parameters: M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
KEEP_FREED = "POPGPT_KEEP_FREED_MEMORY"  # environment variable: 0 leaves the C allocator as it is


def retain_freed_memory() -> bool:
    """Keep freed CPU memory in the process for the next tensor (glibc on Linux; elsewhere nothing).

    A training step allocates and frees the same megabyte-sized activations
    thousands of times. glibc's defaults hand such blocks back to the kernel
    (mmap above a dynamic threshold, heap trimming above 2x it), so every
    step pays for fresh zeroed pages again. Serving blocks of up to 32 MiB
    from the heap and trimming it only above 1 GiB measured 696-773 ->
    809-863 member-steps/s (P=200, 1 thread, 2-core CPU, three alternating
    pairs of runs; docs/performance.md). The cost: up to ~1 GiB of freed
    memory stays mapped by the process. ``popgpt`` and the benchmarks call
    this at start; ``POPGPT_KEEP_FREED_MEMORY=0`` turns it off. Returns
    whether the setting was applied.
    """
    if os.environ.get(KEEP_FREED, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_MMAP_THRESHOLD, 32 * 2 ** 20), (_M_TOP_PAD, 64 * 2 ** 20), (_M_TRIM_THRESHOLD, 2 ** 30)))


def cpu_workers(requested, n_items: int, device) -> int:
    """Worker threads for ``n_items`` independent pieces of CPU work: ``auto`` is one per torch thread on a
    CPU (1 elsewhere), never more than there are pieces."""
    if requested != "auto":
        return max(1, min(int(requested), n_items))
    return max(1, min(torch.get_num_threads(), n_items)) if torch.device(device).type == "cpu" else 1


def member_blocks(n: int, block: int, parts: int = 1) -> list[tuple[int, int]]:
    """Contiguous blocks ``(start, stop)`` covering ``n`` members: at most ``block`` members each, of
    near-equal sizes, as many as a multiple of ``parts`` where ``n`` allows, so that ``parts`` workers
    taking ``len(blocks) // parts`` neighbouring blocks each get equal shares of the work (blocks of 24
    for 160 members over 2 workers were shares of 96 and 64: a third of one thread idle)."""
    if n < 1 or block < 1 or parts < 1:
        raise ValueError(f"member_blocks needs n, block, parts >= 1, got {n}, {block}, {parts}")
    count = min(n, parts * -(-n // (parts * block)))
    bounds = [0]
    for i in range(count):
        bounds.append(bounds[-1] + n // count + (i < n % count))
    return list(zip(bounds[:-1], bounds[1:]))


def in_threads(fn, items: list, workers: int) -> list:
    """``[fn(item) for item in items]``, spread over ``workers`` threads at one torch thread each (small
    ops run faster side by side than split across threads; measured in docs/performance.md). The torch
    thread count is restored after."""
    if workers <= 1:
        return [fn(item) for item in items]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)
