"""Sweeps over every head, neuron layer or position, on top of the cache: effect tables per member.

A metric is any function ``metric(logits (P, B, T, V)) -> [P]`` (one number
per member): ``mean_nll(targets)`` (a clean loss, an in-context loss on a
slice of positions), ``logit_diff(a, b, position)`` (a payload logit
difference), or one of your own.

- ``ablation_sweep``: ablate each (layer, head) in turn, in every member at
  once (each member its own head); the metric's change, (P, L, H).
- ``patch_sweep``: run ``tokens`` with the activation at ``hook`` replaced,
  at one (layer, head) or one (layer, position) at a time, by the one a run
  on other tokens recorded (``source``: that run's cache); the metric's
  change, (P, L, H) or (P, L, T). Patching clean activations into a
  corrupted run ("denoising") or the reverse ("noising") is the choice of
  which tokens and which source you pass.
"""

import torch
import torch.nn.functional as F

from ..data import IGNORE
from ..population import Population
from .cache import HEAD_HOOKS, PATTERN_HOOKS, ablate_heads, patch, run_with_cache


def mean_nll(targets: torch.Tensor):
    """Metric: each member's mean next-token NLL over the non-IGNORE ``targets`` (B, T) or (P, B, T)."""
    def metric(logits):
        y = targets.to(logits.device).expand(logits.shape[:-1])
        nll = F.cross_entropy(logits.flatten(0, 2), y.flatten(), ignore_index=IGNORE, reduction="none")
        return nll.view_as(y).sum((1, 2)) / (y != IGNORE).sum((1, 2))
    return metric


def logit_diff(good: int, bad: int, position: int = -1):
    """Metric: mean over the batch of logit[good] - logit[bad] at ``position``."""
    def metric(logits):
        last = logits[:, :, position]  # (P, B, V)
        return (last[..., good] - last[..., bad]).mean(1)
    return metric


@torch.no_grad()
def ablation_sweep(pop: Population, tokens: torch.Tensor, metric, mode: str = "zero",
                   means: dict | None = None) -> torch.Tensor:
    """metric(each head ablated) - metric(nothing ablated), (P, L, H); every member ablates its own head."""
    cfg = pop.config
    base = metric(run_with_cache(pop, tokens)[0])
    out = torch.zeros(len(pop), cfg.n_layer, cfg.n_head, device=pop.device)
    for layer in range(cfg.n_layer):
        for h in range(cfg.n_head):
            heads = torch.zeros(len(pop), cfg.n_layer, cfg.n_head, dtype=torch.bool, device=pop.device)
            heads[:, layer, h] = True
            logits, _ = run_with_cache(pop, tokens, edits=ablate_heads(pop, heads, mode, means))
            out[:, layer, h] = metric(logits) - base
    return out


@torch.no_grad()
def patch_sweep(pop: Population, tokens: torch.Tensor, source: dict, metric, hook: str = "attn.hook_z",
                over: str = "heads") -> torch.Tensor:
    """metric(patched) - metric(unpatched) with ``blocks.{l}.{hook}`` taken from ``source`` at one
    head (``over="heads"``: (P, L, H)) or one position (``over="positions"``: (P, L, T)) at a time."""
    cfg = pop.config
    if over not in ("heads", "positions"):
        raise ValueError(f"over must be 'heads' or 'positions', got {over!r}")
    if over == "heads" and not hook.endswith(HEAD_HOOKS + PATTERN_HOOKS):
        raise ValueError(f"{hook} has no head axis: sweep it over positions")
    names = [f"blocks.{layer}.{hook}" for layer in range(cfg.n_layer)]
    missing = [n for n in names if n not in source]
    if missing:
        raise ValueError(f"the source cache lacks {', '.join(missing)} (run_with_cache(..., names=...) them)")
    base = metric(run_with_cache(pop, tokens)[0])
    n = cfg.n_head if over == "heads" else tokens.shape[-1]
    out = torch.zeros(len(pop), cfg.n_layer, n, device=pop.device)
    for layer, name in enumerate(names):
        for j in range(n):
            edit = patch(name, source[name], heads=[j]) if over == "heads" else patch(name, source[name], positions=[j])
            out[:, layer, j] = metric(run_with_cache(pop, tokens, edits=[edit])[0]) - base
    return out
