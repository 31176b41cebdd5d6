"""The evolution experiment, run into a folder: set-up, the loop over ``generation``, the writer.

``evolve(config, run_dir)`` checks everything before touching the folder
(``prepare``), locks it, writes ``config.json``, then runs
``generation.generation`` until the last generation, writing a checkpoint
and the tables after each one (``_record``) and the samples and
``results.json`` at the end (``_finish``). A sweep is the same run with
several conditions in ``config.conditions``.

Started by ``torchrun`` with several ranks (``distributed.py``), every rank
runs this loop on its shard of the members; rank 0 alone locks and writes
the folder, reads a checkpoint to resume (and hands it to the others), and
gathers the whole population for every checkpoint, so a run resumes with
any number of ranks.
"""

import dataclasses
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .._version import __version__
from ..engine import Engine, default_engine
from ..evaluate import EvalRows, sample_names
from ..population import Population
from ..runio import (
    RunError,
    RunLock,
    claim_run_folder,
    environment,
    file_sha256,
    format_table,
    is_run_folder,
    list_checkpoints,
    load_checkpoint,
    read_json,
    save_checkpoint,
    write_atomic,
    write_csv,
    write_json,
)
from ..stats import summarize_replicates
from .config import STREAMS, RunConfig, condition_label, stream_seed
from .distributed import BACKENDS, Shard, bounds, rank_device
from .generation import Context, EvolutionState, generation, init_state, member_seeds
from .layout import Layout
from .memory import check_fits
from .operators import Operators
from .runs import check_resume, run_data
from .summary import COLUMNS


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
class Run:
    """What the writer needs besides the science: where, since when, with what."""

    run_dir: str
    env: dict  # versions, device, threads, git commit
    clock: float  # perf_counter() at which the run would have started had it never been interrupted


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
    device, and that the run (this rank's shard of it) fits in memory. Returns (the run's data,
    the config it records)."""
    data = run_data(config)
    config = _settle(data.config)
    check_fits(config, rank_device(config.device), n_members=Shard.current(config.n_members, "cpu").size)
    return data, config


def _write_config(run_dir: str, config: RunConfig, saved: dict, data_sha: str, env: dict, force: bool, log,
                  world: int = 1, operators: dict | None = None):
    """A fresh config.json, or, when resuming, the resume checks and a record of this resume.
    ``operators``: the custom operators' names (``Operators.custom``)."""
    cfg_path = os.path.join(run_dir, "config.json")
    operators = operators or {}
    if not saved:
        write_json(cfg_path, {"config": config.to_dict(), "run_seed": config.seed,
                              "stream_seeds": {k: stream_seed(config.seed, k) for k in STREAMS},
                              "member_seeds": member_seeds(config),
                              "data_sha256": data_sha, "environment": env, "world_size": world,
                              "operators": operators})
        return
    info = read_json(cfg_path)
    changes = check_resume(run_dir, info, config, data_sha, env, force)
    recorded = info.get("operators", {})
    if recorded != operators:
        if not force:
            raise RunError(f"{run_dir} was evolved with operators {recorded or '(the defaults)'}, now "
                           f"{operators or '(the defaults)'}: resume with the same operators, or force")
        changes.append(f"operators {operators or '(the defaults)'} instead of {recorded or '(the defaults)'}")
    info.setdefault("resumes", []).append({"after_generation": max(saved), "environment": env, "world_size": world,
                                           "forced_changes": changes, "config": config.to_dict()})
    write_json(cfg_path, info)
    for change in changes:
        log(f"warning: resuming with {change} (forced); later generations' numbers differ from an "
            f"uninterrupted run")


def _open(config: RunConfig, run_dir: str, resume: bool, force: bool, world: int, log,
          operators: Operators) -> dict:
    """On rank 0, under the run's lock: a finished run's results, or the folder checked, config.json
    written (or extended) and the checkpoint to continue from (None for a fresh run)."""
    last, results_path = config.evolution.generations, os.path.join(run_dir, "results.json")
    saved = list_checkpoints(run_dir)
    if resume and saved and max(saved) == last and os.path.isfile(results_path):
        return {"results": read_json(results_path)}
    if saved and not resume:
        raise RunError(f"{run_dir} already holds a run (generation {max(saved)} saved): "
                       f"resume it or choose another folder")
    env = environment(rank_device(config.device), __version__)
    _write_config(run_dir, config, saved, file_sha256(config.data.path), env, force, log, world, operators.custom())
    parts = 1 + len(read_json(os.path.join(run_dir, "config.json")).get("resumes", []))
    return {"results": None, "ck": load_checkpoint(run_dir) if saved else None, "env": env, "parts": parts}


def _start(config: RunConfig, data, opened: dict, run_dir: str, engine: Engine | None, timer: PhaseTimer | None,
           shard: Shard, operators: Operators | None = None) -> tuple[Context, Run, EvolutionState]:
    """Every rank: the context, the run and the first state (fresh, or the checkpoint's)."""
    ck = opened["ck"]
    ctx = make_context(config, data, engine, timer, shard, operators)
    ctx.timer.seconds = dict(ck.get("phase_seconds", {})) if ck else {}
    run = Run(run_dir, opened["env"], time.perf_counter() - (ck.get("elapsed_seconds", 0.0) if ck else 0.0))
    return ctx, run, (EvolutionState.from_checkpoint(ck, ctx) if ck else init_state(ctx))


def make_context(config: RunConfig, data, engine: Engine | None = None, timer: PhaseTimer | None = None,
                 shard: Shard | None = None, operators: Operators | None = None) -> Context:
    """What every generation of a run uses: the layout, the encoded held-out names, the engine.

    ``config`` and ``data`` as ``prepare`` returns them; ``shard``: this
    rank's members (default: the process group's, all of them when alone);
    ``operators``: fitness, selection and breeding (default: the source's)."""
    device = rank_device(config.device)
    shard = shard or Shard.current(config.n_members, device)
    engine = engine or Engine(default_engine(device) if config.engine == "auto" else config.engine)
    eval_rows = EvalRows.of(data.encode(data.eval_docs)[0], device)  # sorted by length once, on the host
    return Context(config, Layout.of(config), data.train_docs, eval_rows, eval_rows.n_targets, engine,
                   timer or PhaseTimer(), device, shard, operators or Operators())


def csv_columns(config: RunConfig) -> list[str]:
    """generations.csv's columns: COLUMNS, then every field the conditions set."""
    fields = list(dict.fromkeys(k for c in config.conditions for k in c))
    return COLUMNS[:3] + fields + COLUMNS[3:]


def _record(state: EvolutionState, ctx: Context, run: Run) -> tuple[EvolutionState, Population | None]:
    """Write the generation's checkpoint and tables (and generation 0's samples): rank 0, with the
    whole population gathered from the ranks. Returns the state and (rank 0) the whole population."""
    cfg = ctx.config
    with ctx.timer("communication", ctx.device):
        whole = ctx.shard.gather_population(state.pop)
    if not ctx.shard.lead:
        return state, None
    with ctx.timer("io", ctx.device):
        if state.generation == 0:
            state = dataclasses.replace(state, samples0=tuple(best_member_samples(
                whole, state.metrics, True, cfg.n_sample_names, stream_seed(cfg.seed, "samples"),
                "generation 0, best vulnerable")))
        ck = state.to_checkpoint(whole) | {"elapsed_seconds": time.perf_counter() - run.clock,
                                           "phase_seconds": dict(ctx.timer.seconds)}
        save_checkpoint(run.run_dir, state.generation, ck, cfg.keep_all_checkpoints)
        write_csv(os.path.join(run.run_dir, "generations.csv"), list(state.rows), csv_columns(cfg))
        if ctx.layout.n_groups > 1:
            summary = summarize_replicates(list(state.rows))
            write_csv(os.path.join(run.run_dir, "generations_summary.csv"), summary, list(summary[0]))
    return state, whole


def _current(state: EvolutionState, ctx: Context) -> list[dict]:
    """The newest generation: its row, or per condition the mean over replicates."""
    if ctx.layout.n_groups == 1:
        return [state.rows[-1]]
    return summarize_replicates(list(state.rows[-ctx.layout.n_groups:]))


def _finish(state: EvolutionState, whole: Population, ctx: Context, run: Run, parts: int) -> dict:
    """Rank 0: samples.txt and results.json (``whole``: the last generation's whole population)."""
    cfg = ctx.config
    last = best_member_samples(whole, state.metrics, False, cfg.n_sample_names,
                               stream_seed(cfg.seed, "samples_last"),
                               f"generation {cfg.evolution.generations}, best immune")
    write_atomic(os.path.join(run.run_dir, "samples.txt"), "\n".join(list(state.samples0) + [""] + last) + "\n")
    final = _current(state, ctx)
    results = {"final": final[0], "final_by_condition": final, "generations": list(state.rows),
               "wall_seconds": time.perf_counter() - run.clock, "phase_seconds": ctx.timer.seconds,
               "parts": parts, "engine": ctx.engine.kind, "world_size": ctx.shard.world,
               "communication": _exchanged(ctx.shard), "environment": run.env}
    write_json(os.path.join(run.run_dir, "results.json"), results)
    return results


def _header(ctx: Context, run: Run) -> list[str]:
    cfg, env, layout = ctx.config, run.env, ctx.layout
    n_params = sum(math.prod(s) for s in cfg.model.param_shapes().values())
    groups = []
    if len(layout.conditions) > 1:
        groups.append(f"{len(layout.conditions)} conditions")
    if layout.replicates > 1:
        groups.append(f"{layout.replicates} replicates")
    lines = [f"popgpt {env['popgpt']} | torch {env['torch']} | {env['device']} ({env['device_name']}) "
             f"| threads {env['threads']} | engine {ctx.engine.kind} | run folder {run.run_dir}",
             (" x ".join(groups + [f"{layout.pop_size} members"]) + " = " if groups else "")
             + f"{cfg.n_members} members x {n_params} parameters | {len(ctx.train_docs)} training names, "
             f"{len(ctx.eval_rows)} held-out names scored | block size {cfg.model.block_size} | "
             f"positions per member-step {cfg.train.batch_size * cfg.model.block_size} padded (training computes packed rows only)"]
    lines += [f"condition {i}: {condition_label(c)}" for i, c in enumerate(cfg.conditions)]
    shard = ctx.shard
    if shard.world > 1:
        sizes = sorted({b - a for a, b in bounds(shard.total, shard.world)})
        lines.append(f"{shard.world} ranks ({BACKENDS[ctx.device.type]}), "
                     f"{' or '.join(map(str, sizes))} members each; rank 0 writes the run folder")
        if ctx.device.type == "cpu" and cfg.threads > 1:
            lines.append(f"warning: {cfg.threads} threads per rank: multi-threaded CPU kernels split work by "
                         f"tensor size, so a member's numbers can depend on how many members share its rank "
                         f"(equal to one process only up to float rounding); --threads 1 makes them bit for bit")
    return lines


def _exchanged(shard: Shard) -> dict:
    """Per exchange (metrics, survivors, checkpoint): bytes rank 0 handed to it and seconds it spent
    in it, over this part of the run (since the last start or resume)."""
    return {k: {"bytes": shard.sent[k], "seconds": shard.seconds.get(k, 0.0)} for k in shard.sent}


def evolve(config: RunConfig, run_dir: str, resume: bool = False, on_generation=None,
           log=print, engine: Engine | None = None, timer: PhaseTimer | None = None, force: bool = False,
           operators: Operators | None = None) -> dict:
    """Run (or resume) the experiment in ``run_dir``; returns the results dict.

    Everything is checked before the folder is touched: the names file, the
    config, the device, and that the run fits in memory. The folder is then
    locked for the life of the run. ``on_generation(generation, row)`` is
    called after each generation has been saved (``row``: the first
    condition's, averaged over replicates). ``engine`` reuses
    compiled/captured steps across calls (else one is made from
    ``config.engine``); ``timer`` collects per-phase seconds. Resuming
    refuses another config or a changed names file, and, unless ``force``,
    settings that change the numbers (threads, device, engine, torch).
    ``operators``: the fitness, selection and breeding rules
    (``evolution.operators.Operators``; default: the source experiment's);
    config.json records the names of custom ones, and a resume needs the same.

    In a process group (``torchrun``) every rank calls it with the same
    arguments and evolves its shard of the members; rank 0 alone logs and
    writes ``run_dir``, which the other ranks never read.
    """
    data, config = prepare(config)
    shard = Shard.current(config.n_members, rank_device(config.device))
    shard.same_everywhere("the run (config, names file, torch and popgpt versions)",
                          (config.to_dict(), file_sha256(config.data.path), torch.__version__, __version__))
    log = log if shard.lead else (lambda s: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with _locked(run_dir, resume, shard):
            return _run(config, data, run_dir, resume, force, on_generation, log, engine, timer, shard,
                        operators or Operators())
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _locked(run_dir: str, resume: bool, shard: Shard):
    """Rank 0 claims (or checks) the run folder and holds its lock; the other ranks hear whether it could."""
    held = []

    def claim():
        if not resume:
            claim_run_folder(run_dir)
        elif not is_run_folder(run_dir):
            raise RunError(f"--resume {run_dir}: not a popgpt run folder (no readable config.json)")
        held.append(RunLock(run_dir, "popgpt evolve").__enter__())

    shard.from_first(claim)
    try:
        yield
    finally:
        for lock in held:
            lock.__exit__(None, None, None)


def _run(config, data, run_dir, resume, force, on_generation, log, engine, timer, shard, operators) -> dict:
    opened = shard.from_first(lambda: _open(config, run_dir, resume, force, shard.world, log, operators))
    if opened["results"] is not None:
        log(f"{run_dir}: the run finished (generation {config.evolution.generations} saved); nothing to do")
        return opened["results"]
    ctx, run, state = _start(config, data, opened, run_dir, engine, timer, shard, operators)
    log("\n".join(_header(ctx, run) + [settings_line(config), LIVE_LEGEND]))
    if opened["ck"] is not None:
        log(f"resuming after generation {state.generation}")
    log(format_table([], live_columns(config)))
    first, last, loop_started = state.generation + 1, config.evolution.generations, time.perf_counter()
    whole = None
    for gen in range(first, last + 1):
        state, metrics = generation(state, ctx)
        state, whole = _record(state, ctx, run)
        rows = _current(state, ctx)
        eta = (time.perf_counter() - loop_started) / (gen - first + 1) * (last - gen)
        for row in rows:
            log(format_live_row(row, time.perf_counter() - run.clock, eta, bool(config.conditions)))
        if metrics["diverged"].any():
            log(f"warning: {int(metrics['diverged'].sum())} of {len(metrics['diverged'])} members diverged "
                f"(non-finite loss) in generation {gen}; they count as vulnerable, rank last in selection and "
                f"are left out of quality means (column n_diverged)")
        if on_generation is not None:
            on_generation(gen, rows[0])
    if whole is None and first > last:  # the last generation was saved, results.json was not
        whole = ctx.shard.gather_population(state.pop)
    results = shard.from_first(lambda: _finish(state, whole, ctx, run, opened["parts"]))
    log(f"done in {results['wall_seconds']:.1f} s; tables in {run_dir}/generations.csv, "
        f"samples in {run_dir}/samples.txt")
    return results


LIVE_COLUMNS = ["gen", "immune", "retest", "q_all", "q_immune", "q_vulnerable", "tax_children", "p_payload",
                "trigger", "elapsed", "eta"]
LIVE_LEGEND = ("immune: share of members immune to their current trigger | retest: agreement of a second, "
               "independent immunity test | q_*: mean quality 1 - NLL/ln 27 of all / immune / vulnerable members | "
               "tax_children: q_vulnerable - q_immune among the new children | p_payload: mean exact "
               "P(payload | trigger) | -: no value (no immune or no vulnerable member to compare)")


def live_columns(config: RunConfig) -> list[str]:
    """The live table's columns; a sweep adds the condition."""
    return LIVE_COLUMNS[:1] + ["cond"] + LIVE_COLUMNS[1:] if config.conditions else LIVE_COLUMNS


def _number(value: float, fmt: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, fmt)


def format_live_row(row: dict, elapsed: float, eta: float, condition: bool = False) -> str:
    cells = [str(row["generation"]), _number(row["immune_frac"], ".2f"), _number(row["retest_agreement"], ".2f"),
             _number(row["fitness_all"], ".4f"), _number(row["fitness_immune"], ".4f"),
             _number(row["fitness_vulnerable"], ".4f"), _number(row["tax_children"], ".4f"),
             _number(row["payload_prob_mean"], ".3g"), row["trigger"], f"{elapsed:.0f}s", f"{eta:.0f}s"]
    if condition:
        cells.insert(1, str(row.get("condition", 0)))
    return "| " + " | ".join(cells) + " |"


def settings_line(config: RunConfig) -> str:
    """The settings that differ from the source experiment's defaults, as flags would say them."""
    default, mine = RunConfig().to_dict(), config.to_dict()
    changed = [f"{section}.{k}={v}" for section in ("model", "virus", "train", "evolution", "data")
               for k, v in mine[section].items()
               if v != default[section][k] and (section, k) not in (("model", "block_size"), ("data", "path"))]
    changed += [f"{k}={mine[k]}" for k in ("seed", "engine") if mine[k] != default[k]]
    return "settings: " + (", ".join(changed) if changed else "the source experiment's defaults") + \
        " (all of them in config.json)"
