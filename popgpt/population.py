"""A population of models as one dict of stacked ``[P, ...]`` tensors.

Member ``i`` is ``{name: params[name][i]}``. The forward runs every member at
once with ``torch.vmap`` over ``torch.func.functional_call`` on a base module
that lives on the ``meta`` device (it holds shapes, never data), as in
PyTorch's model-ensembling tutorial. Any small ``nn.Module`` can be stacked
(``from_modules``, ``from_factory``); MicroGPT is the default
(``from_seeds``). Optimizer state (Adam moments and a per-member step count)
is stacked the same way, so indexing a population carries both. Buffers, if
the module has any, are stacked too and never trained.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.func import functional_call, stack_module_state

from .device import to_device
from .model import MicroGPT, ModelConfig, legacy_names


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

    def slice(self, start: int, stop: int) -> "AdamState":
        return AdamState({k: v[start:stop] for k, v in self.exp_avg.items()},
                         {k: v[start:stop] for k, v in self.exp_avg_sq.items()}, self.step[start:stop])

    @classmethod
    def cat(cls, states: list["AdamState"]) -> "AdamState":
        names = states[0].exp_avg
        return cls({k: torch.cat([s.exp_avg[k] for s in states]) for k in names},
                   {k: torch.cat([s.exp_avg_sq[k] for s in states]) for k in names},
                   torch.cat([s.step for s in states]))


def population_forward(base: nn.Module, params: dict, inputs: tuple, in_dims, kwargs: dict | None = None):
    """vmap of ``functional_call(base, member_params, inputs, kwargs)`` over the population axis."""
    def one(member_params, *member_inputs):
        return functional_call(base, member_params, member_inputs, kwargs or {})

    return torch.vmap(one, in_dims=(0, *in_dims))(params, *inputs)


def population_logits(base: MicroGPT, params: dict, idx: torch.Tensor, in_dims=(0, 0),
                      return_cache: bool = False, head_mask=None):
    """MicroGPT logits of every member: ``idx`` per member (P, B, T) with ``in_dims=(0, 0)`` or shared
    (B, T) with ``(0, None)``. ``head_mask`` (n_layer, H), shared by all members, scales head outputs."""
    kwargs = {"return_cache": True} if return_cache else {}
    if head_mask is not None:
        kwargs["head_mask"] = head_mask
    return population_forward(base, params, (idx,), in_dims[1:], kwargs)


def _on_meta(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure on the meta device (no data)."""
    base = copy.deepcopy(module)
    return base.to("meta")


class Population:
    """P models of one architecture; every tensor has the population axis first.

    ``model``: a ``ModelConfig`` (MicroGPTs) or any ``nn.Module`` whose
    structure every member shares (its values are not used). ``params``
    (and ``buffers``) map the module's names to ``[P, ...]`` tensors.
    """

    def __init__(self, model: ModelConfig | nn.Module, params: dict, opt: AdamState | None = None,
                 buffers: dict | None = None):
        if isinstance(model, ModelConfig):
            with torch.device("meta"):
                base = MicroGPT(model)
        elif isinstance(model, nn.Module):
            base = model if _is_meta(model) else _on_meta(model)
        else:
            raise TypeError(f"model must be a ModelConfig or an nn.Module, got {type(model).__name__}")
        expected = {k: tuple(v.shape) for k, v in base.named_parameters()}
        _check_stack("parameter", params, expected)
        self.base = base
        self.config = base.config if isinstance(base, MicroGPT) else getattr(base, "config", None)
        self.params = {k: params[k] for k in expected}  # registration order
        self.buffers = dict(buffers or {})
        _check_stack("buffer", self.buffers, {k: tuple(v.shape) for k, v in base.named_buffers()}, len(self))
        self.opt = opt if opt is not None else AdamState.zeros_like(self.params)

    def _like(self, params: dict, opt: AdamState, buffers: dict) -> "Population":
        """Another population of this architecture (the same meta base)."""
        return Population(self.base, params, opt, buffers)

    def own_base(self) -> "Population":
        """The same members (same tensors) over a copy of the meta base module: ``functional_call``
        swaps a module's parameters while it runs, so threads working side by side each need their own."""
        return Population(copy.deepcopy(self.base), self.params, self.opt, self.buffers)

    @classmethod
    def from_seeds(cls, config: ModelConfig, seeds=None, *, n: int | None = None,
                   device: str | torch.device = "cpu") -> "Population":
        """MicroGPTs: member i equals ``MicroGPT(config)`` built alone under ``torch.manual_seed(seeds[i])``."""
        if seeds is None:
            if n is None:
                raise ValueError("give seeds or n")
            seeds = default_seeds(n)
        models = [MicroGPT(config, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        params, _ = stack_module_state(models)
        return cls(config, {k: v.detach().to(device) for k, v in params.items()})

    @classmethod
    def from_modules(cls, modules: list[nn.Module], device: str | torch.device | None = None) -> "Population":
        """Stack modules of one architecture (copies: the modules are left as they are)."""
        if not modules:
            raise ValueError("from_modules needs at least one module")
        first = modules[0]
        shapes = [(k, tuple(v.shape)) for k, v in first.named_parameters()]
        for i, m in enumerate(modules[1:], 1):
            if type(m) is not type(first) or [(k, tuple(v.shape)) for k, v in m.named_parameters()] != shapes:
                raise ValueError(f"module {i} ({type(m).__name__}) does not have module 0's parameters "
                                 f"{', '.join(f'{k} {s}' for k, s in shapes)}")
        params, buffers = stack_module_state(modules)
        device = device if device is not None else next(iter(params.values())).device
        move = lambda d: {k: v.detach().to(device).clone() for k, v in d.items()}  # noqa: E731
        model = first.config if isinstance(first, MicroGPT) else first
        return cls(model, move(params), buffers=move(buffers))

    @classmethod
    def from_factory(cls, factory, seeds: list[int], device: str | torch.device = "cpu") -> "Population":
        """Member i is ``factory()`` built under ``torch.manual_seed(seeds[i])``; the global random
        state is restored afterwards (modules that initialise from it need no generator)."""
        models = []
        with torch.random.fork_rng(devices=[]):
            for s in seeds:
                torch.manual_seed(int(s))
                models.append(factory())
        return cls.from_modules(models, device)

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def __len__(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def __repr__(self) -> str:
        n = sum(v[0].numel() for v in self.params.values())
        return f"Population({len(self)} x {type(self.base).__name__}, {n:,} parameters each, {self.device})"

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
        return self._like(_index(self.params, index), self.opt.index(index), _index(self.buffers, index))

    @classmethod
    def cat(cls, pops: list["Population"]) -> "Population":
        first = pops[0]
        params = {k: torch.cat([p.params[k] for p in pops]) for k in first.params}
        buffers = {k: torch.cat([p.buffers[k] for p in pops]) for k in first.buffers}
        return first._like(params, AdamState.cat([p.opt for p in pops]), buffers)

    def view(self, start: int, stop: int) -> "Population":
        """Members start..stop-1 sharing storage with this population (updates show through)."""
        return self._like({k: v[start:stop] for k, v in self.params.items()}, self.opt.slice(start, stop),
                          {k: v[start:stop] for k, v in self.buffers.items()})

    def clone(self) -> "Population":
        return self[torch.arange(len(self), device=self.device)]

    def functional(self, params: dict | None = None) -> dict:
        """What ``functional_call`` gets: the parameters (``params`` instead, if given) and the buffers."""
        return {**(self.params if params is None else params), **self.buffers}

    def forward(self, *inputs, shared: bool = False, **kwargs):
        """Every member's output for per-member inputs (P, ...) or, with ``shared``, one input for all."""
        for x in inputs if not shared else ():
            if x.shape[0] != len(self):
                raise ValueError(f"per-member input has {x.shape[0]} members, population has {len(self)} "
                                 f"(shared=True gives every member the same input)")
        in_dims = tuple(None if shared else 0 for _ in inputs)
        return population_forward(self.base, self.functional(), inputs, in_dims, kwargs)

    __call__ = forward

    def logits(self, idx: torch.Tensor, return_cache: bool = False, head_mask=None):
        """MicroGPT logits (P, B, T, V) for per-member batches (P, B, T) or one shared batch (B, T).

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
        return population_logits(self.base, self.functional(), idx, in_dims, return_cache, head_mask)

    def member(self, i: int) -> nn.Module:
        """A standalone module holding a copy of member i's weights (and buffers)."""
        if isinstance(self.base, MicroGPT):
            with torch.device("meta"):
                model = MicroGPT(self.config)
        else:
            model = copy.deepcopy(self.base)
        model = model.to_empty(device=self.device)  # no init draws from the global RNG
        model.load_state_dict({k: v[i] for k, v in {**self.params, **self.buffers}.items()})
        return model

    def state_dict(self) -> dict:
        """Plain tensors and ints only, loadable with ``torch.load(weights_only=True)``."""
        state = {"params": self.params, "exp_avg": self.opt.exp_avg, "exp_avg_sq": self.opt.exp_avg_sq,
                 "step": self.opt.step}
        if self.buffers:
            state["buffers"] = self.buffers
        if isinstance(self.config, ModelConfig):
            state["config"] = vars(self.config).copy()
        return state

    @classmethod
    def from_state_dict(cls, state: dict, device=None, model: nn.Module | None = None) -> "Population":
        """The population a ``state_dict`` saved; ``model``: the architecture, for modules other than
        MicroGPT. MicroGPT checkpoints from before 0.2 (other parameter names) load too."""
        def move(d):
            return {k: v.to(device) for k, v in d.items()} if device is not None else dict(d)

        params, m, v = move(state["params"]), move(state["exp_avg"]), move(state["exp_avg_sq"])
        step = state["step"].to(device) if device is not None else state["step"]
        if model is None:
            if "config" not in state:
                raise ValueError("this population is not of MicroGPTs: give its architecture as model=")
            model = ModelConfig(**state["config"])
            renamed = legacy_names(params, model.n_layer)
            params, m, v = ({renamed.get(k, k): t for k, t in d.items()} for d in (params, m, v))
        return cls(model, params, AdamState(m, v, step), move(state.get("buffers", {})))


def _is_meta(module: nn.Module) -> bool:
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.device.type == "meta" for t in tensors)


def _check_stack(kind: str, tensors: dict, expected: dict, n: int | None = None) -> None:
    """Names and member shapes of stacked tensors against the module's; all of one population size."""
    if set(tensors) != set(expected):
        raise ValueError(f"{kind} names {sorted(tensors)} do not match the model's {sorted(expected)}")
    sizes = {v.shape[0] for v in tensors.values()} | ({n} if n is not None and tensors else set())
    if len(sizes) > 1:
        raise ValueError(f"{kind} tensors disagree on the population size: {sorted(sizes)}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape[1:]) != shape:
            raise ValueError(f"{name}: member shape {tuple(tensors[name].shape[1:])}, expected {shape}")
