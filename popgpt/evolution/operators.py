"""Fitness, selection, crossover and mutation as index / where ops over stacked tensors.

Each operator is a pure function of (tensors, generator) -> tensors; no
per-member Python loop and no state_dict copies. The loop that composes
them with training and evaluation lives in ``generation.py``; ``Operators``
is what it calls, the source experiment's rules unless a user passes others
to ``evolve`` (each a plain function with the default's signature).
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from ..population import AdamState, Population
from .config import EvolutionConfig


def selection_fitness(quality: torch.Tensor, vulnerable: torch.Tensor, penalty: float) -> torch.Tensor:
    """Quality with vulnerable members' multiplied by ``penalty`` (used for ranking only).

    Written as ``q - (1 - penalty) * |q|``: the same as ``q * penalty`` for
    q >= 0, and still a penalty when a member is worse than uniform (q < 0).
    A diverged member (non-finite quality) gets -inf: it ranks last.
    """
    fitness = torch.where(vulnerable, quality - (1 - penalty) * quality.abs(), quality)
    return torch.where(torch.isfinite(quality), fitness, -torch.inf)


def source_fitness(metrics: dict, penalty: torch.Tensor) -> torch.Tensor:
    """The source experiment's fitness: clean quality, a vulnerable member's multiplied by its
    condition's ``penalty`` [P]. ``metrics``: the generation's [P] tensors (``evaluate_members``:
    nll, quality, vulnerable, hits, payload_prob, diverged, and retest_vulnerable when retested)."""
    return selection_fitness(metrics["quality"], metrics["vulnerable"], penalty)


def select(fitness: torch.Tensor, n_survivors: int, replicates: int = 1) -> torch.Tensor:
    """Indices of the ``n_survivors`` fittest members of each replicate, best first.

    ``fitness`` is [R*P], replicate-major; selection never crosses replicates.
    Returns [R*S] population indices, replicate by replicate. Ties: lower
    index first. A NaN fitness (a diverged member) ranks last, never first.
    """
    ranked = torch.nan_to_num(fitness, nan=-torch.inf).view(replicates, -1)  # (R, P)
    local = torch.sort(ranked, descending=True, stable=True).indices[:, :n_survivors]  # (R, S)
    offsets = torch.arange(replicates, device=fitness.device)[:, None] * ranked.shape[1]
    return (local + offsets).flatten()


def pick_parents(survivors: torch.Tensor, n_children: int, generator: torch.Generator,
                 replicates: int = 1, distinct: bool = False) -> torch.Tensor:
    """Random survivor pairs (R*n_children, 2), each pair from its own replicate's survivors.

    ``survivors``: [R*S] population indices as ``select`` returns them. A
    pair may repeat a parent unless ``distinct`` (then the second parent is
    uniform over the other survivors; one survivor alone still pairs with itself).
    """
    surv = survivors.view(replicates, -1)  # (R, S)
    S, device = surv.shape[1], generator.device
    if distinct and S > 1:  # second = first + 1 + uniform{0..S-2} (mod S): uniform over the others
        first = torch.randint(S, (replicates, n_children), generator=generator, device=device)
        offset = torch.randint(S - 1, (replicates, n_children), generator=generator, device=device)
        pick = torch.stack([first, (first + 1 + offset) % S], -1).to(survivors.device)
    else:
        pick = torch.randint(S, (replicates, n_children, 2), generator=generator, device=device).to(survivors.device)
    return torch.gather(surv[:, :, None].expand(-1, -1, 2), 1, pick).view(-1, 2)


def _per_child(value, like: torch.Tensor):
    """A float, or a [C] tensor viewed to broadcast against ``like`` (C, ...)."""
    if isinstance(value, torch.Tensor):
        return value.to(like.device).view((-1,) + (1,) * (like.dim() - 1))
    return value


def crossover(params: dict, parents: torch.Tensor, p_first, generator: torch.Generator, rows=slice(None)):
    """Children whose every tensor is taken whole from one of their two parents.

    ``p_first``: a float, or one probability per child [C]. ``rows``: the
    children to make (a slice of the C); the draws are made for all C, so
    a slice equals the same rows of the whole. Returns (child params
    {name: (C', ...)}, from_first (C', n_tensors) bool).
    """
    n_children = parents.shape[0]
    draws = torch.rand(n_children, len(params), generator=generator, device=generator.device).to(parents.device)
    from_first = (draws < _per_child(p_first, draws))[rows]
    parents = parents[rows]
    children = {}
    for j, (name, value) in enumerate(params.items()):
        pick = torch.where(from_first[:, j], parents[:, 0], parents[:, 1])  # (C',)
        children[name] = value[pick]
    return children, from_first


def mutate(params: dict, rate, std, generator: torch.Generator, rows=slice(None),
           n_children: int | None = None) -> dict:
    """Add N(0, std^2) noise to each weight independently with probability ``rate``
    (each a float, or one value per child [C]).

    ``params`` are children ``rows`` of ``n_children`` (default: all of
    them): the noise is drawn for all ``n_children`` and these rows used."""
    out = {}
    for name, value in params.items():
        shape = (n_children or value.shape[0],) + value.shape[1:]  # (C, ...)
        draws = torch.rand(shape, generator=generator, device=generator.device)
        hit = (draws < _per_child(rate, draws))[rows]
        noise = (torch.randn(shape, generator=generator, device=generator.device) * _per_child(std, draws))[rows]
        out[name] = value + (noise * hit).to(value.device)
    return out


def child_rates(cfg: EvolutionConfig, groups: int, rates: dict | None = None) -> dict:
    """crossover_p, mutation_rate and mutation_std per child [R*C] (``rates``: [R] per group), or cfg's floats."""
    C = cfg.pop_size - cfg.n_survivors
    return {k: rates[k].repeat_interleave(C) if rates and k in rates else getattr(cfg, k)
            for k in ("crossover_p", "mutation_rate", "mutation_std")}


def breed(model, params: dict, parents: torch.Tensor, rates: dict, generator: torch.Generator,
          rows=slice(None), crossover_fn=crossover, mutate_fn=mutate) -> Population:
    """Crossover children of ``parents`` (C, 2) (indices into ``params``), mutated, with fresh Adam state.

    ``model``: the architecture (a ModelConfig or a population's base). ``rows``: the children to make;
    every draw is made for all C children, so the rows of a slice equal those of the whole (a shard
    breeds its own)."""
    child_params, _ = crossover_fn(params, parents, rates["crossover_p"], generator, rows)
    child_params = mutate_fn(child_params, rates["mutation_rate"], rates["mutation_std"], generator, rows,
                             parents.shape[0])
    return Population(model, child_params, AdamState.zeros_like(child_params))


@dataclass(frozen=True)
class Operators:
    """The evolution loop's pluggable parts; each default is the source experiment's rule.

    A replacement keeps its default's signature. ``fitness`` sees the members
    this process holds (all of them, unless a run is sharded over torchrun
    ranks: then a fitness that compares members, such as a rank or a z-score,
    makes a sharded run differ from one process). Randomness comes only from
    the generator passed in, drawn for the whole population (so shards agree).
    """

    fitness: Callable = source_fitness  # (metrics {name: [P]}, penalty [P]) -> fitness [P]
    select: Callable = select  # (fitness [G*P], n_survivors, groups) -> survivors [G*S], best first
    pick_parents: Callable = pick_parents  # (survivors, n_children, generator, groups, distinct) -> (G*C, 2)
    crossover: Callable = crossover  # (params, parents, p_first, generator, rows) -> (children, from_first)
    mutate: Callable = mutate  # (params, rate, std, generator, rows, n_children) -> params

    def custom(self) -> dict:
        """The operators that differ from the defaults: {field: module.qualname} (what a run records)."""
        default = Operators()
        return {f.name: f"{getattr(self, f.name).__module__}.{getattr(self, f.name).__qualname__}"
                for f in fields(self) if getattr(self, f.name) is not getattr(default, f.name)}


def parent_pairs(survivors: torch.Tensor, parents: torch.Tensor, groups: int) -> torch.Tensor:
    """(R*P, 2) parents of the next generation in ``assemble``'s order, a survivor's being itself twice."""
    self_pairs = survivors[:, None].expand(-1, 2)
    return torch.cat([self_pairs.reshape(groups, -1, 2), parents.view(groups, -1, 2)], 1).view(-1, 2)


def next_generation(pop: Population, fitness: torch.Tensor, cfg: EvolutionConfig,
                    generator: torch.Generator, groups: int | None = None, rates: dict | None = None):
    """Select survivors and breed mutated crossover children, within each group (replicate).

    ``groups`` (default ``cfg.replicates``) populations of ``cfg.pop_size``
    lie side by side; ``rates`` may give ``crossover_p``, ``mutation_rate``
    and ``mutation_std`` per group ([R] tensors) instead of ``cfg``'s.
    Returns (survivors, children, parents): survivors (R*S members) are
    bit-for-bit the selected members with their optimizer state, best first
    in each group; children (R*C) have fresh optimizer state (fine-tuning
    them is the caller's job); parents is (R*P, 2), in the order of
    ``assemble(survivors, children)``: population indices of the members each
    member of the next generation came from, a survivor's being itself twice.
    """
    R = groups or cfg.replicates
    if len(pop) != cfg.pop_size * R:
        raise ValueError(f"population has {len(pop)} members, config says "
                         f"{R} group(s) x pop_size={cfg.pop_size}")
    C = cfg.pop_size - cfg.n_survivors
    survivors = select(fitness, cfg.n_survivors, R)  # (R*S,)
    parents = pick_parents(survivors, C, generator, R, cfg.distinct_parents)  # (R*C, 2)
    children = breed(pop.base, pop.params, parents, child_rates(cfg, R, rates), generator)
    return pop[survivors], children, parent_pairs(survivors, parents, R)


def assemble(survivors: Population, children: Population, replicates: int = 1) -> Population:
    """The next generation, replicate-major: each replicate's survivors, then its children."""
    S, C = len(survivors) // replicates, len(children) // replicates
    both = Population.cat([survivors, children])
    arange = functools.partial(torch.arange, device=both.device)
    order = torch.cat([arange(replicates * S).view(replicates, S),
                       replicates * S + arange(replicates * C).view(replicates, C)], 1).flatten()
    return both if replicates == 1 else both[order]
