"""Batched training: every member on its own batches, one backward, stacked Adam.

Summing the per-member losses and differentiating once gives each member
exactly its own gradient (members share no parameters). Adam is elementwise,
so one update over the stacked tensors is P independent optimizers, also
with per-member hyperparameters (``Hyper``: lr, betas, eps, weight decay as
[P] tensors) and per-member step counts (children start with fresh optimizer
state while survivors keep theirs, so bias correction is per member too). A
member may also sit a step out (``active``): then nothing of it changes.
Nothing here reduces across the population axis: there is no global
gradient clipping.

A round's data (``Batches``) is per member too: a bank of encoded tables,
which table each member draws from, and the rows it draws at every step.

``step`` is the one training step; every engine (``engine.py``) calls it,
with compiled versions of the loss and the update where it compiles them.
"""

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .data import inputs_targets
from .device import tensor
from .loss import losses_of, member_losses  # noqa: F401  (member_losses: public API)
from .packed import Plan, needed_lengths, plan_from_lengths
from .population import AdamState, Population
from .settings import at_least, check_finite, in_range, require


@dataclass(frozen=True)
class TrainConfig:
    """One training round."""

    steps: int = 100  # optimizer steps per round (the source experiment: 100)
    batch_size: int = 32  # documents per member per step (the source experiment: 32)
    lr: float = 1e-2  # tiny models, few steps: a large constant rate
    beta1: float = 0.9
    beta2: float = 0.99  # shorter second-moment memory suits 100-step rounds
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled (AdamW-style) when > 0

    def __post_init__(self):
        for name in ("lr", "beta1", "beta2", "eps", "weight_decay"):
            require(not isinstance(getattr(self, name), torch.Tensor),
                    f"TrainConfig.{name} is one setting for every member; for one value per member pass a "
                    f"[P] tensor to popgpt.train({name if not name.startswith('beta') else 'betas'}=...)")
        check_finite(self)
        at_least(self, ("steps",), 0)
        at_least(self, ("batch_size",), 1)
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")
        in_range(self, "beta1", 0.0, 1.0, high_open=True)
        in_range(self, "beta2", 0.0, 1.0, high_open=True)
        require(self.eps > 0, f"eps must be > 0, got {self.eps}")
        at_least(self, ("weight_decay",), 0.0)


class Hyper(NamedTuple):
    """Adam's hyperparameters per member, each a float32 [P] tensor."""

    lr: torch.Tensor
    beta1: torch.Tensor
    beta2: torch.Tensor
    eps: torch.Tensor
    weight_decay: torch.Tensor

    @classmethod
    def of(cls, configs, device="cpu", dtype=torch.float32) -> "Hyper":
        """From one TrainConfig per member (a list), on ``device``."""
        return cls(*(tensor([getattr(c, f) for c in configs], device, dtype)
                     for f in cls._fields))

    @classmethod
    def like(cls, config: TrainConfig, n: int, device="cpu", dtype=torch.float32) -> "Hyper":
        """The same TrainConfig for n members."""
        return cls.of([config] * n, device, dtype)

    def index(self, index) -> "Hyper":
        return Hyper(*(t[index] for t in self))


def as_hyper(hyper, pop: Population) -> Hyper:
    """A Hyper in the population's dtype and device, or a TrainConfig spread over its members."""
    dtype, device = pop.opt.step.dtype, pop.device
    if isinstance(hyper, Hyper):
        return hyper if hyper.lr.dtype == dtype and hyper.lr.device == device else \
            Hyper(*(t.to(device, dtype) for t in hyper))
    return Hyper.like(hyper, len(pop), device, dtype)


@torch.no_grad()
def adam_step(params: dict, grads: dict, opt: AdamState, hp: Hyper, active: torch.Tensor | None = None) -> None:
    """One Adam update in place (decoupled AdamW decay where ``weight_decay`` > 0), per member.

    The update rule of ``torch.optim.Adam`` / ``AdamW``: it equals a loop of
    them up to float rounding (the tests check this). ``active`` [P] (bool):
    members that take this step; the others keep parameters, moments and
    step count unchanged.
    """
    act = None if active is None else active.to(opt.step.dtype)
    opt.step += 1 if act is None else act
    t = opt.step.clamp(min=1)  # a member that never stepped has nothing to correct
    bias1 = 1 - hp.beta1 ** t  # [P]
    bias2_sqrt = (1 - hp.beta2 ** t).sqrt()  # [P]
    lr = hp.lr if act is None else hp.lr * act
    w1, w2 = 1 - hp.beta1, 1 - hp.beta2
    keep2 = hp.beta2
    if act is not None:
        w1, w2, keep2 = w1 * act, w2 * act, torch.where(active, hp.beta2, torch.ones_like(hp.beta2))
    step_size, decay = lr / bias1, 1 - lr * hp.weight_decay
    for name, p in params.items():
        shape = (-1,) + (1,) * (p.dim() - 1)  # [P] -> (P, 1, ...)
        g = grads[name]
        m, v = opt.exp_avg[name], opt.exp_avg_sq[name]
        p.mul_(decay.view(shape))
        m.lerp_(g, w1.view(shape))
        v.mul_(keep2.view(shape)).addcmul_(g, g * w2.view(shape))
        denom = (v.sqrt() / bias2_sqrt.view(shape)).add_(hp.eps.view(shape))
        p.sub_(m / denom * step_size.view(shape))


def step(base, params: dict, opt: AdamState, x: torch.Tensor, y: torch.Tensor, hp: Hyper,
         active: torch.Tensor | None = None, losses_fn=losses_of, update_fn=adam_step, loss=None,
         buffers: dict | None = None, plan: Plan | None = None) -> torch.Tensor:
    """Forward, one backward over the summed member losses, Adam; returns the losses [P].

    ``params`` and ``opt`` are updated in place (they may be views into a
    larger population's storage, or an engine's static buffers). ``loss``:
    (outputs, targets) -> [P] (``loss.py``); None: next-token cross-entropy.
    ``buffers``: the module's stacked buffers, if it has any (never trained).
    ``plan``: MicroGPT's packed rows (``packed.py``); None: the padded computation.
    """
    names = list(params)
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}  # same storage
    losses = losses_fn(base, {**leaves, **(buffers or {})}, x, y, loss, plan)
    if losses.shape != (x.shape[0],):
        raise ValueError(f"the loss must give one value per member, shape ({x.shape[0]},); got "
                         f"{tuple(losses.shape)} (reduce over each member's batch, never across members)")
    grads = torch.autograd.grad(losses.sum(), [leaves[k] for k in names])
    update_fn(params, dict(zip(names, grads)), opt, hp, active)
    return losses.detach()


def train_step(pop: Population, x: torch.Tensor, y: torch.Tensor, hp, active: torch.Tensor | None = None,
               losses_fn=losses_of, update_fn=adam_step, loss=None, plan: Plan | None = None) -> torch.Tensor:
    """``step`` on a population (or a ``Population.view`` of one): losses [P].

    ``hp``: a ``Hyper`` or a ``TrainConfig`` shared by all members."""
    hp = as_hyper(hp, pop)
    return step(pop.base, pop.params, pop.opt, x, y, hp, active, losses_fn, update_fn, loss, pop.buffers, plan)


@dataclass(frozen=True)
class Batches:
    """The data of one training round, per member.

    ``bank`` (K, N, T+1) holds K tables of N encoded rows (int8 or int64),
    split into next-token inputs and targets; or, with ``targets`` (K, N,
    ...), ``bank`` (K, N, ...) holds the inputs and ``targets`` what each row
    should give. Member p draws from table ``table[p]``; at step s it trains
    on rows ``rows[s, p]`` of that table. ``active`` (steps, P) marks the
    members that train at each step (None: all of them).
    """

    bank: torch.Tensor
    table: torch.Tensor  # [P] long
    rows: torch.Tensor  # (steps, P, B) long
    active: torch.Tensor | None = None  # (steps, P) bool
    targets: torch.Tensor | None = None  # (K, N, ...): bank holds inputs, this the targets
    plan: Plan | None = None  # packed rows of every step (``packed.py``); None: padded

    @classmethod
    def shared(cls, rows: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor | None = None) -> "Batches":
        """Every member draws from one table ``rows`` (N, ...) (and ``targets``); ``idx`` (steps, P, B)."""
        return cls(rows[None], torch.zeros(idx.shape[1], dtype=torch.long, device=idx.device), idx,
                   targets=None if targets is None else targets[None])

    @property
    def steps(self) -> int:
        return self.rows.shape[0]

    def members(self, a: int, b: int) -> "Batches":
        """Members a..b-1 only."""
        return Batches(self.bank, self.table[a:b], self.rows[:, a:b],
                       None if self.active is None else self.active[:, a:b], self.targets, self.plan)

    def planned(self, multiple: int = 1) -> "Batches":
        """These batches with the packed plan of the whole round (row lengths rounded up to ``multiple``):
        one read to the host. Token rows only (no separate targets)."""
        if self.targets is not None:
            raise ValueError("packed rows need token rows (inputs and targets from one row)")
        lengths = needed_lengths(self.bank[..., 1:].long())  # (K, N) of every table's rows
        per_step = lengths[self.table[None, :, None], self.rows]  # (steps, P, B)
        return dataclasses.replace(self, plan=plan_from_lengths(per_step, multiple=multiple,
                                                                width=self.bank.shape[-1] - 1))

    def at(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of step s: (P, B, ...) each."""
        return self.gather(self.table, self.rows[s])

    def gather(self, table: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of rows (P, B) of each member's table."""
        picked = self.bank[table[:, None], rows]
        if self.targets is None:
            return inputs_targets(picked)
        return picked, self.targets[table[:, None], rows]


def draw_rows(lengths: torch.Tensor, table: torch.Tensor, steps: int, batch_size: int,
              generator: torch.Generator) -> torch.Tensor:
    """Row indices of every batch of a round, drawn in one call: (steps, P, B).

    Member p draws uniformly from the first ``lengths[table[p]]`` rows of its
    table. With one length for all (the usual case) the draw is one
    ``randint``; otherwise uniform float64 numbers are scaled per member.
    """
    P, device = len(table), generator.device
    if bool((lengths == lengths[0]).all()):
        return torch.randint(int(lengths[0]), (steps, P, batch_size), generator=generator, device=device)
    n = lengths.to(device, torch.float64)[table.to(device)]  # [P]
    u = torch.rand((steps, P, batch_size), generator=generator, device=device, dtype=torch.float64)
    return (u * n[None, :, None]).long().minimum(n.long()[None, :, None] - 1)


def sample_indices(n_rows: int, steps: int, n_members: int, batch_size: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Row indices of every batch of a round from one shared table, drawn in one call: (steps, P, B)."""
    return torch.randint(n_rows, (steps, n_members, batch_size), generator=generator,
                         device=generator.device)
