"""``subspace``: a KL-bounded, low-rank patch confined to each member's contrast subspace."""


import torch

from ..data import IGNORE, inputs_targets
from ..population import Population
from .cureset import CureSet
from .objectives import SITE_OF, WRITERS, CureConfig, Directions, _logp, _optimise, clean_kl, reference_logp, token_kl
from .patch import Patch, patched


@torch.no_grad()
def removal_target(pop: Population, cs: CureSet) -> torch.Tensor:
    """Q at the last trigger letter of every member's triggered rows: (P, N, V). The original
    distribution there, with the payload's first letter capped at the probability the member gives
    it at the same place of the name without the trigger, renormalised: the payload goes down to
    the member's own clean level, everything else keeps its proportions (a member without a
    backdoor has Q = P_orig: nothing to remove)."""
    V, first = pop.config.vocab_size, cs.payload[:, :1]  # (P, 1)
    x, _ = inputs_targets(cs.triggered)
    at = cs.trigger_pos[..., None, None].expand(*cs.trigger_pos.shape, 1, V)  # (P, N, 1, V)
    p = _logp(pop.base, pop.params, x).gather(2, at).squeeze(2).exp()  # (P, N, V)
    xc, _ = inputs_targets(cs.clean)
    clean = _logp(pop.base, pop.params, xc)[:, torch.arange(len(cs.gap)), cs.gap].exp()  # (P, N, V)
    cap = clean.gather(-1, first[:, None, :].expand(-1, p.shape[1], 1))  # (P, N, 1)
    q = p.scatter(-1, first[:, None, :].expand(-1, p.shape[1], 1),
                  torch.minimum(p.gather(-1, first[:, None, :].expand(-1, p.shape[1], 1)), cap))
    return q / q.sum(-1, keepdim=True)


def subspace_loss(pop: Population, params: dict, cs: CureSet, idx: torch.Tensor, q: torch.Tensor,
                  ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(removal KL(Q || P_new) at the trigger, mean clean per-token KL) on cure names ``idx``: [P] each.
    One forward of each member on its triggered rows and the clean rows together."""
    P, B = len(pop), len(idx)
    xt, _ = inputs_targets(cs.triggered[:, idx])  # (P, B, T)
    xc, yc = inputs_targets(cs.clean[idx])  # (B, T)
    logp = _logp(pop.base, params, torch.cat([xt, xc.expand(P, -1, -1)], 1))  # (P, 2B, T, V)
    pos = cs.trigger_pos[:, idx]
    at_trigger = logp[:, :B].gather(2, pos[..., None, None].expand(P, B, 1, logp.shape[-1])).squeeze(2)
    qb = q[:, idx]
    remove = (qb * (qb.clamp(min=1e-30).log() - at_trigger)).sum(-1).mean(-1)
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


def hold_bound(pop: Population, patch: Patch, rows: torch.Tensor, bound: float, ref: torch.Tensor,
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


def cure_subspace(pop: Population, cs: CureSet, cfg: CureConfig, order: torch.Tensor, dirs: Directions):
    fixed, learned = subspace_factors(pop, dirs, cfg.targets)
    if cfg.parametrization == "lora":  # the subspace factor starts at U and is learned too
        learned |= {k + ".U": v.clone() for k, v in fixed.items()}
    lam = torch.ones(len(pop), device=pop.device)
    q = removal_target(pop, cs)
    ref = reference_logp(pop, cs.clean)

    def loss(patch, s):
        remove, kl = subspace_loss(pop, patched(pop.params, patch), cs, order[s], q, ref)
        total = remove + lam.clone() * kl
        lam.mul_(torch.exp(cfg.dual_lr * (kl.detach() / cfg.kl_bound - 1))).clamp_(1.0, 1e4)
        return total

    with torch.enable_grad():
        _optimise(pop, learned, lambda leaves: _subspace_patch(fixed, leaves), loss, len(order), cfg.lr)
    with torch.no_grad():
        x, _ = inputs_targets(cs.triggered)
        at = cs.trigger_pos[..., None, None].expand(*cs.trigger_pos.shape, 1, q.shape[-1])
        p0 = _logp(pop.base, pop.params, x).gather(2, at).squeeze(2)  # (P, N, V)
        excess = (q * (q.clamp(min=1e-30).log() - p0)).sum(-1).mean(-1)  # removal loss before the cure
        treated = excess > cfg.min_excess
        patch, scale, kl = hold_bound(pop, _subspace_patch(fixed, learned).scaled(treated.float()), cs.clean,
                                      cfg.kl_bound, ref)
    return patch, {"multiplier": lam, "scale": scale * treated, "kl_cure_set": kl, "excess": excess,
                   "treated": treated.float()}
