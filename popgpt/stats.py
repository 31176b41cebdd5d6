"""Statistics across replicates: mean and 95% interval of every table cell.

The interval is Student's t interval for the mean over the replicates that
have a value (a replicate with no immune member has no immune quality):
mean +- t(0.975, n-1) * sd / sqrt(n), sd with n-1. One replicate gives no
interval (NaN bounds).
"""

import math

# t(0.975, df) for df = 1..30; beyond 30 the normal 1.96 is within 2%.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]

NUMERIC = ["immune_frac", "n_immune", "n_diverged", "fitness_all", "fitness_immune", "fitness_vulnerable",
           "fitness_best", "nll_mean", "payload_prob_mean"]


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_interval(values) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% t interval, ignoring NaN values."""
    xs = [float(v) for v in values if not math.isnan(float(v))]
    if not xs:
        return math.nan, math.nan, math.nan
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = t975(len(xs) - 1) * sd / math.sqrt(len(xs))
    return mean, mean - half, mean + half


def summarize_replicates(rows: list[dict]) -> list[dict]:
    """One row per generation: ``col``, ``col_lo``, ``col_hi`` for every numeric column."""
    by_gen: dict[int, list[dict]] = {}
    for row in rows:
        by_gen.setdefault(row["generation"], []).append(row)
    out = []
    for gen, group in sorted(by_gen.items()):
        summary = {"generation": gen, "replicates": len(group), "trigger": group[0]["trigger"],
                   "virus_generation": group[0]["virus_generation"]}
        for col in NUMERIC:
            summary[col], summary[f"{col}_lo"], summary[f"{col}_hi"] = mean_interval(r[col] for r in group)
        out.append(summary)
    return out
