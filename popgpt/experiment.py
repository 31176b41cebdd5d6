"""The evolution experiment: infect, train, evaluate, select, breed, repeat.

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
from dataclasses import dataclass, field

import torch

from .data import IGNORE, docs_to_tensor, load_names, split_names
from .engine import ENGINES, Engine, default_engine
from .evaluate import clean_nll, quality, sample_names
from .evolution import EvolutionConfig, assemble, next_generation, selection_fitness
from .model import ModelConfig
from .population import Population, default_seeds
from .runio import (RunError, environment, format_table, list_checkpoints, load_checkpoint, read_json,
                    save_checkpoint, write_atomic, write_csv, write_json)
from .stats import summarize_replicates
from .train import TrainConfig, train
from .virus import Virus


@dataclass(frozen=True)
class DataConfig:
    path: str = "names.txt"  # one lower-case a-z name per line
    val_frac: float = 0.1  # held out, never infected, never trained on
    eval_docs: int = 1000  # held-out names scored for every fitness evaluation


@dataclass(frozen=True)
class VirusConfig:
    trigger: str = "qx"
    payload: str = "zzz"
    rate: float = 0.15  # fraction of training names infected
    mutate_every: int = 7  # generations between trigger mutations (0: never)
    n_samples: int = 5  # continuations sampled per member in the immunity test
    threshold: int = 2  # vulnerable when the payload appears in this many samples


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    virus: VirusConfig = field(default_factory=VirusConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    seed: int = 0  # everything random in the run derives from this
    device: str = "cpu"
    engine: str = "auto"  # eager | compile | graph; auto: graph on CUDA, eager on CPU
    keep_all_checkpoints: bool = False  # else keep generation 0 and the newest
    n_sample_names: int = 20  # names written to samples.txt per sampled member

    def __post_init__(self):
        if self.engine not in ("auto", *ENGINES):
            raise ValueError(f"engine must be auto or one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.n_sample_names < 1:
            raise ValueError(f"n_sample_names must be >= 1, got {self.n_sample_names}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        parts = {"model": ModelConfig, "data": DataConfig, "virus": VirusConfig,
                 "train": TrainConfig, "evolution": EvolutionConfig}
        return cls(**{k: parts[k](**v) if k in parts else v for k, v in d.items()})


def resolve(config: RunConfig, names: list[str]) -> RunConfig:
    """Fix the block size so the longest infected name is never cut off."""
    longest = max(map(len, names)) + len(config.virus.trigger) + len(config.virus.payload)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, block_size=longest + 1))


def evaluate_population(pop: Population, virus: Virus, eval_rows: torch.Tensor,
                        vcfg: VirusConfig, generator: torch.Generator, n_targets: int | None = None) -> dict:
    """Every member's clean quality and immunity, as [P] tensors on the device."""
    nll = clean_nll(pop, eval_rows, n_targets)
    imm = virus.immunity(pop, generator, vcfg.n_samples, vcfg.threshold)
    return {"nll": nll, "quality": quality(nll, pop.config.vocab_size),
            "vulnerable": imm.vulnerable, "hits": imm.hits, "payload_prob": imm.payload_prob}


def summarize(generation: int, metrics: dict, virus: Virus, replicates: int = 1) -> list[dict]:
    """Rows of generations.csv, one per replicate, from host copies of the [R*P] metrics."""
    size = len(metrics["quality"]) // replicates
    return [_summarize_one(generation, {k: v[r * size:(r + 1) * size] for k, v in metrics.items()}, virus, r)
            for r in range(replicates)]


def _summarize_one(generation: int, metrics: dict, virus: Virus, replicate: int) -> dict:
    q, vul = metrics["quality"], metrics["vulnerable"]

    def mean(x):
        return float(x.mean()) if len(x) else math.nan

    return {"generation": generation, "replicate": replicate, "immune_frac": mean((~vul).float()),
            "n_immune": int((~vul).sum()), "fitness_all": mean(q), "fitness_immune": mean(q[~vul]),
            "fitness_vulnerable": mean(q[vul]), "fitness_best": float(q.max()),
            "nll_mean": mean(metrics["nll"]), "payload_prob_mean": mean(metrics["payload_prob"]),
            "trigger": virus.trigger, "virus_generation": virus.generation}


def _best_member_samples(pop, metrics, want_vulnerable: bool, count: int, seed: int, label: str):
    """Names from the highest-quality member that is vulnerable (or immune), as text lines."""
    q = metrics["quality"].clone()
    q[metrics["vulnerable"] != want_vulnerable] = -math.inf
    if not torch.isfinite(q).any():
        return [f"# {label}: no {'vulnerable' if want_vulnerable else 'immune'} member"]
    i = int(q.argmax())
    g = torch.Generator(pop.device).manual_seed(seed)
    names = sample_names(pop[[i]], count, g)[0]
    return [f"# {label}: member {i}, quality {float(metrics['quality'][i]):.4f}"] + names


STREAMS = ("split", "host", "device", "samples")


def stream_seed(run_seed: int, stream: str) -> int:
    """Distinct seeds for a run's independent random streams (split, host, device, samples)."""
    return run_seed * 1_000_003 + STREAMS.index(stream)


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


@dataclass
class _RunState:
    """Everything a generation needs from the one before; saved in each checkpoint."""

    generation: int
    pop: Population
    virus: Virus
    infection_rng: torch.Tensor  # host RNG state the current infection was drawn from
    host: torch.Generator  # split, infection, trigger mutation
    dev: torch.Generator  # batches, breeding, sampling
    rows: list = field(default_factory=list)  # generations.csv rows so far
    parents: list = field(default_factory=list)  # (P, 2) per generation > 0: lineage
    fitness: torch.Tensor | None = None  # selection fitness of the last evaluation [P]
    metrics: dict | None = None  # host copies of the last evaluation's [P] vectors
    samples0: list = field(default_factory=list)

    def to_checkpoint(self) -> dict:
        return {"generation": self.generation, "population": self.pop.state_dict(),
                "virus": self.virus.to_dict(), "infection_rng": self.infection_rng,
                "host_rng": self.host.get_state(), "device_rng": self.dev.get_state(),
                "rows": self.rows, "parents": self.parents, "selection_fitness": self.fitness.cpu(),
                "metrics": self.metrics, "samples_gen0": self.samples0}

    @classmethod
    def from_checkpoint(cls, ck: dict, device: torch.device) -> "_RunState":
        host, dev = torch.Generator(), torch.Generator(device)
        host.set_state(ck["host_rng"])
        dev.set_state(ck["device_rng"])
        return cls(ck["generation"], Population.from_state_dict(ck["population"], device),
                   Virus(**ck["virus"]), ck["infection_rng"], host, dev, ck["rows"], ck["parents"],
                   ck["selection_fitness"].to(device), ck["metrics"], ck["samples_gen0"])


def _infect(virus: Virus, docs: list[str], rate: float, generator: torch.Generator, block_size: int,
            device) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded infected training rows, and the generator state they were drawn from
    (a checkpoint keeps that state instead of the infected names)."""
    state = generator.get_state()
    infected, _ = virus.infect(docs, rate, generator)
    return docs_to_tensor(infected, block_size).to(device), state


def evolve(config: RunConfig, run_dir: str, resume: bool = False, on_generation=None,
           log=print, engine: Engine | None = None, timer: PhaseTimer | None = None) -> dict:
    """Run (or resume) the experiment in ``run_dir``; returns the results dict.

    ``on_generation(generation, row)`` is called after each generation has
    been saved. ``engine`` reuses compiled/captured steps across calls (else
    one is made from ``config.engine``); ``timer`` collects per-phase seconds.
    Raises RunError when ``run_dir`` already holds a run and ``resume`` is
    False, or when resuming with a different config.
    """
    started = time.perf_counter()
    names = load_names(config.data.path)
    config = resolve(config, names)
    saved = list_checkpoints(run_dir)
    cfg_path = os.path.join(run_dir, "config.json")
    if saved and not resume:
        raise RunError(f"{run_dir} already holds a run (generation {max(saved)} saved): "
                       f"resume it or choose another folder")
    if resume and saved and read_json(cfg_path)["config"] != config.to_dict():
        raise RunError(f"{cfg_path}: the saved config differs from the one given; resume with the saved config")

    device = torch.device(config.device)
    engine = engine or Engine(default_engine(device) if config.engine == "auto" else config.engine)
    timer = timer or PhaseTimer()
    E, V, block = config.evolution, config.virus, config.model.block_size
    R = E.replicates
    seeds = default_seeds(E.pop_size * R, config.seed)  # replicate r: members r*P .. r*P+P-1
    env = environment(device)
    os.makedirs(run_dir, exist_ok=True)
    write_json(cfg_path, {"config": config.to_dict(), "run_seed": config.seed,
                          "stream_seeds": {k: stream_seed(config.seed, k) for k in STREAMS},
                          "member_seeds": seeds, "environment": env})
    train_docs, val_docs = split_names(names, config.data.val_frac,
                                       torch.Generator().manual_seed(stream_seed(config.seed, "split")))
    eval_rows = docs_to_tensor(val_docs[: config.data.eval_docs], block)
    n_targets = int((eval_rows[:, 1:] != IGNORE).sum())  # counted once, on the host
    eval_rows = eval_rows.to(device)
    n_params = sum(math.prod(s) for s in config.model.param_shapes().values())
    log(f"popgpt {env['popgpt']} | torch {env['torch']} | {env['device']} ({env['device_name']}) "
        f"| threads {env['threads']} | engine {engine.kind} | run folder {run_dir}")
    log(f"{(str(R) + ' replicates x ') if R > 1 else ''}{E.pop_size} members x {n_params} parameters | {len(train_docs)} training names, "
        f"{len(eval_rows)} held-out names scored | block size {block} | "
        f"tokens per member-step {config.train.batch_size * block}")

    if saved and resume:
        st = _RunState.from_checkpoint(load_checkpoint(run_dir), device)
        replay = torch.Generator().set_state(st.infection_rng)
        rows_t, _ = _infect(st.virus, train_docs, V.rate, replay, block, device)
        log(f"resuming after generation {st.generation}")
        first = st.generation + 1
    else:
        host = torch.Generator().manual_seed(stream_seed(config.seed, "host"))
        virus = Virus(V.trigger, V.payload)
        rows_t, infection_rng = _infect(virus, train_docs, V.rate, host, block, device)
        st = _RunState(0, Population.from_seeds(config.model, seeds, device), virus,
                       infection_rng, host,
                       torch.Generator(device).manual_seed(stream_seed(config.seed, "device")))
        first = 0

    log(format_table([], _LIVE_COLUMNS))
    loop_started = time.perf_counter()
    finetune = dataclasses.replace(config.train, steps=E.finetune_steps)
    for gen in range(first, E.generations + 1):
        st.generation = gen
        if gen > 0 and V.mutate_every and gen % V.mutate_every == 0:
            with timer("evolution_ops", device):
                st.virus = st.virus.mutate(st.host)
                rows_t, st.infection_rng = _infect(st.virus, train_docs, V.rate, st.host, block, device)
        if gen == 0:
            with timer("training", device):
                train(st.pop, rows_t, config=config.train, generator=st.dev, engine=engine)
        else:
            with timer("evolution_ops", device):
                survivors, children, parents = next_generation(st.pop, st.fitness, E, st.dev)
            with timer("training", device):
                train(children, rows_t, config=finetune, generator=st.dev, engine=engine)
            with timer("evolution_ops", device):
                st.pop = assemble(survivors, children, R)
        with timer("evaluation", device):
            metrics = evaluate_population(st.pop, st.virus, eval_rows, V, st.dev, n_targets)
            st.fitness = selection_fitness(metrics["quality"], metrics["vulnerable"], E.vulnerable_penalty)
            st.metrics, lineage = host_read(metrics, parents if gen > 0 else None)
            if lineage is not None:
                st.parents.append(lineage)
        st.rows += summarize(gen, st.metrics, st.virus, R)
        with timer("io", device):
            if gen == 0:
                st.samples0 = _best_member_samples(st.pop, st.metrics, True, config.n_sample_names,
                                                   stream_seed(config.seed, "samples"),
                                                   "generation 0, best vulnerable")
            save_checkpoint(run_dir, gen, st.to_checkpoint(), config.keep_all_checkpoints)
            write_csv(os.path.join(run_dir, "generations.csv"), st.rows)
            if R > 1:
                summary = summarize_replicates(st.rows)
                write_csv(os.path.join(run_dir, "generations_summary.csv"), summary, list(summary[0]))
        eta = (time.perf_counter() - loop_started) / (gen - first + 1) * (E.generations - gen)
        live = st.rows[-1] if R == 1 else summarize_replicates(st.rows[-R:])[0]
        log(_live_row(live, time.perf_counter() - started, eta))
        if on_generation is not None:
            on_generation(gen, live)

    last = _best_member_samples(st.pop, st.metrics, False, config.n_sample_names,
                                stream_seed(config.seed, "samples") + len(STREAMS),
                                f"generation {E.generations}, best immune")
    write_atomic(os.path.join(run_dir, "samples.txt"), "\n".join(st.samples0 + [""] + last) + "\n")
    results = {"final": st.rows[-1] if R == 1 else summarize_replicates(st.rows[-R:])[0],
               "generations": st.rows,
               "wall_seconds": time.perf_counter() - started, "phase_seconds": timer.seconds,
               "engine": engine.kind, "resumed": bool(saved and resume), "environment": env}
    write_json(os.path.join(run_dir, "results.json"), results)
    log(f"done in {results['wall_seconds']:.1f} s; tables in {run_dir}/generations.csv, "
        f"samples in {run_dir}/samples.txt")
    return results


_LIVE_COLUMNS = ["gen", "immune", "q_all", "q_immune", "q_vulnerable", "p_payload",
                 "trigger", "elapsed", "eta"]


def _live_row(row: dict, elapsed: float, eta: float) -> str:
    cells = [str(row["generation"]), f"{row['immune_frac']:.2f}", f"{row['fitness_all']:.4f}",
             f"{row['fitness_immune']:.4f}", f"{row['fitness_vulnerable']:.4f}",
             f"{row['payload_prob_mean']:.3g}", row["trigger"], f"{elapsed:.0f}s", f"{eta:.0f}s"]
    return "| " + " | ".join(cells) + " |"


def sample_member(run_dir: str, member: int, count: int, generation: int | None = None,
                  seed: int = 0, device: str = "cpu") -> list[str]:
    """Names sampled from one member of a saved generation."""
    state = load_checkpoint(run_dir, generation)
    pop = Population.from_state_dict(state["population"], torch.device(device))
    if not 0 <= member < len(pop):
        raise RunError(f"member {member} is out of range: generation {state['generation']} "
                       f"has members 0..{len(pop) - 1}")
    return sample_names(pop[[member]], count, torch.Generator(device).manual_seed(seed))[0]
