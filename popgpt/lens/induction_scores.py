"""Per-head scores on ``ScoringRows``, with the level a head that knows nothing would get.

For every member, layer and head (P, L, H), averaged over the predictable
second-copy queries q (token s_i, whose twin s_i sits at ``twin`` in the
first copy):

- ``induction``: attention mass on ``twin + 1``, the token after the earlier
  copy (the textbook induction head; 1.0 for a perfect one, since scoring
  tokens are distinct);
- ``duplicate``: mass on ``twin``;
- ``shifted``: the largest, over offsets d in ``OFFSETS``, of the mass on
  ``twin + d`` (``shift`` holds that d): a copying circuit that is not
  textbook (layer 0 reading 2 back, layer 1 attending 3 after the twin)
  scores here and not as induction;
- ``previous``: mass of every query t >= 1 of the rows on key t - 1;
- ``copying``: direct logit attribution: the head's output at q (its ``z``
  through its slice of ``attn_out``, scaled by the final RMSNorm of the
  full residual) dotted with the predicted token's unembedding minus the
  mean unembedding: how much the head alone raises the right next token.

Chance levels (``chance``): a head attending uniformly over the causal keys
puts 1 / (t + 1) on each, so its mass on one chosen key averages
``mean(1 / (q + 1))`` over the scored queries (the same for every offset of
``shifted``, the best of several offsets of one uniform head); a head with
no output direction has copying 0.

``k_composition`` is Elhage et al.'s K-composition of a layer-0 head h0 into
a later head h1: ||W_QK^h1 W_OV^h0||_F / (||W_QK^h1||_F ||W_OV^h0||_F), with
its chance level the same ratio for Gaussian matrices of the same shapes.
"""

import math

import torch
from einops import rearrange

from ..population import Population
from .cache import run_with_cache
from .heads import head_outputs
from .induction_task import ScoringRows

OFFSETS = tuple(range(-3, 13))  # d = 0: duplicate, 1: induction; shifted circuits seen at d = 2..6
SCORES = ("previous", "duplicate", "induction", "shifted", "copying")


def _nll(logits: torch.Tensor, rows: ScoringRows, positions: torch.Tensor) -> torch.Tensor:
    """Mean NLL per member of the query's target predicted at ``positions``: [P]."""
    logp = logits[:, rows.row, positions].log_softmax(-1)  # (P, Q, V)
    return -logp.gather(-1, rows.target[None, :, None].expand(len(logits), -1, 1))[..., 0].mean(1)


def _attention(pattern: torch.Tensor, rows: ScoringRows) -> dict:
    """Attention scores of one layer's pattern (P, B, H, T, T): (P, H) each, and the best offsets."""
    at = pattern.transpose(2, 3)[:, rows.row, rows.query]  # (P, Q, H, T): every key of every scored query
    by_offset = []
    for d in OFFSETS:
        key = rows.twin + d
        ok = (key >= 0) & (key <= rows.query)
        mass = at.gather(-1, key.clamp(0, pattern.shape[-1] - 1)[None, :, None, None].expand(
            at.shape[0], -1, at.shape[2], 1))[..., 0]  # (P, Q, H)
        by_offset.append((mass * ok[None, :, None]).mean(1))
    by_offset = torch.stack(by_offset, -1)  # (P, H, D)
    best = by_offset.max(-1)
    T = pattern.shape[-1]
    t = torch.arange(1, T, device=pattern.device)
    valid = (t[None, :] < rows.ends[:, None]).float()  # (B, T-1)
    prev = pattern[..., t, t - 1]  # (P, B, H, T-1)
    previous = (prev * valid[None, :, None]).sum((1, 3)) / valid.sum()
    return {"induction": by_offset[..., OFFSETS.index(1)], "duplicate": by_offset[..., OFFSETS.index(0)],
            "shifted": best.values, "shift": torch.tensor(OFFSETS, device=pattern.device)[best.indices],
            "previous": previous}


@torch.no_grad()
def head_scores(pop: Population, rows: ScoringRows, edits=()) -> dict:
    """Every score of ``SCORES`` and ``shift`` (P, L, H), and the copy losses ``loss_first`` (the
    first-copy twins predicting the same tokens: nothing to copy yet) and ``loss_second`` [P]."""
    cfg = pop.config
    L = cfg.n_layer
    rows = rows.to(pop.device)
    names = [f"blocks.{layer}.attn.{h}" for layer in range(L) for h in ("hook_pattern", "hook_z")]
    logits, cache = run_with_cache(pop, rows.tokens, [*names, f"blocks.{L - 1}.hook_resid_post"], edits)
    final = cache[f"blocks.{L - 1}.hook_resid_post"][:, rows.row, rows.query]  # (P, Q, C)
    scale = torch.rsqrt(final.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) if cfg.norm else torch.ones_like(
        final[..., :1])
    unembed = pop.params["lm_head"]  # (P, V, C)
    direction = unembed[:, rows.target] - unembed.mean(1, keepdim=True)  # (P, Q, C)
    out = {k: [] for k in (*SCORES, "shift")}
    for layer in range(L):
        for k, v in _attention(cache[f"blocks.{layer}.attn.hook_pattern"], rows).items():
            out[k].append(v)
        contrib = head_outputs(pop, cache, layer)[:, rows.row, rows.query] * scale[:, :, None]  # (P, Q, H, C)
        out["copying"].append(torch.einsum("pqhc,pqc->ph", contrib, direction) / len(rows.query))
    out = {k: torch.stack(v, 1) for k, v in out.items()}
    out["loss_first"], out["loss_second"] = _nll(logits, rows, rows.twin), _nll(logits, rows, rows.query)
    return out


def chance(rows: ScoringRows) -> dict:
    """What a head attending uniformly (and writing nothing in particular) scores on ``rows``."""
    uniform = (1.0 / (rows.query.double() + 1)).mean().item()
    t = torch.arange(1, rows.tokens.shape[1])
    valid = t[None, :] < rows.ends[:, None]
    previous = ((1.0 / (t.double() + 1))[None, :] * valid).sum().item() / valid.sum().item()
    return {"induction": uniform, "duplicate": uniform, "shifted": uniform, "previous": previous, "copying": 0.0}


def later(values: torch.Tensor) -> torch.Tensor:
    """The best over heads of layers >= 1 of (..., L, H) scores (-inf at depth 1): (...)."""
    if values.shape[-2] < 2:
        return torch.full(values.shape[:-2], -math.inf, device=values.device)
    return values[..., 1:, :].flatten(-2).max(-1).values


def _qk_ov(pop: Population, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W_QK (P, H, C, C) (query side on the left) and W_OV (P, H, C, C) of every head of a layer."""
    H = pop.config.n_head
    prefix = pop.config.block_prefixes()[layer]
    q, k, v = rearrange(pop.params[prefix + "attn_qkv"], "p (s h d) c -> s p h d c", s=3, h=H)
    o = rearrange(pop.params[prefix + "attn_out"], "p c (h d) -> p h c d", h=H)
    return q.transpose(-1, -2) @ k, o @ v


def _kcomp(qk: torch.Tensor, ov: torch.Tensor) -> torch.Tensor:
    """K-composition of every (h0 of ``ov``, h1 of ``qk``): (..., H0, H1)."""
    prod = qk[..., None, :, :, :] @ ov[..., :, None, :, :]  # (..., H0, H1, C, C)
    norms = qk.flatten(-2).norm(dim=-1)[..., None, :] * ov.flatten(-2).norm(dim=-1)[..., :, None]
    return prod.flatten(-2).norm(dim=-1) / norms.clamp_min(1e-30)  # a head that writes nothing composes 0


@torch.no_grad()
def k_composition(pop: Population, layer: int = 1) -> torch.Tensor:
    """K-composition of each layer-0 head into each head of ``layer``: (P, H0, H1)."""
    qk, _ = _qk_ov(pop, layer)
    _, ov = _qk_ov(pop, 0)
    return _kcomp(qk, ov)


def k_composition_chance(pop: Population, draws: int = 64, seed: int = 0) -> float:
    """Mean K-composition of Gaussian W_Q, W_K, W_V, W_O of this model's shapes."""
    C, D = pop.config.n_embd, pop.config.head_dim
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(draws, 1, D, C, generator=g) for _ in range(3))
    o = torch.randn(draws, 1, C, D, generator=g)
    return _kcomp(q.transpose(-1, -2) @ k, o @ v).mean().item()
