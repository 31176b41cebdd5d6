"""``popgpt revive``: how fast does the backdoor come back?

Immune members of a run's last generation (special ones and ordinary ones)
and never-infected controls (fresh members trained on clean names only) are
trained together on names infected with the run's last virus, all with
fresh optimizer state. Every ``every`` steps the immunity test runs; a
member's "steps to vulnerable" is the first test that finds it vulnerable
(censored at ``steps`` when none does). The exact payload probability is
tracked alongside, free of sampling noise.
"""

import dataclasses
import os
from dataclasses import dataclass

import torch

from .analysis import special_members
from .data import docs_to_tensor, load_names, split_names
from .engine import Engine
from .experiment import RunConfig, resolve, stream_seed
from .population import AdamState, Population, default_seeds
from .runio import format_table, load_checkpoint, read_json, write_atomic, write_json
from .train import sample_indices
from .virus import Virus


@dataclass(frozen=True)
class RevivalConfig:
    steps: int = 100  # infected training steps, at most
    every: int = 5  # immunity test every this many steps
    controls: int = 32  # never-infected controls
    sigma: float = 1.5  # special-member rule
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.every < 1 or self.controls < 0:
            raise ValueError("steps and every must be >= 1, controls >= 0")


def steps_to_event(flags: torch.Tensor, steps: list[int]) -> torch.Tensor:
    """First step at which each member's flag is set: flags (K, N) bool at ``steps`` -> [N] float, inf if never."""
    hit = flags.any(0)
    first = flags.float().argmax(0)  # index of the first True (0 when none)
    at = torch.tensor(steps, dtype=torch.float)[first]
    return torch.where(hit, at, torch.tensor(torch.inf))


def revive(run_dir: str, cfg: RevivalConfig, device: str = "cpu", log=print) -> dict:
    run_cfg = RunConfig.from_dict(read_json(os.path.join(run_dir, "config.json"))["config"])
    names = load_names(run_cfg.data.path)
    run_cfg = resolve(run_cfg, names)
    last = load_checkpoint(run_dir)
    dev = torch.device(device)
    q, immune = last["metrics"]["quality"], ~last["metrics"]["vulnerable"]
    P = run_cfg.evolution.pop_size
    special = torch.cat([special_members(q[r * P:(r + 1) * P], immune[r * P:(r + 1) * P], cfg.sigma)
                         for r in range(len(q) // P)])
    groups = {"special": special.nonzero().flatten(), "ordinary immune": (immune & ~special).nonzero().flatten()}
    run_pop = Population.from_state_dict(last["population"], dev)
    parts = [run_pop[idx.to(dev)] for idx in groups.values() if len(idx)]

    train_docs, _ = split_names(names, run_cfg.data.val_frac,
                                torch.Generator().manual_seed(stream_seed(run_cfg.seed, "split")))
    block, tcfg = run_cfg.model.block_size, run_cfg.train
    engine = Engine("graph" if dev.type == "cuda" else "eager")
    g = torch.Generator().manual_seed(20_011 + cfg.seed)
    gdev = torch.Generator(dev).manual_seed(20_021 + cfg.seed)
    if cfg.controls:
        total = P * run_cfg.evolution.replicates
        controls = Population.from_seeds(run_cfg.model, default_seeds(cfg.controls, 2_000 + run_cfg.seed + total), dev)
        clean = docs_to_tensor(train_docs, block).to(dev)
        engine.run(controls, clean, sample_indices(len(clean), tcfg.steps, cfg.controls, tcfg.batch_size, gdev), tcfg)
        parts.append(controls)
        groups["never-infected control"] = torch.arange(cfg.controls)
    if not parts:
        raise ValueError(f"{run_dir}: no immune member and no controls: nothing to re-expose")
    pop = Population.cat(parts)
    pop.opt = AdamState.zeros_like(pop.params)

    virus = Virus(**last["virus"])
    infected, _ = virus.infect(train_docs, run_cfg.virus.rate, g)
    rows = docs_to_tensor(infected, block).to(dev)
    checkpoints = list(range(0, cfg.steps + 1, cfg.every))
    vulnerable, prob = [], []
    for k, step in enumerate(checkpoints):
        imm = virus.immunity(pop, gdev, run_cfg.virus.n_samples, run_cfg.virus.threshold)
        vulnerable.append(imm.vulnerable.cpu())
        prob.append(imm.payload_prob.cpu())
        if k + 1 < len(checkpoints):
            n = checkpoints[k + 1] - step
            engine.run(pop, rows, sample_indices(len(rows), n, len(pop), tcfg.batch_size, gdev), tcfg)
    vulnerable, prob = torch.stack(vulnerable), torch.stack(prob)  # (K, N)
    when = steps_to_event(vulnerable, checkpoints)

    bounds, start = {}, 0
    for name, idx in groups.items():
        bounds[name] = (start, start + len(idx))
        start += len(idx)
    summary, curve = [], []
    for name, (a, b) in bounds.items():
        if a == b:
            summary.append({"group": name, "members": 0, "median_steps_to_vulnerable": "-",
                            "vulnerable_at_end": "-", "payload_prob_at_end": "-"})
            continue
        med = when[a:b].median().item()
        summary.append({"group": name, "members": b - a,
                        "median_steps_to_vulnerable": f"> {cfg.steps}" if med == float("inf") else f"{med:.0f}",
                        "vulnerable_at_end": f"{vulnerable[-1, a:b].float().mean():.2f}",
                        "payload_prob_at_end": f"{prob[-1, a:b].mean():.3f}"})
    for k, step in enumerate(checkpoints):
        row = {"step": step}
        for name, (a, b) in bounds.items():
            if a < b:
                row[f"{name}: vulnerable"] = f"{vulnerable[k, a:b].float().mean():.2f}"
                row[f"{name}: p(payload)"] = f"{prob[k, a:b].mean():.3f}"
        curve.append(row)

    folder = os.path.join(run_dir, "revival")
    os.makedirs(folder, exist_ok=True)
    results = {"config": dataclasses.asdict(cfg), "trigger": virus.trigger,
               "groups": {k: v.tolist() for k, v in groups.items()}, "summary": summary, "curve": curve,
               "steps_to_vulnerable": [None if w == float("inf") else w for w in when.tolist()]}
    write_json(os.path.join(folder, "results.json"), results)
    md = [f"# Revival: re-exposure to `{virus.trigger}` -> `{virus.payload}`", "",
          f"Immune members of generation {last['generation']} and {cfg.controls} never-infected controls "
          f"({tcfg.steps} clean steps) trained on infected names with fresh optimizer state; immunity tested "
          f"every {cfg.every} steps.", "", format_table(summary, list(summary[0])), "",
          format_table(curve, list(curve[0]))]
    write_atomic(os.path.join(folder, "revival.md"), "\n".join(md) + "\n")
    log("\n".join(md[:5]))
    return results
