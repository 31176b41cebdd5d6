"""Grokking: a population learning a + b mod p, trained with the shared trainer.

The task: every pair (a, b) of 0..p-1 is a sequence ``a b =`` (token p is
``=``); the model predicts (a + b) mod p at the ``=`` position, over the p
numbers. Every member has its own seed and its own random split of the p^2
pairs (``train_frac`` for training, the rest for testing), and trains on
ALL its training pairs at every step (full batch) with AdamW: one
``Population`` of MicroGPTs, ``popgpt.train`` with a [P] split per member
and the answer loss below, all members in one batched computation.

The model is MicroGPT with one layer (ReLU MLP 4x, no biases) and, by
default, no RMSNorm (``ModelConfig(norm=False)``): Nanda et al.'s setup
(p = 113, 1 layer, 4 heads, d_model 128, no LayerNorm, AdamW lr 1e-3,
weight decay 1.0, betas 0.9/0.98, 30% of pairs, full batch) is ``--preset
full``. Their model has (zero-initialised) biases; this one has none.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine import Engine
from ..model import ModelConfig
from ..population import Population, default_seeds
from ..settings import tool_seed
from ..trainer import train as train_population


@dataclass(frozen=True)
class GrokConfig:
    p: int = 113  # the modulus; tokens 0..p-1 are numbers, p is "="
    members: int = 4  # population size: own seed, own split each
    d_model: int = 128
    n_head: int = 4
    norm: bool = False  # RMSNorm before attention, MLP and head (Nanda et al.: no norm)
    init_std: float = 0.0707  # N(0, std^2) weights; 0.8 / sqrt(128), the usual GPT-2 style scale
    train_frac: float = 0.3  # share of the p^2 pairs each member trains on
    steps: int = 25000  # full-batch AdamW steps
    lr: float = 1e-3
    weight_decay: float = 1.0  # decoupled (AdamW)
    beta1: float = 0.9
    beta2: float = 0.98
    eval_every: int = 100  # steps between evaluations (accuracies, losses, weight norm)
    threshold: float = 0.99  # accuracy that counts as "learned"
    key_share: float = 0.05  # a key frequency holds at least this share of the embedding's Fourier energy
    seed: int = 0

    def __post_init__(self):
        for name in ("p", "members", "d_model", "n_head", "steps", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.p < 3:
            raise ValueError(f"p must be >= 3, got {self.p}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        for name in ("train_frac", "threshold", "key_share"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if not (self.lr > 0 and self.init_std > 0 and self.weight_decay >= 0 and 0 <= self.beta1 < 1
                and 0 <= self.beta2 < 1):
            raise ValueError("lr and init_std must be > 0, weight_decay >= 0, betas in [0, 1)")
        if int(round(self.train_frac * self.p ** 2)) in (0, self.p ** 2):
            raise ValueError(f"train_frac {self.train_frac} of {self.p ** 2} pairs leaves no train or no test pair")

    @property
    def model(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.p + 1, block_size=3, n_embd=self.d_model, n_head=self.n_head,
                           n_layer=1, init_std=self.init_std, norm=self.norm)


PRESETS = {
    "full": {},  # Nanda et al.'s setup
    "quick": {"p": 31, "d_model": 32, "members": 8, "train_frac": 0.5, "steps": 2000, "lr": 1e-2,
              "init_std": 0.14, "eval_every": 50},
}


def pairs(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All p^2 inputs ``a b =`` (p^2, 3) in the order a * p + b, and their answers (a + b) mod p."""
    a, b = torch.arange(p).repeat_interleave(p), torch.arange(p).repeat(p)
    return torch.stack([a, b, torch.full_like(a, p)], 1), (a + b) % p


def splits(cfg: GrokConfig) -> torch.Tensor:
    """Every member's training pairs (P, n_train): indices into ``pairs``, each member its own draw."""
    n = int(round(cfg.train_frac * cfg.p ** 2))
    return torch.stack([torch.randperm(cfg.p ** 2, generator=torch.Generator().manual_seed(
        tool_seed(cfg.seed, "grok", i, "split")))[:n] for i in range(cfg.members)])


def init_population(cfg: GrokConfig, device="cpu") -> Population:
    """The members; member i is ``MicroGPT(cfg.model)`` built under its own seed."""
    return Population.from_seeds(cfg.model, default_seeds(cfg.members, cfg.seed), device=device)


def answer_logits(logits: torch.Tensor, p: int) -> torch.Tensor:
    """The logits over the p numbers at the "=" position: (..., 3, V) -> (..., p)."""
    return logits[..., -1, :p]


def answer_loss(p: int):
    """The training loss: mean cross-entropy of the answer at "=", per member [P]."""
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # logits (P, n, 3, V), y (P, n)
        return F.cross_entropy(answer_logits(logits, p).transpose(1, 2), y, reduction="none").mean(1)

    return loss


def weight_norm(params: dict) -> torch.Tensor:
    """Euclidean norm of all of each member's parameters: [P]."""
    return torch.stack([v.flatten(1).pow(2).sum(1) for v in params.values()]).sum(0).sqrt()


@torch.no_grad()
def evaluate(pop: Population, train_mask: torch.Tensor, cfg: GrokConfig, inputs, answers) -> dict:
    """Accuracy and loss on each member's train and test pairs, and weight norm: {name: [P]}."""
    logits = answer_logits(pop.logits(inputs), cfg.p)  # (P, p^2, p)
    nll = F.cross_entropy(logits.transpose(1, 2), answers.expand(len(logits), -1), reduction="none")  # (P, p^2)
    right = (logits.argmax(-1) == answers).float()
    out = {"weight_norm": weight_norm(pop.params)}
    for name, mask in (("train", train_mask), ("test", ~train_mask)):
        m = mask.float()
        out[f"{name}_acc"] = (right * m).sum(1) / m.sum(1)
        out[f"{name}_loss"] = (nll * m).sum(1) / m.sum(1)
    return out


def train(cfg: GrokConfig, device="cpu", log=None, engine: Engine | None = None) -> dict:
    """Train the population; returns final params, the split mask and the history {metric: (E, P)}.

    Full-batch AdamW through ``popgpt.train``, evaluated every ``eval_every`` steps."""
    inputs, answers = (t.to(device) for t in pairs(cfg.p))
    train_idx = splits(cfg).to(device)  # (P, n)
    mask = torch.zeros(cfg.members, cfg.p ** 2, dtype=torch.bool, device=device).scatter_(1, train_idx, True)
    data = (inputs[train_idx], answers[train_idx])  # (P, n, 3), (P, n): every member its own pairs
    pop = init_population(cfg, device)
    engine, loss = engine or Engine("eager"), answer_loss(cfg.p)
    marks = sorted({*range(0, cfg.steps, cfg.eval_every), cfg.steps})
    history = {}
    for a, b in zip([0, *marks], marks):
        if b > a:
            train_population(pop, data, b - a, batch_size=None, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=1e-8, weight_decay=cfg.weight_decay, engine=engine, loss=loss, per_member=True)
        for k, v in evaluate(pop, mask, cfg, inputs, answers).items():
            history.setdefault(k, []).append(v.cpu())
        if log:
            log(b, {k: v[-1] for k, v in history.items()})
    return {"params": pop.params, "population": pop, "mask": mask.cpu(), "steps": marks,
            "history": {k: torch.stack(v) for k, v in history.items()}}
