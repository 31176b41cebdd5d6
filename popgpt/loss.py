"""The losses every stage shares: cross-entropy per member, and a user's loss made per member.

Training differentiates them; evaluation scores held-out names with them.
They keep the population axis: nothing here reduces across members.

A loss function, wherever popgpt takes one (``popgpt.train(loss=...)``,
``step``), maps the members' outputs and targets, both with the population
axis first, to one loss per member ``[P]``. ``per_member(fn)`` makes one
from a function written for a single model's output and targets.
"""

import torch
import torch.nn.functional as F

from .data import IGNORE
from .model import MicroGPT
from .packed import Plan, packed_losses
from .population import population_forward, population_logits


def member_nll_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed NLL of each member, [P], for logits (P, ..., V) and targets (P, ...) or shared (...);
    targets equal to ``IGNORE`` count nothing."""
    y = y.expand(logits.shape[:-1])  # (P, ...)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                          reduction="none")
    return nll.view(y.shape).flatten(1).sum(1)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each member over its non-ignored targets: [P] (popgpt's default loss)."""
    return member_nll_sum(logits, y) / (y != IGNORE).expand(logits.shape[:-1]).flatten(1).sum(1)


def per_member(fn):
    """A loss of the members' outputs and targets (P first), [P], from ``fn(output, target) -> scalar``
    written for one model (vmapped over the population axis)."""
    return torch.vmap(fn)


def losses_of(base, params: dict, x: torch.Tensor, y: torch.Tensor, loss=None, plan: Plan | None = None) -> torch.Tensor:
    """Loss of each member on its batch, [P], as a function of the stacked parameters (what engines
    differentiate and compile). ``loss``: (outputs, targets) -> [P], the members' inputs x and targets
    y being per-member batches (P, B, ...); None: MicroGPT's next-token cross-entropy, for per-member
    token batches (P, B, T) or one shared batch (B, T), on packed rows when ``plan`` is given
    (``packed.py``: the same numbers without the padding's arithmetic)."""
    if loss is None and plan is not None and isinstance(base, MicroGPT):
        return packed_losses(params, base.config, x, y, plan)
    if loss is None:
        logits = population_logits(base, params, x, (0, 0) if x.dim() == 3 else (0, None))  # (P, B, T, V)
        return cross_entropy(logits, y)
    return loss(population_forward(base, params, (x,), (0,)), y)


def member_losses(pop, x: torch.Tensor, y: torch.Tensor, loss=None) -> torch.Tensor:
    """Each member's loss on its batch: [P] (the mean next-token cross-entropy unless ``loss``)."""
    return losses_of(pop.base, pop.functional(), x, y, loss)
