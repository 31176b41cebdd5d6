"""How much memory a run needs, estimated before anything is allocated.

A run that cannot fit should fail at once with a message that says how
much it needs, how much there is, and the largest population that fits,
not minutes later with an out-of-memory crash. The estimate counts float32
tensors: the population's parameters with their Adam moments and
gradients (and the copies breeding makes), the activations of one training
step (a block of members on a CPU, all of them on a GPU), evaluation
chunks and the sampling pass of the immunity test. It is an estimate of
the peak within a factor of about two, which is what the check needs.
Activations are counted at the padded block size: training and evaluation
run packed (``packed.py``) on fewer positions, so this is an upper bound.
"""

import math
import os

import torch

from ..device import CPU_MEMBER_BLOCK, LOGIT_BUDGET
from .config import RunConfig

FLOAT = 4  # bytes


def _per_token_floats(config: RunConfig) -> int:
    """Floats a forward + backward keeps per (member, sequence, position)."""
    m = config.model
    C, H, T, V = m.n_embd, m.n_head, m.block_size, m.vocab_size
    return m.n_layer * (14 * C + 3 * 4 * C + 3 * H * T) + 3 * V


def estimate_bytes(config: RunConfig, n_members: int | None = None, device_type: str = "cpu") -> dict[str, int]:
    """Bytes of each part of a run's peak: ``state``, ``training``, ``evaluation``, ``sampling``."""
    P = n_members or config.n_members
    m = config.model
    n_params = sum(math.prod(s) for s in m.param_shapes().values())
    T, V = m.block_size, m.vocab_size
    trained = P if device_type != "cpu" else min(P, CPU_MEMBER_BLOCK)
    per_token = _per_token_floats(config)
    eval_chunk = max(1, LOGIT_BUDGET.get(device_type, 2 ** 25) // (P * T * V))
    return {
        "state": P * n_params * FLOAT * 7,  # params, 2 moments, grads, breeding copies (x ~1.75)
        "training": trained * config.train.batch_size * T * per_token * FLOAT,
        "evaluation": P * eval_chunk * T * per_token // 2 * FLOAT,  # no backward
        "sampling": P * config.virus.n_samples * T * per_token // 2 * FLOAT,
    }


def available_bytes(device: torch.device) -> int:
    """Free memory on the device: CUDA's free memory, or the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def largest_population(config: RunConfig, budget: int, device_type: str) -> int:
    """The most members whose estimate fits ``budget`` bytes (0 if not even one)."""
    low, high = 0, 1
    while sum(estimate_bytes(config, high, device_type).values()) <= budget and high < 2 ** 40:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if sum(estimate_bytes(config, mid, device_type).values()) <= budget else (low, mid)
    return low


def check_fits(config: RunConfig, device: torch.device, n_members: int | None = None,
               headroom: float = 0.8) -> dict[str, int]:
    """Raise MemoryError (with the largest size that fits) when the estimate passes ``headroom`` of
    the free memory; else return the estimate."""
    device = torch.device(device)
    need = estimate_bytes(config, n_members, device.type)
    free = available_bytes(device)
    if sum(need.values()) > headroom * free:
        gib = 2 ** 30
        parts = ", ".join(f"{k} {v / gib:.2f}" for k, v in need.items())
        fits = largest_population(config, int(headroom * free), device.type)
        raise MemoryError(
            f"this run needs about {sum(need.values()) / gib:.2f} GiB ({parts}) but {device} has "
            f"{free / gib:.2f} GiB free; at block size {config.model.block_size} the largest population that fits "
            f"is about {fits} members in all (--pop-size x --replicates)")
    return need
