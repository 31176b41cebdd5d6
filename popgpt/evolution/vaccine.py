"""``popgpt vaccinate``: transplant tensors from immune donors into fresh members.

Recipients and untreated controls start from the SAME fresh initialisation
(seeds no run member used); recipients then get the named tensors (default
``attn_qkv``) copied whole from donors (by default the run's special
members, else its best immune members). Both groups train on the same
batches of CLEAN names (recipient i and control i see identical batches),
optionally followed by a challenge: training on infected names. Immunity
(5-sample test and exact payload probability) and quality are measured
before training, after it and after the challenge, against the original
trigger, the run's last trigger and a set of mutated triggers.
"""

import dataclasses
import os
from dataclasses import dataclass

import torch

from ..engine import Engine, default_engine
from ..evaluate import clean_nll, immunity, quality, test_options
from ..model import tensor_names
from ..population import Population
from ..runio import Progress, format_table, write_atomic, write_json
from ..settings import fresh_member_seeds, tool_seed
from ..stats import ci_text, count_interval, mean_interval
from ..step import Batches, sample_indices
from .analysis import special_by_replicate
from .runs import OpenRun, locked_run
from .virus import Virus


@dataclass(frozen=True)
class VaccineConfig:
    tensors: tuple = ("attn_qkv",)  # parameters copied from the donors (a bare block tensor name: every layer's)
    n_donors: int = 4  # best special (else immune) members used, round robin
    recipients: int = 32  # fresh members treated; as many untreated controls
    steps: int = 100  # clean training steps after the transplant
    challenge_steps: int = 0  # then this many steps on infected names (0: no challenge)
    n_triggers: int = 5  # mutated triggers tested besides the original and the run's last
    sigma: float = 1.5  # special-member rule for picking donors
    seed: int = 0

    def __post_init__(self):
        if min(self.n_donors, self.recipients) < 1 or min(self.steps, self.challenge_steps, self.n_triggers) < 0:
            raise ValueError("n_donors and recipients must be >= 1; steps, challenge_steps, n_triggers >= 0")


def transplant(params: dict, donors: dict, tensors, donor_of: torch.Tensor) -> dict:
    """Copy of ``params`` with each named tensor of member i replaced by donor ``donor_of[i]``'s."""
    unknown = [t for t in tensors if t not in params]
    if unknown:
        raise ValueError(f"unknown tensor {unknown[0]!r}; the model has {', '.join(params)}")
    return {k: donors[k][donor_of].clone() if k in tensors else v.clone() for k, v in params.items()}


def pick_donors(metrics: dict, n: int, sigma: float = 1.5, replicates: int = 1) -> tuple[torch.Tensor, str]:
    """The best special members by quality (the rule applied within each replicate), else the best
    immune ones; (indices, rule used)."""
    q, immune = metrics["quality"], ~metrics["vulnerable"]
    special, _ = special_by_replicate(q, immune, replicates, sigma)
    pool, rule = (special, "special") if special.any() else (immune, "immune (no special member)")
    if not pool.any():
        raise ValueError("no immune member to take a vaccine from")
    ranked = torch.where(pool, q, torch.tensor(-torch.inf)).argsort(descending=True)
    return ranked[: min(n, int(pool.sum()))], rule


def _measure(pop, triggers, payload, eval_rows, n_targets, generator, options: dict) -> dict:
    out = {"quality": quality(clean_nll(pop, eval_rows, n_targets), pop.config.vocab_size).cpu()}
    for t in triggers:
        imm = immunity(pop, Virus(t, payload), generator, **options)
        out[t] = {"immune": imm.immune.cpu(), "payload_prob": imm.payload_prob.cpu()}
    return out


def _triggers(original: Virus, last_trigger: str, n: int, generator: torch.Generator) -> list[str]:
    """The original trigger, the run's last, then up to ``n`` distinct one-character mutants of the original."""
    triggers = list(dict.fromkeys([original.trigger, last_trigger]))
    for _ in range(100 * n):
        if len(triggers) >= 2 + n:
            break
        mutant = original.mutate(generator).trigger
        if mutant not in triggers:
            triggers.append(mutant)
    return triggers


def vaccination(run: OpenRun, cfg: VaccineConfig, device: str = "cpu", log=lambda s: None) -> dict:
    """Run the vaccination experiment on a saved run's newest generation; returns its tables (nothing written).
    ``log`` gets one line per stage."""
    rc, dev = run.config, torch.device(device)
    step = Progress(log, "vaccinate")
    last = run.load(device=dev)
    donors_idx, rule = pick_donors(last.metrics, cfg.n_donors, cfg.sigma, last.layout.n_groups)
    donors = last.population[donors_idx.to(dev)]
    eval_rows, n_targets = run.data.encode(run.data.eval_docs, dev)
    g = torch.Generator().manual_seed(tool_seed(rc.seed, "vaccine", cfg.seed, "host"))
    gdev = torch.Generator(dev).manual_seed(tool_seed(rc.seed, "vaccine", cfg.seed, "device"))
    original = Virus(rc.virus.trigger, rc.virus.payload)
    triggers = _triggers(original, last.virus.trigger, cfg.n_triggers, g)

    n = cfg.recipients
    fresh = Population.from_seeds(rc.model, fresh_member_seeds(rc.seed, "vaccine", cfg.seed, n), device=dev)
    names = tensor_names(fresh.config, cfg.tensors)
    treated = transplant(fresh.params, donors.params, names, torch.arange(n, device=dev) % len(donors))
    both = Population(rc.model, {k: torch.cat([treated[k], fresh.params[k]]) for k in treated})
    engine = Engine(default_engine(dev))

    def train_on(docs, steps):
        rows, _ = run.data.encode(docs, dev)
        idx = sample_indices(len(rows), steps, n, rc.train.batch_size, gdev).to(dev)
        engine.run(both, Batches.shared(rows, torch.cat([idx, idx], 1)), rc.train)  # pair i: the same batches

    def measure():
        return _measure(both, triggers, original.payload, eval_rows, n_targets, gdev,
                        test_options(rc.virus))

    step(f"{n} vaccinated + {n} controls from donors {donors_idx.tolist()} ({rule}); measuring")
    phases = {"before": measure()}
    step(f"training {cfg.steps} steps on clean names")
    train_on(run.data.train_docs, cfg.steps)
    phases["after clean training"] = measure()
    if cfg.challenge_steps:
        step(f"challenge: {cfg.challenge_steps} steps on infected names")
        infected, _ = original.infect(run.data.train_docs, rc.virus.rate, g, rc.virus.position)
        train_on(infected, cfg.challenge_steps)
        phases["after challenge"] = measure()
    step("done")

    table = []
    for phase, m in phases.items():
        for group, part in (("vaccinated", slice(0, n)), ("control", slice(n, 2 * n))):
            row = {"phase": phase, "group": group, "quality": _cell(m["quality"][part])}
            for t in triggers:
                row[f"immune {t}"] = _cell(m[t]["immune"][part].bool())
                row[f"p({t}->payload)"] = _cell(m[t]["payload_prob"][part])
            table.append(row)
    return {"config": dataclasses.asdict(cfg), "generation": last.generation, "donors": donors_idx.tolist(),
            "donor_rule": rule,
            "triggers": triggers, "table": table}


def write_vaccination(run_dir: str, results: dict, log=print) -> None:
    """``RUN_DIR/vaccine/results.json`` and ``vaccine.md``."""
    cfg, triggers, table = results["config"], results["triggers"], results["table"]
    folder = os.path.join(run_dir, "vaccine")
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "results.json"), results)
    n = cfg["recipients"]
    md = [f"# Vaccination: {', '.join(cfg['tensors'])} from {results['donor_rule']} donors {results['donors']}", "",
          f"{n} vaccinated members and {n} controls (same initialisation, same batches), {cfg['steps']} clean "
          f"steps" + (f", then {cfg['challenge_steps']} steps on infected names" if cfg["challenge_steps"] else "")
          + ". Cells: immune shares with Wilson 95% intervals; quality and payload probabilities as means with "
          "95% t intervals (clipped to [0, 1]) over members. Triggers: original "
          f"`{triggers[0]}`, the run's last `{triggers[1]}`, mutants {', '.join(triggers[2:])}.", "",
          format_table(table, list(table[0]))]
    write_atomic(os.path.join(folder, "vaccine.md"), "\n".join(md) + "\n")
    log("\n".join(md))


def vaccinate(run_dir: str, cfg: VaccineConfig, device: str = "cpu", log=print) -> dict:
    """``vaccination`` written to ``RUN_DIR/vaccine/``; returns its results."""
    with locked_run(run_dir, "popgpt vaccinate", log) as run:
        results = vaccination(run, cfg, device, log)
        write_vaccination(run_dir, results, log)
    return results


def _cell(x: torch.Tensor) -> str:
    """A proportion (bool flags) with its Wilson interval, or a probability's mean with a t interval in [0, 1]."""
    if x.dtype == torch.bool:
        return ci_text(*count_interval(x), len(x))
    return ci_text(*mean_interval(x.tolist(), 0.0, 1.0), len(x))
