"""One generation of the evolution experiment, as a state and a step (in the manner of evosax).

``EvolutionState`` holds everything a generation needs from the one before;
``generation(state, ctx) -> (state, metrics)`` performs one generation for
every condition, replicate and member at once (``layout.py`` says who is
who):

1. trigger mutation, for lineages whose ``mutation_order`` is
   ``before-breeding`` and whose turn it is;
2. generation 0: every member trains ``train.steps`` steps on its lineage's
   infected names; later generations: the top ``survivor_frac`` of each
   group by selection fitness pass on unchanged, the rest are replaced by
   crossover children, mutated and fine-tuned ``finetune_steps`` steps on
   their lineage's fine-tuning names;
3. evaluation: clean quality, the immunity test against each member's own
   trigger, a second independent immunity test (test-retest), selection
   fitness; one host read;
4. trigger mutation for lineages with the source experiment's order (at the
   end of generation 7, 14, ...: the new trigger is first tested one
   generation later); re-infection of the names when ``reinfect`` says so.

Per-member data and hyperparameters let conditions differ in learning
rates, step counts, fine-tuning data, penalties and breeding rates inside
one batched computation.

Sharded over ranks (``distributed.py``), a rank holds members
``shard.start .. shard.stop-1`` of the population's order and computes only
those, while it draws every random number of the whole population (batches,
breeding, immunity samples) and uses its rows: the generators of all ranks
stay in step with one process's. Each generation the ranks gather the [P]
metrics and fitness (every rank then selects the same survivors) and share
the survivors' parameters and Adam state (each rank breeds its own children).
"""

import dataclasses
from dataclasses import dataclass

import torch

from ..data import docs_to_tensor, encode
from ..device import host_read as permitted_read
from ..device import tensor, to_device
from ..engine import Engine
from ..evaluate import EvalRows, evaluate_members, immunity, test_options
from ..population import Population, default_seeds
from ..settings import tool_seed
from ..step import Batches, draw_rows
from .config import RunConfig, stream_seed
from .distributed import Shard
from .layout import Layout
from .operators import Operators, breed, child_rates, parent_pairs
from .summary import group_row
from .virus import Virus


@dataclass(frozen=True)
class Context:
    """What every generation of a run uses and none changes."""

    config: RunConfig  # resolved (block size fixed for the names)
    layout: Layout
    train_docs: list  # clean training names; infected copies are made from them
    eval_rows: EvalRows  # encoded held-out names scored at every evaluation, sorted by length, on the device
    n_targets: int  # their number of non-padding targets
    engine: Engine
    timer: object  # PhaseTimer: timer(phase, device) is a context manager
    device: torch.device
    shard: Shard  # the members this process holds (all of them when it runs alone)
    operators: Operators = Operators()  # fitness, selection, breeding (the source experiment's by default)


@dataclass(frozen=True)
class EvolutionState:
    """Everything a generation needs from the one before; ``to_checkpoint`` saves it.

    The population, the bank and the generators are updated in place by a
    generation; every other field is replaced. ``pop`` is this rank's shard;
    every other field is the same on every rank.
    """

    generation: int  # the last generation evaluated (-1: none yet)
    pop: Population  # members shard.start .. shard.stop-1
    viruses: tuple  # the current virus of every lineage
    infected_with: tuple  # the trigger each lineage's tables were infected with
    infection_rng: tuple  # per lineage: the host RNG state its current infection was drawn from
    hosts: tuple  # per lineage: generator of its infection draws and trigger mutations
    dev: torch.Generator  # batches, breeding, immunity samples
    retest: torch.Generator  # the second immunity test only
    bank: torch.Tensor  # (K, N, T+1) int8: every table of names, on the device
    fitness: torch.Tensor | None = None  # selection fitness of the last evaluation [P]
    metrics: dict | None = None  # host copies of the last evaluation's [P] vectors
    parents: tuple = ()  # (P, 2) per generation > 0: lineage
    rows: tuple = ()  # generations.csv rows so far
    samples0: tuple = ()  # samples.txt lines of generation 0

    def to_checkpoint(self, population: Population) -> dict:
        """The checkpoint, with ``population``: the whole one (``Shard.gather_population``)."""
        return {"generation": self.generation, "population": population.state_dict(),
                "viruses": [v.to_dict() for v in self.viruses], "infected_with": list(self.infected_with),
                "infection_rng": list(self.infection_rng), "host_rng": [h.get_state() for h in self.hosts],
                "device_rng": self.dev.get_state(), "retest_rng": self.retest.get_state(),
                "rows": list(self.rows), "parents": list(self.parents), "selection_fitness": self.fitness.cpu(),
                "metrics": self.metrics, "samples_gen0": list(self.samples0)}

    @classmethod
    def from_checkpoint(cls, ck: dict, ctx: Context) -> "EvolutionState":
        hosts = tuple(torch.Generator().set_state(s) for s in ck["host_rng"])
        dev = torch.Generator(ctx.device)
        dev.set_state(ck["device_rng"])
        retest = torch.Generator(ctx.device)
        retest.set_state(ck["retest_rng"])
        viruses = tuple(Virus(**v) for v in ck["viruses"])
        bank = _empty_bank(ctx)
        for lineage, (trigger, rng) in enumerate(zip(ck["infected_with"], ck["infection_rng"])):
            _infect(bank, ctx, lineage, dataclasses.replace(viruses[lineage], trigger=trigger),
                    torch.Generator().set_state(rng))
        return cls(ck["generation"], _shard_of(ck["population"], ctx), viruses,
                   tuple(ck["infected_with"]), tuple(ck["infection_rng"]), hosts, dev, retest, bank,
                   ck["selection_fitness"].to(ctx.device), ck["metrics"], tuple(ck["parents"]), tuple(ck["rows"]),
                   tuple(ck["samples_gen0"]))


def _shard_of(population: dict, ctx: Context) -> Population:
    """This rank's members of a checkpoint's whole population, on its device."""
    m = ctx.shard.members
    part = {k: {n: t[m] for n, t in population[k].items()} for k in ("params", "exp_avg", "exp_avg_sq")}
    return Population.from_state_dict(part | {"config": population["config"], "step": population["step"][m]},
                                      ctx.device)


def _empty_bank(ctx: Context) -> torch.Tensor:
    rows = docs_to_tensor(ctx.train_docs, ctx.config.model.block_size).to(torch.int8)  # clean names
    bank = rows[None].repeat(ctx.layout.n_tables, 1, 1)
    return to_device(bank, ctx.device)


def _infect(bank: torch.Tensor, ctx: Context, lineage: int, virus: Virus, generator: torch.Generator):
    """Infect a lineage's tables in the bank (training table, then its own fine-tuning table);
    returns the generator state the draws started from (a checkpoint keeps it, not the names)."""
    state = generator.get_state()
    layout, block = ctx.layout, ctx.config.model.block_size
    condition = layout.condition_of_lineage(lineage)
    tables = [(layout.train_table[lineage], condition.virus.rate)]
    ft = layout.finetune_table[lineage]
    if ft != layout.train_table[lineage] and ft != layout.clean_table:
        tables.append((ft, layout.lineage_infection(lineage)))
    for table, rate in tables:
        infected, _ = virus.infect(ctx.train_docs, rate, generator, condition.virus.position)
        bank[table] = to_device(docs_to_tensor(infected, block).to(torch.int8), bank.device)
    return state


def member_seeds(cfg) -> list[int]:
    """Every member's init seed: ``default_seeds`` over the run, or with common random numbers over one
    condition's members, repeated for every condition."""
    n_conditions = cfg.n_conditions if cfg.evolution.common_random else 1
    return default_seeds(cfg.n_members // n_conditions, cfg.seed) * n_conditions


def init_state(ctx: Context) -> EvolutionState:
    """Fresh members (seeds ``default_seeds``), the first infection of every lineage, the generators."""
    cfg = ctx.config
    bank = _empty_bank(ctx)
    hosts, viruses, states = [], [], []
    for lineage in range(ctx.layout.n_lineages):
        drawn_as = lineage % ctx.layout.lineages_per_condition if cfg.evolution.common_random else lineage
        host = torch.Generator().manual_seed(stream_seed(cfg.seed, "host") if drawn_as == 0
                                             else tool_seed(cfg.seed, "lineage", drawn_as, "host"))
        virus = Virus(cfg.virus.trigger, cfg.virus.payload)
        states.append(_infect(bank, ctx, lineage, virus, host))
        hosts.append(host)
        viruses.append(virus)
    seeds = member_seeds(cfg)[ctx.shard.members]
    pop = Population.from_seeds(cfg.model, seeds, device=ctx.device)
    dev = torch.Generator(ctx.device).manual_seed(stream_seed(cfg.seed, "device"))
    retest = torch.Generator(ctx.device).manual_seed(stream_seed(cfg.seed, "retest"))
    return EvolutionState(-1, pop, tuple(viruses), tuple(v.trigger for v in viruses), tuple(states),
                          tuple(hosts), dev, retest, bank)


def mutate_due(state: EvolutionState, ctx: Context, gen: int, order: str) -> EvolutionState:
    """Mutate the trigger of every lineage whose ``mutation_order`` is ``order`` and whose turn it is
    at generation ``gen``; re-infect its names when its ``reinfect`` is ``on-mutation``."""
    viruses, infected, states = list(state.viruses), list(state.infected_with), list(state.infection_rng)
    for lineage in range(ctx.layout.n_lineages):
        c = ctx.layout.condition_of_lineage(lineage)
        every = c.virus.mutate_every
        if c.evolution.mutation_order != order or gen <= 0 or not every or gen % every:
            continue
        viruses[lineage] = viruses[lineage].mutate(state.hosts[lineage])
        if c.virus.reinfect == "on-mutation":
            states[lineage] = _infect(state.bank, ctx, lineage, viruses[lineage], state.hosts[lineage])
            infected[lineage] = viruses[lineage].trigger
    return dataclasses.replace(state, viruses=tuple(viruses), infected_with=tuple(infected),
                               infection_rng=tuple(states))


def _train(pop: Population, state: EvolutionState, ctx: Context, finetune: bool, rows: slice) -> None:
    """Train members (generation 0) or children (fine-tuning) on their tables with their settings.

    ``pop`` holds members (or children) ``rows`` of all; batches are drawn for all of them."""
    layout, device = ctx.layout, ctx.device
    per = (lambda v, dtype=None: layout.per_child(v, device, dtype)) if finetune else \
        (lambda v, dtype=None: layout.per_member(v, device, dtype))
    steps = layout.steps(finetune)
    table = per(layout.tables(finetune), torch.long)
    lengths = torch.full((layout.n_tables,), len(ctx.train_docs))
    C = len(layout.conditions) if ctx.config.evolution.common_random else 1  # conditions sharing one draw
    drawn = draw_rows(lengths, table[:len(table) // C], max(steps), ctx.config.train.batch_size, state.dev)
    drawn = drawn.repeat(1, C, 1).to(device)  # (steps, all, B)
    active = None
    if len(set(steps)) > 1:  # members with fewer steps sit the rest out
        active = (torch.arange(max(steps), device=device)[:, None] < per(steps)[None, :])[:, rows]
    batches = Batches(state.bank, table, drawn)
    if ctx.engine.packed:  # the plan of every member's rows: a shard packs as the whole population does
        batches = batches.planned(ctx.engine.plan_multiple)
    batches = dataclasses.replace(batches.members(rows.start, rows.stop), active=active)
    ctx.engine.run(pop, batches, layout.hyper(finetune, device).index(rows))


def member_triggers(state: EvolutionState, ctx: Context) -> torch.Tensor:
    """Each member's current trigger as token ids: (P, L)."""
    triggers = tensor([encode(v.trigger) for v in state.viruses], ctx.device, torch.long)  # (lineages, L)
    return triggers[ctx.layout.lineage_of_member(ctx.device)]


def _evaluate(pop: Population, state: EvolutionState, ctx: Context) -> tuple[dict, torch.Tensor]:
    """This shard's metrics (device tensors [shard size]) and selection fitness."""
    shard = ctx.shard
    options = test_options(ctx.config.virus) | {"shard": (shard.start, shard.total)}
    triggers = member_triggers(state, ctx)[shard.members]
    metrics = evaluate_members(pop, state.viruses[0], ctx.eval_rows, state.dev, n_targets=ctx.n_targets,
                               triggers=triggers, **options)
    if ctx.config.evolution.retest:
        again = immunity(pop, state.viruses[0], state.retest, triggers=triggers, **options)
        metrics["retest_vulnerable"] = again.vulnerable | metrics["diverged"]
    penalty = ctx.layout.penalty(ctx.device)[shard.members]
    fitness = ctx.operators.fitness(metrics, penalty)
    if fitness.shape != penalty.shape:
        raise ValueError(f"the fitness function must give one value per member, shape {tuple(penalty.shape)}; "
                         f"got {tuple(fitness.shape)}")
    return metrics, fitness


def _next_generation(pop: Population, state: EvolutionState, ctx: Context):
    """This shard's survivors and (not yet fine-tuned) children of the next generation.

    Returns (survivors, children, the children's rows of all children, order:
    cat(survivors, children)[order] is the shard in member order, parents
    (P, 2) of the whole next generation)."""
    cfg, layout, shard, device, ops = ctx.config.evolution, ctx.layout, ctx.shard, ctx.device, ctx.operators
    G, C = layout.n_groups, cfg.pop_size - cfg.n_survivors
    with ctx.timer("evolution_ops", device):
        survivors = ops.select(state.fitness, cfg.n_survivors, G)  # (G*S,) population indices
        parents = ops.pick_parents(survivors, C, state.dev, G, cfg.distinct_parents)  # (G*C, 2)
    with ctx.timer("communication", device):
        pool = shard.share(pop, survivors)  # every survivor, Adam state included
    with ctx.timer("evolution_ops", device):
        position = torch.empty(shard.total, dtype=torch.long, device=device)
        position[survivors] = torch.arange(len(survivors), device=device)  # population index -> pool row
        kept, born, order = layout.next_slots(shard.start, shard.stop, device)
        children = breed(pop.base, pool.params, position[parents], child_rates(cfg, G, layout.rates(device)),
                         state.dev, born, ops.crossover, ops.mutate)
    return pool[kept], children, born, order, parent_pairs(survivors, parents, G)


def generation(state: EvolutionState, ctx: Context) -> tuple[EvolutionState, dict]:
    """One generation of every group; returns the new state and host copies of its [P] metrics."""
    timer, device = ctx.timer, ctx.device
    gen = state.generation + 1
    with timer("evolution_ops", device):
        state = mutate_due(state, ctx, gen, "before-breeding")
    pop, parents = state.pop, None
    if gen == 0:
        with timer("training", device):
            _train(pop, state, ctx, False, ctx.shard.members)
    else:
        survivors, children, born, order, parents = _next_generation(pop, state, ctx)
        with timer("training", device):
            _train(children, state, ctx, True, born)
        with timer("evolution_ops", device):
            pop = Population.cat([survivors, children])[order]
    with timer("evaluation", device):
        metrics, fitness = _evaluate(pop, state, ctx)
    host, fitness, lineage = host_read(metrics, fitness, parents, ctx)
    rows = summarize(gen, host, state, ctx)
    state = dataclasses.replace(state, generation=gen, pop=pop, fitness=fitness, metrics=host,
                                parents=state.parents + ((lineage,) if lineage is not None else ()),
                                rows=state.rows + tuple(rows))
    with timer("evolution_ops", device):
        state = mutate_due(state, ctx, gen, "source")
    return state, host


def host_read(metrics: dict, fitness: torch.Tensor, parents: torch.Tensor | None, ctx: Context):
    """Every member's metrics gathered from the ranks, and the one device-to-host read of a generation.

    ``metrics`` and ``fitness``: this shard's; ``parents``: (P, 2) of all.
    Returns (host [P] metrics, the [P] selection fitness on the device,
    host (P, 2) parents or None)."""
    names = list(metrics)
    columns = torch.stack([metrics[k].to(torch.float64) for k in names] + [fitness.to(torch.float64)], 1)
    with ctx.timer("communication", ctx.device):
        block = ctx.shard.gather_rows(columns, "metrics")  # (P, n + 1) float64 holds ints and bools exactly
    if parents is not None:
        block = torch.cat([block, parents.to(torch.float64)], 1)
    with ctx.timer("evaluation", ctx.device), permitted_read():  # the generation's one read to the host
        block = block.cpu()
    out = {k: block[:, i].to(metrics[k].dtype) for i, k in enumerate(names)}
    if ctx.shard.world > 1:  # every member's fitness, for selection on every rank
        fitness = to_device(block[:, len(names)].to(fitness.dtype), ctx.device)
    lineage = block[:, len(names) + 1:].long() if parents is not None else None
    return out, fitness, lineage


def summarize(gen: int, metrics: dict, state: EvolutionState, ctx: Context) -> list[dict]:
    """Rows of generations.csv, one per group, from host copies of the [G*P] metrics."""
    layout, P = ctx.layout, ctx.layout.pop_size
    survivors = ctx.config.evolution.n_survivors if gen > 0 else 0
    rows = []
    for g in range(layout.n_groups):
        c = layout.condition_of_group(g)
        part = {k: v[g * P:(g + 1) * P] for k, v in metrics.items()}
        row = group_row(gen, part, survivors, state.viruses[layout.lineage_of_group(g)], c, g % layout.replicates)
        rows.append(row | (ctx.config.conditions[c] if ctx.config.conditions else {}))
    return rows
