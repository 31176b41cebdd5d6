"""A population of MicroGPTs as one dict of stacked ``[P, ...]`` tensors.

Member ``i`` is ``{name: params[name][i]}``. The forward runs every member at
once with ``torch.vmap`` over ``torch.func.functional_call`` on a base module
that lives on the ``meta`` device (it holds shapes, never data). Optimizer
state (Adam moments and a per-member step count) is stacked the same way, so
indexing a population carries both.
"""

from dataclasses import dataclass

import torch
from torch.func import functional_call, stack_module_state

from .device import to_device
from .model import MicroGPT, ModelConfig


def default_seeds(n: int, run_seed: int = 0) -> list[int]:
    """Member i of run ``run_seed`` is initialised under seed ``(run_seed*n + i)*137 + 42``.

    Run seed 0 gives the source experiment's seeds ``i*137 + 42``
    (docs/definitions.md); other run seeds give disjoint ones.
    """
    return [(run_seed * n + i) * 137 + 42 for i in range(n)]


def _index(tensors: dict, index) -> dict:
    return {k: v[index] for k, v in tensors.items()}


@dataclass
class AdamState:
    """Adam moments per parameter tensor ``[P, ...]`` and the step count of each member ``[P]``."""

    exp_avg: dict
    exp_avg_sq: dict
    step: torch.Tensor  # float32 [P]: members trained for different numbers of steps

    @classmethod
    def zeros_like(cls, params: dict) -> "AdamState":
        p0 = next(iter(params.values()))
        return cls(exp_avg={k: torch.zeros_like(v) for k, v in params.items()},
                   exp_avg_sq={k: torch.zeros_like(v) for k, v in params.items()},
                   step=torch.zeros(p0.shape[0], dtype=p0.dtype, device=p0.device))

    def index(self, index) -> "AdamState":
        return AdamState(_index(self.exp_avg, index), _index(self.exp_avg_sq, index), self.step[index])


def population_logits(base: MicroGPT, params: dict, idx: torch.Tensor, in_dims=(0, 0),
                      return_cache: bool = False, head_mask=None):
    """vmap of ``functional_call(base, member_params, (idx,))`` over the population axis.

    ``head_mask`` (n_layer, H), shared by all members, scales head outputs.
    """
    def one(member_params, x):
        return functional_call(base, member_params, (x,), {"return_cache": return_cache, "head_mask": head_mask})

    return torch.vmap(one, in_dims=in_dims)(params, idx)


class Population:
    """P MicroGPTs sharing one ``ModelConfig``; every tensor has the population axis first."""

    def __init__(self, config: ModelConfig, params: dict, opt: AdamState | None = None):
        expected = config.param_shapes()
        if set(params) != set(expected):
            raise ValueError(f"parameter names {sorted(params)} do not match the model's {sorted(expected)}")
        sizes = {v.shape[0] for v in params.values()}
        if len(sizes) != 1:
            raise ValueError(f"parameter tensors disagree on the population size: {sorted(sizes)}")
        for name, shape in expected.items():
            if tuple(params[name].shape[1:]) != shape:
                raise ValueError(f"{name}: member shape {tuple(params[name].shape[1:])}, expected {shape}")
        self.config = config
        self.params = {k: params[k] for k in expected}  # registration order
        self.opt = opt if opt is not None else AdamState.zeros_like(self.params)
        with torch.device("meta"):
            self.base = MicroGPT(config)

    @classmethod
    def from_seeds(cls, config: ModelConfig, seeds=None, *, n: int | None = None,
                   device: str | torch.device = "cpu") -> "Population":
        """Member i equals ``MicroGPT(config)`` built alone under ``torch.manual_seed(seeds[i])``."""
        if seeds is None:
            if n is None:
                raise ValueError("give seeds or n")
            seeds = default_seeds(n)
        models = [MicroGPT(config, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        params, _ = stack_module_state(models)
        return cls(config, {k: v.detach().to(device) for k, v in params.items()})

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def __len__(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def __getitem__(self, index) -> "Population":
        """Members selected by an index tensor, list or slice; parameters AND optimizer state.

        Always a copy (use ``view`` for members that share storage).
        """
        if isinstance(index, int):
            index = [index]
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        if isinstance(index, list):
            index = torch.tensor(index, dtype=torch.long)
        if isinstance(index, torch.Tensor):
            index = to_device(index, self.device)
        return Population(self.config, _index(self.params, index), self.opt.index(index))

    @classmethod
    def cat(cls, pops: list["Population"]) -> "Population":
        first = pops[0]
        params = {k: torch.cat([p.params[k] for p in pops]) for k in first.params}
        opt = AdamState({k: torch.cat([p.opt.exp_avg[k] for p in pops]) for k in first.params},
                        {k: torch.cat([p.opt.exp_avg_sq[k] for p in pops]) for k in first.params},
                        torch.cat([p.opt.step for p in pops]))
        return cls(first.config, params, opt)

    def view(self, start: int, stop: int) -> "Population":
        """Members start..stop-1 sharing storage with this population (updates show through)."""
        return Population(self.config, {k: v[start:stop] for k, v in self.params.items()},
                          AdamState({k: v[start:stop] for k, v in self.opt.exp_avg.items()},
                                    {k: v[start:stop] for k, v in self.opt.exp_avg_sq.items()},
                                    self.opt.step[start:stop]))

    def clone(self) -> "Population":
        return self[torch.arange(len(self), device=self.device)]

    def logits(self, idx: torch.Tensor, return_cache: bool = False, head_mask=None):
        """Logits (P, B, T, V) for per-member batches (P, B, T) or one shared batch (B, T).

        ``return_cache``: also the activation dict, every entry with P first.
        ``head_mask`` (n_layer, H): scales (0: ablates) heads in every member.
        """
        if idx.dim() == 3:
            if idx.shape[0] != len(self):
                raise ValueError(f"per-member batch has {idx.shape[0]} members, population has {len(self)}")
            in_dims = (0, 0)
        elif idx.dim() == 2:
            in_dims = (0, None)
        else:
            raise ValueError(f"idx must be (P, B, T) or (B, T), got shape {tuple(idx.shape)}")

        return population_logits(self.base, self.params, idx, in_dims, return_cache, head_mask)

    def member(self, i: int) -> MicroGPT:
        """A standalone ``MicroGPT`` holding a copy of member i's weights."""
        with torch.device("meta"):
            model = MicroGPT(self.config)
        model = model.to_empty(device=self.device)  # no init draws from the global RNG
        model.load_state_dict({k: v[i] for k, v in self.params.items()})
        return model

    def state_dict(self) -> dict:
        """Plain tensors and ints only, loadable with ``torch.load(weights_only=True)``."""
        return {"config": vars(self.config).copy(), "params": self.params,
                "exp_avg": self.opt.exp_avg, "exp_avg_sq": self.opt.exp_avg_sq, "step": self.opt.step}

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "Population":
        def move(d):
            return {k: v.to(device) for k, v in d.items()} if device is not None else d

        opt = AdamState(move(state["exp_avg"]), move(state["exp_avg_sq"]),
                        state["step"].to(device) if device is not None else state["step"])
        return cls(ModelConfig(**state["config"]), move(state["params"]), opt)
