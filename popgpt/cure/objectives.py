"""What every cure method shares: its settings, exact per-token KL, payload probabilities, the
members' residual activations and contrast directions, a per-member Adam loop."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from ..data import IGNORE, inputs_targets
from ..model import rmsnorm
from ..population import AdamState, Population, population_logits
from ..step import Hyper, TrainConfig, adam_step
from .cureset import CureSet
from .patch import Patch, patched

METHODS = ("counterfactual", "subspace", "ablate", "finetune", "prune")
SITES = ("resid_pre", "resid_mid", "resid_post")
# Which residual site a matrix touches, and whether it writes there (U @ B) or reads / holds vectors (A @ U^T).
# (Cures handle one-layer models: the block's tensors are blocks.0.*.)
SITE_OF = {"wte": "resid_pre", "wpe": "resid_pre", "blocks.0.attn_qkv": "resid_pre", "blocks.0.attn_out": "resid_mid",
           "blocks.0.mlp_fc1": "resid_mid", "blocks.0.mlp_fc2": "resid_post", "lm_head": "resid_post"}
WRITERS = ("blocks.0.attn_out", "blocks.0.mlp_fc2")
SEARCH_NAMES = 64  # ablate's search scores the clean KL of each choice on the first this many cure names



def _sites(name: str, targets) -> tuple:
    """``targets`` as patchable tensor names (a bare block tensor means layer 0's); errors name ``--name``."""
    bad = [t for t in targets if t not in SITE_OF and "blocks.0." + t not in SITE_OF]
    if bad or not targets:
        raise ValueError(f"argument --{name.replace('_', '-')}: {bad[0] if bad else '(empty)'!r} cannot be patched; "
                         f"choose from {', '.join(SITE_OF)}")
    return tuple(t if t in SITE_OF else "blocks.0." + t for t in targets)

@dataclass(frozen=True)
class CureConfig:
    """Settings of a cure (README, "Cures", gives every default's reason)."""

    names: int = 256  # clean names in the cure set (each also gets the trigger inserted)
    batch_size: int = 32  # cure names per member per step
    epochs: int = 3  # passes over the cure set (the source: 1-3)
    lr: float = 1e-2  # Adam, every trained method (the run's training rate)
    rank: int = 2  # k: directions per site in the subspace
    # subspace: patched matrices; a bare block tensor name (attn_qkv) means the block's (blocks.0.attn_qkv)
    targets: tuple = ("attn_qkv", "attn_out", "mlp_fc1", "mlp_fc2", "lm_head")
    # confined: each change lies in the member's subspace (U fixed); lora: rank-k LoRA factors whose
    # subspace side starts at U and is learned as well (the change may leave the subspace)
    parametrization: str = "confined"
    kl_bound: float = 0.01  # epsilon: mean per-token KL(P_orig || P_new) on the clean cure names, nats
    dual_lr: float = 1.0  # multiplier update: lam *= exp(dual_lr * (KL / epsilon - 1)) per step, lam >= 1
    min_excess: float = 0.01  # subspace: a member whose removal loss starts below this (nats) is left alone
    # subspace, counterfactual: a member whose exact payload probability after its trigger (at a name's start, or
    # the mean inside the cure names) is at most this has no backdoor to remove and is left alone (the
    # trigger-deleted target would otherwise also rewrite how a clean member reads the inserted letters)
    treat_above: float = 0.01
    contrast: str = "apart"  # control rows: trigger letters apart, or the last one alone
    start_share: float = 0.0  # cure names with the trigger at their start (else uniform, as infection)
    ablate_grid: tuple = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # ablation strengths searched
    target: float = 0.01  # ablate: payload probability a strength must reach to be chosen
    prune_neurons: int = 8  # of 4 * n_embd
    prune_heads: int = 0
    # counterfactual (counterfactual.py): rank 1 suffices for one behaviour and keeps the patch to 1 number per
    # row and column of each matrix; lambda 30 is where leakage is ~0 with the clean KL still ~0.002 on the quick
    # preset (larger trades leakage for KL); 100 Adam steps at the run's rate converge; 64 + 64 rows per step
    cf_rank: int = 1
    cf_lambda: float = 30.0  # weight of the mean clean per-token KL
    cf_steps: int = 100
    cf_lr: float = 1e-2
    cf_rows: int = 64  # triggered rows and clean rows per member per step
    cf_start_share: float = 0.5  # triggered rows with the trigger at the name's start (the rest: uniform gap)
    cf_targets: tuple = tuple(SITE_OF)  # all seven matrices
    seed: int = 0

    def __post_init__(self):
        for name in ("names", "batch_size", "epochs", "rank", "cf_rank", "cf_steps", "cf_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"argument --{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "kl_bound", "dual_lr", "target", "min_excess", "cf_lambda", "cf_lr", "treat_above"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"argument --{name.replace('_', '-')}: must be a finite number > 0, got {value}")
        object.__setattr__(self, "targets", _sites("targets", self.targets))
        for name in ("start_share", "cf_start_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"argument --{name.replace('_', '-')}: must be in [0, 1], got {getattr(self, name)}")
        object.__setattr__(self, "cf_targets", _sites("cf_targets", self.cf_targets))
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
def leaky_members(pop: Population, cs: CureSet, above: float) -> torch.Tensor:
    """Members with a backdoor to remove: exact P(payload) after a trigger at the start (the max over
    its cure triggers) or its mean inside the cure names (teacher forcing) > ``above``: [P] bool."""
    x, _ = inputs_targets(cs.infected)
    inside = payload_logprob(_logp(pop.base, pop.params, x), cs.infected, cs.read_infected[..., 0],
                             cs.payload.shape[1]).exp().mean(-1)
    return torch.maximum(prompt_payload_prob(pop, Patch(), cs), inside) > above


@torch.no_grad()
def stream_activations(pop: Population, rows: torch.Tensor, read: torch.Tensor | None = None) -> dict:
    """Residual sites (P, N, m, C), MLP hidden units (P, N, m, 4C) and head outputs (P, N, m, H, C) at
    the read positions (P, N, m) of per-member rows (P, N, T+1); ``read`` None: every position."""
    x = rows[..., :-1].long().clamp(min=0)
    _, cache = pop.logits(x, return_cache=True)
    pre, post = cache["blocks.0.hook_resid_pre"], cache["blocks.0.hook_resid_post"]  # (P, N, T, C)
    w_out = rearrange(pop.params["blocks.0.attn_out"], "p c (h d) -> p c h d", h=pop.config.n_head)
    heads = torch.einsum("pnthd,pchd->pnthc", cache["blocks.0.attn.hook_z"], w_out)  # (P, N, T, H, C)
    mid = pre + heads.sum(3)
    hidden = F.relu(torch.einsum("pntc,pfc->pntf", rmsnorm(mid, pop.config.norm_eps), pop.params["blocks.0.mlp_fc1"]))
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
