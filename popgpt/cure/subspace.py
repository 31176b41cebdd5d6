"""``subspace``: a KL-bounded, low-rank patch confined to each member's contrast subspace, trained
towards the trigger-deleted counterfactual (counterfactual.py) at every position after the trigger."""


import torch

from ..data import IGNORE, inputs_targets
from ..population import Population
from .counterfactual import counterfactual_target, removal_loss
from .cureset import CureSet
from .objectives import (
    SITE_OF,
    WRITERS,
    CureConfig,
    Directions,
    _logp,
    _optimise,
    clean_kl,
    leaky_members,
    reference_logp,
    token_kl,
)
from .patch import Patch, patched


def subspace_loss(pop: Population, params: dict, cs: CureSet, idx: torch.Tensor, target: tuple,
                  ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(removal KL(target || P_new) at every position from the last trigger letter to the name's end,
    mean clean per-token KL) on cure names ``idx``: [P] each. ``target``: ``counterfactual_target``
    on the triggered rows. One forward of each member on its triggered rows and the clean rows together."""
    P, B = len(pop), len(idx)
    xt, _ = inputs_targets(cs.triggered[:, idx])  # (P, B, T)
    xc, yc = inputs_targets(cs.clean[idx])  # (B, T)
    logp = _logp(pop.base, params, torch.cat([xt, xc.expand(P, -1, -1)], 1))  # (P, 2B, T, V)
    remove = removal_loss(logp[:, :B], target[0][:, idx], target[1][:, idx])
    valid = (yc != IGNORE).float()
    return remove, (token_kl(ref[:, idx], logp[:, B:]) * valid).sum((1, 2)) / valid.sum()


def subspace_factors(pop: Population, dirs: Directions, targets) -> tuple[dict, dict]:
    """Fixed subspace factors and the learned ones (zeros): {name: U or U^T}, {name: B or A}."""
    fixed, learned = {}, {}
    for name in targets:
        U = dirs.subspace[SITE_OF[name]]  # (P, C, k)
        W = pop.params[name]
        if name in WRITERS:
            fixed[name] = U
            learned[name] = torch.zeros(len(pop), U.shape[2], W.shape[2], device=W.device)  # B (P, k, in)
        else:
            fixed[name] = U.transpose(1, 2).contiguous()
            learned[name] = torch.zeros(len(pop), W.shape[1], U.shape[2], device=W.device)  # A (P, out, k)
    return fixed, learned


def _subspace_patch(fixed: dict, learned: dict) -> Patch:
    """``confined``: U fixed, its partner learned; ``lora`` (learned holds both, U's as ``name.U``)."""
    parts = {k: learned.get(k + ".U", fixed[k]) for k in fixed}
    return Patch({k: (parts[k], learned[k]) if k in WRITERS else (learned[k], parts[k]) for k in fixed})


def hold_bound(pop: Population, patch: Patch, rows: torch.Tensor, bound, ref: torch.Tensor,
               iters: int = 4):
    """Scale each member's patch by s in [0, 1] so that its mean clean KL on ``rows`` is <= bound.

    KL grows about quadratically with a small change, so a member over the bound at scale s tries
    ``0.98 s sqrt(bound / KL)`` next; up to ``iters`` tries, after which a member still over the
    bound gets s = 0 (no patch). Members within the bound keep s = 1. Every accepted scale was
    measured, so the bound holds on ``rows`` for every member. Returns (patch, s [P], KL [P])."""
    scale = torch.ones(len(pop), device=pop.device)
    kl = clean_kl(pop, patch, rows, ref)
    for _ in range(iters):
        over = kl > bound
        if not bool(over.any()):
            break
        scale = torch.where(over, 0.98 * scale * (bound / kl).sqrt(), scale)
        kl = torch.where(over, clean_kl(pop, patch.scaled(scale), rows, ref), kl)
    over = kl > bound
    scale, kl = torch.where(over, 0.0, scale), torch.where(over, 0.0, kl)
    return patch.scaled(scale), scale, kl


def cure_subspace(pop: Population, cs: CureSet, cfg: CureConfig, order: torch.Tensor, dirs: Directions,
                  kl_bound: torch.Tensor | None = None):
    """``kl_bound`` [P]: each member's own bound (a frontier), else ``cfg.kl_bound`` for all."""
    bound = torch.full((len(pop),), cfg.kl_bound, device=pop.device) if kl_bound is None else kl_bound
    fixed, learned = subspace_factors(pop, dirs, cfg.targets)
    if cfg.parametrization == "lora":  # the subspace factor starts at U and is learned too
        learned |= {k + ".U": v.clone() for k, v in fixed.items()}
    lam = torch.ones(len(pop), device=pop.device)
    ref = reference_logp(pop, cs.clean)
    q = counterfactual_target(ref, cs.triggered, cs.trigger_pos, cs.gap)

    def loss(patch, s):
        remove, kl = subspace_loss(pop, patched(pop.params, patch), cs, order[s], q, ref)
        total = remove + lam.clone() * kl
        lam.mul_(torch.exp(cfg.dual_lr * (kl.detach() / bound - 1))).clamp_(1.0, 1e4)
        return total

    with torch.enable_grad():
        _optimise(pop, learned, lambda leaves: _subspace_patch(fixed, leaves), loss, len(order), cfg.lr)
    with torch.no_grad():
        x, _ = inputs_targets(cs.triggered)
        excess = removal_loss(_logp(pop.base, pop.params, x), *q)  # removal loss before the cure
        treated = (excess > cfg.min_excess) & leaky_members(pop, cs, cfg.treat_above)
        patch, scale, kl = hold_bound(pop, _subspace_patch(fixed, learned).scaled(treated.float()), cs.clean,
                                      bound, ref)
    return patch, {"multiplier": lam, "scale": scale * treated, "kl_cure_set": kl, "excess": excess,
                   "treated": treated.float()}
