"""``popgpt cure``: cure every member of a saved generation and compare the methods.

Each method cures all members at once (cure.py) and writes its patch to
``RUN_DIR/cure/<method>/patch.pt``, apart from the run's checkpoint; every
patch, and the uncured generation, is measured the same way (cure_eval.py);
a subset of cured members is then re-exposed to infected names beside the
generation's immune members and never-infected controls (relapse, the
revival experiment's loop). One row per method, the uncured generation and
"immunity by selection" (the members the run's own test found immune),
each cell a population mean with its 95% interval and n.
"""

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch

from ..data import encode
from ..engine import Engine, default_engine
from ..evaluate import test_options
from ..evolution.revival import reexpose, steps_to_event
from ..evolution.runs import OpenRun, SavedGeneration, locked_run
from ..evolution.virus import Virus
from ..population import AdamState, Population
from ..runio import format_table, write_atomic, write_csv, write_json
from ..settings import fresh_member_seeds, tool_seed
from ..step import Batches, sample_indices
from .cureset import build_cure_set, fitting_names
from .measure import infected_rows, leak_prefixes, measure, mutants
from .methods import cure
from .objectives import METHODS, CureConfig
from .patch import Patch, patched, save_patch, weights_sha256
from .report import COLUMNS, goals, pareto_plot, subset, table_row
from .scan import scan

TRIGGER_MODES = ("known", "auto")


@dataclass(frozen=True)
class CureRunConfig:
    """What ``popgpt cure`` does around the methods (README, "Cures", gives the reasons)."""

    trigger: str = "known"  # known: the original and the current trigger; auto: scan; else the letters given
    mutants: int = -1  # 1-letter mutants of the original tested (-1: all of them)
    relapse_members: int = 32  # cured members re-exposed per method (the same ones for every method)
    relapse_steps: int = 100  # infected training steps at most
    relapse_every: int = 5  # immunity test every this many steps
    controls: int = 32  # never-infected controls re-exposed beside them
    scan_threshold: float = 0.5  # auto: P(continuation | . trigger) that counts as anomalous
    scan_candidates: int = 128  # auto: prompts per member and length whose continuation is decoded
    max_triggers: int = 32  # auto: recovered triggers cured against, per member
    # sampled leakage: 400 continuations resolve P(payload) to ~0.0025 and a 1% leaker from a clean one; 8
    # name prefixes spread the inside-name prompts over letters and lengths; a member counts as leaking above
    # 5% (a member at the 1% goal exceeds it in 400 samples with probability < 1e-6)
    leak_samples: int = 400
    leak_prompts: int = 8
    leak_threshold: float = 0.05

    def __post_init__(self):
        if self.trigger not in TRIGGER_MODES and not (self.trigger.isalpha() and self.trigger.islower()):
            raise ValueError(f"argument --trigger: known, auto or lower-case letters, got {self.trigger!r}")
        for name in ("relapse_members", "controls", "leak_samples", "leak_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"argument --{name.replace('_', '-')}: must be >= 0, got {getattr(self, name)}")
        for name in ("relapse_steps", "relapse_every", "scan_candidates", "max_triggers"):
            if getattr(self, name) < 1:
                raise ValueError(f"argument --{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.leak_threshold < 1:
            raise ValueError(f"argument --leak-threshold: must be in [0, 1), got {self.leak_threshold}")
        if not 0 < self.scan_threshold <= 1:
            raise ValueError(f"argument --scan-threshold: must be in (0, 1], got {self.scan_threshold}")


def cure_triggers(run: OpenRun, saved: SavedGeneration, rcfg: CureRunConfig, log) -> tuple[list, list, dict]:
    """Each member's cure triggers and payload, and what the scan found (auto)."""
    original, payload = run.config.virus.trigger, run.config.virus.payload
    current = [v.trigger for v in saved.viruses]
    lineage = saved.layout.lineage_of_member("cpu").tolist()
    P = len(saved.population)
    if rcfg.trigger == "known":
        return [list(dict.fromkeys([original, current[lineage[p]]])) for p in range(P)], [payload] * P, {}
    if rcfg.trigger != "auto":
        return [[rcfg.trigger]] * P, [payload] * P, {}
    t0 = time.perf_counter()
    found = scan(saved.population, run.data.names, threshold=rcfg.scan_threshold,
                 candidates=rcfg.scan_candidates, max_triggers=rcfg.max_triggers)
    seconds = time.perf_counter() - t0
    truth = [{original, current[lineage[p]]} for p in range(P)]
    recovered = [bool(truth[p] & set(found.triggers[p])) for p in range(P)]
    log(f"scan: {sum(map(bool, found.triggers))} of {P} members with an anomaly, the true trigger recovered "
        f"in {sum(recovered)} ({seconds:.1f} s)")
    fallback = next((t for ts in found.triggers for t in ts), original)
    triggers = [ts or [fallback] for ts in found.triggers]
    payloads = [ps[0] if ps else payload[:3].ljust(3, payload[-1]) for ps in found.payloads]
    return triggers, payloads, {"found": found, "true_trigger_recovered": recovered, "scan_seconds": seconds}


def _evaluation(run: OpenRun, saved: SavedGeneration, rcfg: CureRunConfig, seed: int, dev) -> dict:
    """The held-out rows, triggers and options every patch is measured with."""
    rc = run.config
    original = rc.virus.trigger
    g = torch.Generator().manual_seed(tool_seed(rc.seed, "cure", seed, "evaluation"))
    fresh = fitting_names(run.data.fresh_docs or run.data.eval_docs, rc.model.block_size,
                          len(original) + len(rc.virus.payload))[:len(run.data.eval_docs)]
    eval_rows, _ = run.data.encode(run.data.eval_docs, dev)
    all_mutants = mutants(original)
    chosen = all_mutants if rcfg.mutants < 0 else all_mutants[:0] if rcfg.mutants == 0 else \
        [all_mutants[int(i)] for i in torch.randperm(len(all_mutants), generator=g)[:rcfg.mutants]]
    P = len(saved.population)
    room = rc.model.block_size - len(original) - len(rc.virus.payload) - 1
    leak = {"trigger": original, "samples": rcfg.leak_samples,
            "prefixes": leak_prefixes(fresh, rcfg.leak_prompts, room, g)}
    triggers = {"original": torch.tensor([encode(original)] * P), "current": saved.member_triggers()[:P]}
    return {"eval_rows": eval_rows, "infected": infected_rows(fresh, original, rc.virus.payload,
                                                               rc.model.block_size, g),
            "triggers": triggers, "payload": rc.virus.payload, "options": test_options(rc.virus),
            "mutant_triggers": chosen, "leak": leak, "seed": tool_seed(rc.seed, "cure", seed, "tests") % (2 ** 62)}


def run_methods(run: OpenRun, saved: SavedGeneration, methods: list, cfg: CureConfig, rcfg: CureRunConfig,
                dev, log) -> dict:
    """Cure with every method; measure each patch and the uncured generation: {row: {...}}."""
    rc, pop = run.config, saved.population
    g = torch.Generator().manual_seed(tool_seed(rc.seed, "cure", cfg.seed, "host"))
    triggers, payloads, scanned = cure_triggers(run, saved, rcfg, log)
    longest = max(len(t) for ts in triggers for t in ts) + len(payloads[0])
    names = fitting_names(run.data.train_docs, rc.model.block_size, longest)[:cfg.names]
    cs = build_cure_set(names, triggers, payloads, rc.model.block_size, g, cfg.contrast, cfg.start_share)
    ev = _evaluation(run, saved, rcfg, cfg.seed, dev)
    if scanned:
        ev["triggers"]["recovered"] = [ts[0] if ts else None for ts in scanned["found"].triggers]
    active = scanned["found"].found() if scanned else None
    log(f"measuring the {len(pop)} uncured members")
    rows = {"uncured": {"members": measure(pop, Patch(), **ev), "seconds": 0.0, "patch": Patch()}}
    base_sha = weights_sha256(pop.params)
    for method in methods:
        t0, c0 = time.perf_counter(), time.process_time()
        patch, info = cure(pop, cs, cfg, method, torch.Generator().manual_seed(
            tool_seed(rc.seed, "cure", cfg.seed, "batches")), active)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        patch.base_sha256 = base_sha
        log(f"{method}: {len(pop)} members cured in {seconds:.1f} s ({cpu:.1f} s of CPU time); measuring")
        rows[method] = {"members": measure(pop, patch, **ev), "seconds": seconds, "cpu_seconds": cpu,
                        "patch": patch, "info": info}
    return {"rows": rows, "scan": scanned, "triggers": triggers, "payloads": payloads, "n_cure_names": len(names)}


def relapse(run: OpenRun, saved: SavedGeneration, rows: dict, rcfg: CureRunConfig, seed: int, dev) -> dict:
    """Steps to vulnerable under infected training, per group: {group: [n] float (inf: never)}."""
    rc, pop = run.config, saved.population
    g = torch.Generator().manual_seed(tool_seed(rc.seed, "cure", seed, "relapse"))
    gdev = torch.Generator(dev).manual_seed(tool_seed(rc.seed, "cure", seed, "relapse-device"))
    engine = Engine(default_engine(dev))
    pick = torch.randperm(len(pop), generator=g)[:rcfg.relapse_members]
    groups, parts = {}, []
    for name, row in rows.items():
        if name != "uncured" and len(pick):
            parts.append(Population(rc.model, {k: v[pick] for k, v in patched(pop.params, row["patch"]).items()}))
            groups[name] = len(pick)
    immune = (~saved.metrics["vulnerable"]).nonzero().flatten()
    if len(immune):
        parts.append(pop[immune.to(dev)])
        groups["immunity by selection"] = len(immune)
    if rcfg.controls:
        controls = Population.from_seeds(rc.model, fresh_member_seeds(rc.seed, "cure", seed, rcfg.controls),
                                         device=dev)
        clean, _ = run.data.encode(run.data.train_docs, dev)
        engine.run(controls, Batches.shared(clean, sample_indices(len(clean), rc.train.steps, rcfg.controls,
                                                                  rc.train.batch_size, gdev)), rc.train)
        parts.append(controls)
        groups["never-infected control"] = rcfg.controls
    if not parts:
        return {}
    everyone = Population.cat(parts)
    everyone.opt = AdamState.zeros_like(everyone.params)
    virus = Virus(rc.virus.trigger, rc.virus.payload)
    infected, _ = virus.infect(run.data.train_docs, rc.virus.rate, g, rc.virus.position)
    checkpoints = list(range(0, rcfg.relapse_steps + 1, rcfg.relapse_every))
    vulnerable, _ = reexpose(everyone, virus, run.data.encode(infected, dev)[0], checkpoints, rc, engine, gdev)
    when = steps_to_event(vulnerable, checkpoints)
    out, start = {}, 0
    for name, n in groups.items():
        out[name] = when[start:start + n]
        start += n
    return {"steps_to_vulnerable": out, "members": pick.tolist(), "checkpoints": checkpoints}


def config_dict(cfg: CureConfig, rcfg: CureRunConfig) -> dict:
    return {"cure": dataclasses.asdict(cfg), "run": dataclasses.asdict(rcfg)}


METHOD_CHOICES = (*METHODS, "all")


def comparison_table(results: dict, saved: SavedGeneration) -> list[dict]:
    """The rows of the comparison: every cure, the uncured generation, selection's immune and
    vulnerable members, the never-infected controls (relapse only)."""
    rel = results["relapse"].get("steps_to_vulnerable", {})
    table = []
    for name, row in results["rows"].items():
        cured = name != "uncured"
        table.append(table_row(name, row["members"], rel.get(name), row["patch"].n_params() if cured else 0,
                               row["seconds"] if cured else "-", kl=cured, threshold=results["leak_threshold"]))
    uncured, immune = results["rows"]["uncured"]["members"], ~saved.metrics["vulnerable"]
    for name, mask in (("immunity by selection", immune), ("vulnerable by selection", ~immune)):
        if mask.any():
            table.append(table_row(name, subset(uncured, mask), rel.get(name), "-", "-", kl=False,
                                   threshold=results["leak_threshold"]))
    if "never-infected control" in rel:
        controls = rel["never-infected control"]
        table.append({c: "-" for c in COLUMNS} | {
            "row": "never-infected control", "n": len(controls),
            "relapse steps (median)": table_row("-", uncured, controls)["relapse steps (median)"]})
    return table


def cure_tables(run: OpenRun, methods: list, cfg: CureConfig, rcfg: CureRunConfig, generation: int | None = None,
                device="cpu", log=print) -> dict:
    """Cure a saved generation with every method and measure everything (nothing written)."""
    dev = torch.device(device)
    saved = run.load(generation, dev)
    results = run_methods(run, saved, methods, cfg, rcfg, dev, log)
    results["generation"] = saved.generation
    results["leak_threshold"] = rcfg.leak_threshold
    results["relapse"] = {}
    if rcfg.relapse_members or rcfg.controls:
        log(f"relapse: {rcfg.relapse_members} members per method and {rcfg.controls} never-infected controls "
            f"trained on infected names")
        results["relapse"] = relapse(run, saved, results["rows"], rcfg, cfg.seed, dev)
    results["table"] = comparison_table(results, saved)
    results["goals"] = goals(results)
    return results


def _members_csv(path: str, row: dict) -> None:
    cols = dict(row["members"]) | {k: v for k, v in row.get("info", {}).items() if v.dim() == 1}
    table = [{"member": i, **{k: float(v[i]) for k, v in cols.items()}}
             for i in range(len(row["members"]["nll_after"]))]
    write_csv(path, table, ["member", *cols])


def _json(results: dict, cfg: CureConfig, rcfg: CureRunConfig) -> dict:
    scan_info = results["scan"]
    return {"config": config_dict(cfg, rcfg), "generation": results["generation"],
            "n_cure_names": results["n_cure_names"], "table": results["table"], "goals": results["goals"],
            "seconds": {k: r["seconds"] for k, r in results["rows"].items()},
            "cpu_seconds": {k: r.get("cpu_seconds", 0.0) for k, r in results["rows"].items()},
            "members": {k: {m: v.tolist() for m, v in r["members"].items()} for k, r in results["rows"].items()},
            "relapse": {k: [None if math.isinf(x) else x for x in v.tolist()]
                        for k, v in results["relapse"].get("steps_to_vulnerable", {}).items()},
            "scan": {} if not scan_info else {
                "triggers": scan_info["found"].triggers, "payloads": scan_info["found"].payloads,
                "true_trigger_recovered": scan_info["true_trigger_recovered"], "seconds": scan_info["scan_seconds"]}}


def _comparison(g: dict) -> str:
    """The best low-rank method against ablation and fine-tuning, in words."""
    text = (f"`{g['method']}`: {100 * g['vulnerable_original']:.1f}% of members vulnerable to the original trigger, "
            f"NLL ratio {g['nll_ratio']:.4f}, KL mean {g['kl_mean']:.3g} (p99 {g['kl_p99']:.3g})")
    if "leak_mean" in g:
        text += f", sampled leakage {g['leak_mean']:.3g} on average (worst member {g['leak_worst']:.3g})"
    for other in ("ablate", "finetune"):
        if f"kl_ratio_vs_{other}" in g:
            text += (f"; against `{other}` ({100 * g[f'{other}_vulnerable_original']:.1f}% vulnerable): KL mean "
                     f"{g[f'kl_ratio_vs_{other}']:.3g}x and p99 {g[f'kl_p99_ratio_vs_{other}']:.3g}x lower")
    return text + "."


def _markdown(results: dict, label: str, plot: str | None) -> str:
    g = results["goals"]
    md = [f"# Cures of generation {results['generation']} ({label})", "",
          "Population means over each row's members with 95% intervals (t for means, Wilson for shares; "
          "relapse: median steps of infected training until the immunity test fails, order-statistic "
          "interval, `never` = not within the steps run). KL: exact KL(P_orig || P_cured) per token on held-out "
          "names, each member's mean / median / p99 / max, then averaged over members.", "",
          format_table(results["table"], COLUMNS), ""]
    if results["scan"]:
        rec = results["scan"]["true_trigger_recovered"]
        md += [f"Trigger scan: the true trigger (original or current) is among the recovered triggers of "
               f"{sum(rec)} of {len(rec)} members.", ""]
    if g:
        md += [_comparison(g), ""]
    if plot:
        md += [f"![pareto]({os.path.basename(plot)})", ""]
    return "\n".join(md)


def write_cures(run_dir: str, results: dict, methods: list, cfg: CureConfig, rcfg: CureRunConfig, log=print) -> str:
    """Each method's patch and members to ``RUN_DIR/cure/<method>/``, the comparison to
    ``RUN_DIR/cure/<method or all>/``; returns that folder."""
    label = methods[0] if len(methods) == 1 else "all"
    for method in methods:
        folder = os.path.join(run_dir, "cure", method)
        os.makedirs(folder, exist_ok=True)
        row = results["rows"][method]
        save_patch(os.path.join(folder, "patch.pt"), row["patch"],
                   {"method": method, "generation": results["generation"], "config": str(config_dict(cfg, rcfg))})
        _members_csv(os.path.join(folder, "members.csv"), row)
    folder = os.path.join(run_dir, "cure", label)
    os.makedirs(folder, exist_ok=True)
    plot = pareto_plot(os.path.join(folder, "pareto.png"), results)
    write_json(os.path.join(folder, "results.json"), _json(results, cfg, rcfg))
    md = _markdown(results, label, plot)
    write_atomic(os.path.join(folder, "cure.md"), md + "\n")
    log(md)
    return folder


def cure_command(run_dir: str, methods: list, cfg: CureConfig, rcfg: CureRunConfig, generation: int | None = None,
                 device: str = "cpu", log=print) -> dict:
    """``popgpt cure``: cure, measure and write under ``RUN_DIR/cure/``; returns the results."""
    with locked_run(run_dir, "popgpt cure", log, generation) as run:
        results = cure_tables(run, methods, cfg, rcfg, generation, device, log)
        write_cures(run_dir, results, methods, cfg, rcfg, log)
    return results
