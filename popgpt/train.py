"""Batched training: every member on its own batches, one backward, stacked Adam.

Summing the per-member losses and differentiating once gives each member
exactly its own gradient (members share no parameters). Adam is elementwise,
so one update over the stacked tensors is P independent optimizers; the step
count is per member (children start with fresh optimizer state while
survivors keep theirs), so bias correction is per member too. Nothing here
reduces across the population axis: there is no global gradient clipping.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORE, docs_to_tensor
from .population import AdamState, Population, population_logits


@dataclass(frozen=True)
class TrainConfig:
    """One training round."""

    steps: int = 100  # optimizer steps per round (the source: 100)
    batch_size: int = 32  # documents per member per step (the source: 32)
    lr: float = 1e-2  # tiny models, few steps: a large constant rate
    beta1: float = 0.9
    beta2: float = 0.99  # shorter second-moment memory suits 100-step rounds
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled (AdamW-style) when > 0

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def member_losses(pop: Population, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each member on its batch: [P].

    x, y: (P, B, T) per-member batches, or (B, T) one batch shared by all.
    """
    return losses_of(pop.base, pop.params, x, y)


def losses_of(base, params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``member_losses`` as a function of the stacked parameters (what engines compile)."""
    logits = population_logits(base, params, x, (0, 0) if x.dim() == 3 else (0, None))  # (P, B, T, V)
    return member_nll_sum(logits, y) / (y != IGNORE).sum((-2, -1))


def member_nll_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed NLL of each member, [P], for logits (P, B, T, V) and targets (P, B, T) or (B, T)."""
    y = y.expand(logits.shape[:-1])  # (P, B, T)
    nll = F.cross_entropy(logits.flatten(0, 2), y.flatten(), ignore_index=IGNORE, reduction="none")
    return nll.view_as(y).sum((1, 2))


@torch.no_grad()
def adam_step(params: dict, grads: dict, opt: AdamState, cfg: TrainConfig) -> None:
    """One Adam update in place (decoupled AdamW decay when ``weight_decay`` > 0).

    The update rule of ``torch.optim.Adam``, with per-member bias correction
    computed in the parameters' dtype: it equals a loop of ``torch.optim.Adam``
    up to float rounding (the tests check this).
    """
    opt.step += 1
    bias1 = 1 - cfg.beta1 ** opt.step  # [P]
    bias2_sqrt = (1 - cfg.beta2 ** opt.step).sqrt()  # [P]
    for name, p in params.items():
        per_member = (-1,) + (1,) * (p.dim() - 1)
        g = grads[name]
        m, v = opt.exp_avg[name], opt.exp_avg_sq[name]
        if cfg.weight_decay:
            p.mul_(1 - cfg.lr * cfg.weight_decay)
        m.lerp_(g, 1 - cfg.beta1)
        v.mul_(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
        denom = (v.sqrt() / bias2_sqrt.view(per_member)).add_(cfg.eps)
        p.sub_(m / denom * (cfg.lr / bias1).view(per_member))


def train_step(pop: Population, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Forward, one backward over the summed member losses, Adam; returns the losses [P].

    ``pop`` may be a view of a larger population (``Population.view``): the
    update is written in place, into the shared storage.
    """
    names = list(pop.params)
    leaves = {k: v.detach().requires_grad_(True) for k, v in pop.params.items()}  # same storage
    losses = losses_of(pop.base, leaves, x, y)
    grads = torch.autograd.grad(losses.sum(), [leaves[k] for k in names])
    adam_step(pop.params, dict(zip(names, grads)), pop.opt, cfg)
    return losses.detach()


def sample_indices(n_rows: int, steps: int, n_members: int, batch_size: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Row indices of every batch of a round, drawn in one call: (steps, P, B)."""
    return torch.randint(n_rows, (steps, n_members, batch_size), generator=generator,
                         device=generator.device)


def train(pop: Population, docs, steps: int = 100, batch_size: int = 32,
          generator: torch.Generator | None = None, config: TrainConfig | None = None,
          engine=None) -> torch.Tensor:
    """Train every member in place on its own random batches of ``docs``.

    ``docs``: a list of strings, or rows already encoded by ``data.docs_to_tensor``.
    ``config`` overrides ``steps`` and ``batch_size`` when given. ``engine``
    (a ``popgpt.engine.Engine``) chooses how steps execute; the default is
    eager. Returns the loss history (steps, P), left on the population's device.
    """
    from .engine import Engine

    cfg = config if config is not None else TrainConfig(steps=steps, batch_size=batch_size)
    if generator is None:
        raise ValueError("train needs an explicit torch.Generator (randomness is never global)")
    rows = docs if isinstance(docs, torch.Tensor) else docs_to_tensor(docs, pop.config.block_size)
    rows = rows.to(pop.device)
    idx = sample_indices(len(rows), cfg.steps, len(pop), cfg.batch_size, generator).to(pop.device)
    return (engine or Engine("eager")).run(pop, rows, idx, cfg)
