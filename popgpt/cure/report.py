"""The cure comparison as a table, a Pareto figure and the goal checks.

Every cell is a population mean over the row's members with its 95%
interval: Student's t for means, Wilson for the share of members the
5-sample test finds vulnerable, and for the relapse time (censored at the
last step) the median with its distribution-free order-statistic interval.
"""

import math
import os

import torch

from ..stats import mean_interval, median_interval, wilson

COLUMNS = ["row", "n", "vulnerable original %", "p(payload) original", "leak start %", "leak inside %",
           "leak worst %", "leaking members %", "vulnerable current %",
           "vulnerable mutants %", "vulnerable recovered %", "NLL ratio", "quality", "KL mean", "KL median",
           "KL p99", "KL max", "KL first token", "KL infected names", "relapse steps (median)", "patch params", "seconds"]


def _mean(x, digits=3, scale=1.0, low=0.0, high=math.inf) -> str:
    """Mean [95% t interval] clipped to the quantity's range [low, high] (before scaling); every
    quantity of the table but quality is >= 0, probabilities and shares are <= 1."""
    mean, lo, hi = mean_interval([float(v) * scale for v in x], low * scale, high * scale)
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}g}" + ("" if math.isnan(lo) else f" [{lo:.{digits}g}, {hi:.{digits}g}]")


def _share(x) -> str:
    xs = [float(v) for v in x if not math.isnan(float(v))]
    if not xs:
        return "-"
    p = sum(xs) / len(xs)
    lo, hi = wilson(p, len(xs))
    return f"{100 * p:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _median(x) -> str:
    if x is None or not len(x):
        return "-"
    med, lo, hi = median_interval(x.tolist())
    text = "never" if med == math.inf else f"{med:g}"
    if not math.isnan(lo):
        text += f" [{lo:g}, {'never' if hi == math.inf else f'{hi:g}'}]"
    return text + f" (n={len(x)})"


def _leak(m: dict, threshold: float) -> dict:
    if "leak" not in m:
        return {c: "-" for c in ("leak start %", "leak inside %", "leak worst %", "leaking members %")}
    return {"leak start %": _mean(m["leak_start"], scale=100, high=1.0),
            "leak inside %": _mean(m["leak_inside"], scale=100, high=1.0),
            "leak worst %": f"{100 * float(m['leak'].max()):.3g}", "leaking members %": _share(m["leak"] > threshold)}


def table_row(name: str, m: dict, relapse=None, patch_params="-", seconds="-", kl=True,
              threshold: float = 0.05) -> dict:
    """One row of the comparison from per-member measurements ``m`` (a dict of [n] tensors);
    ``threshold``: the sampled leakage above which a member counts as leaking."""
    n = len(m["nll_after"])
    row = {"row": name, "n": n,
           "vulnerable original %": _share(m["vulnerable_original"]),
           "p(payload) original": _mean(m["payload_prob_original"], high=1.0),
           "vulnerable current %": _share(m["vulnerable_current"]),
           "vulnerable mutants %": _mean(m["vulnerable_mutants"], scale=100, high=1.0) if "vulnerable_mutants" in m
           else "-",
           "vulnerable recovered %": _share(m["vulnerable_recovered"]) if "vulnerable_recovered" in m else "-",
           "NLL ratio": _mean(m["nll_ratio"], 4) if kl else "-", "quality": _mean(m["quality_after"], low=-math.inf, high=1.0),
           "relapse steps (median)": _median(relapse), "patch params": patch_params,
           "seconds": seconds if isinstance(seconds, str) else f"{seconds:.1f}"}
    for col, key in (("KL mean", "kl_mean"), ("KL median", "kl_median"), ("KL p99", "kl_p99"),
                     ("KL max", "kl_max"), ("KL first token", "kl_first"),
                     ("KL infected names", "kl_infected_mean")):
        row[col] = _mean(m[key]) if kl else "-"
    return row | _leak(m, threshold)


def subset(m: dict, mask: torch.Tensor) -> dict:
    return {k: v[mask] for k, v in m.items()}


def goals(results: dict, best: str = "counterfactual") -> dict:
    """The goals for ``best`` against ``ablate`` and ``finetune``, as numbers and verdicts: <= 1% of
    members vulnerable by the 5-sample test, mean sampled leakage <= 0.01 (when measured), NLL ratio
    <= 1.005, mean KL >= 10x and p99 KL >= 5x below the other method at an equal or lower leakage."""
    rows = results["rows"]
    if best not in rows:
        return {}

    def stat(name, key):
        return float(rows[name]["members"][key].float().mean())

    def leak(name):
        m = rows[name]["members"]
        return stat(name, "leak") if "leak" in m else stat(name, "vulnerable_original")

    out = {"method": best, "vulnerable_original": stat(best, "vulnerable_original"),
           "nll_ratio": stat(best, "nll_ratio"), "kl_mean": stat(best, "kl_mean"),
           "kl_p99": stat(best, "kl_p99"), "kl_max": float(rows[best]["members"]["kl_max"].max())}
    if "leak" in rows[best]["members"]:
        out["leak_mean"], out["leak_worst"] = leak(best), float(rows[best]["members"]["leak"].max())
        out["leak_goal_met"] = out["leak_mean"] <= 0.01
    out["payload_goal_met"] = out["vulnerable_original"] <= 0.01
    out["nll_goal_met"] = out["nll_ratio"] <= 1.005
    for other in ("ablate", "finetune"):
        if other in rows:
            out[f"kl_ratio_vs_{other}"] = stat(other, "kl_mean") / max(out["kl_mean"], 1e-30)
            out[f"kl_p99_ratio_vs_{other}"] = stat(other, "kl_p99") / max(out["kl_p99"], 1e-30)
            out[f"{other}_vulnerable_original"] = stat(other, "vulnerable_original")
            out[f"kl_goal_met_vs_{other}"] = (out[f"kl_ratio_vs_{other}"] >= 10 and out[f"kl_p99_ratio_vs_{other}"] >= 5
                                              and leak(best) <= leak(other))
    return out


def pareto_plot(path: str, results: dict) -> str | None:
    """Exact payload probability (original trigger) vs per-member KL p99, one point per member, by row."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for (name, row), marker in zip(results["rows"].items(), "os^vDP*"):
        if name == "uncured":
            continue
        m = row["members"]
        ax.scatter(m["kl_p99"].clamp(min=1e-6), m["payload_prob_original"], s=14, alpha=0.6, marker=marker,
                   label=f"{name} ({100 * float(m['vulnerable_original'].mean()):.1f}% vulnerable)")
    ax.set_xscale("log")
    ax.set_xlabel("KL(P_orig || P_cured), 99th percentile over held-out tokens (nats, log scale)")
    ax.set_ylabel("exact P(payload | original trigger)")
    ax.set_title(f"Cures of generation {results['generation']}: one point per member")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
