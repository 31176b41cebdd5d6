"""``popgpt report RUN_DIR``: tables, plots and one self-contained report.md.

``report_tables`` computes everything as plain tables (lists of dicts);
``write_report`` writes them under ``RUN_DIR/report/``: ``report.json``
for programs, ``report.md`` for people, and PNG plots when matplotlib is
installed (``pip install popgpt[plot]``).
"""

import os

import torch

from .analysis import ancestry, retest, special_by_replicate
from .runio import format_table, write_atomic, write_json
from .runs import OpenRun, locked_run
from .stats import mean_interval

TABLE_COLUMNS = ["generation", "trigger", "immune_pct", "quality_all", "quality_immune",
                 "quality_vulnerable", "tax", "payload_prob"]


def generation_table(rows: list[dict], replicates: int = 1) -> list[dict]:
    """The source experiment's columns (docs/definitions.md); ``tax`` = quality of vulnerable
    minus quality of immune members.

    With replicates, every cell is "mean [95% interval]" across them (the tax
    interval is over the per-replicate differences).
    """
    rows = [dict(r, tax=r["fitness_vulnerable"] - r["fitness_immune"], immune_pct=100 * r["immune_frac"])
            for r in rows]
    cols = {"immune_pct": "immune_pct", "quality_all": "fitness_all", "quality_immune": "fitness_immune",
            "quality_vulnerable": "fitness_vulnerable", "tax": "tax", "payload_prob": "payload_prob_mean"}
    if replicates == 1:
        return [{"generation": r["generation"], "trigger": r["trigger"], **{k: r[v] for k, v in cols.items()}}
                for r in rows]
    out = []
    for gen in sorted({r["generation"] for r in rows}):
        group = [r for r in rows if r["generation"] == gen]
        cells = {}
        for k, v in cols.items():
            mean, lo, hi = mean_interval(r[v] for r in group)
            cells[k] = f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"
        out.append({"generation": gen, "trigger": group[0]["trigger"], **cells})
    return out


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

    gens = [r["generation"] for r in rows]
    mutations = [r["generation"] for prev, r in zip(rows, rows[1:]) if r["trigger"] != prev["trigger"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(gens, [100 * r["immune_frac"] for r in rows], "o-", color="tab:green")
    top.set_ylabel("immune members (%)")
    bottom.plot(gens, [r["fitness_immune"] for r in rows], "o-", label="immune", color="tab:green")
    bottom.plot(gens, [r["fitness_vulnerable"] for r in rows], "s-", label="vulnerable", color="tab:red")
    bottom.set_ylabel("quality 1 - NLL/ln V")
    bottom.set_xlabel("generation")
    bottom.legend()
    for ax in (top, bottom):
        for g in mutations:
            ax.axvline(g, color="grey", linestyle="--", linewidth=1)
    top.set_title("immunity and its cost (dashed: trigger mutation)")
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


def report_tables(run: OpenRun, sigma: float = 1.5, retest_special: bool = True) -> dict:
    """Every table of the report, computed (nothing written)."""
    first, last = run.load(min(run.saved)), run.load()
    R, P = run.replicates, run.pop_size
    q0, q_last = first.metrics["quality"], last.metrics["quality"]
    immune = ~last.metrics["vulnerable"]
    special, thresholds = special_by_replicate(q_last, immune, R, sigma)
    founders = ancestry(last.parents, len(q0))[-1]  # (R*P, R*P)
    idx = special.nonzero().flatten()
    fresh = retest(run, last.generation, idx) if retest_special and len(idx) else None
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
        "generations": generation_table(last.rows, R),
        "replicate0_rows": [r for r in last.rows if r.get("replicate", 0) == 0],
        "distribution": [{"generation": first.generation, **distribution(q0)},
                         {"generation": last.generation, **distribution(q_last)}],
        "special": {"sigma": sigma, "per_replicate": [int(special[r * P:(r + 1) * P].sum()) for r in range(R)],
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
    md += ["## Generations", "", "Quality is `1 - NLL/ln V` on held-out clean names; `tax` is the quality of "
          "vulnerable minus that of immune members.", "",
          (f"Each cell: mean [95% t interval] over {R} replicates." if R > 1 else ""), "",
          format_table(t["generations"], TABLE_COLUMNS), ""]
    if R > 1 and plots:
        md.append("(plots show replicate 0)")
    md += [f"![{p}]({p})" for p in plots] or ["(plots need matplotlib: `pip install popgpt[plot]`)"]
    md += ["", "## Quality distribution", "",
           format_table(t["distribution"], ["generation", "mean", "sd", "min", "q25", "median", "q75", "max"]), ""]
    rule = f"Immune and quality >= mean + {sp['sigma']} sd of the immune members' quality"
    if R > 1:
        rule += f" of the same replicate. Per replicate: {', '.join(map(str, sp['per_replicate']))} of {P}. "
    elif sp["thresholds"][0] == float("inf"):
        rule += " (fewer than two immune members: none). "
    else:
        rule += f" (threshold {sp['thresholds'][0]:.4f}). "
    md += [f"## Special members (generation {last_gen})", "",
           rule + f"**{sum(sp['per_replicate'])} of {R * P}** members are special.", ""]
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


def write_report(run_dir: str, sigma: float = 1.5, retest_special: bool = True, log=print) -> str:
    """Write ``RUN_DIR/report/report.md`` and ``report.json`` (plus PNGs); returns the markdown's path."""
    with locked_run(run_dir, "popgpt report", log) as run:
        return _write(run, report_tables(run, sigma, retest_special), log)


def _write(run: OpenRun, tables: dict, log) -> str:
    folder = os.path.join(run.run_dir, "report")
    os.makedirs(folder, exist_ok=True)
    plots = _plots(folder, tables["replicate0_rows"], tables["quality_first"], tables["quality_last"],
                   tables["last_generation"])
    write_json(os.path.join(folder, "report.json"),
               {k: v for k, v in tables.items() if not k.startswith("quality_")})
    path = os.path.join(folder, "report.md")
    write_atomic(path, _markdown(run, tables, plots))
    log(f"wrote {path}" + (f" and {', '.join(plots)}" if plots else " (no plots: matplotlib is not installed)"))
    return path
