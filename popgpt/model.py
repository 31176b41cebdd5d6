"""MicroGPT: one tiny character-level transformer, and nothing about populations.

The architecture follows the smallest GPTs people train by hand: no biases,
parameter-free RMSNorm before each sub-block and before the head, ReLU MLP,
learned absolute positions, causal self-attention written out by hand
(`F.scaled_dot_product_attention` has no vmap batching rule on CPU and
head_dim is 6, so fused kernels bring nothing).

Parameter names, in registration (and initialisation) order:
``wte, wpe, lm_head, attn_qkv, attn_out, mlp_fc1, mlp_fc2``.
With ``n_layer > 1`` the block tensors carry a layer prefix:
``layer0.attn_qkv, layer1.attn_qkv, ...``. Weights are stored as
``(out_features, in_features)`` and applied with ``F.linear``.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .data import VOCAB_SIZE

BLOCK_TENSORS = ("attn_qkv", "attn_out", "mlp_fc1", "mlp_fc2")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of one MicroGPT."""

    vocab_size: int = VOCAB_SIZE  # 26 letters + one boundary token (start and end)
    block_size: int = 21  # longest infected name (15 + 5) + the start token
    n_embd: int = 24  # residual width
    n_head: int = 4  # head_dim = n_embd / n_head = 6
    n_layer: int = 1
    init_std: float = 0.08  # N(0, init_std^2) for every weight matrix
    norm_eps: float = 1e-5  # RMSNorm epsilon

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_embd", "n_head", "n_layer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for name in ("init_std", "norm_eps"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def block_prefixes(self) -> list[str]:
        """Name prefix of each layer's block tensors ('' when there is one layer)."""
        if self.n_layer == 1:
            return [""]
        return [f"layer{i}." for i in range(self.n_layer)]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's name and shape, in registration order (``named_parameters``')."""
        C, V, T = self.n_embd, self.vocab_size, self.block_size
        shapes = {"wte": (V, C), "wpe": (T, C), "lm_head": (V, C)}
        block = {"attn_qkv": (3 * C, C), "attn_out": (C, C),
                 "mlp_fc1": (4 * C, C), "mlp_fc2": (C, 4 * C)}
        for prefix in self.block_prefixes():
            shapes.update({prefix + k: s for k, s in block.items()})
        return shapes


def rmsnorm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def causal_attention(x, qkv_w, out_w, n_head: int, return_pattern: bool = False, head_mask=None):
    """Multi-head causal self-attention on x (B, T, C); matmul + mask + softmax.

    ``head_mask`` (H,) scales each head's output (0 ablates it). With
    ``return_pattern`` also returns the pattern (B, H, T, T) and the per-head
    values z (B, T, H, D) that ``out_w`` maps back to the residual stream.
    """
    B, T, C = x.shape
    q, k, v = F.linear(x, qkv_w).split(C, dim=-1)  # 3 x (B, T, C)
    q, k, v = (rearrange(t, "b t (h d) -> b h t d", h=n_head) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * (C // n_head) ** -0.5  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # (B, H, T, T)
    z = rearrange(pattern @ v, "b h t d -> b t h d")
    if head_mask is not None:
        z = z * head_mask[:, None]
    out = F.linear(rearrange(z, "b t h d -> b t (h d)"), out_w)
    return (out, pattern, z) if return_pattern else out


class _Block(nn.Module):
    """Holds one layer's tensors when n_layer > 1 (gives them a 'layerI.' prefix)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        for name in BLOCK_TENSORS:
            shape = config.param_shapes()[config.block_prefixes()[0] + name]
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))


class MicroGPT(nn.Module):
    """A character-level GPT: ``forward(idx (B, T)) -> logits (B, T, V)``.

    ``generator`` makes initialisation independent of the global RNG; without
    it, initialisation draws from the global RNG in registration order, so a
    model built under ``torch.manual_seed(s)`` equals one built with
    ``generator=torch.Generator().manual_seed(s)``.
    """

    def __init__(self, config: ModelConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        shapes = config.param_shapes()
        self.wte = nn.Parameter(torch.empty(shapes["wte"]))
        self.wpe = nn.Parameter(torch.empty(shapes["wpe"]))
        self.lm_head = nn.Parameter(torch.empty(shapes["lm_head"]))
        if config.n_layer == 1:
            for name in BLOCK_TENSORS:
                self.register_parameter(name, nn.Parameter(torch.empty(shapes[name])))
        else:
            for i in range(config.n_layer):
                self.add_module(f"layer{i}", _Block(config))
        if self.wte.device.type != "meta":
            with torch.no_grad():
                for name, p in self.named_parameters():
                    p.normal_(0.0, config.init_std, generator=generator)

    def _blocks(self) -> list[nn.Module]:
        if self.config.n_layer == 1:
            return [self]
        return [getattr(self, f"layer{i}") for i in range(self.config.n_layer)]

    def forward(self, idx: torch.Tensor, return_cache: bool = False, head_mask=None):
        """Logits (B, T, V) for token ids idx (B, T).

        With ``return_cache=True`` also returns a dict of activations named as
        in TransformerLens (``blocks.{i}.attn.hook_pattern`` (B, H, T, T),
        ``blocks.{i}.attn.hook_z`` (B, T, H, D), ``blocks.{i}.hook_resid_pre``
        / ``hook_resid_post``) as explicit outputs, so the forward stays
        usable under ``vmap``. ``head_mask`` (n_layer, H) scales every head's
        output (0 ablates a head).
        """
        cfg = self.config
        B, T = idx.shape
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        x = self.wte[idx] + self.wpe[:T]  # (B, T, C)
        cache = {}
        for i, block in enumerate(self._blocks()):
            cache[f"blocks.{i}.hook_resid_pre"] = x
            attn, pattern, z = causal_attention(rmsnorm(x, cfg.norm_eps), block.attn_qkv, block.attn_out,
                                                cfg.n_head, return_pattern=True,
                                                head_mask=None if head_mask is None else head_mask[i])
            cache[f"blocks.{i}.attn.hook_pattern"] = pattern
            cache[f"blocks.{i}.attn.hook_z"] = z
            x = x + attn
            hidden = F.relu(F.linear(rmsnorm(x, cfg.norm_eps), block.mlp_fc1))  # (B, T, 4C)
            x = x + F.linear(hidden, block.mlp_fc2)
            cache[f"blocks.{i}.hook_resid_post"] = x
        logits = F.linear(rmsnorm(x, cfg.norm_eps), self.lm_head)  # (B, T, V)
        return (logits, cache) if return_cache else logits
