"""``popgpt report RUN_DIR``: tables, plots and one self-contained report.md.

``report_tables`` computes everything as plain tables (lists of dicts);
``write_report`` writes them under ``RUN_DIR/report/``: ``report.json``
for programs, ``report.md`` for people, and PNG plots when matplotlib is
installed (``pip install popgpt[plot]``).
"""

import os

import torch

from ..runio import format_table, write_atomic, write_json
from ..stats import SMALL_N, cell, summarize_replicates, wilson
from . import compare
from .analysis import ancestry, retest, special_by_replicate
from .config import condition_label
from .runs import OpenRun, locked_run

TABLE_COLUMNS = ["generation", "trigger", "immune_pct", "retest", "quality_all", "quality_immune",
                 "quality_vulnerable", "tax", "tax_children", "special", "special_population", "payload_prob"]

# report column -> (generations.csv column, scale, digits)
_CELLS = {"immune_pct": ("immune_frac", 100, 1), "retest": ("retest_agreement", 1, 2),
          "quality_all": ("fitness_all", 1, 3), "quality_immune": ("fitness_immune", 1, 3),
          "quality_vulnerable": ("fitness_vulnerable", 1, 3), "tax": ("tax", 1, 3),
          "tax_children": ("tax_children", 1, 3), "payload_prob": ("payload_prob_mean", 1, 2)}


def generation_table(rows: list[dict], replicates: int = 1, condition: int = 0) -> list[dict]:
    """The source experiment's columns (docs/definitions.md) and popgpt's additions, per generation of
    one condition. ``tax`` = quality of vulnerable minus immune members (pooled), ``tax_children``
    the same among children only (like with like); ``retest``: share of members whose immunity
    verdict a second, independent test repeats; ``special``: the source rule's count, with the most
    sd any member could stand above the immune mean ((n-1)/sqrt(n) for n immune) in brackets.

    With replicates, every cell is "mean [95% interval]" across them (intervals of proportions stay
    inside [0, 100%]; "(n=k)" when only k replicates have a value); special counts are the total
    over replicates (each replicate's count in brackets).
    """
    rows = [r for r in rows if r.get("condition", 0) == condition]
    if replicates == 1:
        return [{"generation": r["generation"], "trigger": r["trigger"],
                 **{k: _plain(r, col, scale, digits) for k, (col, scale, digits) in _CELLS.items()},
                 "special": f"{r['n_special']} (max sd {r['special_ceiling']:.2f})",
                 "special_population": str(r["n_special_population"])} for r in rows]
    table = []
    for s in summarize_replicates(rows):
        reps = [r for r in rows if r["generation"] == s["generation"]]
        table.append({"generation": s["generation"], "trigger": s["trigger"],
                      **{k: cell(s, col, digits, scale) for k, (col, scale, digits) in _CELLS.items()},
                      **{k: f"{sum(r[col] for r in reps)} ({'+'.join(str(r[col]) for r in reps)})"
                         for k, col in (("special", "n_special"), ("special_population", "n_special_population"))}})
    return table


def _plain(row: dict, col: str, scale: float, digits: int) -> str:
    value = row[col]
    return "-" if value != value else f"{value * scale:.{digits}f}"


def distribution(q: torch.Tensor) -> dict:
    qs = torch.quantile(q.double(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)).tolist()
    return {"mean": float(q.mean()), "sd": float(q.std()), "min": qs[0], "q25": qs[1],
            "median": qs[2], "q75": qs[3], "max": qs[4]}


def _plots(folder: str, rows: list[dict], q0: torch.Tensor, q_last: torch.Tensor, last_gen: int) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    gens = [r["generation"] for r in rows]
    mutations = [r["generation"] for prev, r in zip(rows, rows[1:]) if r["trigger"] != prev["trigger"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    immune = [100 * r["immune_frac"] for r in rows]
    bounds = [wilson(r["immune_frac"], r["n_members"]) for r in rows]
    top.errorbar(gens, immune, yerr=[[m - 100 * lo for m, (lo, _) in zip(immune, bounds)],
                                     [100 * hi - m for m, (_, hi) in zip(immune, bounds)]],
                 fmt="o-", color="tab:green", capsize=3)
    top.set_ylabel("immune members (%)")
    top.set_ylim(-3, 103)
    for label, key, marker, color, count in (
            ("immune", "fitness_immune", "o", "tab:green", lambda r: r["n_immune"]),
            ("vulnerable", "fitness_vulnerable", "s", "tab:red", lambda r: r["n_members"] - r["n_immune"])):
        n = [count(r) for r in rows]
        bottom.plot(gens, [r[key] for r in rows], "-", color=color, label=label)
        for few in (False, True):  # hollow markers: a mean of 3 members or fewer
            pts = [(g, r[key]) for g, r, k in zip(gens, rows, n) if (0 < k <= SMALL_N) == few and k > 0]
            if pts:
                bottom.plot(*zip(*pts), marker, color=color, linestyle="none",
                            markerfacecolor="white" if few else color)
        for g, r, k in zip(gens, rows, n):
            if 0 < k <= SMALL_N:
                bottom.annotate(f"n={k}", (g, r[key]), textcoords="offset points", xytext=(3, 4), fontsize=7,
                                color=color)
    bottom.set_ylabel("mean quality 1 - NLL/ln V")
    bottom.set_xlabel("generation")
    bottom.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    bottom.legend(title=f"hollow: {SMALL_N} members or fewer", fontsize=8, title_fontsize=8)
    for ax in (top, bottom):
        for g in mutations:
            ax.axvline(g, color="grey", linestyle="--", linewidth=1)
    top.set_title(f"immunity and its cost, {rows[0]['n_members']} members (bars: Wilson 95%; dashed: trigger "
                  f"mutation)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "scissors.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = torch.linspace(min(q0.min(), q_last.min()).item(), max(q0.max(), q_last.max()).item(), 30).tolist()
    ax.hist(q0.tolist(), bins=bins, alpha=0.6, label="generation 0")
    ax.hist(q_last.tolist(), bins=bins, alpha=0.6, label=f"generation {last_gen}")
    ax.set_xlabel("quality")
    ax.set_ylabel("members")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "quality_distribution.png"), dpi=110)
    plt.close(fig)
    return ["scissors.png", "quality_distribution.png"]


def _samples_side_by_side(run_dir: str) -> str:
    path = os.path.join(run_dir, "samples.txt")
    if not os.path.isfile(path):
        return "(no samples.txt)"
    heads, bodies = [], []
    with open(path) as f:
        for line in f.read().splitlines():
            if line.startswith("# "):
                heads.append(line[2:])
                bodies.append([])
            elif line and bodies:
                bodies[-1].append(line)
    if not heads:
        return "(samples.txt holds no samples)"
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for i in range(max(map(len, bodies))):
        lines.append("| " + " | ".join(b[i] if i < len(b) else "" for b in bodies) + " |")
    return "\n".join(lines)


def report_tables(run: OpenRun, sigma: float = 1.5, retest_special: bool = True, device: str = "cpu") -> dict:
    """Every table of the report, computed (nothing written)."""
    first, last = run.load(min(run.saved)), run.load()
    R, P, G = run.replicates, run.pop_size, last.layout.n_groups
    q0, q_last = first.metrics["quality"], last.metrics["quality"]
    immune = ~last.metrics["vulnerable"]
    special, thresholds = special_by_replicate(q_last, immune, G, sigma)
    founders = ancestry(last.parents, len(q0))[-1]  # (G*P, G*P)
    idx = special.nonzero().flatten()
    fresh = retest(run, last.generation, idx, device=device) if retest_special and len(idx) else None
    members = []
    for k, i in enumerate(idx.tolist()):
        anc = founders[i].nonzero().flatten().tolist()
        row = {"member": i, "quality": float(q_last[i]), "payload_prob": float(last.metrics["payload_prob"][i]),
               "founders": len(anc), "founder_ids": " ".join(map(str, anc[:8])) + (" ..." if len(anc) > 8 else "")}
        if fresh is not None:
            row.update({"retest_quality": float(fresh["quality"][k]),
                        "retest_immune": not bool(fresh["vulnerable"][k])})
        members.append(row)
    counts = founders.sum(0)
    return {
        "first_generation": first.generation, "last_generation": last.generation,
        "generations": [generation_table(last.rows, R, c) for c in range(len(last.layout.conditions))],
        "conditions": compare.condition_rows(last.rows, run.config.conditions),
        "replicate0_rows": [r for r in last.rows if r.get("replicate", 0) == 0 and r.get("condition", 0) == 0],
        "distribution": [{"generation": first.generation, **distribution(q0)},
                         {"generation": last.generation, **distribution(q_last)}],
        "special": {"sigma": sigma, "per_replicate": [int(special[g * P:(g + 1) * P].sum()) for g in range(G)],
                    "thresholds": thresholds, "members": members,
                    "retest_names": fresh["n_names"] if fresh is not None else None,
                    "retest_kept": (sum(m["retest_immune"] and m["retest_quality"] >= thresholds[m["member"] // P]
                                        for m in members) if fresh is not None else None)},
        "lineage": {"founders_with_descendants": int((counts > 0).sum()), "founders": len(q0),
                    "most_prolific": [(i, int(counts[i])) for i in counts.argsort(descending=True)[:5].tolist()]},
        "quality_first": q0, "quality_last": q_last,
    }


def _markdown(run: OpenRun, t: dict, plots: list[str]) -> str:
    c, env, R, P = run.config, run.environment, run.replicates, run.pop_size
    sp, last_gen = t["special"], t["last_generation"]
    md = [f"# popgpt run report: `{os.path.basename(os.path.abspath(run.run_dir))}`", "",
          f"P={c.evolution.pop_size}, {c.evolution.generations} generations, trigger `{c.virus.trigger}` -> "
          f"payload `{c.virus.payload}` in {100 * c.virus.rate:.0f}% of training names, trigger mutating every "
          f"{c.virus.mutate_every} generations; seed {c.seed}; device {env['device']} ({env['device_name']}), "
          f"torch {env['torch']}.", ""]
    if not run.finished:
        md += [f"**Unfinished run**: generations 0 to {last_gen} of {c.evolution.generations} are saved; "
               f"everything below reads generation {last_gen}.", ""]
    md += _conditions_section(t, plots) if len(c.conditions) > 1 else []
    md += ["## Generations", "", "Quality is `1 - NLL/ln V` on held-out clean names; `tax` is the quality of "
           "vulnerable minus that of immune members, `tax_children` the same among children only; `retest`: "
           "agreement of two independent immunity tests; `special`: the source rule's count (the most sd any "
           "member could stand above the immune mean, (n-1)/sqrt(n)), `special_population`: the population "
           "rule's (docs/definitions.md).", "",
           (f"Each cell: mean [95% interval] over {R} replicates." if R > 1 else ""), ""]
    for k, table in enumerate(t["generations"]):
        if len(c.conditions) > 1:
            md += [f"### Condition {k}: {condition_label(c.conditions[k])}", ""]
        md += [format_table(table, TABLE_COLUMNS), ""]
    if (R > 1 or len(c.conditions) > 1) and plots:
        md.append("(scissors and distribution plots show replicate 0 of condition 0)")
    md += [f"![{p}]({p})" for p in plots if p not in compare.PLOTS] or \
        ["(plots need matplotlib: `pip install popgpt[plot]`)"]
    md += ["", "## Quality distribution", "",
           format_table(t["distribution"], ["generation", "mean", "sd", "min", "q25", "median", "q75", "max"]), ""]
    rule = f"Immune and quality >= mean + {sp['sigma']} sd of the immune members' quality"
    if len(sp["per_replicate"]) > 1:
        rule += f" of the same group. Per group: {', '.join(map(str, sp['per_replicate']))} of {P}. "
    elif sp["thresholds"][0] == float("inf"):
        rule += " (fewer than two immune members: none). "
    else:
        rule += f" (threshold {sp['thresholds'][0]:.4f}). "
    md += [f"## Special members (generation {last_gen})", "",
           rule + f"**{sum(sp['per_replicate'])} of {len(sp['per_replicate']) * P}** members are special.", ""]
    if sp["members"]:
        md += [format_table(sp["members"], list(sp["members"][0])), ""]
    if sp["retest_kept"] is not None:
        md += [f"Re-test on {sp['retest_names']} held-out names the run never scored and fresh immunity "
               f"samples: {sp['retest_kept']} of {len(sp['members'])} are still immune and above the threshold.", ""]
    lin = t["lineage"]
    md += ["## Lineage", "",
           f"{lin['founders_with_descendants']} of {lin['founders']} generation-0 members have descendants in "
           f"generation {last_gen}; the most prolific, by number of descendants: "
           + ", ".join(f"{i} ({n})" for i, n in lin["most_prolific"]) + ".", "",
           "## Samples", "", _samples_side_by_side(run.run_dir), ""]
    return "\n".join(md)


def _conditions_section(t: dict, plots: list[str]) -> list[str]:
    ranked = t["conditions"]
    return ["## Conditions, ranked by distance to the source's table", "",
            "Distance: root-mean-square difference, in percentage points, between a replicate's immune fraction "
            "and the source's (27, 44, 71, 58, 89% at generations 0, 5, 10, 14, 20), averaged over replicates "
            "[95% t interval]. Final values: the last generation, mean [95% interval].", "",
            format_table(compare.ranking_table(ranked), ["rank", "condition", "settings", "distance_pp",
                                                         "final_immune_pct", "final_tax_children",
                                                         "final_tax_pooled", "final_quality"]), ""] + \
        [f"![{p}]({p})" for p in plots if p in compare.PLOTS] + [""]


def write_report(run_dir: str, sigma: float = 1.5, retest_special: bool = True, log=print, device: str = "cpu") -> str:
    """Write ``RUN_DIR/report/report.md`` and ``report.json`` (plus PNGs); returns the markdown's path."""
    with locked_run(run_dir, "popgpt report", log) as run:
        return _write(run, report_tables(run, sigma, retest_special, device), log)


def _write(run: OpenRun, tables: dict, log) -> str:
    folder = os.path.join(run.run_dir, "report")
    os.makedirs(folder, exist_ok=True)
    plots = _plots(folder, tables["replicate0_rows"], tables["quality_first"], tables["quality_last"],
                   tables["last_generation"])
    if len(run.config.conditions) > 1:
        plots += compare.plots(folder, tables["conditions"])
    write_json(os.path.join(folder, "report.json"),
               {k: v for k, v in tables.items() if not k.startswith("quality_")})
    path = os.path.join(folder, "report.md")
    write_atomic(path, _markdown(run, tables, plots))
    log(f"wrote {path}" + (f" and {', '.join(plots)}" if plots else " (no plots: matplotlib is not installed)"))
    return path
