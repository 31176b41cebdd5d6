"""What a grokked member computes: grokking times, key frequencies of its number embeddings, and the
restricted and excluded losses of Nanda et al.

Per member: grokking step (first evaluation at which test accuracy exceeds
``threshold``), train step (the same for train accuracy), key frequencies
(Fourier analysis of the number embeddings), the share of the logits on the
key frequencies' ``a + b`` directions, restricted loss (logits kept on those
directions only) and excluded loss (those directions removed), weight norm
over training.
"""

import math
import time

import torch
import torch.nn.functional as F

from ..population import Population
from ..stats import mean_interval, wilson
from .task import GrokConfig, answer_logits, pairs, train


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
    pop = Population(cfg.model, {k: v.cpu() for k, v in params.items()})
    logits = answer_logits(pop.logits(inputs), cfg.p).double()  # (P, p^2, p)
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
        low = -math.inf if key == "delay" else 0.0  # steps, counts, losses and norms are >= 0
        out[key] = list(mean_interval(values, low)) + [len([v for v in values if not math.isnan(v)])]
    return out
