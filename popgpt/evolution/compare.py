"""Conditions side by side: which reading of the experiment reproduces the source's table?

For every condition of a run (a sweep, or one condition): its final immune
fraction and alignment tax with 95% intervals, and its distance to the
source experiment's reported immune fractions (27, 44, 71, 58, 89% at
generations 0, 5, 10, 14, 20): the root-mean-square difference in
percentage points over the generations the run has, computed per replicate
and then averaged (t interval over replicates). Conditions are ranked by
that distance. Figures: the phase diagram (final immune fraction against
the within-children alignment tax, one point per condition, intervals as
bars) and the immune-fraction curves of every condition next to the
source's.
"""

import math
import os

from ..stats import cell, mean_interval, summarize_replicates
from .config import condition_label

PLOTS = ("phase_diagram.png", "immune_curves.png")
SOURCE_IMMUNE = {0: 27.0, 5: 44.0, 10: 71.0, 14: 58.0, 20: 89.0}  # percent (docs/definitions.md)


def distance_to_source(rows: list[dict]) -> float:
    """RMS difference (percentage points) between one replicate's immune % and the source's, over the
    generations of SOURCE_IMMUNE the rows have (NaN if none)."""
    by_gen = {r["generation"]: 100 * r["immune_frac"] for r in rows}
    diffs = [by_gen[g] - v for g, v in SOURCE_IMMUNE.items() if g in by_gen]
    return math.sqrt(sum(d * d for d in diffs) / len(diffs)) if diffs else math.nan


def condition_rows(rows: list[dict], conditions: tuple) -> list[dict]:
    """One row per condition: its settings, final immune % and taxes with intervals, distance to the
    source's table; ranked by that distance (nearest first)."""
    out = []
    n = max(1, len(conditions))
    last = max(r["generation"] for r in rows)
    for c in range(n):
        mine = [r for r in rows if r.get("condition", 0) == c]
        replicates = sorted({r["replicate"] for r in mine})
        dist = mean_interval(distance_to_source([r for r in mine if r["replicate"] == k]) for k in replicates)
        final = summarize_replicates([r for r in mine if r["generation"] == last])[0]
        out.append({"condition": c, "settings": condition_label(conditions[c]) if conditions else "default",
                    "replicates": len(replicates), "distance": dist[0], "distance_lo": dist[1],
                    "distance_hi": dist[2], "final_immune_pct": cell(final, "immune_frac", 1, 100),
                    "final_tax": cell(final, "tax"), "final_tax_children": cell(final, "tax_children"),
                    "final_quality": cell(final, "fitness_all"), "summary": final,
                    "curve": _curve(mine)})
    return sorted(out, key=lambda r: (math.isnan(r["distance"]), r["distance"]))


def _curve(rows: list[dict]) -> list[tuple]:
    """(generation, immune % mean, lo, hi) per generation."""
    return [(s["generation"], 100 * s["immune_frac"], 100 * s["immune_frac_lo"], 100 * s["immune_frac_hi"])
            for s in summarize_replicates(rows)]


def distance_cell(row: dict) -> str:
    if math.isnan(row["distance"]):
        return "-"
    if math.isnan(row["distance_lo"]):
        return f"{row['distance']:.1f}"
    return f"{row['distance']:.1f} [{row['distance_lo']:.1f}, {row['distance_hi']:.1f}]"


def ranking_table(ranked: list[dict]) -> list[dict]:
    """The printable ranking."""
    return [{"rank": i + 1, "condition": r["condition"], "settings": r["settings"],
             "distance_pp": distance_cell(r), "final_immune_pct": r["final_immune_pct"],
             "final_tax_children": r["final_tax_children"], "final_tax_pooled": r["final_tax"],
             "final_quality": r["final_quality"]} for i, r in enumerate(ranked)]


def plots(folder: str, ranked: list[dict]) -> list[str]:
    """phase_diagram.png and immune_curves.png (none without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    untaxed, last = [], max(r["summary"]["generation"] for r in ranked)
    for r in ranked:
        s = r["summary"]
        x, y = 100 * s["immune_frac"], s["tax_children"]
        if math.isnan(y):
            untaxed.append(f"{r['condition']} ({x:.0f}% immune)")  # no vulnerable or no immune child: no tax
            continue
        xerr = [[max(0.0, x - 100 * s["immune_frac_lo"])], [max(0.0, 100 * s["immune_frac_hi"] - x)]]
        yerr = None if math.isnan(s["tax_children_lo"]) else \
            [[max(0.0, y - s["tax_children_lo"])], [max(0.0, s["tax_children_hi"] - y)]]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=3)
        ax.annotate(str(r["condition"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if untaxed:
        ax.text(0.01, 0.01, "no tax to place (all children immune or all vulnerable): " + ", ".join(untaxed),
                transform=ax.transAxes, fontsize=7, wrap=True, va="bottom")
    ax.axhline(0, color="grey", linewidth=0.8)
    if last in SOURCE_IMMUNE:  # the source's value at the same generation, when it reported one
        ax.axvline(SOURCE_IMMUNE[last], color="black", linestyle=":", linewidth=1, label=f"source, generation {last}")
    ax.set_xlabel(f"immune members at generation {last} (%)")
    ax.set_ylabel("alignment tax among children (quality vulnerable - immune)")
    ax.set_title("conditions (numbers: condition ids; bars: 95% intervals)")
    if last in SOURCE_IMMUNE:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "phase_diagram.png"), dpi=110)
    plt.close(fig)

    cols = min(4, len(ranked))
    rows_n = math.ceil(len(ranked) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.4 * rows_n), sharex=True, sharey=True,
                             squeeze=False)
    for ax, r in zip(axes.flat, sorted(ranked, key=lambda r: r["condition"])):
        gens, mean, lo, hi = zip(*r["curve"])
        ax.fill_between(gens, lo, hi, alpha=0.3)
        ax.plot(gens, mean, "-", linewidth=1.5)
        ax.plot(list(SOURCE_IMMUNE), list(SOURCE_IMMUNE.values()), "k:o", markersize=3, linewidth=1)
        ax.set_title(f"{r['condition']}: {r['settings']}", fontsize=7)
        ax.set_ylim(-3, 103)
    for ax in axes.flat[len(ranked):]:
        ax.axis("off")
    fig.supxlabel("generation")
    fig.supylabel("immune members (%); dotted: the source")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "immune_curves.png"), dpi=110)
    plt.close(fig)
    return ["phase_diagram.png", "immune_curves.png"]
