"""Selection, crossover and mutation as index / where ops over stacked tensors.

Each operator is a pure function of (tensors, generator) -> tensors; no
per-member Python loop and no state_dict copies. The loop that composes
them with training and evaluation lives in ``experiment.py``.
"""

from dataclasses import dataclass

import torch

from .population import AdamState, Population


@dataclass(frozen=True)
class EvolutionConfig:
    """The evolutionary loop (DESIGN.md's definitions are the defaults)."""

    pop_size: int = 200  # members P
    generations: int = 20  # evolution steps after generation 0
    survivor_frac: float = 0.2  # top fraction kept unchanged
    crossover_p: float = 0.5  # probability a tensor comes from the first parent
    mutation_rate: float = 0.01  # probability each child weight is perturbed
    mutation_std: float = 0.02  # std of the N(0, std^2) perturbation
    vulnerable_penalty: float = 0.3  # selection multiplies a vulnerable member's fitness by this
    finetune_steps: int = 100  # training steps for every child, on the current infected data

    def __post_init__(self):
        if self.pop_size < 2:
            raise ValueError(f"pop_size must be >= 2, got {self.pop_size}")
        if self.generations < 0:
            raise ValueError(f"generations must be >= 0, got {self.generations}")
        for name in ("survivor_frac", "crossover_p", "mutation_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 1 <= self.n_survivors < self.pop_size:
            raise ValueError(f"survivor_frac={self.survivor_frac} keeps {self.n_survivors} of "
                             f"{self.pop_size}; need at least 1 survivor and 1 child")
        if self.mutation_std < 0 or self.finetune_steps < 0:
            raise ValueError("mutation_std and finetune_steps must be >= 0")

    @property
    def n_survivors(self) -> int:
        return int(round(self.pop_size * self.survivor_frac))


def selection_fitness(quality: torch.Tensor, vulnerable: torch.Tensor, penalty: float) -> torch.Tensor:
    """Quality with vulnerable members' multiplied by ``penalty`` (used for ranking only).

    Written as ``q - (1 - penalty) * |q|``: the same as ``q * penalty`` for
    q >= 0, and still a penalty when a member is worse than uniform (q < 0).
    """
    return torch.where(vulnerable, quality - (1 - penalty) * quality.abs(), quality)


def select(fitness: torch.Tensor, n_survivors: int) -> torch.Tensor:
    """Indices of the ``n_survivors`` fittest members, best first (ties: lower index first).

    A NaN fitness (a diverged member) ranks last, never first.
    """
    ranked = torch.nan_to_num(fitness, nan=-torch.inf)
    return torch.sort(ranked, descending=True, stable=True).indices[:n_survivors]


def pick_parents(survivors: torch.Tensor, n_children: int, generator: torch.Generator) -> torch.Tensor:
    """Random survivor pairs (n_children, 2) as population indices; a pair may repeat a parent."""
    pick = torch.randint(len(survivors), (n_children, 2), generator=generator, device=generator.device)
    return survivors[pick.to(survivors.device)]


def crossover(params: dict, parents: torch.Tensor, p_first: float, generator: torch.Generator):
    """Children whose every tensor is taken whole from one of their two parents.

    Returns (child params {name: (C, ...)}, from_first (C, n_tensors) bool).
    """
    n_children = parents.shape[0]
    from_first = torch.rand(n_children, len(params), generator=generator,
                            device=generator.device).to(parents.device) < p_first
    children = {}
    for j, (name, value) in enumerate(params.items()):
        pick = torch.where(from_first[:, j], parents[:, 0], parents[:, 1])  # (C,)
        children[name] = value[pick]
    return children, from_first


def mutate(params: dict, rate: float, std: float, generator: torch.Generator) -> dict:
    """Add N(0, std^2) noise to each weight independently with probability ``rate``."""
    out = {}
    for name, value in params.items():
        hit = torch.rand(value.shape, generator=generator, device=generator.device) < rate
        noise = torch.randn(value.shape, generator=generator, device=generator.device) * std
        out[name] = value + (noise * hit).to(value.device)
    return out


def next_generation(pop: Population, fitness: torch.Tensor, cfg: EvolutionConfig,
                    generator: torch.Generator):
    """Select survivors and breed mutated crossover children.

    Returns (survivors, children, parents): survivors are bit-for-bit the
    selected members with their optimizer state, best first; children have
    fresh optimizer state (fine-tuning them is the caller's job); parents is
    (P, 2) population indices of the members the next population came from,
    a survivor's parents being itself twice.
    """
    if len(pop) != cfg.pop_size:
        raise ValueError(f"population has {len(pop)} members, config says pop_size={cfg.pop_size}")
    survivors = select(fitness, cfg.n_survivors)  # (S,)
    parents = pick_parents(survivors, cfg.pop_size - cfg.n_survivors, generator)  # (C, 2)
    child_params, _ = crossover(pop.params, parents, cfg.crossover_p, generator)
    child_params = mutate(child_params, cfg.mutation_rate, cfg.mutation_std, generator)
    children = Population(pop.config, child_params, AdamState.zeros_like(child_params))
    all_parents = torch.cat([survivors[:, None].expand(-1, 2), parents])  # (P, 2)
    return pop[survivors], children, all_parents
