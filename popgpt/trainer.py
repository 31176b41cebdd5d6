"""``popgpt.train``: train every member of a population at once, each with its own settings if wanted.

Each hyperparameter is a float (the same for every member) or a ``[P]``
tensor (one value per member); member p then trains exactly as a run with
its values alone would (Adam is elementwise; nothing reduces across
members). Data is a list of names, encoded rows, or input/target tensors,
shared by every member or one set per member (``per_member``). ``loss``
replaces the next-token cross-entropy (``popgpt.loss``).
"""

import torch

from .data import docs_to_tensor
from .engine import Engine
from .population import Population
from .settings import require
from .step import Batches, Hyper, TrainConfig, sample_indices

_UNSET = object()
DEFAULTS = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0}
# argument -> (test on a tensor of values, what it must be)
_RANGES = {"lr": (lambda v: v > 0, "> 0"), "beta1": (lambda v: (v >= 0) & (v < 1), "in [0, 1)"),
           "beta2": (lambda v: (v >= 0) & (v < 1), "in [0, 1)"), "eps": (lambda v: v > 0, "> 0"),
           "weight_decay": (lambda v: v >= 0, ">= 0")}


def per_member_value(name: str, value, n: int, device, dtype=torch.float32) -> torch.Tensor:
    """A hyperparameter as a [n] tensor: a float for every member, or one value per member (checked)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.expand(n)
        require(value.shape == (n,), f"{name}: expected a float or a [P] tensor with P={n} members, "
                f"got shape {tuple(value.shape)}")
        out = value.detach().to(device, dtype)
    else:
        require(isinstance(value, (int, float)) and not isinstance(value, bool),
                f"{name}: expected a float or a [P] tensor, got {type(value).__name__}")
        out = torch.full((n,), float(value), device=device, dtype=dtype)
    test, must = _RANGES[name]
    bad = ~(torch.isfinite(out) & test(out))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name} must be finite and {must}, got {float(out[i])}"
                         + (f" for member {i}" if isinstance(value, torch.Tensor) else ""))
    return out


def hyper(pop: Population, lr, betas, eps, weight_decay) -> Hyper:
    """Adam's settings per member from floats or [P] tensors; errors name the argument."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    values = {"lr": lr, "beta1": betas[0], "beta2": betas[1], "eps": eps, "weight_decay": weight_decay}
    dtype = pop.opt.step.dtype
    return Hyper(**{k: per_member_value(k, v, len(pop), pop.device, dtype) for k, v in values.items()})


def _table(data, pop: Population, per_member: bool):
    """(bank (K, N, ...), targets (K, N, ...) or None, table [P]) of the training data."""
    n = len(pop)
    if isinstance(data, (list, tuple)) and data and all(isinstance(d, str) for d in data):
        require(pop.config is not None and hasattr(pop.config, "block_size"),
                "names need a MicroGPT population; give other models (inputs, targets) tensors")
        require(not per_member, "per_member=True needs tensors (P, N, ...), not a list of names")
        data = docs_to_tensor(list(data), pop.config.block_size)
    if isinstance(data, torch.Tensor):
        bank, targets = data, None
        require(bank.dim() == (3 if per_member else 2),
                f"encoded rows must be (N, T+1){' per member (P, N, T+1)' if per_member else ''}, got shape "
                f"{tuple(bank.shape)}" + ("; per_member=True takes (P, N, T+1)" if bank.dim() == 3 else ""))
    elif isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        bank, targets = data
        require(len(bank) == len(targets) and (not per_member or bank.shape[1] == targets.shape[1]),
                f"inputs {tuple(bank.shape)} and targets {tuple(targets.shape)} disagree on the number of rows")
    else:
        raise ValueError("data must be a list of names, encoded rows (N, T+1), or a pair (inputs, targets)")
    if per_member:
        require(bank.shape[0] == n, f"per-member data has {bank.shape[0]} members, the population {n}")
        table = torch.arange(n)
    else:
        bank, targets, table = bank[None], None if targets is None else targets[None], torch.zeros(n, dtype=torch.long)
    require(bank.shape[1] > 0, "data has no rows")
    device = pop.device
    return bank.to(device), None if targets is None else targets.to(device), table.to(device)


def train(pop: Population, data, steps: int = 100, batch_size: int | None = 32, *, lr=_UNSET, betas=_UNSET,
          eps=_UNSET, weight_decay=_UNSET, generator: torch.Generator | None = None, engine: Engine | None = None,
          loss=None, per_member: bool = False, config: TrainConfig | None = None) -> torch.Tensor:
    """Train every member in place, ``steps`` Adam steps each; returns the losses (steps, P).

    ``data``: a list of names, encoded rows (N, T+1) from ``data.docs_to_tensor``, or a pair
    ``(inputs, targets)`` of tensors (N, ...); with ``per_member`` a leading member axis (P, N, ...).
    Every step each member trains on ``batch_size`` rows drawn uniformly with ``generator`` (the
    draw is made once, up front, so every engine sees the same batches); ``batch_size=None``: every
    row at every step (full batch). ``lr``, ``betas`` (beta1, beta2), ``eps``, ``weight_decay``
    (decoupled, AdamW-style): floats, or [P] tensors of per-member values (defaults: 1e-2, (0.9, 0.99),
    1e-8, 0). ``loss``: (outputs, targets) -> [P]; None: next-token cross-entropy. ``engine``: how
    steps execute (default eager). ``config``: a TrainConfig instead of steps, batch size and the
    hyperparameters.
    """
    given = {k: v for k, v in (("lr", lr), ("betas", betas), ("eps", eps), ("weight_decay", weight_decay))
             if v is not _UNSET}
    if config is not None:
        if given:
            raise ValueError(f"give either config= or {', '.join(given)}, not both")
        steps, batch_size = config.steps, config.batch_size
        given = {"lr": config.lr, "betas": (config.beta1, config.beta2), "eps": config.eps,
                 "weight_decay": config.weight_decay}
    if generator is None and batch_size is not None:
        raise ValueError("train needs an explicit torch.Generator (randomness is never global)")
    require(isinstance(steps, int) and steps >= 0, f"steps must be an int >= 0, got {steps!r}")
    require(batch_size is None or (isinstance(batch_size, int) and batch_size >= 1),
            f"batch_size must be an int >= 1 or None (full batch), got {batch_size!r}")
    hp = hyper(pop, **(DEFAULTS | given))
    bank, targets, table = _table(data, pop, per_member)
    n_rows = bank.shape[1]
    if batch_size is None:
        rows = torch.arange(n_rows, device=pop.device).expand(steps, len(pop), n_rows)  # a view: no copies
    else:
        rows = sample_indices(n_rows, steps, len(pop), batch_size, generator).to(pop.device)
    return (engine or Engine("eager")).run(pop, Batches(bank, table, rows, targets=targets), hp, loss)
