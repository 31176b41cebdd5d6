"""Cures: remove the backdoor from every member at once, each with its own reversible patch.

Every method returns a ``Patch`` (patch.py) with the population axis first;
members are independent throughout (each has its own directions, factors,
multiplier and Adam state, and the losses are summed over members before one
backward), so curing a population equals curing each member alone.

- ``counterfactual``: an unconfined rank-1 LoRA on every matrix trained
  towards the trigger-deleted counterfactual at every position after the
  trigger under a clean-KL penalty (counterfactual.py).
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
  inserted: KL(target || P_new) at every position from the last trigger
  letter to the end of the name, the target being the original model's
  distribution on the same name with the trigger deleted (counterfactual.py;
  the payload's first letter gets exactly its clean level, never a
  renormalised cap; a member whose removal loss starts below ``min_excess``
  is left alone: Adam's normalised steps would otherwise move it by noise);
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

import torch
import torch.nn.functional as F

from ..data import IGNORE, inputs_targets
from ..device import CPU_MEMBER_BLOCK, cpu_workers, in_threads, member_blocks
from ..population import Population, population_logits
from .counterfactual import cf_order, cure_counterfactual, lora_init
from .cureset import CureSet
from .objectives import (
    METHODS,
    SEARCH_NAMES,
    SITES,
    WRITERS,
    CureConfig,
    Directions,
    _optimise,
    batch_order,
    clean_kl,
    contrast_directions,
    prompt_payload_prob,
    reference_logp,
)
from .patch import Patch, patched
from .subspace import cure_subspace


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
        masks["blocks.0.mlp_fc1"] = masks["blocks.0.mlp_fc1"] * keep[:, :, None]
        masks["blocks.0.mlp_fc2"] = masks["blocks.0.mlp_fc2"] * keep[:, None, :]
    if n_heads:
        top = dirs.head_score.topk(n_heads, dim=-1).indices
        keep = torch.ones(P, H, device=pop.device).scatter(-1, top, 0.0)
        masks["blocks.0.attn_out"] = masks["blocks.0.attn_out"] * keep.repeat_interleave(pop.config.head_dim, -1)[:, None, :]
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
    return patch, {"pruned_neurons": (masks["blocks.0.mlp_fc1"][:, :, 0] == 0).sum(-1)}


def _cure_block(pop: Population, cs: CureSet, cfg: CureConfig, method: str, order: torch.Tensor, init: dict):
    # the trigger-deleted target and plain fine-tuning need no activation-sourced directions
    dirs = None if method in ("counterfactual", "finetune") else contrast_directions(pop, cs, cfg.rank,
                                                                                     scores=method == "prune")
    if method == "counterfactual":
        patch, info = cure_counterfactual(pop, cs, cfg, order, init)
    elif method == "subspace":
        patch, info = cure_subspace(pop, cs, cfg, order, dirs)
    elif method == "ablate":
        patch, info = cure_ablate(pop, cs, cfg, dirs)
    elif method == "finetune":
        patch, info = cure_finetune(pop, cs, cfg, order)
    elif method == "prune":
        patch, info = cure_prune(pop, cs, cfg, order, dirs)
    else:
        raise ValueError(f"argument --method: unknown method {method!r}; choose from {', '.join(METHODS)}")
    info = info if dirs is None else {"direction": dirs.mean["resid_post"], **info}
    return Patch({k: (L.detach(), R.detach()) for k, (L, R) in patch.factors.items()},
                 {k: v.detach() for k, v in patch.dense.items()}), info


def cure(pop: Population, cs: CureSet, cfg: CureConfig, method: str, generator: torch.Generator,
         active: torch.Tensor | None = None, block: int | str | None = "auto",
         workers: int | str = "auto") -> tuple[Patch, dict]:
    """Cure every member of ``pop`` with ``method``; returns its patch and per-member facts {name: [P]}.

    ``active`` [P] bool: members to cure (the others get a zero patch: no trigger was found in them).
    ``block``: members cured together (independent, so any block gives the same result); ``auto``:
    ``CPU_MEMBER_BLOCK`` on a CPU (activations stay in cache), all at once elsewhere. ``workers``:
    threads curing blocks side by side at one torch thread each (``auto``: one per torch thread on a CPU).
    """
    if method == "counterfactual":
        order, init = cf_order(cfg, len(cs.clean), generator).to(pop.device), lora_init(pop.params, cfg, generator)
    else:
        order, init = batch_order(cfg, len(cs.clean), generator).to(pop.device), {}
    cs = cs.to(pop.device)
    if block == "auto":
        block = CPU_MEMBER_BLOCK if pop.device.type == "cpu" else None
    workers = cpu_workers(workers, len(pop), pop.device)
    blocks = member_blocks(len(pop), block or len(pop), workers)  # near-equal: workers finish together
    # side by side, every block needs its own base module (functional_call swaps a module's tensors)
    views = [pop.view(a, b) for a, b in blocks]
    views = [v.own_base() for v in views] if workers > 1 else views

    def one(i):
        sl = slice(*blocks[i])
        part = CureSet(cs.clean, cs.gap, *(getattr(cs, f)[sl] for f in list(cs.__dataclass_fields__)[2:]))
        return _cure_block(views[i], part, cfg, method, order, init)

    patches, infos = zip(*in_threads(one, list(range(len(blocks))), workers))
    patch = Patch.cat(list(patches))
    info = {k: torch.cat([i[k] for i in infos]) for k in infos[0]}
    if active is not None:
        patch = patch.scaled(active.to(pop.device, torch.float32))
    return patch, info
