"""How a run lays its population out: conditions x replicates x members, and who reads what.

Members are ordered condition-major: group g = c * R + r holds the P
members of replicate r of condition c, at positions g*P .. g*P+P-1.
Selection and lineage stay within a group. A *lineage* owns a virus (its
trigger mutates on its own) and the infected names drawn for it: with
``replicate_data="own"`` every group is its own lineage (replicates differ
in infection draws and trigger mutations too); with ``"shared"`` the
replicates of a condition share one.

Every lineage has a training table (the names at the condition's infection
rate: what generation 0 trains on) and a fine-tuning table for children:
the same table when ``finetune_infection`` is unset or equal to the rate
(the source experiment fine-tunes on its documents), one clean table
shared by all lineages when it is 0, its own table otherwise. Tables are
stacked into one bank (K, N, T+1) of int8 token ids on the device.
"""

from dataclasses import dataclass

import torch

from ..device import tensor
from ..step import Hyper
from .config import RunConfig, condition_configs


@dataclass(frozen=True)
class Layout:
    """Groups, lineages, tables and every per-member setting of a run."""

    config: RunConfig
    conditions: tuple  # the effective RunConfig of each condition
    train_table: tuple  # per lineage: the bank table of its training names
    finetune_table: tuple  # per lineage: the bank table its children fine-tune on
    n_tables: int
    clean_table: int | None  # the table of clean names, if a condition fine-tunes on them

    @classmethod
    def of(cls, config: RunConfig) -> "Layout":
        conditions = tuple(condition_configs(config))
        R = config.evolution.replicates
        n_lineages = len(conditions) * (1 if config.evolution.replicate_data == "shared" else R)
        train = tuple(range(n_lineages))
        finetune, clean, k = [], None, n_lineages
        for lineage in range(n_lineages):
            c = conditions[lineage * len(conditions) // n_lineages]
            f = c.evolution.finetune_infection
            if f is None or f == c.virus.rate:
                finetune.append(lineage)
            elif f == 0:
                clean = k if clean is None else clean
                k += clean == k
                finetune.append(clean)
            else:
                finetune.append(k)
                k += 1
        return cls(config, conditions, train, tuple(finetune), k, clean)

    @property
    def pop_size(self) -> int:
        return self.config.evolution.pop_size

    @property
    def replicates(self) -> int:
        return self.config.evolution.replicates

    @property
    def n_groups(self) -> int:
        return len(self.conditions) * self.replicates

    @property
    def n_lineages(self) -> int:
        return len(self.train_table)

    @property
    def lineages_per_condition(self) -> int:
        return self.n_lineages // len(self.conditions)

    def condition_of_group(self, g: int) -> int:
        return g // self.replicates

    def lineage_of_group(self, g: int) -> int:
        return g if self.n_lineages == self.n_groups else self.condition_of_group(g)

    def condition_of_lineage(self, lineage: int) -> RunConfig:
        return self.conditions[lineage * len(self.conditions) // self.n_lineages]

    def lineage_infection(self, lineage: int) -> float:
        """Infection rate of a lineage's fine-tuning table."""
        c = self.condition_of_lineage(lineage)
        f = c.evolution.finetune_infection
        return c.virus.rate if f is None else f

    def per_member(self, values: list, device, dtype=None) -> torch.Tensor:
        """One value per group, repeated for its P members: [G*P]."""
        return tensor(values, device, dtype).repeat_interleave(self.pop_size)

    def per_child(self, values: list, device, dtype=None) -> torch.Tensor:
        """One value per group, repeated for its children: [G*C]."""
        C = self.pop_size - self.config.evolution.n_survivors
        return tensor(values, device, dtype).repeat_interleave(C)

    def group_values(self, fn) -> list:
        """``fn(condition config)`` for every group."""
        return [fn(self.conditions[self.condition_of_group(g)]) for g in range(self.n_groups)]

    def lineage_of_member(self, device) -> torch.Tensor:
        return self.per_member([self.lineage_of_group(g) for g in range(self.n_groups)], device, torch.long)

    def hyper(self, finetune: bool, device) -> Hyper:
        """Adam's settings per member (generation 0) or per child (fine-tuning)."""
        def train_config(c):
            lr = c.evolution.finetune_lr if finetune and c.evolution.finetune_lr is not None else c.train.lr
            return c.train.__class__(**{**vars(c.train), "lr": lr})

        configs = self.group_values(train_config)
        repeat = self.pop_size - self.config.evolution.n_survivors if finetune else self.pop_size
        return Hyper.of([c for c in configs for _ in range(repeat)], device)

    def steps(self, finetune: bool) -> list[int]:
        """Training steps per group, generation 0's or the children's."""
        return self.group_values(lambda c: c.evolution.finetune_steps if finetune else c.train.steps)

    def tables(self, finetune: bool) -> list[int]:
        """The bank table of every group's members (training) or children (fine-tuning)."""
        table = self.finetune_table if finetune else self.train_table
        return [table[self.lineage_of_group(g)] for g in range(self.n_groups)]

    def rates(self, device) -> dict:
        """Breeding settings per group: crossover_p, mutation_rate, mutation_std ([G] tensors)."""
        return {k: tensor(self.group_values(lambda c, k=k: getattr(c.evolution, k)), device)
                for k in ("crossover_p", "mutation_rate", "mutation_std")}

    def next_slots(self, start: int, stop: int, device) -> tuple[slice, slice, torch.Tensor]:
        """Where members ``start .. stop-1`` of the next generation come from.

        The next generation holds, group by group, its S survivors then its C
        children (``evolution.assemble``). Returns (survivors, children, order):
        the slices of the R*S selected survivors and of the R*C children that
        land in the range (contiguous for a contiguous range), and ``order``
        [stop - start], which puts cat(those survivors, those children) in
        member order.
        """
        P, S = self.pop_size, self.config.evolution.n_survivors
        C = P - S

        def before(m: int) -> tuple[int, int]:  # survivors and children ahead of member m
            g, k = divmod(m, P)
            return g * S + min(k, S), g * C + max(0, k - S)

        (sa, ca), (sb, cb) = before(start), before(stop)
        m = torch.arange(start, stop, device=device)
        g, k = m // P, m % P
        order = torch.where(k < S, g * S + k - sa, (sb - sa) + g * C + k - S - ca)
        return slice(sa, sb), slice(ca, cb), order

    def penalty(self, device) -> torch.Tensor:
        """The selection penalty of every member: [G*P]."""
        return self.per_member(self.group_values(lambda c: c.evolution.vulnerable_penalty), device)
