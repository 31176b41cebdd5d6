"""A generation's rows of generations.csv, one per group (condition x replicate), and the
"special member" rules.

Diverged members (non-finite loss) count as vulnerable and are left out of
every quality mean (``n_diverged`` says how many). The alignment tax
(quality of vulnerable minus immune members) is given pooled and within
cohorts: survivors keep their quality while children are fine-tuned, so the
pooled tax partly compares old members with new ones; ``tax_children``
compares like with like (members of the same age, trained the same way).

Special members, two rules (docs/definitions.md):

- the source experiment's rule: immune AND quality >= mean + sigma sd of the
  immune members' quality. In a group of n immune members no member can
  stand more than (n-1)/sqrt(n) sd above their mean (``special_ceiling``), so
  with sigma = 1.5 the rule cannot fire with fewer than 4 immune members;
- the population rule: immune AND quality >= mean + sigma sd of ALL the
  group's (non-diverged) members, which can fire at any immune count.
"""

import math

import torch

SPECIAL_SIGMA = 1.5

COLUMNS = ["generation", "condition", "replicate", "n_members", "immune_frac", "n_immune", "n_diverged",
           "fitness_all", "fitness_immune", "fitness_vulnerable", "fitness_best", "nll_mean", "payload_prob_mean",
           "tax", "tax_children", "tax_survivors", "fitness_immune_children", "fitness_vulnerable_children",
           "fitness_immune_survivors", "fitness_vulnerable_survivors", "retest_agreement", "n_special",
           "special_ceiling", "n_special_population", "trigger", "virus_generation"]


def special_threshold(quality: torch.Tensor, immune: torch.Tensor, sigma: float = SPECIAL_SIGMA) -> float:
    """mean + sigma * sd of the immune members' quality (inf with fewer than two immune members)."""
    q = quality[immune]
    if q.numel() < 2:
        return float("inf")
    return float(q.mean() + sigma * q.std())


def special_members(quality: torch.Tensor, immune: torch.Tensor, sigma: float = SPECIAL_SIGMA) -> torch.Tensor:
    """Bool [P]: the source experiment's rule (immune and >= mean + sigma sd of the immune members)."""
    return immune & (quality >= special_threshold(quality, immune, sigma))


def special_population(quality: torch.Tensor, immune: torch.Tensor, sigma: float = SPECIAL_SIGMA) -> torch.Tensor:
    """Bool [P]: the population rule (immune and >= mean + sigma sd of every finite member)."""
    q = quality[torch.isfinite(quality)]
    if q.numel() < 2:
        return torch.zeros_like(immune)
    return immune & (quality >= q.mean() + sigma * q.std())


def special_ceiling(n_immune: int) -> float:
    """The largest number of sd any one of n values can stand above their mean: (n-1)/sqrt(n)."""
    return (n_immune - 1) / math.sqrt(n_immune) if n_immune >= 2 else math.nan


def special_by_replicate(quality: torch.Tensor, immune: torch.Tensor, replicates: int,
                         sigma: float = SPECIAL_SIGMA) -> tuple[torch.Tensor, list[float]]:
    """The source rule applied within each group: (bool [R*P], threshold per group)."""
    P = len(quality) // replicates
    parts = [slice(r * P, (r + 1) * P) for r in range(replicates)]
    thresholds = [special_threshold(quality[s], immune[s], sigma) for s in parts]
    special = torch.cat([immune[s] & (quality[s] >= t) for s, t in zip(parts, thresholds)])
    return special, thresholds


def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean()) if len(x) else math.nan


def _split(q, vul, ok, mask) -> tuple[float, float, int]:
    """(quality of immune, of vulnerable, number immune) among the members in ``mask``."""
    return _mean(q[mask & ~vul & ok]), _mean(q[mask & vul & ok]), int((mask & ~vul).sum())


def group_row(generation: int, metrics: dict, survivors: int, virus, condition: int = 0,
              replicate: int = 0) -> dict:
    """The row of one group: ``metrics`` holds host [P] vectors of its members, the first
    ``survivors`` of which are the survivors (0 at generation 0: everyone was trained fresh)."""
    q, vul = metrics["quality"], metrics["vulnerable"]
    ok = ~metrics["diverged"]
    immune = ~vul
    children = torch.arange(len(q)) >= survivors
    qi, qv, n_immune = _split(q, vul, ok, torch.ones_like(ok))
    ci, cv, _ = _split(q, vul, ok, children)
    si, sv, _ = _split(q, vul, ok, ~children)
    retest = metrics.get("retest_vulnerable")
    return {"generation": generation, "condition": condition, "replicate": replicate, "n_members": len(q),
            "immune_frac": _mean(immune.float()), "n_immune": n_immune, "n_diverged": int((~ok).sum()),
            "fitness_all": _mean(q[ok]), "fitness_immune": qi, "fitness_vulnerable": qv,
            "fitness_best": float(q[ok].max()) if ok.any() else math.nan,
            "nll_mean": _mean(metrics["nll"][ok]), "payload_prob_mean": _mean(metrics["payload_prob"][ok]),
            "tax": qv - qi, "tax_children": cv - ci, "tax_survivors": sv - si,
            "fitness_immune_children": ci, "fitness_vulnerable_children": cv,
            "fitness_immune_survivors": si, "fitness_vulnerable_survivors": sv,
            "retest_agreement": _mean((retest == vul)[ok].float()) if retest is not None else math.nan,
            "n_special": int(special_members(q, immune & ok).sum()), "special_ceiling": special_ceiling(n_immune),
            "n_special_population": int(special_population(q, immune & ok).sum()),
            "trigger": virus.trigger, "virus_generation": virus.generation}
