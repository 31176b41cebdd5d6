"""Hand-written circuits with known answers: an induction circuit and a positional window head.

Attention-only, no norms, one-hot subspaces of the residual stream:
tokens [0, V), the previous token [V, 2V), positions [2V, 2V + T), the
copied token [2V + T, 3V + T). Head dimension >= T so that positions fit.
"""

import torch

from popgpt import ModelConfig, Population

SHARP = 40.0  # attention logit of a match: the pattern is one-hot up to e^-40


def planted_config(vocab: int = 16, block_size: int = 24, n_head: int = 3) -> ModelConfig:
    C = 3 * vocab + block_size
    C += (-C) % n_head
    return ModelConfig(vocab_size=vocab, block_size=block_size, n_embd=C, n_head=n_head, n_layer=2,
                       norm=False, mlp=False)


def _blank(cfg: ModelConfig) -> dict:
    V, T, C = cfg.vocab_size, cfg.block_size, cfg.n_embd
    p = {name: torch.zeros(shape) for name, shape in cfg.param_shapes().items()}
    p["wte"][torch.arange(V), torch.arange(V)] = 1.0
    p["wpe"][torch.arange(T), 2 * V + torch.arange(T)] = 1.0
    p["lm_head"][torch.arange(V), 2 * V + T + torch.arange(V)] = 10.0
    assert C >= 3 * V + T
    return p


def _head(p: dict, cfg: ModelConfig, layer: int, h: int, q_rows, k_rows, v_rows, o_cols, scale=SHARP) -> None:
    """Head h of ``layer``: query dim i reads residual q_rows[i], key dim i reads k_rows[i] (so the score
    is SHARP when they match), value dim i reads v_rows[i] and writes it to residual o_cols[i]."""
    C, D = cfg.n_embd, cfg.head_dim
    qkv, out = p[f"blocks.{layer}.attn_qkv"], p[f"blocks.{layer}.attn_out"]
    s = scale * D ** 0.5
    for i, (a, b) in enumerate(zip(q_rows, k_rows)):
        qkv[h * D + i, a] = s
        qkv[C + h * D + i, b] = 1.0
    for i, (a, b) in enumerate(zip(v_rows, o_cols)):
        qkv[2 * C + h * D + i, a] = 1.0
        out[b, h * D + i] = 1.0


def induction_circuit(cfg: ModelConfig) -> dict:
    """Layer 0 head 0: previous-token head (query at t matches key position t - 1) writing the token it
    reads into the previous-token subspace; layer 1 head 0: query = current token, key = previous token
    (the token after an earlier copy), value = that token, written where ``lm_head`` reads."""
    V, T = cfg.vocab_size, cfg.block_size
    p = _blank(cfg)
    pos = [2 * V + t for t in range(T)]
    _head(p, cfg, 0, 0, pos[1:], pos[:-1], range(V), [V + i for i in range(V)])
    _head(p, cfg, 1, 0, range(V), [V + i for i in range(V)], range(V), [2 * V + T + i for i in range(V)])
    return p


def window_head(cfg: ModelConfig, back: int, layer: int = 1) -> dict:
    """One head attending exactly ``back`` positions back and copying the token there to the output."""
    V, T = cfg.vocab_size, cfg.block_size
    p = _blank(cfg)
    pos = [2 * V + t for t in range(T)]
    _head(p, cfg, layer, 0, pos[back:], pos[:-back], range(V), [2 * V + T + i for i in range(V)])
    return p


def population_of(cfg: ModelConfig, params: list[dict]) -> Population:
    pop = Population.from_seeds(cfg, list(range(len(params))))
    with torch.no_grad():
        for name, value in pop.params.items():
            value.copy_(torch.stack([p[name] for p in params]))
    return pop
