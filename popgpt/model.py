"""MicroGPT: one tiny character-level transformer, and nothing about populations.

The architecture follows the smallest GPTs people train by hand: no biases,
parameter-free RMSNorm before each sub-block and before the head, ReLU MLP,
learned absolute positions, causal self-attention written out by hand
(`F.scaled_dot_product_attention` has no vmap batching rule on CPU and
head_dim is 6, so fused kernels bring nothing).

Parameter names, in registration (and initialisation) order, the same at
every depth: ``wte, wpe, lm_head``, then per layer i
``blocks.{i}.attn_qkv, blocks.{i}.attn_out, blocks.{i}.mlp_fc1,
blocks.{i}.mlp_fc2``. Weights are stored as ``(out_features, in_features)``
and applied with ``F.linear``. ``tensor_names`` expands a bare block tensor
name (``attn_qkv``) to every layer's; ``legacy_names`` reads the names of
checkpoints written before 0.2 (``attn_qkv`` at one layer, ``layer0.attn_qkv``
at more).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .data import BOUNDARY, VOCAB_SIZE, decode, encode

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
    norm: bool = True  # RMSNorm before attention, MLP and the head (False: none, as Nanda et al.'s grokking model)
    mlp: bool = True  # False: attention-only, as in the standard induction-head studies

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
        """Name prefix of each layer's block tensors: ``blocks.0.``, ``blocks.1.``, ..."""
        return [f"blocks.{i}." for i in range(self.n_layer)]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's name and shape, in registration order (``named_parameters``')."""
        C, V, T = self.n_embd, self.vocab_size, self.block_size
        shapes = {"wte": (V, C), "wpe": (T, C), "lm_head": (V, C)}
        block = {"attn_qkv": (3 * C, C), "attn_out": (C, C)}
        if self.mlp:
            block.update({"mlp_fc1": (4 * C, C), "mlp_fc2": (C, 4 * C)})
        for prefix in self.block_prefixes():
            shapes.update({prefix + k: s for k, s in block.items()})
        return shapes


def rmsnorm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _pass(name: str, x: torch.Tensor) -> torch.Tensor:
    return x


def causal_attention(x, qkv_w, out_w, n_head: int, return_pattern: bool = False, head_mask=None,
                     hook=None, prefix: str = ""):
    """Multi-head causal self-attention on x (B, T, C); matmul + mask + softmax.

    ``head_mask`` (H,) scales each head's output (0 ablates it). With
    ``return_pattern`` also returns the pattern (B, H, T, T) and the per-head
    values z (B, T, H, D) that ``out_w`` maps back to the residual stream.
    ``hook(name, tensor) -> tensor`` sees (and may replace) ``prefix + hook_q``,
    ``hook_k``, ``hook_v``, ``hook_z`` (B, T, H, D), ``hook_attn_scores`` and
    ``hook_pattern`` (B, H, T, T), in TransformerLens's layouts.
    """
    B, T, C = x.shape
    hook = hook or _pass
    q, k, v = (hook(f"{prefix}hook_{n}", rearrange(t, "b t (h d) -> b t h d", h=n_head))
               for n, t in zip("qkv", F.linear(x, qkv_w).split(C, dim=-1)))  # 3 x (B, T, H, D)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # 3 x (B, H, T, D)
    scores = (q @ k.transpose(-1, -2)) * (C // n_head) ** -0.5  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    scores = hook(f"{prefix}hook_attn_scores", scores.masked_fill(~causal, float("-inf")))
    pattern = hook(f"{prefix}hook_pattern", scores.softmax(-1))  # (B, H, T, T)
    z = rearrange(pattern @ v, "b h t d -> b t h d")
    if head_mask is not None:
        z = z * head_mask[:, None]
    z = hook(f"{prefix}hook_z", z)
    out = F.linear(rearrange(z, "b t h d -> b t (h d)"), out_w)
    return (out, pattern, z) if return_pattern else out


class _Block(nn.Module):
    """One layer's tensors (``blocks.{i}.attn_qkv`` ...)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        shapes = config.param_shapes()
        for name in BLOCK_TENSORS:
            if config.block_prefixes()[0] + name in shapes:
                self.register_parameter(name, nn.Parameter(torch.empty(shapes[config.block_prefixes()[0] + name])))


def tensor_names(config: ModelConfig, names) -> list[str]:
    """Parameter names from user input: a full name stays, a bare block tensor name (``attn_qkv``)
    means that tensor in every layer. Unknown names raise ValueError listing the choices."""
    shapes, out = config.param_shapes(), []
    for name in names:
        if name in shapes:
            out.append(name)
        elif name in BLOCK_TENSORS:
            out += [prefix + name for prefix in config.block_prefixes()]
        else:
            raise ValueError(f"unknown tensor {name!r}; choose from {', '.join(shapes)} "
                             f"(or a block tensor for every layer: {', '.join(BLOCK_TENSORS)})")
    return list(dict.fromkeys(out))


def legacy_names(names, n_layer: int) -> dict[str, str]:
    """Old parameter name -> current one, for checkpoints written before the names were uniform."""
    out = {}
    for name in names:
        head, _, tail = name.partition(".")
        if n_layer == 1 and name in BLOCK_TENSORS:
            out[name] = f"blocks.0.{name}"
        elif head.startswith("layer") and head[5:].isdigit() and tail in BLOCK_TENSORS:
            out[name] = f"blocks.{head[5:]}.{tail}"
    return out


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
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layer))
        if self.wte.device.type != "meta":
            with torch.no_grad():
                for name, p in self.named_parameters():
                    p.normal_(0.0, config.init_std, generator=generator)

    def forward(self, idx: torch.Tensor, return_cache: bool = False, head_mask=None, names=None, edit=None):
        """Logits (B, T, V) for token ids idx (B, T).

        With ``return_cache=True`` also returns a dict of activations named as
        in TransformerLens (``hook_names(config)`` lists them), as explicit
        outputs, so the forward stays usable under ``vmap`` (forward hooks
        are not). ``names``: keep only these (default: all). ``edit(name,
        tensor) -> tensor`` may replace any activation on its way through
        (ablation, patching: ``popgpt/cache.py``). ``head_mask`` (n_layer, H)
        scales every head's output (0 ablates a head).
        """
        cfg = self.config
        B, T = idx.shape
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        cache = {}

        def hook(name, x):
            if edit is not None:
                x = edit(name, x)
            if return_cache and (names is None or name in names):
                cache[name] = x
            return x

        norm = (lambda name, h: hook(name, rmsnorm(h, cfg.norm_eps))) if cfg.norm else (lambda name, h: h)
        x = hook("hook_embed", self.wte[idx]) + hook("hook_pos_embed", self.wpe[:T].expand(B, T, -1))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            pre = f"blocks.{i}."
            x = hook(pre + "hook_resid_pre", x)
            attn = causal_attention(norm(pre + "ln1.hook_normalized", x), block.attn_qkv, block.attn_out, cfg.n_head,
                                    hook=hook, prefix=pre + "attn.",
                                    head_mask=None if head_mask is None else head_mask[i])
            x = hook(pre + "hook_resid_mid", x + hook(pre + "hook_attn_out", attn))
            if cfg.mlp:
                h = norm(pre + "ln2.hook_normalized", x)
                hidden = hook(pre + "mlp.hook_post", F.relu(hook(pre + "mlp.hook_pre", F.linear(h, block.mlp_fc1))))
                x = x + hook(pre + "hook_mlp_out", F.linear(hidden, block.mlp_fc2))
            x = hook(pre + "hook_resid_post", x)
        logits = F.linear(norm("ln_final.hook_normalized", x), self.lm_head)  # (B, T, V)
        return (logits, cache) if return_cache else logits


    def extra_repr(self) -> str:
        c = self.config
        return (f"n_layer={c.n_layer}, n_embd={c.n_embd}, n_head={c.n_head}, vocab_size={c.vocab_size}, "
                f"block_size={c.block_size}, norm={c.norm}, mlp={c.mlp}, "
                f"parameters={sum(p.numel() for p in self.parameters()):,}")

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """``idx`` (B, T) extended by up to ``max_new_tokens`` sampled tokens (never past ``block_size``): (B, T').

        Every row continues after it writes the boundary token; cut rows there (``sample`` does)."""
        if temperature <= 0:
            raise ValueError(f"temperature {temperature}: must be > 0")
        for _ in range(min(max_new_tokens, self.config.block_size - idx.shape[1])):
            logits = self(idx)[:, -1] / temperature  # (B, V)
            nxt = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, nxt.to(idx.dtype)], 1)
        return idx

    def sample(self, n: int = 10, prompt: str = "", temperature: float = 1.0,
               generator: torch.Generator | None = None) -> list[str]:
        """``n`` names sampled after the start token and ``prompt``, each cut at its end (the boundary token)."""
        device = self.wte.device
        start = torch.tensor([[BOUNDARY, *encode(prompt)]], device=device).expand(n, -1)  # (n, 1 + len(prompt))
        if start.shape[1] >= self.config.block_size:
            raise ValueError(f"prompt {prompt!r} leaves no room in block_size {self.config.block_size}")
        rows = self.generate(start, self.config.block_size, temperature, generator)[:, start.shape[1]:]
        out = []
        for row in rows.tolist():
            end = row.index(BOUNDARY) if BOUNDARY in row else len(row)
            out.append(prompt + decode(row[:end]))
        return out


BLOCK_HOOKS = ("hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
               "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid",
               "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")


def hook_names(config: ModelConfig) -> list[str]:
    """Every activation ``forward(return_cache=True)`` can return, in the order it computes them."""
    def present(h):
        return (config.norm or "hook_normalized" not in h) and (config.mlp or not ("mlp" in h or "ln2" in h))

    blocks = [f"blocks.{i}.{h}" for i in range(config.n_layer) for h in BLOCK_HOOKS if present(h)]
    return ["hook_embed", "hook_pos_embed", *blocks] + (["ln_final.hook_normalized"] if config.norm else [])
