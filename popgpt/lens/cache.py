"""The microscope: a batched activation cache and interventions, per member.

``run_with_cache(pop, tokens, names)`` runs every member at once and returns
the logits (P, B, T, V) and the activations asked for, named as in
TransformerLens (``model.hook_names``) with the population axis first:
``blocks.{l}.attn.hook_z`` is (P, B, T, H, d_head), ``hook_pattern`` (P, B,
H, T_q, T_k), ``hook_resid_pre`` (P, B, T, C), ``mlp.hook_post`` (P, B, T,
4C). The activations are outputs of the functional forward under ``vmap``,
never collected by forward hooks (hooks leak batched tensors out of vmap),
and only the names asked for are kept.

Every intervention is one primitive, an ``Edit``: at the activation ``name``,
``torch.where(mask, value, activation)``, with ``mask`` and ``value`` carrying
the population axis first, so each member gets its own. Builders make the
usual ones:

- ``ablate_heads(pop, heads [P, L, H])``: zero a head's ``hook_z`` (its
  output), or with ``mode="mean"`` replace it by its mean over a reference
  batch (``activation_means``: one mean per member, position and head);
- ``ablate_neurons(pop, neurons [P, L, 4C])``: the same on ``mlp.hook_post``;
- ``patch(name, source, positions, heads)``: replace an activation at the
  given positions (and heads) by the one a source run recorded (``source``
  is that run's cache entry, P first).

Where a member's mask is False, ``where`` returns its activation unchanged,
bit for bit: an edit of member 0 leaves every other member's logits exactly
as they were (the tests check this).
"""

from dataclasses import dataclass

import torch
from torch.func import functional_call

from ..model import ModelConfig, hook_names
from ..population import Population

HEAD_HOOKS = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")  # (B, T, H, D)
PATTERN_HOOKS = ("attn.hook_attn_scores", "attn.hook_pattern")  # (B, H, T_q, T_k)


@dataclass(frozen=True)
class Edit:
    """At activation ``name``: ``where(mask, value, activation)``, member by member.

    ``mask`` and ``value``: P first, the rest broadcastable to one member's
    activation (e.g. a head's ``hook_z`` mask is (P, 1, 1, H, 1)).
    """

    name: str
    mask: torch.Tensor
    value: torch.Tensor


def check_names(config: ModelConfig, names) -> tuple[str, ...]:
    """The names as a tuple; an unknown name is a ValueError listing the known ones."""
    known = hook_names(config)
    names = (names,) if isinstance(names, str) else tuple(names)
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown activation name(s) {', '.join(map(repr, bad))}; "
                         f"this model has: {', '.join(known)}")
    return names


def run_with_cache(pop: Population, tokens: torch.Tensor, names=(), edits=()) -> tuple[torch.Tensor, dict]:
    """Logits (P, B, T, V) and ``{name: activation with P first}`` for the names asked for.

    ``tokens``: one batch (B, T) shared by all members or one per member
    (P, B, T). ``edits``: ``Edit``s applied in order during the forward.
    """
    names = check_names(pop.config, names)
    check_names(pop.config, [e.name for e in edits])
    P = len(pop)
    grouped: dict = {}
    for e in edits:
        if e.mask.shape[0] != P or e.value.shape[0] != P:
            raise ValueError(f"edit at {e.name}: mask and value need the population axis first "
                             f"(P={P}), got {tuple(e.mask.shape)} and {tuple(e.value.shape)}")
        grouped.setdefault(e.name, []).append((e.mask, e.value))
    if tokens.dim() not in (2, 3) or (tokens.dim() == 3 and tokens.shape[0] != P):
        raise ValueError(f"tokens must be (B, T) or (P={P}, B, T), got {tuple(tokens.shape)}")
    base = pop.base

    def one(params, member_edits, x):
        def edit(name, a):
            for mask, value in member_edits.get(name, ()):
                a = torch.where(mask, value, a)
            return a

        return functional_call(base, params, (x,), {"return_cache": True, "names": names,
                                                    "edit": edit if member_edits else None})

    return torch.vmap(one, in_dims=(0, 0, 0 if tokens.dim() == 3 else None))(pop.params, grouped,
                                                                              tokens.to(pop.device))


@torch.no_grad()
def activation_means(pop: Population, tokens: torch.Tensor, names) -> dict:
    """Each member's mean activation over a reference batch, per position: {name: (P, T, ...)}.

    ``mode="mean"`` ablation replaces an activation by this mean; use
    reference sequences of the length the ablated run reads.
    """
    _, cache = run_with_cache(pop, tokens, names)
    return {k: v.mean(1) for k, v in cache.items()}


def _member_mask(mask: torch.Tensor, P: int, what: str, shape: tuple) -> torch.Tensor:
    if mask.dtype != torch.bool or tuple(mask.shape) != (P, *shape):
        raise ValueError(f"{what} mask must be bool of shape {(P, *shape)}, got {mask.dtype} {tuple(mask.shape)}")
    return mask


def ablate_heads(pop: Population, heads: torch.Tensor, mode: str = "zero", means: dict | None = None) -> list[Edit]:
    """Edits ablating, per member, the heads marked True in ``heads`` (P, L, H): their ``hook_z``
    zeroed (``mode="zero"``) or set to ``means`` (``activation_means`` of ``hook_z``; ``"mean"``)."""
    cfg = pop.config
    heads = _member_mask(heads.to(pop.device), len(pop), "head", (cfg.n_layer, cfg.n_head))
    return _ablate(pop, heads, "attn.hook_z", lambda m: m[:, None, None, :, None], mode, means)


def ablate_neurons(pop: Population, neurons: torch.Tensor, mode: str = "zero",
                   means: dict | None = None) -> list[Edit]:
    """Edits ablating, per member, the MLP neurons marked True in ``neurons`` (P, L, 4C) at ``mlp.hook_post``."""
    cfg = pop.config
    neurons = _member_mask(neurons.to(pop.device), len(pop), "neuron", (cfg.n_layer, 4 * cfg.n_embd))
    return _ablate(pop, neurons, "mlp.hook_post", lambda m: m[:, None, None, :], mode, means)


def _ablate(pop, mask, hook, shape_mask, mode, means) -> list[Edit]:
    if mode not in ("zero", "mean"):
        raise ValueError(f"ablation mode must be 'zero' or 'mean', got {mode!r}")
    edits = []
    for layer in range(pop.config.n_layer):
        name = f"blocks.{layer}.{hook}"
        if not mask[:, layer].any():
            continue
        member_mask = shape_mask(mask[:, layer])
        if mode == "zero":
            value = torch.zeros((len(pop),) + (1,) * (member_mask.dim() - 1), device=pop.device)
        else:
            if means is None or name not in means:
                raise ValueError(f"mean ablation needs activation_means(...) of {name}")
            value = means[name][:, None]  # (P, 1, T, ...): the mean of every position
        edits.append(Edit(name, member_mask, value))
    return edits


def _positions(index, T: int, device) -> torch.Tensor:
    """A bool (T,) mask from None (all), an int, a sequence of ints or a bool mask."""
    if index is None:
        return torch.ones(T, dtype=torch.bool, device=device)
    if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
        return index.to(device)
    out = torch.zeros(T, dtype=torch.bool, device=device)
    out[torch.as_tensor([index] if isinstance(index, int) else list(index), dtype=torch.long)] = True
    return out


def patch(name: str, source: torch.Tensor, positions=None, heads=None) -> Edit:
    """Replace activation ``name`` by ``source`` (P, B, ...: a source run's cache entry) at
    ``positions`` (query positions for patterns; default all) and ``heads`` (default all;
    only for q, k, v, z, attention scores and patterns)."""
    P, T = source.shape[0], source.shape[-2] if name.endswith(PATTERN_HOOKS) else source.shape[2]
    pos = _positions(positions, T, source.device)
    if name.endswith(HEAD_HOOKS + PATTERN_HOOKS):
        H = source.shape[3] if name.endswith(HEAD_HOOKS) else source.shape[2]
        hd = _positions(heads, H, source.device)
        if name.endswith(HEAD_HOOKS):
            mask = pos[:, None, None] & hd[None, :, None]  # (T, H, 1) of (B, T, H, D)
        else:
            mask = hd[:, None, None] & pos[None, :, None]  # (H, T_q, 1) of (B, H, T_q, T_k)
    else:
        if heads is not None:
            raise ValueError(f"{name} has no head axis; patch it by position only")
        mask = pos[:, None]  # (T, 1) of (B, T, C)
    return Edit(name, mask.expand(P, *mask.shape), source)


def hooked_transformer_config(config: ModelConfig) -> dict:
    """Keyword arguments of TransformerLens's ``HookedTransformerConfig`` for a MicroGPT of ``config``:
    no biases, weightless RMSNorm before each sub-block and the unembedding (``RMSPre``), ReLU MLP
    of width 4C, learned absolute positions, attention scaled by 1/sqrt(d_head)."""
    return {"n_layers": config.n_layer, "d_model": config.n_embd, "n_ctx": config.block_size,
            "d_head": config.head_dim, "n_heads": config.n_head, "d_mlp": 4 * config.n_embd,
            "d_vocab": config.vocab_size, "act_fn": "relu", "normalization_type": "RMSPre",
            "eps": config.norm_eps, "positional_embedding_type": "standard", "default_prepend_bos": False}


def hooked_transformer_state_dict(model) -> dict:
    """A MicroGPT's weights under TransformerLens's names and layouts (zero biases)."""
    cfg = model.config
    C, H, D = cfg.n_embd, cfg.n_head, cfg.head_dim
    sd = {"embed.W_E": model.wte.detach().clone(), "pos_embed.W_pos": model.wpe.detach().clone(),
          "unembed.W_U": model.lm_head.detach().T.clone(), "unembed.b_U": torch.zeros(cfg.vocab_size)}
    for i, block in enumerate(model.blocks):
        pre = f"blocks.{i}."
        for n, w in zip("QKV", block.attn_qkv.detach().split(C, dim=0)):  # each (H*D, C): out x in
            sd[pre + f"attn.W_{n}"] = w.reshape(H, D, C).transpose(1, 2).clone()  # (H, C, D)
            sd[pre + f"attn.b_{n}"] = torch.zeros(H, D)
        sd[pre + "attn.W_O"] = block.attn_out.detach().reshape(C, H, D).permute(1, 2, 0).clone()  # (H, D, C)
        sd[pre + "attn.b_O"] = torch.zeros(C)
        sd[pre + "mlp.W_in"] = block.mlp_fc1.detach().T.clone()  # (C, 4C)
        sd[pre + "mlp.b_in"] = torch.zeros(4 * C)
        sd[pre + "mlp.W_out"] = block.mlp_fc2.detach().T.clone()  # (4C, C)
        sd[pre + "mlp.b_out"] = torch.zeros(C)
    return {k: v.to(model.wte.device) for k, v in sd.items()}


def to_hooked_transformer(model):
    """A TransformerLens ``HookedTransformer`` holding a MicroGPT's weights (e.g. ``pop.member(i)``).

    TransformerLens is an optional extra (``pip install -e ".[lens]"``: 2.x or 3.x; 4.x removed
    ``HookedTransformer``), never a dependency.
    """
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError as e:
        raise ImportError(f"to_hooked_transformer needs TransformerLens 2.x or 3.x (pip install "
                          f"'transformer_lens>=2,<4'); importing it failed: {e}") from e
    hooked = HookedTransformer(HookedTransformerConfig(**hooked_transformer_config(model.config)))
    missing, unexpected = hooked.load_state_dict(hooked_transformer_state_dict(model), strict=False)
    if unexpected or any(not k.endswith((".IGNORE", ".mask")) for k in missing):
        raise ValueError(f"TransformerLens layout changed: missing {missing}, unexpected {unexpected}")
    return hooked.to(model.wte.device).eval()
