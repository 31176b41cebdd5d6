"""``popgpt induction``'s tables: one row per depth and task (with intervals and chance levels), one per member."""

import math

import torch

from ..stats import ci_text, count_interval, mean_interval
from .induction_scores import later


def _cell(values, low=-math.inf, high=math.inf) -> str:
    values = [v for v in values if not math.isnan(v)]
    return ci_text(*mean_interval(values, low, high), len(values)) if values else "-"


def _scored(values, chance_level: float, low=-math.inf, high=math.inf) -> str:
    return f"{_cell(values, low, high)} (chance {chance_level:.3f})"


def _share(flags) -> str:
    flags = [bool(f) for f in flags]
    p, lo, hi = count_interval(flags)
    return f"{sum(flags)}/{len(flags)} ({100 * p:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}])" if flags else "-"


def _best(d: dict, key: str, idx: list, layer0: bool = False) -> list[float]:
    final = d[key][-1]  # (P, L, H)
    values = final[:, 0].flatten(1).max(1).values if layer0 else later(final)
    return [float(values[i]) for i in idx]


def summary_rows(depths: list[dict], cfg) -> list[dict]:
    """One row per depth and task: members that grew induction heads in layer >= 1 and textbook ones (Wilson
    95%), phase and loss steps, final scores beside their chance levels, losses, the causal check (means with
    95% t intervals over members)."""
    rows = []
    for d in depths:
        ch, later_ok = d["chance"], d["depth"] > 1
        for task in cfg.tasks:
            idx = [i for i, m in enumerate(d["layout"]) if m["task"] == task]
            c = d["causal"]
            row = {"depth": d["depth"], "task": task, "members": len(idx),
                   "grew induction heads (layer >= 1)": _share(c["detected"][idx]),
                   "textbook (+ layer-0 previous-token head, K-composition > chance)": _share(d["textbook"][idx]),
                   "phase step": _cell([float(d["phase_step"][i]) for i in idx], 0),
                   "loss step": _cell([float(d["loss_step"][i]) for i in idx], 0)}
            ind = _best(d, "induction", idx) if later_ok else _best(d, "induction", idx, layer0=True)
            na = "- (one layer)"
            row.update({
                "best induction score, layer >= 1 (depth 1: layer 0)": _scored(ind, ch["induction"], 0, 1),
                "best shifted copying score, layer >= 1": _scored(_best(d, "shifted", idx), ch["shifted"], 0, 1)
                if later_ok else na,
                "best direct-logit copying, layer >= 1": _scored(_best(d, "copying", idx), 0.0) if later_ok else na,
                "best previous-token score, layer 0": _scored(_best(d, "previous", idx, layer0=True),
                                                               ch["previous"], 0, 1),
                "K-composition prev -> induction head": _scored([float(d["k_composition"][i]) for i in idx],
                                                                d["k_chance"], 0, 1) if later_ok else na})
            row.update({"loss 1st copy": _cell(d["loss_first"][-1, idx].tolist(), 0),
                        "loss 2nd copy": _cell(d["loss_second"][-1, idx].tolist(), 0),
                        "ablate induction heads: d loss 2nd": _cell(c["induction_second"][idx].tolist()),
                        "ablate a control head: d loss 2nd": _cell(c["random_second"][idx].tolist())})
            rows.append(row)
    return rows


def _names(mask: torch.Tensor, H: int) -> str:
    return " ".join(f"L{j // H}H{j % H}" for j in mask.flatten().nonzero().flatten().tolist())


def member_rows(depths: list[dict]) -> list[dict]:
    """One row per member: its place in the grid, final scores, phase steps and causal check."""
    rows = []
    for d in depths:
        c = d["causal"]
        H = d["induction"].shape[-1]
        for i, m in enumerate(d["layout"]):
            ind = d["induction"][-1, i].flatten()
            if d["depth"] > 1:
                ind = ind.clone()
                ind[:H] = -math.inf  # the best head of layers >= 1
            j = int(ind.argmax())
            rows.append({"depth": d["depth"], "member": i, **m, "init_seed": d["seeds"][m["init"]],
                         "best_induction_score": float(ind.max()), "best_layer": j // H, "best_head": j % H,
                         "best_shifted_score": float(d["shifted"][-1, i].flatten()[j]),
                         "best_shift": int(d["shift"][-1, i].flatten()[j]),
                         "best_copying_dla": float(d["copying"][-1, i].flatten()[j]),
                         "best_previous_score_layer0": float(d["previous"][-1, i, 0].max()),
                         "k_composition": float(d["k_composition"][i]), "textbook": bool(d["textbook"][i]),
                         "loss_first": float(d["loss_first"][-1, i]), "loss_second": float(d["loss_second"][-1, i]),
                         "phase_step": float(d["phase_step"][i]), "loss_step": float(d["loss_step"][i]),
                         "grew_induction_heads": bool(c["detected"][i]),
                         "induction_heads": _names(c["induction_heads"][i], H),
                         "control_head": _names(c["random_head"][i], H),
                         "excluded_from_control": _names(c["excluded"][i], H),
                         "ablate_induction_d_loss_second": float(c["induction_second"][i]),
                         "ablate_control_d_loss_second": float(c["random_second"][i]),
                         "ablate_induction_d_loss_first": float(c["induction_first"][i]),
                         "ablate_control_d_loss_first": float(c["random_first"][i])})
    return rows
