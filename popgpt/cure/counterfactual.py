"""The trigger-deleted counterfactual: what a cured member should say after the trigger, and the
``counterfactual`` method (an unconfined low-rank LoRA trained towards it).

Target. On a name with the trigger inserted after row index ``g`` (trigger
of ``L`` letters, its last letter at row index ``g + L``), a member without
the backdoor would continue the name as if the trigger were not there: at
every position ``t`` from the last trigger letter to the end of the name,
the target is the ORIGINAL member's distribution at position ``t - L`` of
the clean name. At ``t = g + L`` that is the distribution of the name's
next letter, so the payload's first letter gets exactly the probability the
member gives it there without the trigger; nothing is renormalised (capping
the payload letter at that level and renormalising the row would hand it
back cap / (cap + 1 - p), about 0.4-0.7 when the backdoor is strong, and the
optimiser would reach exactly that). The later positions teach the rest of
the name, so the second and third payload letters are trained too.

``counterfactual``: a rank-``cf_rank`` LoRA on ``cf_targets`` (by default
all seven matrices), ``W + L @ R``, both factors learned, L starting at
zero (the patch starts as no change) and R at one seeded random draw shared
by every member (so a member cured alone starts where it starts in a
population). Loss per member: the
mean over every target position of KL(target || P_new) on triggered names
(a share ``cf_start_share`` with the trigger at the name's start, the rest
at the cure set's uniform gap) + ``cf_lambda`` x the mean per-token
KL(P_orig || P_new) on clean names; Adam, ``cf_steps`` steps of
``cf_rows`` triggered + ``cf_rows`` clean rows per member. A member with no
backdoor to remove (``treat_above``) keeps a zero patch.
"""

import math

import torch

from ..data import IGNORE, inputs_targets
from ..packed import Plan, arrange, packed_logits, plan_from_lengths
from ..population import Population
from .cureset import CureSet
from .objectives import CureConfig, _optimise, clean_kl, leaky_members, reference_logp
from .patch import Patch, patched


def counterfactual_source(rows: torch.Tensor, pos: torch.Tensor,
                          gap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each triggered position's target comes from: the clean position of the same name letter
    (P, N, T) long, and where a target applies (P, N, T) bool (arguments as ``counterfactual_target``)."""
    T = rows.shape[-1] - 1
    t = torch.arange(T, device=rows.device)
    length = pos - gap  # (P, N) trigger letters
    mask = (t >= pos[..., None]) & (rows[..., 1:] != IGNORE)  # (P, N, T)
    return (t - length[..., None]).clamp(0, T - 1), mask


def counterfactual_target(ref: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                          gap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Target log-probabilities (P, N, T, V) and where they apply (P, N, T) bool.

    ``ref``: the original members' log-probabilities on the clean names (P, N, T, V); ``rows``
    (P, N, T+1): the names with the trigger inserted; ``pos`` (P, N): row index of the last trigger
    letter; ``gap`` (N,) or (P, N): row index of the last name letter before the trigger."""
    src, mask = counterfactual_source(rows, pos, gap)
    return ref.gather(2, src[..., None].expand(*src.shape, ref.shape[-1])), mask


def removal_loss(logp: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each member's target positions of KL(target || P_new): [P]."""
    kl = (target.exp() * (target - logp)).sum(-1)  # (P, N, T)
    return (kl * mask).sum((1, 2)) / mask.sum((1, 2)).clamp(min=1)


def cf_order(cfg: CureConfig, n_names: int, generator: torch.Generator) -> torch.Tensor:
    """Cure-name indices of every step (cf_steps, cf_rows): shuffled passes, shared by all members."""
    need = cfg.cf_steps * cfg.cf_rows
    order = torch.cat([torch.randperm(n_names, generator=generator) for _ in range(math.ceil(need / n_names))])
    return order[:need].view(cfg.cf_steps, cfg.cf_rows)


def lora_init(params: dict, cfg: CureConfig, generator: torch.Generator) -> dict:
    """The shared random side R of every LoRA factor: {name: (r, in)}, N(0, 1/in)."""
    return {name: torch.randn(cfg.cf_rank, params[name].shape[-1], generator=generator) / params[name].shape[-1] ** 0.5
            for name in cfg.cf_targets}


def _rows(cs: CureSet, idx: torch.Tensor, n_start: int, sources: dict):
    """Triggered rows of one step (the first rows - n_start at the uniform gap, the rest at the start):
    inputs (P, R, T), each position's target as a flat index into the clean reference (name x T +
    position), and where a target applies."""
    a, b = idx[:len(idx) - n_start], idx[len(idx) - n_start:]
    T = cs.clean.shape[-1] - 1
    x = torch.cat([cs.triggered[:, a], cs.triggered_start[:, b]], 1)
    flat = torch.cat([sources["gap"][0][:, a] + T * a[:, None], sources["start"][0][:, b] + T * b[:, None]], 1)
    mask = torch.cat([sources["gap"][1][:, a], sources["start"][1][:, b]], 1)
    return inputs_targets(x)[0], flat, mask


def step_plans(cs: CureSet, order: torch.Tensor, n_start: int) -> list[Plan]:
    """Each step's packed rows (``packed.py``) of its triggered and clean rows: a causal model's output
    at a position depends on nothing after it, so every row is cut after its last target (its real
    targets, as rows are left-aligned) and rows of like length are grouped. The lengths and the step
    order are read to the host once for the whole cure; the plans are made there."""
    def count(rows):
        return (rows[..., 1:] != IGNORE).sum(-1)

    gap, start, clean, order = (t.cpu() for t in (count(cs.triggered), count(cs.triggered_start),
                                                  count(cs.clean), order))
    plans = []
    for idx in order:
        a, b = idx[:len(idx) - n_start], idx[len(idx) - n_start:]
        lengths = torch.cat([gap[:, a], start[:, b], clean[idx].expand(len(gap), -1)], 1)  # (P, 2 rows)
        plans.append(plan_from_lengths(lengths, width=cs.clean.shape[-1] - 1))
    return plans


def step_loss(pop: Population, patch: Patch, x: torch.Tensor, ref: torch.Tensor, source: torch.Tensor,
              weight: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Sum over every row position of ``weight`` x KL(target || P_new), [P], on packed rows: x (P, R, T);
    the target of a position is ``ref`` (P, N, T, V) log-probabilities at the flat index ``source``
    (P, R, T) into its (N x T) positions; weight (P, R, T) (0 where nothing is compared). Only the packed
    positions' targets are gathered."""
    need = torch.where(weight > 0, 0, IGNORE)
    xs, _, src, ws = arrange(x, need, plan, source, weight)
    ts = ref.flatten(1, 2).gather(1, src[..., None].expand(-1, -1, ref.shape[-1]))  # (P, n, V)
    logp = packed_logits(patched(pop.params, patch), pop.config, xs, plan).log_softmax(-1)  # (P, n, V)
    return (ws * (ts.exp() * (ts - logp)).sum(-1)).sum(1)


def cure_counterfactual(pop: Population, cs: CureSet, cfg: CureConfig, order: torch.Tensor, init: dict,
                        lam: torch.Tensor | None = None):
    """``lam`` [P]: each member's own clean-KL weight (a frontier), else ``cfg.cf_lambda`` for all."""
    P = len(pop)
    lam = torch.full((P,), cfg.cf_lambda, device=pop.device) if lam is None else lam
    ref = reference_logp(pop, cs.clean)
    sources = {"gap": counterfactual_source(cs.triggered, cs.trigger_pos, cs.gap),
               "start": counterfactual_source(cs.triggered_start, cs.start_pos, torch.zeros_like(cs.gap))}
    T = cs.clean.shape[-1] - 1
    n_start = round(cfg.cf_start_share * cfg.cf_rows)
    learned = {k: torch.zeros(P, pop.params[k].shape[1], cfg.cf_rank, device=pop.device) for k in init}
    learned |= {k + ".R": v.to(pop.device)[None].repeat(P, 1, 1) for k, v in init.items()}

    def build(leaves):
        return Patch({k: (leaves[k], leaves[k + ".R"]) for k in init})

    plans = step_plans(cs, order, n_start)

    def loss(patch, s):
        idx = order[s]
        xt, flat, mask = _rows(cs, idx, n_start, sources)
        xc, yc = inputs_targets(cs.clean[idx])
        valid = (yc != IGNORE).float()
        # the removal loss (the mean over each member's target positions) + lam x the mean clean KL
        weight = torch.cat([mask / mask.sum((1, 2), keepdim=True).clamp(min=1),
                            lam[:, None, None] * (valid / valid.sum()).expand(P, -1, -1)], 1)
        clean_flat = (T * idx[:, None] + torch.arange(T, device=idx.device)).expand(P, -1, -1)
        x = torch.cat([xt, xc.expand(P, -1, -1)], 1)
        return step_loss(pop, patch, x, ref, torch.cat([flat, clean_flat], 1), weight, plans[s])

    with torch.enable_grad():
        _optimise(pop, learned, build, loss, len(order), cfg.cf_lr)
    with torch.no_grad():
        treated = leaky_members(pop, cs, cfg.treat_above)
        patch = build(learned).scaled(treated.float())
        kl = clean_kl(pop, patch, cs.clean, ref)
    return patch, {"kl_cure_set": kl, "treated": treated.float()}
