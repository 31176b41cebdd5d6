"""Statistics across replicates: mean and 95% interval of every table cell.

- A mean's interval is Student's t interval over the replicates that have a
  value: mean +- t(0.975, n-1) * sd / sqrt(n), sd with n-1, with the exact
  t quantile (scipy). One replicate gives no interval (NaN bounds). A
  replicate without a value (no immune member has no immune quality) is left
  out, and the cell says how many replicates it averages (``col_n``).
- A proportion's interval (the immune fraction, test-retest agreement, the
  mean payload probability) stays
  inside [0, 1]: a Wilson score interval for the pooled proportion, with the
  sample size shrunk by the between-replicate variance (the effective n of a
  clustered sample, ``n_eff = p(1-p) / var(p)`` with var(p) the squared
  standard error of the replicate mean) and the t quantile in place of
  1.96, since that variance comes from few replicates. When the replicates
  vary no more than binomial draws would, the plain Wilson interval of the
  pooled counts is used.
"""

import math

import torch

PROPORTIONS = ["immune_frac", "retest_agreement", "payload_prob_mean"]  # bounded in [0, 1]
NUMERIC = ["immune_frac", "n_immune", "n_diverged", "fitness_all", "fitness_immune", "fitness_vulnerable",
           "fitness_best", "nll_mean", "payload_prob_mean", "tax", "tax_children", "tax_survivors",
           "fitness_immune_children", "fitness_vulnerable_children", "fitness_immune_survivors",
           "fitness_vulnerable_survivors", "retest_agreement", "n_special", "n_special_population"]


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    from scipy import stats  # imported when first needed: `import popgpt` stays light

    return float(stats.t.ppf(0.975, df))


def _values(values) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


SMALL_N = 3  # at or below this many values an interval rests on little: every table says so


def mean_interval(values, low: float = -math.inf, high: float = math.inf) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% t interval, ignoring NaN values, clipped to the quantity's range
    [``low``, ``high``] (a loss is >= 0, an AUC in [0, 1]: an interval never leaves what is possible)."""
    xs = _values(values)
    if not xs:
        return math.nan, math.nan, math.nan
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = t975(len(xs) - 1) * sd / math.sqrt(len(xs))
    return mean, max(low, mean - half), min(high, mean + half)


def count_interval(flags) -> tuple[float, float, float]:
    """(share, low, high): the share of true ``flags`` with its Wilson 95% interval (a proportion)."""
    xs = [bool(v) for v in (flags.tolist() if isinstance(flags, torch.Tensor) else flags)]
    if not xs:
        return math.nan, math.nan, math.nan
    p = sum(xs) / len(xs)
    return (p, *wilson(p, len(xs)))


def ci_text(mean: float, lo: float, hi: float, n: int, digits: int = 3, scale: float = 1.0) -> str:
    """``mean [lo, hi]``, with a note when n <= SMALL_N values make the interval rough (or absent)."""
    if math.isnan(mean):
        return "-"
    text = f"{mean * scale:.{digits}f}"
    if math.isnan(lo):
        return text + f" (n={n}: no interval)"
    text += f" [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"
    return text + (f" (n={n}: rough)" if n <= SMALL_N else "")


def wilson(p: float, n: float, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion p observed on n trials (n may be fractional)."""
    if n <= 0:
        return math.nan, math.nan
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # contains p despite rounding


def proportion_interval(values, sizes) -> tuple[float, float, float]:
    """(mean, low, high) for per-replicate proportions ``values`` of ``sizes`` members each."""
    pairs = [(float(v), float(n)) for v, n in zip(values, sizes) if v is not None and not math.isnan(float(v))]
    if not pairs:
        return math.nan, math.nan, math.nan
    total = sum(n for _, n in pairs)
    p = sum(v * n for v, n in pairs) / total
    k = len(pairs)
    if k == 1:
        return (p, *wilson(p, total))
    mean = sum(v for v, _ in pairs) / k
    var = sum((v - mean) ** 2 for v, _ in pairs) / (k - 1) / k  # squared standard error of the mean
    if var == 0 or p * (1 - p) / var >= total:  # replicates agree as binomial draws would: pooled counts
        return (p, *wilson(p, total))
    return (p, *wilson(p, p * (1 - p) / var, t975(k - 1)))


def summarize_replicates(rows: list[dict], sizes: dict | None = None) -> list[dict]:
    """One row per (condition, generation): ``col``, ``col_lo``, ``col_hi``, ``col_n`` per numeric column.

    ``sizes``: members per replicate for the proportion columns (default: the
    rows' ``n_members``, else 1, which gives plain Wilson intervals on counts).
    """
    groups: dict = {}
    for row in rows:
        groups.setdefault((row.get("condition", 0), row["generation"]), []).append(row)
    out = []
    for (condition, gen), group in sorted(groups.items()):
        triggers = sorted({r["trigger"] for r in group})
        summary = {"generation": gen, "condition": condition, "replicates": len(group),
                   "trigger": "/".join(triggers), "virus_generation": group[0]["virus_generation"]}
        for col in NUMERIC:
            if col not in group[0]:
                continue
            values = [r[col] for r in group]
            if col in PROPORTIONS:
                n = [r.get("n_members", 1) for r in group]
                summary[col], summary[f"{col}_lo"], summary[f"{col}_hi"] = proportion_interval(values, n)
            else:
                summary[col], summary[f"{col}_lo"], summary[f"{col}_hi"] = mean_interval(values)
            summary[f"{col}_n"] = len(_values(values))
        out.append(summary)
    return out


def cell(summary: dict, col: str, digits: int = 3, scale: float = 1.0) -> str:
    """'mean [lo, hi]' of a summary row's column, with '(n=k)' when fewer replicates than rows have it."""
    mean, lo, hi = (summary[col] * scale, summary[f"{col}_lo"] * scale, summary[f"{col}_hi"] * scale)
    if math.isnan(mean):
        return "-"
    text = f"{mean:.{digits}f}" + ("" if math.isnan(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]")
    n = summary.get(f"{col}_n")
    return text + (f" (n={n})" if n is not None and n < summary["replicates"] else "")


# Ranking scores against a known truth (data attribution) -------------------------------------------

def average_ranks(x):
    """Ranks 1..n of a 1-D tensor, ties given their average rank."""
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty(len(x), dtype=torch.float64)
    new = torch.ones(len(x), dtype=torch.bool)
    new[1:] = sorted_x[1:] != sorted_x[:-1]
    starts = new.nonzero().flatten().tolist() + [len(x)]
    for start, stop in zip(starts[:-1], starts[1:]):
        ranks[order[start:stop]] = (start + stop + 1) / 2  # mean of ranks start+1 .. stop
    return ranks


def auc(scores, truth) -> float:
    """Area under the ROC curve of ``scores`` for the positives ``truth`` (bool): the probability that a
    random positive scores above a random negative, ties counting one half (Mann-Whitney U / n+ n-)."""
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = average_ranks(scores.double())
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_interval(a: float, n_pos: int, n_neg: int, z: float = 1.959964) -> tuple[float, float]:
    """95% interval of an AUC by Hanley and McNeil's (1982) standard error, clipped to [0, 1]."""
    if math.isnan(a):
        return math.nan, math.nan
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    half = z * math.sqrt(max(var, 0.0))
    return max(0.0, a - half), min(1.0, a + half)


def precision_at_k(scores, truth, k: int | None = None) -> float:
    """Share of positives among the ``k`` highest scores (default k: the number of positives).
    Ties at the cut are broken by position (the earlier index first), the same way every time."""
    k = int(truth.sum()) if k is None else k
    if k == 0:
        return math.nan
    top = torch.argsort(-scores.double(), stable=True)[:k]
    return float(truth[top].double().mean())


def spearman(x, y) -> float:
    """Spearman's rank correlation of two 1-D tensors (average ranks for ties); NaN if either is constant."""
    rx, ry = average_ranks(x.double()), average_ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denom if denom > 0 else math.nan


def spearman_interval(r: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% interval of a Spearman correlation on n pairs: Fisher's z with Fieller et al.'s standard
    error 1.06 / sqrt(n - 3)."""
    if math.isnan(r) or n < 4:
        return math.nan, math.nan
    centre, half = math.atanh(max(-0.999999, min(0.999999, r))), z * 1.06 / math.sqrt(n - 3)
    return math.tanh(centre - half), math.tanh(centre + half)


def median_interval(values) -> tuple[float, float, float]:
    """(median, low, high): the median (mean of the two middle values for an even count) and the
    distribution-free 95% interval of order statistics (ranks from the binomial(n, 1/2) quantiles),
    which stays valid for censored values (inf sorts last). NaN values are left out."""
    xs = sorted(float(v) for v in values if v is not None and not math.isnan(float(v)))
    n = len(xs)
    if not n:
        return math.nan, math.nan, math.nan
    median = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    from scipy import stats

    k = int(stats.binom.ppf(0.025, n, 0.5))  # P(Binom(n, 1/2) <= k - 1) <= 0.025
    if k < 1:
        return median, math.nan, math.nan
    return median, xs[k - 1], xs[n - k]
