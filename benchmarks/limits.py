"""What a training step must compute, and what this machine can compute at its shapes.

``step_flops``: the floating-point operations of one member-step (forward +
backward = 3x the forward's matrix products) counted three ways for the same
batch: on the positions that matter only (``real``: each row up to one past
its last real target, causal attention over the keys a query may see),
as the packed path computes them (``packed``: every row of a group cut to the
group's length, attention over the group's full square), and as the padded
path does (``padded``: every row at the block size). Matrix products only:
norms, softmax, embeddings and Adam are a few percent more, not counted.

``gemm_rate``: the same machine's rate for the step's own matrix-product
shapes (the forward's, and the backward's two per product), batched over a
block of members as the engines run them, timed alone: the throughput the
arithmetic of a step could reach if nothing else cost time.
"""

import time

import torch

from popgpt.model import ModelConfig
from popgpt.packed import Plan, needed_lengths


def _per_position(cfg: ModelConfig) -> int:
    """Forward multiply-adds x 2 of the token-wise products, per position."""
    C, V = cfg.n_embd, cfg.vocab_size
    block = 3 * C * C + C * C + (2 * 4 * C * C if cfg.mlp else 0)
    return 2 * (cfg.n_layer * block + C * V)


def step_flops(cfg: ModelConfig, y: torch.Tensor, plan: Plan) -> dict:
    """Mean FLOP per member-step for targets ``y`` (steps, P, B, T) under ``plan``: real, packed, padded."""
    lengths = needed_lengths(y).double()  # (steps, P, B)
    C, L, T = cfg.n_embd, cfg.n_layer, y.shape[-1]
    per_pos = _per_position(cfg)
    real = per_pos * lengths.sum(-1) + L * 4 * C * (lengths * (lengths + 1) / 2).sum(-1)
    packed = sum(r * (per_pos * t + L * 4 * C * t * t) for r, t in zip(plan.rows, plan.lengths))
    padded = y.shape[-2] * (per_pos * T + L * 4 * C * T * T)
    return {"real": 3 * float(real.mean()), "packed": 3.0 * packed, "padded": 3.0 * padded}


def _shapes(cfg: ModelConfig, positions: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every matrix product of a step's linear layers: forward, input and weight gradients."""
    C, V = cfg.n_embd, cfg.vocab_size
    forward = [(positions, C, 3 * C), (positions, C, C)] * cfg.n_layer + [(positions, C, V)]
    if cfg.mlp:
        forward += [(positions, C, 4 * C), (positions, 4 * C, C)] * cfg.n_layer
    return [s for m, k, n in forward for s in ((m, k, n), (m, n, k), (k, m, n))]


def gemm_rate(cfg: ModelConfig, positions: int, members: int, device, repeats: int = 20) -> float:
    """GFLOP/s of the step's matrix-product shapes batched over ``members`` (torch.bmm), timed alone."""
    flops, seconds = 0.0, 0.0
    g = torch.Generator(device).manual_seed(0)
    for m, k, n in _shapes(cfg, positions):
        a = torch.randn(members, m, k, generator=g, device=device)
        b = torch.randn(members, k, n, generator=g, device=device)
        for _ in range(3):
            torch.bmm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.bmm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        flops += 2.0 * members * m * k * n * repeats
    return flops / seconds / 1e9


def dense_rate(device, n: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of one large square float32 matrix product: the machine's dense peak, for scale."""
    g = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=g, device=device) for _ in range(2))
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2.0 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e9
