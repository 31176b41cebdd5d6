"""``popgpt report RUN_DIR``: tables, plots and one self-contained report.md.

Tables always; PNG plots when matplotlib is installed (``pip install
popgpt[plot]``). Everything is written under ``RUN_DIR/report/``.
"""

import os

import torch

from .analysis import ancestry, retest, special_members
from .stats import mean_interval
from .runio import format_table, list_checkpoints, load_checkpoint, read_json, write_atomic

TABLE_COLUMNS = ["generation", "trigger", "immune_pct", "quality_all", "quality_immune",
                 "quality_vulnerable", "tax", "payload_prob"]


def generation_table(rows: list[dict], replicates: int = 1) -> list[dict]:
    """The source's columns; ``tax`` = quality of vulnerable minus quality of immune members.

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
    with open(path) as f:
        sections = [s.strip().splitlines() for s in f.read().split("\n\n") if s.strip()]
    heads = [s[0].lstrip("# ") for s in sections]
    bodies = [s[1:] for s in sections]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for i in range(max(map(len, bodies))):
        lines.append("| " + " | ".join(b[i] if i < len(b) else "" for b in bodies) + " |")
    return "\n".join(lines)


def write_report(run_dir: str, sigma: float = 1.5, retest_special: bool = True, log=print) -> str:
    """Write ``RUN_DIR/report/report.md`` (plus PNGs); returns its path."""
    saved = list_checkpoints(run_dir)
    if not saved:
        raise ValueError(f"{run_dir}: no checkpoints; is this a popgpt run folder?")
    first, last = load_checkpoint(run_dir, min(saved)), load_checkpoint(run_dir)
    cfg = read_json(os.path.join(run_dir, "config.json"))
    folder = os.path.join(run_dir, "report")
    os.makedirs(folder, exist_ok=True)
    rows, last_gen = last["rows"], last["generation"]
    R = cfg["config"]["evolution"].get("replicates", 1)
    q0, q_last = first["metrics"]["quality"], last["metrics"]["quality"]
    immune = ~last["metrics"]["vulnerable"]
    P = len(q_last) // R
    special = torch.cat([special_members(q_last[r * P:(r + 1) * P], immune[r * P:(r + 1) * P], sigma)
                         for r in range(R)])
    founders = ancestry(last["parents"], len(q0))[-1]  # (R*P, R*P)

    c = cfg["config"]
    md = [f"# popgpt run report: `{os.path.basename(os.path.abspath(run_dir))}`", "",
          f"P={c['evolution']['pop_size']}, {c['evolution']['generations']} generations, "
          f"trigger `{c['virus']['trigger']}` -> payload `{c['virus']['payload']}` in "
          f"{100 * c['virus']['rate']:.0f}% of training names, trigger mutating every "
          f"{c['virus']['mutate_every']} generations; seed {c['seed']}; device "
          f"{cfg['environment']['device']} ({cfg['environment']['device_name']}), torch "
          f"{cfg['environment']['torch']}.", "",
          "## Generations", "", "Quality is `1 - NLL/ln V` on held-out clean names; `tax` is the quality of "
          "vulnerable minus that of immune members.", "",
          (f"Each cell: mean [95% t interval] over {R} replicates." if R > 1 else ""), "",
          format_table(generation_table(rows, R), TABLE_COLUMNS), ""]
    plots = _plots(folder, [r for r in rows if r.get("replicate", 0) == 0], q0, q_last, last_gen)
    if R > 1 and plots:
        md.append("(plots show replicate 0)")
    md += [f"![{p}]({p})" for p in plots] or ["(plots need matplotlib: `pip install popgpt[plot]`)"]
    dist = [{"generation": min(saved), **distribution(q0)}, {"generation": last_gen, **distribution(q_last)}]
    md += ["", "## Quality distribution", "",
           format_table(dist, ["generation", "mean", "sd", "min", "q25", "median", "q75", "max"]), ""]

    q_imm = q_last[:P][immune[:P]]
    md += [f"## Special members (generation {last_gen})", "",
           f"Immune and quality >= mean + {sigma} sd of the immune members' quality"
           + (" of the same replicate. Per replicate: "
              + ", ".join(str(int(special[r * P:(r + 1) * P].sum())) for r in range(R)) + f" of {P}. "
              if R > 1 else
              (f" ({q_imm.mean():.4f} + {sigma} x {q_imm.std():.4f} = {q_imm.mean() + sigma * q_imm.std():.4f}). "
               if q_imm.numel() >= 2 else " (fewer than two immune members: none). "))
           + f"**{int(special.sum())} of {len(q_last)}** members are special.", ""]
    if special.any():
        idx = special.nonzero().flatten()
        table = []
        fresh = retest(run_dir, last_gen, idx) if retest_special else None
        for k, i in enumerate(idx.tolist()):
            anc = founders[i].nonzero().flatten().tolist()
            row = {"member": i, "quality": float(q_last[i]),
                   "payload_prob": float(last["metrics"]["payload_prob"][i]),
                   "founders": len(anc), "founder_ids": " ".join(map(str, anc[:8])) + (" ..." if len(anc) > 8 else "")}
            if fresh is not None:
                row.update({"retest_quality": float(fresh["quality"][k]),
                            "retest_immune": not bool(fresh["vulnerable"][k])})
            table.append(row)
        cols = list(table[0])
        md += [format_table(table, cols), ""]
        if fresh is not None:
            thresholds = []
            for r in range(R):
                q_r = q_last[r * P:(r + 1) * P][immune[r * P:(r + 1) * P]]
                thresholds.append(float(q_r.mean() + sigma * q_r.std()) if q_r.numel() >= 2 else float("inf"))
            kept = sum(row["retest_immune"] and row["retest_quality"] >= thresholds[row["member"] // P]
                       for row in table)
            md += [f"Re-test on {fresh['n_names']} held-out names the run never scored and fresh immunity "
                   f"samples: {kept} of {len(table)} are still immune and above the threshold.", ""]
    counts = founders.sum(0)
    md += ["## Lineage", "",
           f"{int((counts > 0).sum())} of {len(q0)} generation-0 members have descendants in generation "
           f"{last_gen}; the most prolific, by number of descendants: "
           + ", ".join(f"{i} ({int(counts[i])})" for i in counts.argsort(descending=True)[:5].tolist()) + ".", "",
           "## Samples", "", _samples_side_by_side(run_dir), ""]
    path = os.path.join(folder, "report.md")
    write_atomic(path, "\n".join(md))
    log(f"wrote {path}" + (f" and {', '.join(plots)}" if plots else " (no plots: matplotlib is not installed)"))
    return path
