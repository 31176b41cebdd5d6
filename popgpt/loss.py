"""The loss every stage shares: next-character cross-entropy per member.

Training differentiates it; evaluation scores held-out names with it. Both
keep the population axis: nothing here reduces across members.
"""

import torch
import torch.nn.functional as F

from .data import IGNORE
from .population import Population, population_logits


def member_nll_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed NLL of each member, [P], for logits (P, B, T, V) and targets (P, B, T) or (B, T)."""
    y = y.expand(logits.shape[:-1])  # (P, B, T)
    nll = F.cross_entropy(logits.flatten(0, 2), y.flatten(), ignore_index=IGNORE, reduction="none")
    return nll.view_as(y).sum((1, 2))


def losses_of(base, params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean NLL of each member on its batch, [P], as a function of the stacked parameters
    (what engines differentiate and compile). x, y: (P, B, T) per-member batches or (B, T) shared."""
    logits = population_logits(base, params, x, (0, 0) if x.dim() == 3 else (0, None))  # (P, B, T, V)
    return member_nll_sum(logits, y) / (y != IGNORE).sum((-2, -1))


def member_losses(pop: Population, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each member on its batch: [P]."""
    return losses_of(pop.base, pop.params, x, y)
