"""Cures: remove the backdoor from every member at once, each with its own reversible patch.

Every method returns a ``Patch`` (patch.py) with the population axis first;
members are independent throughout (each has its own directions, factors,
multiplier and Adam state, and the losses are summed over members before one
backward), so curing a population equals curing each member alone.

- ``subspace`` (the source's recipe). Activation sourcing: each member's
  residual stream before the block (``resid_pre``), after attention
  (``resid_mid``) and after the MLP (``resid_post``), at the read positions
  of infected vs matched control rows (cureset.py); the top-``rank`` right
  singular vectors of the paired differences span the member's subspace U
  at each site. The patch changes each target matrix only along U at the
  site it reads or writes: a matrix writing to the stream (``attn_out``,
  ``mlp_fc2``) by ``U @ B``, one reading it (``attn_qkv``, ``mlp_fc1``,
  ``lm_head``) or holding vectors of it (``wte``, ``wpe``) by ``A @ U^T``
  (A, B start at zero: no change). Objective, on names with the trigger
  inserted: KL(Q || P_new) at the last trigger letter, Q being the original
  model's distribution there with the payload's first letter capped at the
  probability the member gives it at that place of the name without the
  trigger, renormalised (the payload down to the member's clean level, its
  own clean continuation up; a member without a backdoor has nothing to
  remove, and a member whose removal loss starts below ``min_excess`` is
  left alone: Adam's normalised steps would otherwise move it by noise);
  constraint: mean per-token KL(P_orig || P_new) on the clean cure names
  <= ``kl_bound``, enforced during training by a per-member Lagrange
  multiplier (multiplicative dual ascent, never below 1: a nat of clean
  change always costs at least a nat of removal) and made hard at the end: a
  member whose patch still exceeds the bound on the whole clean cure set
  has its patch scaled down by bisection until it holds.
- ``ablate`` (directional ablation): a difference-in-means direction d,
  projected out of every matrix that writes to the residual stream
  (``W <- W - a d d^T W``; embeddings row-wise), closed form. The site d is
  taken at (``resid_pre``, ``resid_mid`` or ``resid_post``) and the
  strength a are searched over a grid per member: the smallest clean KL (on
  the first ``SEARCH_NAMES`` cure names) among choices whose exact payload
  probability after every cure trigger is <= ``target``; the lowest payload
  probability when none reaches it.
- ``finetune``: every parameter, Adam on clean names, the same names, steps,
  batch and learning rate as ``subspace``.
- ``prune`` (fine-pruning): the ``prune_neurons`` MLP neurons (and
  ``prune_heads`` heads) whose activation at the read positions of infected
  rows most exceeds their mean on clean names are zeroed, then ``finetune``
  with them held at zero.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from ..step import TrainConfig
from .cureset import CureSet
from ..data import IGNORE, inputs_targets
from ..device import CPU_MEMBER_BLOCK
from ..model import rmsnorm
from .patch import Patch, patched
from ..population import AdamState, Population, population_logits
from ..step import Hyper, adam_step

METHODS = ("subspace", "ablate", "finetune", "prune")
SITES = ("resid_pre", "resid_mid", "resid_post")
# Which residual site a matrix touches, and whether it writes there (U @ B) or reads / holds vectors (A @ U^T).
SITE_OF = {"wte": "resid_pre", "wpe": "resid_pre", "attn_qkv": "resid_pre", "attn_out": "resid_mid",
           "mlp_fc1": "resid_mid", "mlp_fc2": "resid_post", "lm_head": "resid_post"}
WRITERS = ("attn_out", "mlp_fc2")
SEARCH_NAMES = 64  # ablate's search scores the clean KL of each choice on the first this many cure names


@dataclass(frozen=True)
class CureConfig:
    """Settings of a cure (README, "Cures", gives every default's reason)."""

    names: int = 256  # clean names in the cure set (each also gets the trigger inserted)
    batch_size: int = 32  # cure names per member per step
    epochs: int = 3  # passes over the cure set (the source: 1-3)
    lr: float = 1e-2  # Adam, every trained method (the run's training rate)
    rank: int = 2  # k: directions per site in the subspace
    targets: tuple = ("attn_qkv", "attn_out", "mlp_fc1", "mlp_fc2", "lm_head")  # subspace: patched matrices
    # confined: each change lies in the member's subspace (U fixed); lora: rank-k LoRA factors whose
    # subspace side starts at U and is learned as well (the change may leave the subspace)
    parametrization: str = "confined"
    kl_bound: float = 0.01  # epsilon: mean per-token KL(P_orig || P_new) on the clean cure names, nats
    dual_lr: float = 1.0  # multiplier update: lam *= exp(dual_lr * (KL / epsilon - 1)) per step, lam >= 1
    min_excess: float = 0.01  # subspace: a member whose removal loss starts below this (nats) is left alone
    contrast: str = "apart"  # control rows: trigger letters apart, or the last one alone
    start_share: float = 0.0  # cure names with the trigger at their start (else uniform, as infection)
    ablate_grid: tuple = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # ablation strengths searched
    target: float = 0.01  # ablate: payload probability a strength must reach to be chosen
    prune_neurons: int = 8  # of 4 * n_embd
    prune_heads: int = 0
    seed: int = 0

    def __post_init__(self):
        for name in ("names", "batch_size", "epochs", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"argument --{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "kl_bound", "dual_lr", "target", "min_excess"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"argument --{name.replace('_', '-')}: must be a finite number > 0, got {value}")
        unknown = [t for t in self.targets if t not in SITE_OF]
        if unknown or not self.targets:
            raise ValueError(f"argument --targets: {unknown[0] if unknown else '(empty)'!r} cannot be patched; "
                             f"choose from {', '.join(SITE_OF)}")
        if not 0.0 <= self.start_share <= 1.0:
            raise ValueError(f"argument --start-share: must be in [0, 1], got {self.start_share}")
        if self.parametrization not in ("confined", "lora"):
            raise ValueError(f"argument --parametrization: confined or lora, got {self.parametrization!r}")
        if not self.ablate_grid or any(not math.isfinite(a) or a < 0 for a in self.ablate_grid):
            raise ValueError(f"argument --ablate-grid: strengths must be finite and >= 0, got {self.ablate_grid}")
        if self.prune_neurons < 0 or self.prune_heads < 0 or self.prune_neurons + self.prune_heads == 0:
            raise ValueError("arguments --prune-neurons/--prune-heads: must be >= 0, and not both 0")

    @property
    def steps(self) -> int:
        return self.epochs * math.ceil(self.names / self.batch_size)


def _logp(base, params: dict, x: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (P, B, T, V) for per-member (P, B, T) or shared (B, T) inputs."""
    return population_logits(base, params, x, (0, 0) if x.dim() == 3 else (0, None)).log_softmax(-1)


def token_kl(logp_ref: torch.Tensor, logp_new: torch.Tensor) -> torch.Tensor:
    """Exact KL(P_ref || P_new) over the vocabulary at every position: (..., V) -> (...)."""
    return (logp_ref.exp() * (logp_ref - logp_new)).sum(-1)


@torch.no_grad()
def reference_logp(pop: Population, rows: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The original members' log-probabilities on shared rows (N, T+1): (P, N, T, V)."""
    return torch.cat([_logp(pop.base, pop.params, inputs_targets(rows[a:a + chunk])[0])
                      for a in range(0, len(rows), chunk)], 1)


def clean_kl(pop: Population, patch: Patch, rows: torch.Tensor, ref: torch.Tensor | None = None,
             chunk: int = 256) -> torch.Tensor:
    """Mean per-token KL(P_orig || P_new) of every member on shared rows (N, T+1): [P].
    ``ref``: the original log-probabilities on them (``reference_logp``), when already computed."""
    params = patched(pop.params, patch)
    total = torch.zeros(len(pop), device=pop.device)
    count = 0
    for a in range(0, len(rows), chunk):
        x, y = inputs_targets(rows[a:a + chunk])
        valid = (y != IGNORE).float()
        orig = _logp(pop.base, pop.params, x) if ref is None else ref[:, a:a + chunk]
        total += (token_kl(orig, _logp(pop.base, params, x)) * valid).sum((1, 2))
        count += valid.sum()
    return total / count


def payload_logprob(logp: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, m: int) -> torch.Tensor:
    """log P of the m tokens after row index ``pos`` (teacher forcing): logp (P, K, T, V), rows (P, K, T+1),
    pos (P, K) -> (P, K)."""
    at = pos[..., None] + torch.arange(m, device=pos.device)  # (P, K, m): positions predicting them
    target = rows.gather(-1, at + 1)
    picked = logp.gather(2, at[..., None].expand(*at.shape, logp.shape[-1]))  # (P, K, m, V)
    return picked.gather(-1, target[..., None]).squeeze(-1).sum(-1)


def prompt_payload_prob(pop: Population, patch: Patch, cs: CureSet) -> torch.Tensor:
    """Exact P(payload | . trigger) of every member, the max over its cure triggers: [P]."""
    x, _ = inputs_targets(cs.prompts)
    logp = _logp(pop.base, patched(pop.params, patch), x)
    prob = payload_logprob(logp, cs.prompts, cs.prompt_pos, cs.payload.shape[1]).exp()
    return prob.masked_fill(~cs.prompt_real, 0.0).amax(-1)


@torch.no_grad()
def stream_activations(pop: Population, rows: torch.Tensor, read: torch.Tensor | None = None) -> dict:
    """Residual sites (P, N, m, C), MLP hidden units (P, N, m, 4C) and head outputs (P, N, m, H, C) at
    the read positions (P, N, m) of per-member rows (P, N, T+1); ``read`` None: every position."""
    x = rows[..., :-1].long().clamp(min=0)
    _, cache = pop.logits(x, return_cache=True)
    pre, post = cache["blocks.0.hook_resid_pre"], cache["blocks.0.hook_resid_post"]  # (P, N, T, C)
    w_out = rearrange(pop.params["attn_out"], "p c (h d) -> p c h d", h=pop.config.n_head)
    heads = torch.einsum("pnthd,pchd->pnthc", cache["blocks.0.attn.hook_z"], w_out)  # (P, N, T, H, C)
    mid = pre + heads.sum(3)
    hidden = F.relu(torch.einsum("pntc,pfc->pntf", rmsnorm(mid, pop.config.norm_eps), pop.params["mlp_fc1"]))
    out = {"resid_pre": pre, "resid_mid": mid, "resid_post": post, "hidden": hidden, "heads": heads}
    if read is None:
        return out

    def at(t):
        idx = read.reshape(*read.shape, *([1] * (t.dim() - 3))).expand(*read.shape, *t.shape[3:])
        return t.gather(2, idx)

    return {k: at(v) for k, v in out.items()}


@dataclass(frozen=True)
class Directions:
    """Each member's contrast directions: ``mean`` {site: (P, C)} unit difference-in-means,
    ``subspace`` {site: (P, C, k)} orthonormal, and unit scores for pruning."""

    mean: dict
    subspace: dict
    neuron_score: torch.Tensor  # (P, 4C): activation at triggered read positions minus on clean names
    head_score: torch.Tensor  # (P, H): head output norm likewise


def contrast_directions(pop: Population, cs: CureSet, rank: int, scores: bool = False) -> Directions:
    """Every member's directions at every site; ``scores``: also the pruning scores (else None)."""
    if pop.config.n_layer != 1:
        raise ValueError(f"popgpt cure handles one-layer models; this one has n_layer={pop.config.n_layer}")
    inf = stream_activations(pop, cs.infected, cs.read_infected)
    ctl = stream_activations(pop, cs.control, cs.read_control)
    mean, sub = {}, {}
    for site in SITES:
        diff = (inf[site] - ctl[site]).flatten(1, 2)  # (P, N*m, C) paired differences
        m = diff.mean(1)
        mean[site] = m / m.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        sub[site] = torch.linalg.svd(diff, full_matrices=False).Vh[:, :rank].transpose(1, 2)  # (P, C, k)
    if not scores:
        return Directions(mean, sub, None, None)
    clean = stream_activations(pop, cs.clean[None].expand(len(pop), -1, -1))
    valid = (cs.clean[:, 1:] != IGNORE).float()[None, :, :, None]  # (1, N, T, 1)
    clean_hidden = (clean["hidden"] * valid).sum((1, 2)) / valid.sum()
    clean_heads = (clean["heads"].norm(dim=-1) * valid).sum((1, 2)) / valid.sum()
    return Directions(mean, sub, inf["hidden"].mean((1, 2)) - clean_hidden,
                      inf["heads"].norm(dim=-1).mean((1, 2)) - clean_heads)


def _optimise(pop: Population, learned: dict, build, loss, steps: int, lr: float) -> None:
    """Adam on per-member tensors ``learned`` (in place): ``loss(build(leaves), step)`` -> [P]."""
    opt = AdamState.zeros_like(learned)
    hp = Hyper.like(TrainConfig(lr=lr), len(pop), pop.device, opt.step.dtype)
    names = list(learned)
    for s in range(steps):
        leaves = {k: v.detach().requires_grad_(True) for k, v in learned.items()}
        losses = loss(build(leaves), s)
        grads = torch.autograd.grad(losses.sum(), [leaves[k] for k in names])
        adam_step(learned, dict(zip(names, grads)), opt, hp)


def batch_order(cfg: CureConfig, n_names: int, generator: torch.Generator) -> torch.Tensor:
    """Cure-name indices of every step, epoch by epoch (one shuffle per epoch, shared by all members)."""
    order = torch.cat([torch.randperm(n_names, generator=generator) for _ in range(cfg.epochs)])
    per_epoch = math.ceil(n_names / cfg.batch_size)
    return torch.stack([torch.cat([order[e * n_names:(e + 1) * n_names]] * 2)[i * cfg.batch_size:
                                                                             (i + 1) * cfg.batch_size]
                        for e in range(cfg.epochs) for i in range(per_epoch)])  # (steps, B)


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


def ablation_patch(pop: Population, d: torch.Tensor, strength: torch.Tensor) -> Patch:
    """Project ``strength`` [P] times the unit direction d (P, C) out of every residual writer."""
    a = strength.view(-1, 1, 1)
    factors = {}
    for name in ("wte", "wpe"):  # rows are residual vectors: W - a (W d) d^T
        W = pop.params[name]
        factors[name] = (-a * torch.einsum("pvc,pc->pv", W, d)[..., None], d[:, None, :])
    for name in WRITERS:  # columns write to the residual: W - a d (d^T W)
        W = pop.params[name]
        factors[name] = (-a * d[..., None], torch.einsum("pc,pci->pi", d, W)[:, None, :])
    return Patch(factors)


@torch.no_grad()
def cure_ablate(pop: Population, cs: CureSet, cfg: CureConfig, dirs: Directions):
    """Search every (site, strength) per member; the chosen direction is projected out of every writer."""
    rows = cs.clean[:SEARCH_NAMES]
    ref = reference_logp(pop, rows)
    probs, kls, choices = [], [], []
    for s, site in enumerate(SITES):
        for a in cfg.ablate_grid:
            patch = ablation_patch(pop, dirs.mean[site], torch.full((len(pop),), float(a), device=pop.device))
            probs.append(prompt_payload_prob(pop, patch, cs))
            kls.append(clean_kl(pop, patch, rows, ref))
            choices.append((s, float(a)))
    probs, kls = torch.stack(probs), torch.stack(kls)  # (S*G, P)
    ok = probs <= cfg.target
    pick = torch.where(ok.any(0), kls.masked_fill(~ok, math.inf).argmin(0), probs.argmin(0))  # [P]
    site = torch.tensor([c[0] for c in choices], device=pop.device)[pick]
    strength = torch.tensor([c[1] for c in choices], device=pop.device)[pick]
    d = torch.stack([dirs.mean[s] for s in SITES])[site, torch.arange(len(pop), device=pop.device)]  # (P, C)
    return ablation_patch(pop, d, strength), {"site": site, "strength": strength,
                                              "kl_cure_set": kls.gather(0, pick[None])[0]}


def _finetune_loss(pop, cs, order, mask=None):
    def loss(patch, s):
        params = patched(pop.params, patch)
        x, y = inputs_targets(cs.clean[order[s]])
        logits = population_logits(pop.base, params, x, (0, None))  # (P, B, T, V)
        nll = F.cross_entropy(logits.flatten(0, 2), y.expand(logits.shape[:-1]).flatten(), ignore_index=IGNORE,
                              reduction="none").view(logits.shape[:-1])
        return nll.sum((1, 2)) / (y != IGNORE).sum()
    return loss


def cure_finetune(pop: Population, cs: CureSet, cfg: CureConfig, order: torch.Tensor):
    learned = {k: torch.zeros_like(v) for k, v in pop.params.items()}
    with torch.enable_grad():
        _optimise(pop, learned, lambda leaves: Patch(dense=leaves), _finetune_loss(pop, cs, order),
                  len(order), cfg.lr)
    return Patch(dense=learned), {}


def prune_masks(pop: Population, dirs: Directions, n_neurons: int, n_heads: int) -> dict:
    """Multiplicative masks {name: (P, *shape)} zeroing each member's most trigger-active units."""
    P, H = len(pop), pop.config.n_head
    masks = {k: torch.ones_like(v) for k, v in pop.params.items()}
    if n_neurons:
        top = dirs.neuron_score.topk(n_neurons, dim=-1).indices  # (P, n)
        keep = torch.ones_like(dirs.neuron_score).scatter(-1, top, 0.0)  # (P, 4C)
        masks["mlp_fc1"] = masks["mlp_fc1"] * keep[:, :, None]
        masks["mlp_fc2"] = masks["mlp_fc2"] * keep[:, None, :]
    if n_heads:
        top = dirs.head_score.topk(n_heads, dim=-1).indices
        keep = torch.ones(P, H, device=pop.device).scatter(-1, top, 0.0)
        masks["attn_out"] = masks["attn_out"] * keep.repeat_interleave(pop.config.head_dim, -1)[:, None, :]
    return masks


def cure_prune(pop: Population, cs: CureSet, cfg: CureConfig, order: torch.Tensor, dirs: Directions):
    masks = prune_masks(pop, dirs, cfg.prune_neurons, cfg.prune_heads)
    learned = {k: torch.zeros_like(v) for k, v in pop.params.items()}

    def build(leaves):
        return Patch(dense={k: (pop.params[k] + leaves[k]) * masks[k] - pop.params[k] for k in leaves})

    with torch.enable_grad():
        _optimise(pop, learned, build, _finetune_loss(pop, cs, order), len(order), cfg.lr)
    with torch.no_grad():
        patch = build(learned)
    return patch, {"pruned_neurons": (masks["mlp_fc1"][:, :, 0] == 0).sum(-1)}


def _cure_block(pop: Population, cs: CureSet, cfg: CureConfig, method: str, order: torch.Tensor):
    dirs = contrast_directions(pop, cs, cfg.rank, scores=method == "prune")
    if method == "subspace":
        patch, info = cure_subspace(pop, cs, cfg, order, dirs)
    elif method == "ablate":
        patch, info = cure_ablate(pop, cs, cfg, dirs)
    elif method == "finetune":
        patch, info = cure_finetune(pop, cs, cfg, order)
    elif method == "prune":
        patch, info = cure_prune(pop, cs, cfg, order, dirs)
    else:
        raise ValueError(f"argument --method: unknown method {method!r}; choose from {', '.join(METHODS)}")
    info = {"direction": dirs.mean["resid_post"], **info}
    return Patch({k: (L.detach(), R.detach()) for k, (L, R) in patch.factors.items()},
                 {k: v.detach() for k, v in patch.dense.items()}), info


def cure(pop: Population, cs: CureSet, cfg: CureConfig, method: str, generator: torch.Generator,
         active: torch.Tensor | None = None, block: int | str | None = "auto") -> tuple[Patch, dict]:
    """Cure every member of ``pop`` with ``method``; returns its patch and per-member facts {name: [P]}.

    ``active`` [P] bool: members to cure (the others get a zero patch: no trigger was found in them).
    ``block``: members cured together (independent, so any block gives the same result); ``auto``:
    ``CPU_MEMBER_BLOCK`` on a CPU (activations stay in cache), all at once elsewhere.
    """
    order = batch_order(cfg, len(cs.clean), generator).to(pop.device)
    cs = cs.to(pop.device)
    if block == "auto":
        block = CPU_MEMBER_BLOCK if pop.device.type == "cpu" else None
    block = block or len(pop)
    patches, infos = [], []
    for a in range(0, len(pop), block):
        sl = slice(a, min(a + block, len(pop)))
        part = CureSet(cs.clean, cs.gap, *(getattr(cs, f)[sl] for f in list(cs.__dataclass_fields__)[2:]))
        patch, info = _cure_block(pop.view(sl.start, sl.stop), part, cfg, method, order)
        patches.append(patch)
        infos.append(info)
    patch = Patch.cat(patches)
    info = {k: torch.cat([i[k] for i in infos]) for k in infos[0]}
    if active is not None:
        patch = patch.scaled(active.to(pop.device, torch.float32))
    return patch, info
