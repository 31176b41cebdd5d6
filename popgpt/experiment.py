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
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from . import __version__
from .data import docs_to_tensor, load_names, split_names
from .evaluate import clean_nll, quality, sample_names
from .evolution import EvolutionConfig, next_generation, selection_fitness
from .model import ModelConfig
from .population import Population, default_seeds
from .runio import (RunError, format_table, list_checkpoints, load_checkpoint, read_json,
                    save_checkpoint, write_atomic, write_generations_csv, write_json)
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
    keep_all_checkpoints: bool = False  # else keep generation 0 and the newest
    n_sample_names: int = 20  # names written to samples.txt per sampled member

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
                        vcfg: VirusConfig, generator: torch.Generator) -> dict:
    """Every member's clean quality and immunity, as [P] tensors on the device."""
    nll = clean_nll(pop, eval_rows)
    imm = virus.immunity(pop, generator, vcfg.n_samples, vcfg.threshold)
    return {"nll": nll, "quality": quality(nll, pop.config.vocab_size),
            "vulnerable": imm.vulnerable, "hits": imm.hits, "payload_prob": imm.payload_prob}


def summarize(generation: int, metrics: dict, virus: Virus) -> dict:
    """One row of generations.csv from host copies of the [P] metrics."""
    q, vul = metrics["quality"], metrics["vulnerable"]

    def mean(x):
        return float(x.mean()) if len(x) else math.nan

    return {"generation": generation, "immune_frac": mean((~vul).float()),
            "n_immune": int((~vul).sum()), "fitness_all": mean(q), "fitness_immune": mean(q[~vul]),
            "fitness_vulnerable": mean(q[vul]), "fitness_best": float(q.max()),
            "nll_mean": mean(metrics["nll"]), "payload_prob_mean": mean(metrics["payload_prob"]),
            "trigger": virus.trigger, "virus_generation": virus.generation}


def _environment(device: torch.device) -> dict:
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"torch": torch.__version__, "python": sys.version.split()[0], "popgpt": __version__,
            "device": str(device), "device_name": name, "threads": torch.get_num_threads(), "git": git}


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


def evolve(config: RunConfig, run_dir: str, resume: bool = False, on_generation=None,
           log=print) -> dict:
    """Run (or resume) the experiment in ``run_dir``; returns the results dict.

    ``on_generation(generation, row)`` is called after each generation has
    been saved. Raises RunError when ``run_dir`` already holds a run and
    ``resume`` is False, or when resuming with a different config.
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
    E, V = config.evolution, config.virus
    seeds = default_seeds(E.pop_size, config.seed)
    env = _environment(device)
    os.makedirs(run_dir, exist_ok=True)
    write_json(cfg_path, {"config": config.to_dict(), "run_seed": config.seed,
                          "member_seeds": seeds, "environment": env})
    train_docs, val_docs = split_names(names, config.data.val_frac,
                                       torch.Generator().manual_seed(config.seed))
    eval_rows = docs_to_tensor(val_docs[: config.data.eval_docs], config.model.block_size)
    n_params = sum(math.prod(s) for s in config.model.param_shapes().values())
    log(f"popgpt {__version__} | torch {env['torch']} | {env['device']} ({env['device_name']}) "
        f"| threads {env['threads']} | run folder {run_dir}")
    log(f"{E.pop_size} members x {n_params} parameters | {len(train_docs)} training names, "
        f"{len(eval_rows)} held-out names scored | block size {config.model.block_size} | "
        f"tokens per member-step {config.train.batch_size * config.model.block_size}")

    if saved and resume:
        state = load_checkpoint(run_dir)
        host = torch.Generator()
        host.set_state(state["host_rng"])
        dev = torch.Generator(device)
        dev.set_state(state["device_rng"])
        pop = Population.from_state_dict(state["population"], device)
        virus, infected = Virus(**state["virus"]), state["infected_docs"]
        rows, parents_history = state["rows"], state["parents"]
        fitness = state["selection_fitness"].to(device)
        samples0, start = state["samples_gen0"], state["generation"] + 1
        host_metrics = state["metrics"]
        log(f"resuming after generation {state['generation']}")
    else:
        host = torch.Generator().manual_seed(config.seed)  # split, infection, trigger mutation
        dev = torch.Generator(device).manual_seed(config.seed)  # batches, breeding, sampling
        virus = Virus(V.trigger, V.payload)
        infected, _ = virus.infect(train_docs, V.rate, host)
        pop = Population.from_seeds(config.model, seeds, device)
        rows, parents_history, samples0, start = [], [], [], 0

    log(format_table([], _LIVE_COLUMNS))
    gen_started = time.perf_counter()
    for gen in range(start, E.generations + 1):
        if gen > 0 and V.mutate_every and gen % V.mutate_every == 0:
            virus = virus.mutate(host)
            infected, _ = virus.infect(train_docs, V.rate, host)
        rows_t = docs_to_tensor(infected, config.model.block_size).to(device)
        if gen == 0:
            train(pop, rows_t, config=config.train, generator=dev)
        else:
            survivors, children, parents = next_generation(pop, fitness, E, dev)
            train(children, rows_t, config=dataclasses.replace(config.train, steps=E.finetune_steps),
                  generator=dev)
            pop = Population.cat([survivors, children])
            parents_history.append(parents.cpu())
        metrics = evaluate_population(pop, virus, eval_rows, V, dev)
        fitness = selection_fitness(metrics["quality"], metrics["vulnerable"], E.vulnerable_penalty)
        host_metrics = {k: v.cpu() for k, v in metrics.items()}  # the one host read per generation
        rows.append(summarize(gen, host_metrics, virus))
        if gen == 0:
            samples0 = _best_member_samples(pop, host_metrics, True, config.n_sample_names,
                                            config.seed, "generation 0, best vulnerable")
        save_checkpoint(run_dir, gen, {
            "generation": gen, "population": pop.state_dict(), "virus": virus.to_dict(),
            "infected_docs": infected, "host_rng": host.get_state(), "device_rng": dev.get_state(),
            "rows": rows, "parents": parents_history, "selection_fitness": fitness.cpu(),
            "metrics": host_metrics, "samples_gen0": samples0}, config.keep_all_checkpoints)
        write_generations_csv(os.path.join(run_dir, "generations.csv"), rows)
        done = gen - start + 1
        elapsed = time.perf_counter() - gen_started
        eta = elapsed / done * (E.generations - gen)
        log(_live_row(rows[-1], time.perf_counter() - started, eta))
        if on_generation is not None:
            on_generation(gen, rows[-1])

    last = _best_member_samples(pop, host_metrics, False, config.n_sample_names,
                                config.seed + 1, f"generation {E.generations}, best immune")
    write_atomic(os.path.join(run_dir, "samples.txt"), "\n".join(samples0 + [""] + last) + "\n")
    results = {"final": rows[-1], "generations": rows, "wall_seconds": time.perf_counter() - started,
               "resumed": bool(saved and resume), "environment": env}
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
