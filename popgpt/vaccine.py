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

from .analysis import special_members
from .data import IGNORE, docs_to_tensor, load_names, split_names
from .engine import Engine
from .evaluate import clean_nll, quality
from .experiment import RunConfig, resolve, stream_seed
from .population import Population, default_seeds
from .runio import format_table, load_checkpoint, read_json, write_atomic, write_json
from .stats import mean_interval
from .train import sample_indices
from .virus import Virus


@dataclass(frozen=True)
class VaccineConfig:
    tensors: tuple = ("attn_qkv",)  # parameter names copied from the donors
    n_donors: int = 4  # best special (else immune) members used, round robin
    recipients: int = 32  # fresh members treated; as many untreated controls
    steps: int = 100  # clean training steps after the transplant
    challenge_steps: int = 0  # then this many steps on infected names (0: no challenge)
    n_triggers: int = 5  # mutated triggers tested besides the original and the run's last
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


def pick_donors(metrics: dict, n: int, sigma: float = 1.5) -> tuple[torch.Tensor, str]:
    """The best special members by quality, else the best immune ones; (indices, rule used)."""
    q, immune = metrics["quality"], ~metrics["vulnerable"]
    special = special_members(q, immune, sigma)
    pool, rule = (special, "special") if special.any() else (immune, "immune (no special member)")
    if not pool.any():
        raise ValueError("no immune member to take a vaccine from")
    ranked = torch.where(pool, q, torch.tensor(-torch.inf)).argsort(descending=True)
    return ranked[: min(n, int(pool.sum()))], rule


def _measure(pop, triggers, payload, eval_rows, n_targets, generator) -> dict:
    out = {"quality": quality(clean_nll(pop, eval_rows, n_targets), pop.config.vocab_size).cpu()}
    for t in triggers:
        imm = Virus(t, payload).immunity(pop, generator)
        out[t] = {"immune": imm.immune.cpu(), "payload_prob": imm.payload_prob.cpu()}
    return out


def vaccinate(run_dir: str, cfg: VaccineConfig, device: str = "cpu", log=print) -> dict:
    """Run the vaccination experiment on a finished run; writes ``RUN_DIR/vaccine/``."""
    run_cfg = RunConfig.from_dict(read_json(os.path.join(run_dir, "config.json"))["config"])
    names = load_names(run_cfg.data.path)
    run_cfg = resolve(run_cfg, names)
    last = load_checkpoint(run_dir)
    donors_idx, rule = pick_donors(last["metrics"], cfg.n_donors)
    dev = torch.device(device)
    donors = Population.from_state_dict(last["population"], dev)[donors_idx.to(dev)]

    train_docs, val = split_names(names, run_cfg.data.val_frac,
                                  torch.Generator().manual_seed(stream_seed(run_cfg.seed, "split")))
    block = run_cfg.model.block_size
    eval_rows = docs_to_tensor(val[: run_cfg.data.eval_docs], block)
    n_targets = int((eval_rows[:, 1:] != IGNORE).sum())
    eval_rows = eval_rows.to(dev)
    g = torch.Generator().manual_seed(10_007 + cfg.seed)
    gdev = torch.Generator(dev).manual_seed(10_009 + cfg.seed)
    original = Virus(run_cfg.virus.trigger, run_cfg.virus.payload)
    triggers = list(dict.fromkeys([original.trigger, last["virus"]["trigger"]]))
    for _ in range(100 * cfg.n_triggers):  # distinct one-character mutants of the original
        if len(triggers) >= 2 + cfg.n_triggers:
            break
        mutant = original.mutate(g).trigger
        if mutant not in triggers:
            triggers.append(mutant)

    n = cfg.recipients
    total = run_cfg.evolution.pop_size * run_cfg.evolution.replicates
    seeds = default_seeds(n, 1_000 + run_cfg.seed + total)  # never a run member's seed
    fresh = Population.from_seeds(run_cfg.model, seeds, dev)
    donor_of = torch.arange(n, device=dev) % len(donors)
    treated = transplant(fresh.params, donors.params, cfg.tensors, donor_of)
    both = Population(run_cfg.model, {k: torch.cat([treated[k], fresh.params[k]]) for k in treated})
    engine = Engine("graph" if dev.type == "cuda" else "eager")

    def train_on(docs, steps):
        rows = docs_to_tensor(docs, block).to(dev)
        idx = sample_indices(len(rows), steps, n, run_cfg.train.batch_size, gdev).to(dev)
        engine.run(both, rows, torch.cat([idx, idx], 1), run_cfg.train)  # pair i sees the same batches

    phases = {"before": _measure(both, triggers, original.payload, eval_rows, n_targets, gdev)}
    train_on(train_docs, cfg.steps)
    phases["after clean training"] = _measure(both, triggers, original.payload, eval_rows, n_targets, gdev)
    if cfg.challenge_steps:
        infected, _ = original.infect(train_docs, run_cfg.virus.rate, g)
        train_on(infected, cfg.challenge_steps)
        phases["after challenge"] = _measure(both, triggers, original.payload, eval_rows, n_targets, gdev)

    table = []
    for phase, m in phases.items():
        for group, part in (("vaccinated", slice(0, n)), ("control", slice(n, 2 * n))):
            row = {"phase": phase, "group": group, "quality": _cell(m["quality"][part])}
            for t in triggers:
                row[f"immune {t}"] = _cell(m[t]["immune"][part].float())
                row[f"p({t}->payload)"] = _cell(m[t]["payload_prob"][part])
            table.append(row)
    results = {"config": dataclasses.asdict(cfg), "donors": donors_idx.tolist(), "donor_rule": rule,
               "triggers": triggers, "table": table}
    folder = os.path.join(run_dir, "vaccine")
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "results.json"), results)
    md = [f"# Vaccination: {', '.join(cfg.tensors)} from {rule} donors {donors_idx.tolist()}", "",
          f"{n} vaccinated members and {n} controls (same initialisation, same batches), {cfg.steps} clean "
          f"steps" + (f", then {cfg.challenge_steps} steps on infected names" if cfg.challenge_steps else "")
          + ". Cells: mean [95% t interval] over members. Triggers: original "
          f"`{triggers[0]}`, the run's last `{triggers[1]}`, mutants {', '.join(triggers[2:])}.", "",
          format_table(table, list(table[0]))]
    write_atomic(os.path.join(folder, "vaccine.md"), "\n".join(md) + "\n")
    log("\n".join(md))
    return results


def _cell(x: torch.Tensor) -> str:
    mean, lo, hi = mean_interval(x.tolist())
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"
