"""Batched training: every member on its own batches, one backward, stacked Adam.

Summing the per-member losses and differentiating once gives each member
exactly its own gradient (members share no parameters). Adam is elementwise,
so one update over the stacked tensors is P independent optimizers; the step
count is per member (children start with fresh optimizer state while
survivors keep theirs), so bias correction is per member too. Nothing here
reduces across the population axis: there is no global gradient clipping.

``step`` is the one training step; every engine (``engine.py``) calls it,
with compiled versions of the loss and the update where it compiles them.
"""

import torch

from .config import TrainConfig
from .loss import losses_of, member_losses  # noqa: F401  (member_losses: public API)
from .population import AdamState, Population


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


def step(base, params: dict, opt: AdamState, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
         losses_fn=losses_of, update_fn=adam_step) -> torch.Tensor:
    """Forward, one backward over the summed member losses, Adam; returns the losses [P].

    ``params`` and ``opt`` are updated in place (they may be views into a
    larger population's storage, or an engine's static buffers).
    """
    names = list(params)
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}  # same storage
    losses = losses_fn(base, leaves, x, y)
    grads = torch.autograd.grad(losses.sum(), [leaves[k] for k in names])
    update_fn(params, dict(zip(names, grads)), opt, cfg)
    return losses.detach()


def train_step(pop: Population, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
               losses_fn=losses_of, update_fn=adam_step) -> torch.Tensor:
    """``step`` on a population (or a ``Population.view`` of one): losses [P]."""
    return step(pop.base, pop.params, pop.opt, x, y, cfg, losses_fn, update_fn)


def sample_indices(n_rows: int, steps: int, n_members: int, batch_size: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Row indices of every batch of a round, drawn in one call: (steps, P, B)."""
    return torch.randint(n_rows, (steps, n_members, batch_size), generator=generator,
                         device=generator.device)
