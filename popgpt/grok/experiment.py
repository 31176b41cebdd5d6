"""Grokking: a population learning a + b mod p, and when it "clicks".

The task: every pair (a, b) of 0..p-1 is a sequence ``a b =`` (token p is
``=``); the model predicts (a + b) mod p at the ``=`` position, over the p
numbers. Every member has its own seed and its own random split of the p^2
pairs (``train_frac`` for training, the rest for testing), and trains on
ALL its training pairs at every step (full batch) with AdamW, all members
in one batched computation (stacked parameters, ``torch.vmap``, one
backward, the stacked Adam of ``train.py``).

The model is MicroGPT's single layer (same parameter names and shapes:
``wte, wpe, lm_head, attn_qkv, attn_out, mlp_fc1, mlp_fc2``; ReLU MLP 4x, no
biases) with its RMSNorms optional: Nanda et al.'s setup (p = 113, 1 layer,
4 heads, d_model 128, no LayerNorm, AdamW lr 1e-3, weight decay 1.0,
betas 0.9/0.98, 30% of pairs, full batch) is ``--preset full``. Their model
has (zero-initialised) biases; this one has none.

Per member (definitions in the functions below): grokking step (first
evaluation at which test accuracy exceeds ``threshold``), train step (the
same for train accuracy), key frequencies (Fourier analysis of the number
embeddings), the share of the logits on the key frequencies' ``a + b``
directions, restricted loss (logits kept on those directions only) and
excluded loss (those directions removed), weight norm over training.
"""

import io
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._version import __version__
from ..model import MicroGPT, ModelConfig, causal_attention, rmsnorm
from ..population import AdamState, default_seeds
from ..runio import RunLock, claim_run_folder, environment, format_table, three_decimals, write_atomic, write_json
from ..seeds import tool_seed
from ..stats import mean_interval, wilson
from ..step import Hyper, adam_step


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
                           n_layer=1, init_std=self.init_std)


def pairs(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All p^2 inputs ``a b =`` (p^2, 3) in the order a * p + b, and their answers (a + b) mod p."""
    a, b = torch.arange(p).repeat_interleave(p), torch.arange(p).repeat(p)
    return torch.stack([a, b, torch.full_like(a, p)], 1), (a + b) % p


def splits(cfg: GrokConfig) -> torch.Tensor:
    """Every member's training pairs (P, n_train): indices into ``pairs``, each member its own draw."""
    n = int(round(cfg.train_frac * cfg.p ** 2))
    return torch.stack([torch.randperm(cfg.p ** 2, generator=torch.Generator().manual_seed(
        tool_seed(cfg.seed, "grok", i, "split")))[:n] for i in range(cfg.members)])


def init_params(cfg: GrokConfig, device="cpu") -> dict:
    """Stacked parameters; member i is ``MicroGPT(cfg.model)`` built under its own seed."""
    models = [MicroGPT(cfg.model, generator=torch.Generator().manual_seed(s))
              for s in default_seeds(cfg.members, cfg.seed)]
    return {k: torch.stack([m.get_parameter(k).detach() for m in models]).to(device)
            for k in cfg.model.param_shapes()}


def member_logits(params: dict, x: torch.Tensor, p: int, norm: bool, n_head: int, eps: float = 1e-5):
    """One member's logits over the p numbers at the "=" position: x (n, 3) -> (n, p)."""
    nrm = (lambda h: rmsnorm(h, eps)) if norm else (lambda h: h)
    h = params["wte"][x] + params["wpe"][:x.shape[1]]  # (n, 3, C)
    h = h + causal_attention(nrm(h), params["attn_qkv"], params["attn_out"], n_head)
    h = h + F.linear(F.relu(F.linear(nrm(h), params["mlp_fc1"])), params["mlp_fc2"])
    return F.linear(nrm(h[:, -1]), params["lm_head"])[:, :p]


def population_logits(params: dict, x: torch.Tensor, cfg: GrokConfig) -> torch.Tensor:
    """Logits (P, n, p) for per-member inputs (P, n, 3) or shared ones (n, 3)."""
    def one(mp, xi):
        return member_logits(mp, xi, cfg.p, cfg.norm, cfg.n_head)

    return torch.vmap(one, in_dims=(0, 0 if x.dim() == 3 else None))(params, x)


def weight_norm(params: dict) -> torch.Tensor:
    """Euclidean norm of all of each member's parameters: [P]."""
    return torch.stack([v.flatten(1).pow(2).sum(1) for v in params.values()]).sum(0).sqrt()


@torch.no_grad()
def evaluate(params: dict, train_mask: torch.Tensor, cfg: GrokConfig, inputs, answers) -> dict:
    """Accuracy and loss on each member's train and test pairs, and weight norm: {name: [P]}."""
    logits = population_logits(params, inputs, cfg)  # (P, p^2, p)
    nll = F.cross_entropy(logits.transpose(1, 2), answers.expand(len(logits), -1), reduction="none")  # (P, p^2)
    right = (logits.argmax(-1) == answers).float()
    test = ~train_mask
    out = {"weight_norm": weight_norm(params)}
    for name, mask in (("train", train_mask), ("test", test)):
        m = mask.float()
        out[f"{name}_acc"] = (right * m).sum(1) / m.sum(1)
        out[f"{name}_loss"] = (nll * m).sum(1) / m.sum(1)
    return out


def train(cfg: GrokConfig, device="cpu", log=None) -> dict:
    """Train the population; returns final params, the split mask and the history {metric: (E, P)}."""
    inputs, answers = (t.to(device) for t in pairs(cfg.p))
    train_idx = splits(cfg).to(device)  # (P, n)
    mask = torch.zeros(cfg.members, cfg.p ** 2, dtype=torch.bool, device=device).scatter_(1, train_idx, True)
    x, y = inputs[train_idx], answers[train_idx]  # (P, n, 3), (P, n)
    params = init_params(cfg, device)
    opt = AdamState.zeros_like(params)
    hp = Hyper(*(torch.full((cfg.members,), v, device=device) for v in
                 (cfg.lr, cfg.beta1, cfg.beta2, 1e-8, cfg.weight_decay)))
    history, steps = {}, []
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            for k, v in evaluate(params, mask, cfg, inputs, answers).items():
                history.setdefault(k, []).append(v.cpu())
            steps.append(step)
            if log:
                log(step, {k: v[-1] for k, v in history.items()})
        if step == cfg.steps:
            break
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        losses = F.cross_entropy(population_logits(leaves, x, cfg).transpose(1, 2), y, reduction="none").mean(1)
        grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
        adam_step(params, dict(zip(params, grads)), opt, hp)
    return {"params": params, "mask": mask.cpu(), "steps": steps,
            "history": {k: torch.stack(v) for k, v in history.items()}}


def first_step(curve: torch.Tensor, steps: list[int], threshold: float) -> torch.Tensor:
    """First step at which each member's curve (E, P) exceeds ``threshold``: [P] float, NaN if never."""
    above = curve > threshold
    first = above.float().argmax(0)
    return torch.where(above.any(0), torch.tensor(steps, dtype=torch.float)[first], torch.tensor(math.nan))


def fourier_basis(p: int) -> torch.Tensor:
    """Orthonormal cos/sin basis over 0..p-1 for frequencies 1..(p-1)//2: (K, 2, p)."""
    a = torch.arange(p, dtype=torch.float64)
    k = torch.arange(1, (p - 1) // 2 + 1, dtype=torch.float64)[:, None]
    basis = torch.stack([torch.cos(2 * math.pi * k * a / p), torch.sin(2 * math.pi * k * a / p)], 1)
    return basis / basis.norm(dim=-1, keepdim=True)


def embedding_spectrum(wte: torch.Tensor, p: int) -> torch.Tensor:
    """Share of the number embeddings' non-constant energy at each frequency 1..(p-1)//2: (P, K).

    wte (P, V, C): rows 0..p-1 are the numbers. Energy at frequency k: squared norm of the embedding
    matrix projected on that frequency's cos and sin directions (over the number axis)."""
    w = wte[:, :p].double()
    w = w - w.mean(1, keepdim=True)
    energy = torch.einsum("kia,pac->pkic", fourier_basis(p), w).pow(2).sum((2, 3))  # (P, K)
    return energy / w.pow(2).sum((1, 2))[:, None]


def key_frequencies(spectrum: torch.Tensor, share: float) -> list[list[int]]:
    """Frequencies (1-based) holding at least ``share`` of the energy, per member, strongest first."""
    out = []
    for row in spectrum:
        order = torch.argsort(row, descending=True)
        out.append([int(k) + 1 for k in order if row[k] >= share])
    return out


def sum_directions(p: int, freqs: list[int]) -> torch.Tensor:
    """Orthonormal directions cos(w_k (a+b)), sin(w_k (a+b)) over the p^2 pairs (a*p+b): (2|freqs|, p^2)."""
    a, b = torch.arange(p).repeat_interleave(p), torch.arange(p).repeat(p)
    s = (a + b).double()
    rows = [f(2 * math.pi * k * s / p) for k in freqs for f in (torch.cos, torch.sin)]
    if not rows:
        return torch.zeros(0, p * p, dtype=torch.float64)
    d = torch.stack(rows)
    return d / d.norm(dim=1, keepdim=True)


@torch.no_grad()
def ablation_losses(params: dict, cfg: GrokConfig, keys: list[list[int]], mask: torch.Tensor) -> dict:
    """Per member: share of the (centred) logits on its key frequencies' a+b directions; restricted loss
    (all pairs; logits = their mean over pairs + those components) and excluded loss (its train pairs;
    logits minus those components), as Nanda et al. define them."""
    inputs, answers = pairs(cfg.p)
    logits = population_logits({k: v.cpu() for k, v in params.items()}, inputs, cfg).double()  # (P, p^2, p)
    out = {"logit_share": [], "restricted_loss": [], "excluded_loss": []}
    for i in range(len(logits)):
        L = logits[i]
        centred = L - L.mean(0)
        d = sum_directions(cfg.p, keys[i])  # (m, p^2)
        on_keys = d.T @ (d @ centred)  # (p^2, p)
        out["logit_share"].append(float(on_keys.pow(2).sum() / centred.pow(2).sum()))
        out["restricted_loss"].append(float(F.cross_entropy(L.mean(0) + on_keys, answers)))
        m = mask[i]
        out["excluded_loss"].append(float(F.cross_entropy((L - on_keys)[m], answers[m])))
    return {k: torch.tensor(v) for k, v in out.items()}


PRESETS = {
    "full": {},  # Nanda et al.'s setup
    "quick": {"p": 31, "d_model": 32, "members": 8, "train_frac": 0.5, "steps": 2000, "lr": 1e-2,
              "init_std": 0.14, "eval_every": 50},
}


def grokking(cfg: GrokConfig, device="cpu", log=None) -> dict:
    """Train, then analyse every member: per-member table rows, histories and spectra (nothing written)."""
    t0 = time.perf_counter()
    run = train(cfg, device, log)
    seconds = time.perf_counter() - t0
    h, steps = run["history"], run["steps"]
    grok, learn = first_step(h["test_acc"], steps, cfg.threshold), first_step(h["train_acc"], steps, cfg.threshold)
    spectrum = embedding_spectrum(run["params"]["wte"].cpu(), cfg.p).float()
    keys = key_frequencies(spectrum, cfg.key_share)
    abl = ablation_losses(run["params"], cfg, keys, run["mask"])
    rows = [{"member": i, "train_step": float(learn[i]), "grok_step": float(grok[i]),
             "delay": float(grok[i] - learn[i]), "key_frequencies": keys[i], "n_key": len(keys[i]),
             "logit_share": float(abl["logit_share"][i]), "restricted_loss": float(abl["restricted_loss"][i]),
             "excluded_loss": float(abl["excluded_loss"][i]), "test_loss": float(h["test_loss"][-1, i]),
             "train_acc": float(h["train_acc"][-1, i]), "test_acc": float(h["test_acc"][-1, i]),
             "weight_norm_start": float(h["weight_norm"][0, i]), "weight_norm_end": float(h["weight_norm"][-1, i])}
            for i in range(cfg.members)]
    return {"rows": rows, "steps": steps, "history": h, "spectrum": spectrum, "seconds": seconds,
            "params": run["params"], "summary": summarize(rows, cfg)}


def summarize(rows: list[dict], cfg: GrokConfig) -> dict:
    """Population facts: members grokked (Wilson interval), grokking and train steps (mean, t interval)."""
    grokked = [r for r in rows if not math.isnan(r["grok_step"])]
    frac = len(grokked) / len(rows)
    out = {"members": len(rows), "grokked": len(grokked), "grokked_frac": frac,
           "grokked_frac_ci": list(wilson(frac, len(rows)))}
    for key in ("grok_step", "train_step", "delay", "n_key", "restricted_loss", "excluded_loss", "test_loss",
                "weight_norm_end"):
        values = [r[key] for r in (grokked if key in ("grok_step", "delay") else rows)]
        out[key] = list(mean_interval(values))
    return out


def grok_markdown(res: dict, cfg: GrokConfig, plots: list[str]) -> str:
    s = res["summary"]
    cols = ["member", "train_step", "grok_step", "delay", "key_frequencies", "logit_share", "restricted_loss",
            "excluded_loss", "test_acc", "weight_norm_start", "weight_norm_end"]

    def cell(v):
        return "never" if isinstance(v, float) and math.isnan(v) else three_decimals(v)

    def ci(key, digits=0):
        m, lo, hi = s[key]
        if math.isnan(m):
            return "n/a"
        return f"{m:.{digits}f}" + ("" if math.isnan(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]")

    md = [f"# Grokking a + b mod {cfg.p}: {cfg.members} members", "",
          f"d_model {cfg.d_model}, {cfg.n_head} heads, norm {'RMSNorm' if cfg.norm else 'none'}, "
          f"{cfg.train_frac:.0%} of pairs for training (own split per member), full batch, AdamW lr {cfg.lr}, "
          f"weight decay {cfg.weight_decay}, betas {cfg.beta1}/{cfg.beta2}, {cfg.steps} steps, evaluated every "
          f"{cfg.eval_every}; learned = accuracy > {cfg.threshold}; key frequency: >= {cfg.key_share:.0%} of the "
          f"embedding's Fourier energy. {res['seconds']:.0f} s.", "",
          f"Grokked (test accuracy > {cfg.threshold}): {s['grokked']} of {s['members']} "
          f"({s['grokked_frac']:.0%}, 95% CI {s['grokked_frac_ci'][0]:.0%}-{s['grokked_frac_ci'][1]:.0%}); "
          f"grokking step {ci('grok_step')}; train-accuracy step {ci('train_step')}; delay {ci('delay')}; "
          f"key frequencies per member {ci('n_key', 1)}; restricted loss {ci('restricted_loss', 3)}, excluded loss "
          f"{ci('excluded_loss', 3)}, test loss {ci('test_loss', 3)} (means, 95% t intervals).", "",
          format_table(res["rows"], cols, cell=cell), ""]
    md += [f"![{p}]({p})" for p in plots]
    return "\n".join(md) + "\n"


def write_grok(out_dir: str, res: dict, cfg: GrokConfig, env: dict, log=print) -> None:
    """OUT/: config.json, results.json (rows, summary, histories), grok.md, plots."""
    write_json(os.path.join(out_dir, "config.json"), {"config": vars(cfg), "environment": env, "tool": "grok"})
    write_json(os.path.join(out_dir, "results.json"), {
        "config": vars(cfg), "environment": env, "seconds": res["seconds"], "summary": res["summary"],
        "rows": res["rows"], "steps": res["steps"], "history": {k: v.tolist() for k, v in res["history"].items()},
        "embedding_spectrum": res["spectrum"].tolist()})
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in res["params"].items()}, buf)
    write_atomic(os.path.join(out_dir, "params.pt"), buf.getvalue())
    plots = _grok_plots(out_dir, res, cfg)
    md = grok_markdown(res, cfg, plots)
    write_atomic(os.path.join(out_dir, "grok.md"), md)
    log(md)


def _grok_plots(out_dir: str, res: dict, cfg: GrokConfig) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, steps = res["history"], res["steps"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for i in range(cfg.members):
        axes[0].plot(steps, h["train_acc"][:, i], color="C0", alpha=0.4, lw=1)
        axes[0].plot(steps, h["test_acc"][:, i], color="C3", alpha=0.6, lw=1)
        axes[1].plot(steps, h["weight_norm"][:, i], color="k", alpha=0.4, lw=1)
    axes[0].set(xlabel="step", ylabel="accuracy (blue: train, red: test)", title="every member")
    axes[1].set(xlabel="step", ylabel="weight norm")
    grok = [r["grok_step"] for r in res["rows"] if not math.isnan(r["grok_step"])]
    axes[2].hist(grok, bins=min(20, max(1, len(grok))), color="C3")
    never = sum(1 for r in res["rows"] if math.isnan(r["grok_step"]))
    axes[2].set(xlabel="grokking step (test acc > %.2f)" % cfg.threshold, ylabel="members",
                title=f"{len(grok)} grokked, {never} not within {cfg.steps} steps")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "grok.png"), dpi=80)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.25 * cfg.members))
    im = ax.imshow(res["spectrum"].numpy(), aspect="auto", cmap="viridis", interpolation="nearest",
                   extent=(0.5, res["spectrum"].shape[1] + 0.5, cfg.members - 0.5, -0.5))
    ax.set(xlabel="frequency k (embedding Fourier energy share)", ylabel="member")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "spectrum.png"), dpi=80)
    plt.close(fig)
    return ["grok.png", "spectrum.png"]


def run_grok(cfg: GrokConfig, out_dir: str, device="cpu", log=print) -> dict:
    """``popgpt grok``: claim the folder, lock it, train and analyse, write."""
    claim_run_folder(out_dir)
    with RunLock(out_dir, "popgpt grok"):
        every = max(cfg.eval_every, cfg.steps // 20)

        def progress(step, h):
            if step % every == 0 or step == cfg.steps:
                log(f"step {step:>6}: train acc {float(h['train_acc'].mean()):.3f}, test acc "
                    f"{float(h['test_acc'].mean()):.3f} (member means), "
                    f"weight norm {float(h['weight_norm'].mean()):.1f}")

        res = grokking(cfg, device, progress)
        write_grok(out_dir, res, cfg, environment(torch.device(device), __version__), log)
    return res
