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

from ..engine import Engine, default_engine
from ..evaluate import immunity, test_options
from ..population import AdamState, Population
from ..runio import Progress, format_table, write_atomic, write_json
from ..settings import fresh_member_seeds, tool_seed
from ..step import Batches, sample_indices
from .analysis import special_by_replicate
from .runs import OpenRun, SavedGeneration, locked_run


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


def median(x: torch.Tensor) -> float:
    """The median, the mean of the two middle values for an even count (torch.median takes the lower)."""
    s = x.sort().values
    n = len(s)
    return float(s[n // 2]) if n % 2 else float((s[n // 2 - 1] + s[n // 2]) / 2)


def _patients(run: OpenRun, last: SavedGeneration, cfg: RevivalConfig, dev, engine, gdev):
    """Immune members (special, ordinary) and trained never-infected controls, all with fresh
    optimizer state: (population, {group: member indices in the run or among the controls})."""
    immune = ~last.metrics["vulnerable"]
    special, _ = special_by_replicate(last.metrics["quality"], immune, last.layout.n_groups, cfg.sigma)
    groups = {"special": special.nonzero().flatten(), "ordinary immune": (immune & ~special).nonzero().flatten()}
    parts = [last.population[idx.to(dev)] for idx in groups.values() if len(idx)]
    rc, tcfg = run.config, run.config.train
    if cfg.controls:
        controls = Population.from_seeds(rc.model, fresh_member_seeds(rc.seed, "revival", cfg.seed, cfg.controls),
                                        device=dev)
        clean, _ = run.data.encode(run.data.train_docs, dev)
        idx = sample_indices(len(clean), tcfg.steps, cfg.controls, tcfg.batch_size, gdev)
        engine.run(controls, Batches.shared(clean, idx), tcfg)
        parts.append(controls)
        groups["never-infected control"] = torch.arange(cfg.controls)
    if not parts:
        raise ValueError(f"{run.run_dir}: no immune member and no controls: nothing to re-expose")
    pop = Population.cat(parts)
    pop.opt = AdamState.zeros_like(pop.params)
    return pop, groups


def _tables(groups: dict, vulnerable: torch.Tensor, prob: torch.Tensor, checkpoints: list[int], max_steps: int):
    """Per-group summary and the curve of vulnerable fraction and payload probability per test."""
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
        med = median(when[a:b])
        summary.append({"group": name, "members": b - a,
                        "median_steps_to_vulnerable": f"> {max_steps}" if med == float("inf") else f"{med:g}",
                        "vulnerable_at_end": f"{vulnerable[-1, a:b].float().mean():.2f}",
                        "payload_prob_at_end": f"{prob[-1, a:b].mean():.3f}"})
    for k, step in enumerate(checkpoints):
        row = {"step": step}
        for name, (a, b) in bounds.items():
            if a < b:
                row[f"{name}: vulnerable"] = f"{vulnerable[k, a:b].float().mean():.2f}"
                row[f"{name}: p(payload)"] = f"{prob[k, a:b].mean():.3f}"
        curve.append(row)
    return summary, curve, when


def reexpose(pop: Population, virus, rows: torch.Tensor, checkpoints: list[int], rc, engine: Engine,
             gdev: torch.Generator, log=lambda s: None) -> tuple[torch.Tensor, torch.Tensor]:
    """Train ``pop`` in place on infected ``rows`` (the run's batch size and optimizer settings ``rc``),
    running the run's immunity test against ``virus`` at every step of ``checkpoints``: vulnerable
    (K, P) bool and exact payload probability (K, P), on the host. ``log`` gets one line per test."""
    vulnerable, prob = [], []
    for k, step in enumerate(checkpoints):
        imm = immunity(pop, virus, gdev, **test_options(rc.virus))
        vulnerable.append(imm.vulnerable.cpu())
        prob.append(imm.payload_prob.cpu())
        log(f"step {step}/{checkpoints[-1]}: {vulnerable[-1].float().mean():.0%} of {len(pop)} vulnerable")
        if k + 1 < len(checkpoints):
            idx = sample_indices(len(rows), checkpoints[k + 1] - step, len(pop), rc.train.batch_size, gdev)
            engine.run(pop, Batches.shared(rows, idx), rc.train)
    return torch.stack(vulnerable), torch.stack(prob)


def revival(run: OpenRun, cfg: RevivalConfig, device: str = "cpu", log=lambda s: None) -> dict:
    """Re-expose the newest generation's immune members and controls; returns the tables (nothing written).
    ``log`` gets one line per stage and immunity test."""
    step = Progress(log, "revive")
    rc, dev = run.config, torch.device(device)
    last = run.load(device=dev)
    engine = Engine(default_engine(dev))
    g = torch.Generator().manual_seed(tool_seed(rc.seed, "revival", cfg.seed, "host"))
    gdev = torch.Generator(dev).manual_seed(tool_seed(rc.seed, "revival", cfg.seed, "device"))
    step(f"generation {last.generation}: training {cfg.controls} never-infected controls")
    pop, groups = _patients(run, last, cfg, dev, engine, gdev)
    step(f"re-exposing {len(pop)} members to {last.virus.trigger!r} -> {last.virus.payload!r}")
    infected, _ = last.virus.infect(run.data.train_docs, rc.virus.rate, g, rc.virus.position)
    rows, _ = run.data.encode(infected, dev)
    checkpoints = list(range(0, cfg.steps + 1, cfg.every))
    vulnerable, prob = reexpose(pop, last.virus, rows, checkpoints, rc, engine, gdev, step)
    summary, curve, when = _tables(groups, vulnerable, prob, checkpoints, cfg.steps)
    return {"config": dataclasses.asdict(cfg), "generation": last.generation, "trigger": last.virus.trigger,
            "payload": last.virus.payload, "clean_steps": rc.train.steps,
            "groups": {k: v.tolist() for k, v in groups.items()}, "summary": summary, "curve": curve,
            "steps_to_vulnerable": [None if w == float("inf") else w for w in when.tolist()]}


def write_revival(run_dir: str, results: dict, log=print) -> None:
    """``RUN_DIR/revival/results.json`` and ``revival.md``."""
    folder = os.path.join(run_dir, "revival")
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "results.json"), results)
    cfg, summary, curve = results["config"], results["summary"], results["curve"]
    md = [f"# Revival: re-exposure to `{results['trigger']}` -> `{results['payload']}`", "",
          f"Immune members of generation {results['generation']} and {cfg['controls']} never-infected controls "
          f"({results['clean_steps']} clean steps) trained on infected names with fresh optimizer state; immunity "
          f"tested every {cfg['every']} steps.", "", format_table(summary, list(summary[0])), "",
          format_table(curve, list(curve[0]))]
    write_atomic(os.path.join(folder, "revival.md"), "\n".join(md) + "\n")
    log("\n".join(md[:5]))


def revive(run_dir: str, cfg: RevivalConfig, device: str = "cpu", log=print) -> dict:
    """``revival`` written to ``RUN_DIR/revival/``; returns its results."""
    with locked_run(run_dir, "popgpt revive", log) as run:
        results = revival(run, cfg, device, log)
        write_revival(run_dir, results, log)
    return results
