"""The evolution experiment: infect, train, evaluate, select, breed, repeat.

Shaped as a state and a step, in the manner of evosax: ``EvolutionState``
holds everything a generation needs from the one before, and
``generation(state, ctx) -> (state, metrics)`` performs one generation.
``evolve`` sets up, runs the short loop and writes the run folder.

Generation 0: P fresh members trained ``train.steps`` steps on the infected
names, then evaluated. Each later generation: the top ``survivor_frac`` by
selection fitness (quality, times ``vulnerable_penalty`` if vulnerable) pass
on unchanged; the rest are replaced by crossover children, mutated and
fine-tuned ``finetune_steps`` steps on the currently infected names. Every
``mutate_every`` generations the trigger mutates and the names are infected
anew. All of it stays on the device; the host reads the [P] result vectors
once per generation.
"""

import dataclasses
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ._version import __version__
from .config import STREAMS, RunConfig, stream_seed
from .data import docs_to_tensor
from .engine import Engine, default_engine, train
from .evaluate import evaluate_members, sample_names
from .evolution import assemble, next_generation, selection_fitness
from .memory import check_fits
from .population import Population, default_seeds
from .runio import (RunError, RunLock, claim_run_folder, environment, file_sha256, format_table, is_run_folder,
                    list_checkpoints, load_checkpoint, read_json, save_checkpoint, write_atomic, write_csv,
                    write_json)
from .runs import check_resume, run_data
from .stats import summarize_replicates
from .virus import Virus


class PhaseTimer:
    """Wall seconds per phase of a run; ``sync`` makes GPU work finish inside its phase."""

    def __init__(self, sync: bool = False):
        self.sync = sync
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str, device: torch.device):
        if self.sync and device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        yield
        if self.sync and device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


@dataclass(frozen=True)
class Context:
    """What every generation of a run uses and none changes."""

    config: RunConfig  # resolved (block size fixed for the names)
    train_docs: list  # clean training names; infected copies are made from them
    eval_rows: torch.Tensor  # encoded held-out names scored at every evaluation, on the device
    n_targets: int  # their number of non-padding targets
    engine: Engine
    timer: PhaseTimer
    device: torch.device
    env: dict  # versions, device, threads, git commit
    clock: float  # perf_counter() at which the run would have started had it never been interrupted


@dataclass(frozen=True)
class EvolutionState:
    """Everything a generation needs from the one before; ``to_checkpoint`` saves it.

    The population and the two generators are updated in place by a
    generation; every other field is replaced.
    """

    generation: int  # the last generation evaluated (-1: none yet)
    pop: Population
    virus: Virus
    train_rows: torch.Tensor  # the currently infected training names, encoded, on the device
    infection_rng: torch.Tensor  # host RNG state the current infection was drawn from
    host: torch.Generator  # split, infection, trigger mutation
    dev: torch.Generator  # batches, breeding, immunity samples
    fitness: torch.Tensor | None = None  # selection fitness of the last evaluation [P]
    metrics: dict | None = None  # host copies of the last evaluation's [P] vectors
    parents: tuple = ()  # (P, 2) per generation > 0: lineage
    rows: tuple = ()  # generations.csv rows so far
    samples0: tuple = ()  # samples.txt lines of generation 0

    def to_checkpoint(self) -> dict:
        return {"generation": self.generation, "population": self.pop.state_dict(),
                "virus": self.virus.to_dict(), "infection_rng": self.infection_rng,
                "host_rng": self.host.get_state(), "device_rng": self.dev.get_state(),
                "rows": list(self.rows), "parents": list(self.parents), "selection_fitness": self.fitness.cpu(),
                "metrics": self.metrics, "samples_gen0": list(self.samples0)}

    @classmethod
    def from_checkpoint(cls, ck: dict, ctx: Context) -> "EvolutionState":
        host, dev = torch.Generator(), torch.Generator(ctx.device)
        host.set_state(ck["host_rng"])
        dev.set_state(ck["device_rng"])
        virus = Virus(**ck["virus"])
        rows, _ = infect_rows(virus, ctx, torch.Generator().set_state(ck["infection_rng"]))
        return cls(ck["generation"], Population.from_state_dict(ck["population"], ctx.device), virus, rows,
                   ck["infection_rng"], host, dev, ck["selection_fitness"].to(ctx.device), ck["metrics"],
                   tuple(ck["parents"]), tuple(ck["rows"]), tuple(ck["samples_gen0"]))


def infect_rows(virus: Virus, ctx: Context, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded infected training rows, and the generator state they were drawn from
    (a checkpoint keeps that state instead of the infected names)."""
    state = generator.get_state()
    infected, _ = virus.infect(ctx.train_docs, ctx.config.virus.rate, generator)
    return docs_to_tensor(infected, ctx.config.model.block_size).to(ctx.device), state


def init_state(ctx: Context) -> EvolutionState:
    """Fresh members (seeds ``default_seeds``), the first infection, the run's generators."""
    cfg = ctx.config
    host = torch.Generator().manual_seed(stream_seed(cfg.seed, "host"))
    virus = Virus(cfg.virus.trigger, cfg.virus.payload)
    rows, infection_rng = infect_rows(virus, ctx, host)
    pop = Population.from_seeds(cfg.model, default_seeds(cfg.n_members, cfg.seed), ctx.device)
    dev = torch.Generator(ctx.device).manual_seed(stream_seed(cfg.seed, "device"))
    return EvolutionState(-1, pop, virus, rows, infection_rng, host, dev)


def generation(state: EvolutionState, ctx: Context) -> tuple[EvolutionState, dict]:
    """One generation: (mutate the trigger) -> breed and fine-tune (or train generation 0) -> evaluate.

    Returns the new state and the host copies of its evaluation's [P] metrics.
    """
    cfg, timer, device = ctx.config, ctx.timer, ctx.device
    E, V = cfg.evolution, cfg.virus
    gen = state.generation + 1
    virus, rows, infection_rng = state.virus, state.train_rows, state.infection_rng
    if gen > 0 and V.mutate_every and gen % V.mutate_every == 0:
        with timer("evolution_ops", device):
            virus = virus.mutate(state.host)
            rows, infection_rng = infect_rows(virus, ctx, state.host)
    pop, parents = state.pop, None
    if gen == 0:
        with timer("training", device):
            train(pop, rows, config=cfg.train, generator=state.dev, engine=ctx.engine)
    else:
        with timer("evolution_ops", device):
            survivors, children, parents = next_generation(pop, state.fitness, E, state.dev)
        with timer("training", device):
            finetune = dataclasses.replace(cfg.train, steps=E.finetune_steps)
            train(children, rows, config=finetune, generator=state.dev, engine=ctx.engine)
        with timer("evolution_ops", device):
            pop = assemble(survivors, children, E.replicates)
    with timer("evaluation", device):
        metrics = evaluate_members(pop, virus, ctx.eval_rows, state.dev, V.n_samples, V.threshold, ctx.n_targets)
        fitness = selection_fitness(metrics["quality"], metrics["vulnerable"], E.vulnerable_penalty)
        host, lineage = host_read(metrics, parents)
    return dataclasses.replace(
        state, generation=gen, pop=pop, virus=virus, train_rows=rows, infection_rng=infection_rng,
        fitness=fitness, metrics=host, parents=state.parents + ((lineage,) if lineage is not None else ()),
        rows=state.rows + tuple(summarize(gen, host, virus, E.replicates))), host


def host_read(metrics: dict, parents: torch.Tensor | None):
    """The one device-to-host read of a generation: every [P] metric and the (P, 2) parents."""
    names = list(metrics)
    columns = [metrics[k].to(torch.float64) for k in names]
    if parents is not None:
        columns += [parents[:, 0].to(torch.float64), parents[:, 1].to(torch.float64)]
    block = torch.stack(columns, 1).cpu()  # (P, n) float64 holds ints and bools exactly
    out = {k: block[:, i].to(metrics[k].dtype) for i, k in enumerate(names)}
    lineage = block[:, len(names):].long() if parents is not None else None
    return out, lineage


def summarize(generation: int, metrics: dict, virus: Virus, replicates: int = 1) -> list[dict]:
    """Rows of generations.csv, one per replicate, from host copies of the [R*P] metrics."""
    size = len(metrics["quality"]) // replicates
    return [_summarize_one(generation, {k: v[r * size:(r + 1) * size] for k, v in metrics.items()}, virus, r)
            for r in range(replicates)]


def _summarize_one(generation: int, metrics: dict, virus: Virus, replicate: int) -> dict:
    """One replicate's row. Diverged members count as vulnerable (not immune) and are left out of
    every mean; ``n_diverged`` says how many."""
    q, vul = metrics["quality"], metrics["vulnerable"]
    ok = ~metrics["diverged"]

    def mean(x):
        return float(x.mean()) if len(x) else math.nan

    return {"generation": generation, "replicate": replicate, "immune_frac": mean((~vul).float()),
            "n_immune": int((~vul).sum()), "n_diverged": int((~ok).sum()), "fitness_all": mean(q[ok]),
            "fitness_immune": mean(q[~vul & ok]), "fitness_vulnerable": mean(q[vul & ok]),
            "fitness_best": float(q[ok].max()) if ok.any() else math.nan,
            "nll_mean": mean(metrics["nll"][ok]), "payload_prob_mean": mean(metrics["payload_prob"][ok]),
            "trigger": virus.trigger, "virus_generation": virus.generation}


def best_member_samples(pop: Population, metrics: dict, want_vulnerable: bool, count: int, seed: int,
                        label: str) -> list[str]:
    """Names from the highest-quality member that is vulnerable (or immune), as text lines: a
    ``# label`` line, then one name per line (an empty sample written as ``(empty)``)."""
    q = metrics["quality"].clone()
    q[(metrics["vulnerable"] != want_vulnerable) | metrics["diverged"]] = -math.inf
    if not torch.isfinite(q).any():
        return [f"# {label}: no {'vulnerable' if want_vulnerable else 'immune'} member"]
    i = int(q.argmax())
    g = torch.Generator(pop.device).manual_seed(seed)
    names = [name or "(empty)" for name in sample_names(pop[[i]], count, g)[0]]  # a blank line separates sections
    return [f"# {label}: member {i}, quality {float(metrics['quality'][i]):.4f}"] + names


def _settle(config: RunConfig) -> RunConfig:
    """The config a run records: threads fixed, the device checked."""
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"the run is set to run on {config.device}, but torch sees no CUDA device here; "
                       f"give --device cpu (resuming: with --force; later generations' numbers will differ)")
    return dataclasses.replace(config, threads=config.threads or torch.get_num_threads())


def prepare(config: RunConfig):
    """Every check a run makes before it touches its folder: the names file, the block size, the
    device, and that the run fits in memory. Returns (the run's data, the config it records)."""
    data = run_data(config)
    config = _settle(data.config)
    check_fits(config, torch.device(config.device))
    return data, config


def _start(config: RunConfig, data, run_dir: str, resume: bool, force: bool, engine: Engine | None,
           timer: PhaseTimer | None, log) -> tuple[Context, EvolutionState, dict | None]:
    """Under the run's lock: check the folder, write (or extend) config.json, make the first state.

    Returns (context, state, checkpoint it came from or None for a fresh run)."""
    saved = list_checkpoints(run_dir)
    if saved and not resume:
        raise RunError(f"{run_dir} already holds a run (generation {max(saved)} saved): "
                       f"resume it or choose another folder")
    device = torch.device(config.device)
    env = environment(device, __version__)
    data_sha = file_sha256(config.data.path)
    cfg_path = os.path.join(run_dir, "config.json")
    if saved:
        info = read_json(cfg_path)
        changes = check_resume(run_dir, info, config, data_sha, env, force)
        info.setdefault("resumes", []).append({"after_generation": max(saved), "environment": env,
                                               "forced_changes": changes, "config": config.to_dict()})
        write_json(cfg_path, info)
        for change in changes:
            log(f"warning: resuming with {change} (forced); later generations' numbers differ from an "
                f"uninterrupted run")
    else:
        write_json(cfg_path, {"config": config.to_dict(), "run_seed": config.seed,
                              "stream_seeds": {k: stream_seed(config.seed, k) for k in STREAMS},
                              "member_seeds": default_seeds(config.n_members, config.seed),
                              "data_sha256": data_sha, "environment": env})
    engine = engine or Engine(default_engine(device) if config.engine == "auto" else config.engine)
    eval_rows, n_targets = data.encode(data.eval_docs, device)
    ck = load_checkpoint(run_dir) if saved else None
    timer = timer or PhaseTimer()
    timer.seconds = dict(ck.get("phase_seconds", {})) if ck else {}
    clock = time.perf_counter() - (ck.get("elapsed_seconds", 0.0) if ck else 0.0)
    ctx = Context(config, data.train_docs, eval_rows, n_targets, engine, timer, device, env, clock)
    return ctx, (EvolutionState.from_checkpoint(ck, ctx) if ck else init_state(ctx)), ck


def _record(state: EvolutionState, ctx: Context, run_dir: str) -> EvolutionState:
    """Write the generation's checkpoint and tables (and generation 0's samples)."""
    cfg = ctx.config
    with ctx.timer("io", ctx.device):
        if state.generation == 0:
            state = dataclasses.replace(state, samples0=tuple(best_member_samples(
                state.pop, state.metrics, True, cfg.n_sample_names, stream_seed(cfg.seed, "samples"),
                "generation 0, best vulnerable")))
        ck = state.to_checkpoint() | {"elapsed_seconds": time.perf_counter() - ctx.clock,
                                      "phase_seconds": dict(ctx.timer.seconds)}
        save_checkpoint(run_dir, state.generation, ck, cfg.keep_all_checkpoints)
        write_csv(os.path.join(run_dir, "generations.csv"), list(state.rows))
        if cfg.evolution.replicates > 1:
            summary = summarize_replicates(list(state.rows))
            write_csv(os.path.join(run_dir, "generations_summary.csv"), summary, list(summary[0]))
    return state


def _current(state: EvolutionState, replicates: int) -> dict:
    """The newest generation's row, or the mean over replicates."""
    return state.rows[-1] if replicates == 1 else summarize_replicates(list(state.rows[-replicates:]))[0]


def _finish(state: EvolutionState, ctx: Context, run_dir: str, parts: int) -> dict:
    cfg = ctx.config
    last = best_member_samples(state.pop, state.metrics, False, cfg.n_sample_names,
                               stream_seed(cfg.seed, "samples_last"),
                               f"generation {cfg.evolution.generations}, best immune")
    write_atomic(os.path.join(run_dir, "samples.txt"), "\n".join(list(state.samples0) + [""] + last) + "\n")
    results = {"final": _current(state, cfg.evolution.replicates), "generations": list(state.rows),
               "wall_seconds": time.perf_counter() - ctx.clock, "phase_seconds": ctx.timer.seconds,
               "parts": parts, "engine": ctx.engine.kind, "environment": ctx.env}
    write_json(os.path.join(run_dir, "results.json"), results)
    return results


def _header(ctx: Context, run_dir: str) -> list[str]:
    cfg, env = ctx.config, ctx.env
    E, R = cfg.evolution, cfg.evolution.replicates
    n_params = sum(math.prod(s) for s in cfg.model.param_shapes().values())
    return [f"popgpt {env['popgpt']} | torch {env['torch']} | {env['device']} ({env['device_name']}) "
            f"| threads {env['threads']} | engine {ctx.engine.kind} | run folder {run_dir}",
            f"{(str(R) + ' replicates x ') if R > 1 else ''}{E.pop_size} members x {n_params} parameters | "
            f"{len(ctx.train_docs)} training names, {len(ctx.eval_rows)} held-out names scored | block size "
            f"{cfg.model.block_size} | tokens per member-step {cfg.train.batch_size * cfg.model.block_size}"]


def evolve(config: RunConfig, run_dir: str, resume: bool = False, on_generation=None,
           log=print, engine: Engine | None = None, timer: PhaseTimer | None = None, force: bool = False) -> dict:
    """Run (or resume) the experiment in ``run_dir``; returns the results dict.

    Everything is checked before the folder is touched: the names file, the
    config, the device, and that the run fits in memory. The folder is then
    locked for the life of the run. ``on_generation(generation, row)`` is
    called after each generation has been saved. ``engine`` reuses
    compiled/captured steps across calls (else one is made from
    ``config.engine``); ``timer`` collects per-phase seconds. Resuming
    refuses another config or a changed names file, and, unless ``force``,
    settings that change the numbers (threads, device, engine, torch).
    """
    data, config = prepare(config)
    if not resume:
        claim_run_folder(run_dir)
    elif not is_run_folder(run_dir):
        raise RunError(f"--resume {run_dir}: not a popgpt run folder (no readable config.json)")
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with RunLock(run_dir, "popgpt evolve"):
            return _run(config, data, run_dir, resume, force, on_generation, log, engine, timer)
    finally:
        torch.set_num_threads(threads)


def _run(config, data, run_dir, resume, force, on_generation, log, engine, timer) -> dict:
    last, results_path = config.evolution.generations, os.path.join(run_dir, "results.json")
    saved = list_checkpoints(run_dir)
    if resume and saved and max(saved) == last and os.path.isfile(results_path):
        log(f"{run_dir}: the run finished (generation {last} saved); nothing to do")
        return read_json(results_path)
    ctx, state, ck = _start(config, data, run_dir, resume, force, engine, timer, log)
    parts = 1 + len(read_json(os.path.join(run_dir, "config.json")).get("resumes", []))
    log("\n".join(_header(ctx, run_dir)))
    if ck is not None:
        log(f"resuming after generation {state.generation}")
    log(format_table([], LIVE_COLUMNS))
    first, loop_started = state.generation + 1, time.perf_counter()
    for gen in range(first, last + 1):
        state, metrics = generation(state, ctx)
        state = _record(state, ctx, run_dir)
        row = _current(state, ctx.config.evolution.replicates)
        eta = (time.perf_counter() - loop_started) / (gen - first + 1) * (last - gen)
        log(format_live_row(row, time.perf_counter() - ctx.clock, eta))
        if metrics["diverged"].any():
            log(f"warning: {int(metrics['diverged'].sum())} of {len(metrics['diverged'])} members diverged "
                f"(non-finite loss) in generation {gen}; they count as vulnerable, rank last in selection and "
                f"are left out of quality means (column n_diverged)")
        if on_generation is not None:
            on_generation(gen, row)
    results = _finish(state, ctx, run_dir, parts)
    log(f"done in {results['wall_seconds']:.1f} s; tables in {run_dir}/generations.csv, "
        f"samples in {run_dir}/samples.txt")
    return results


LIVE_COLUMNS = ["gen", "immune", "q_all", "q_immune", "q_vulnerable", "p_payload", "trigger", "elapsed", "eta"]


def format_live_row(row: dict, elapsed: float, eta: float) -> str:
    cells = [str(row["generation"]), f"{row['immune_frac']:.2f}", f"{row['fitness_all']:.4f}",
             f"{row['fitness_immune']:.4f}", f"{row['fitness_vulnerable']:.4f}",
             f"{row['payload_prob_mean']:.3g}", row["trigger"], f"{elapsed:.0f}s", f"{eta:.0f}s"]
    return "| " + " | ".join(cells) + " |"
