"""``popgpt grok``'s folder: config.json, results.json, params.pt, grok.md and plots."""

import io
import math
import os

import torch

from .._version import __version__
from ..runio import RunLock, claim_run_folder, environment, format_table, three_decimals, write_atomic, write_json
from ..stats import ci_text
from .analysis import grokking
from .task import GrokConfig


def grok_markdown(res: dict, cfg: GrokConfig, plots: list[str]) -> str:
    s = res["summary"]
    cols = ["member", "train_step", "grok_step", "delay", "key_frequencies", "logit_share", "restricted_loss",
            "excluded_loss", "test_acc", "weight_norm_start", "weight_norm_end"]

    steps = {"member", "train_step", "grok_step", "delay"}

    def cell(v, col=None):
        if isinstance(v, float) and math.isnan(v):
            return "never"
        return str(int(v)) if col in steps and isinstance(v, float) and v.is_integer() else three_decimals(v)

    def ci(key, digits=0):
        m, lo, hi, n = s[key]
        return "n/a" if math.isnan(m) else ci_text(m, lo, hi, n, digits)

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
          f"{ci('excluded_loss', 3)}, test loss {ci('test_loss', 3)} (means, 95% t intervals over members, clipped "
          f"to the possible range; 'rough' where 3 or fewer members give them).", "",
          format_table([{c: cell(r[c], c) for c in cols} for r in res["rows"]], cols, cell=str), ""]
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
    import matplotlib.ticker

    h, steps = res["history"], res["steps"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for i in range(cfg.members):
        axes[0].plot(steps, h["train_acc"][:, i], color="C0", alpha=0.4, lw=1)
        axes[0].plot(steps, h["test_acc"][:, i], color="C3", alpha=0.6, lw=1)
        axes[1].plot(steps, h["weight_norm"][:, i], color="k", alpha=0.4, lw=1)
    axes[0].set(xlabel="step", ylabel="accuracy (blue: train, red: test)", title="every member")
    axes[1].set(xlabel="step", ylabel="weight norm")
    # one dot per member (a histogram would merge members of the same step into one block)
    for r in res["rows"]:
        grokked = not math.isnan(r["grok_step"])
        axes[2].plot(r["grok_step"] if grokked else cfg.steps, r["member"], "o" if grokked else "x",
                     color="C3" if grokked else "grey")
    never = sum(1 for r in res["rows"] if math.isnan(r["grok_step"]))
    axes[2].set(xlabel=f"grokking step (test acc > {cfg.threshold:.2f}); x: not within {cfg.steps}",
                ylabel="member", xlim=(0, cfg.steps * 1.05),
                title=f"{cfg.members - never} of {cfg.members} grokked")
    axes[2].yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
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
