"""``popgpt induction``'s output folder: tables, per-member rows, trajectories, two plots.

- ``induction.md``: the summary table (members of each depth and task that
  grew induction heads, with Wilson 95% intervals; phase and loss steps,
  final scores and losses, the causal check, as means with 95% t intervals
  over members) and how the phase step depends on the seed;
- ``members.csv``: one row per member; ``results.json``: config, tables,
  every member's trajectories; ``environment`` (versions, threads, time);
- ``phase_histogram.png``: the phase step across members, per depth and task;
- ``phase_change.png``: every member's best induction score and second-copy
  loss over training.
"""

import dataclasses
import math
import os
import time

import torch

from .._version import __version__
from ..data import load_names, split_names
from ..engine import Engine, default_engine
from ..runio import RunError, environment, format_table, write_atomic, write_csv, write_json
from .induction import InductionConfig, induction_experiment
from .induction_rows import member_rows
from .induction_scores import later

MARKER = "induction.json"  # written first: marks a folder popgpt induction owns
OUTPUTS = {MARKER, "results.json", "members.csv", "induction.md", "phase_histogram.png", "phase_change.png"}


def claim_folder(out: str) -> None:
    """Create ``out``, or accept it when empty or written by ``popgpt induction``; never another folder."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out}: is a file, not a folder")
    os.makedirs(out, exist_ok=True)
    others = set(os.listdir(out)) - OUTPUTS
    if others or (os.listdir(out) and MARKER not in os.listdir(out)):
        raise RunError(f"--out {out}: the folder holds files popgpt induction did not write "
                       f"({', '.join(sorted(others)[:3]) or 'no ' + MARKER}); choose another folder")


def _phase_table(results: dict) -> list[dict]:
    rows = []
    for d in results["depths"]:
        for s in d["seed_dependence"]:
            rows.append({"depth": d["depth"], "task": s["task"], "members reaching the phase": s["n"],
                         "share of spread between init seeds": s["init_share"],
                         "chance level (init)": _chance(s, "init"),
                         "share between data orders": s["order_share"], "chance level (order)": _chance(s, "order")})
    return rows


def _chance(s: dict, key: str) -> float:
    """The share a grouping gets by chance: (groups - 1) / (n - 1)."""
    g = s.get(f"{key}_groups")
    return (g - 1) / (s["n"] - 1) if g and s["n"] > 1 else math.nan


def markdown(results: dict, cfg: InductionConfig, env: dict) -> str:
    cols = list(dict.fromkeys(k for row in results["table"] for k in row))
    task = (f"repeat rows `. u s g s .`: s of {cfg.min_len}-{cfg.max_len} tokens, gap 0-{cfg.gap_max}, "
            f"{'distinct tokens' if cfg.distinct_letters else 'tokens may repeat'}, vocabulary {cfg.vocab}, loss on "
            f"{'the second copy only' if cfg.loss == 'second' else 'every next token'}")
    arch = (f"{cfg.n_embd} wide, {cfg.n_head} heads, {'attention only' if cfg.attn_only else 'with MLP'}")
    lines = [f"# Induction heads: {cfg.members} members per depth ({len(cfg.tasks)} tasks x {cfg.inits} init "
             f"seeds x {cfg.orders} data orders), {cfg.steps} steps of batch {cfg.batch_size}, lr {cfg.lr}", "",
             f"Task: {task}. Models: {arch}.", "",
             f"Scores on {cfg.eval_seqs} scoring rows of random length, prefix and gap with distinct tokens "
             "(a perfect induction head scores 1; chance: a head attending uniformly). Induction head: a head "
             f"of layer >= 1 with induction score >= {cfg.score_threshold}; textbook: also a layer-0 "
             "previous-token head >= the threshold whose K-composition into it exceeds the Gaussian chance "
             f"level. Phase step: first checkpoint (every {cfg.every} steps) where a layer >= 1 head reaches "
             f"the threshold; loss step: first where the second-copy loss < {cfg.icl_loss} nats. Cells: mean "
             "[95% t interval] over members (steps: over members that reached them); counts with Wilson 95% "
             "intervals. Causal check: change of the second-copy loss (nats) when the member's induction heads "
             "(its best layer >= 1 head if none passes) or one control head (not those, not a layer-0 head "
             "they read from) are zeroed.", "",
             format_table(results["table"], cols, str), "",
             "How the phase step depends on the seed (share of the spread of phase steps between init-seed "
             "means and between data-order means; a share near its chance level means no dependence):", "",
             format_table(_phase_table(results), list(_phase_table(results)[0])), "",
             "Phase steps, per depth and task (histogram; 'never': no layer >= 1 head reached the threshold):", "",
             *histogram_lines(results, cfg), "",
             f"threads {env['threads']}, torch {env['torch']}, {env['device_name']}, "
             f"{results['seconds']:.0f} s", ""]
    return "\n".join(lines)


def histogram_lines(results: dict, cfg: InductionConfig) -> list[str]:
    """One line per depth and task: members per bin of phase steps, and those that never reached it."""
    width = max(cfg.every, round(cfg.steps / 10 / cfg.every) * cfg.every)
    lines = []
    for d in results["depths"]:
        for task in cfg.tasks:
            steps = [float(s) for s, m in zip(d["phase_step"], d["layout"]) if m["task"] == task]
            bins: dict = {}
            for s in steps:
                key = "never" if math.isnan(s) else int(s // width) * width
                bins[key] = bins.get(key, 0) + 1
            cells = [f"{k}-{k + width - 1}: {bins[k]}" for k in sorted(k for k in bins if k != "never")]
            lines.append(f"- depth {d['depth']}, {task}: " + ", ".join(cells + [f"never: {bins.get('never', 0)}"]))
    return lines


def write_induction(out: str, results: dict, cfg: InductionConfig, env: dict, log=print) -> None:
    members = member_rows(results["depths"])
    write_csv(os.path.join(out, "members.csv"), members, list(members[0]))
    traj = [{"depth": d["depth"], "steps": d["steps"].tolist(),
             **{k: later(d[k]).T.tolist() for k in ("induction", "shifted", "copying") if d["depth"] > 1},
             "previous_layer0": d["previous"][:, :, 0].flatten(2).max(2).values.T.tolist(),
             "loss_first": d["loss_first"].T.tolist(), "loss_second": d["loss_second"].T.tolist()}
            for d in results["depths"]]
    write_json(os.path.join(out, "results.json"), {
        "config": dataclasses.asdict(cfg), "environment": env, "seconds": results["seconds"],
        "table": results["table"], "seed_dependence": _phase_table(results), "members": members,
        "trajectories (per member: best head's score over checkpoints)": traj})
    md = markdown(results, cfg, env)
    plots = _plots(out, results, cfg)
    md += "".join(f"\n![{p}]({p})\n" for p in plots)
    write_atomic(os.path.join(out, "induction.md"), md)
    log(md)


def _plots(out: str, results: dict, cfg: InductionConfig) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = [s - cfg.every / 2 for s in range(0, cfg.steps + 2 * cfg.every, cfg.every)]
    for d in results["depths"]:
        for task in cfg.tasks:
            steps = [float(s) for s, m in zip(d["phase_step"], d["layout"]) if m["task"] == task and not math.isnan(s)]
            n = sum(m["task"] == task for m in d["layout"])
            if steps:
                ax.hist(steps, bins=bins, alpha=0.6, label=f"{d['depth']} layer{'s' * (d['depth'] > 1)}, {task}: "
                        f"{len(steps)} of {n}")
    ax.set_xlabel(f"phase step (best induction score first >= {cfg.score_threshold})")
    ax.set_ylabel("members")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no member reached the phase\n(no layer >= 1 head above the threshold)",
                ha="center", va="center", transform=ax.transAxes)
    made.append(_save(fig, out, "phase_histogram.png", plt))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {1: "tab:gray", 2: "tab:blue", 3: "tab:green", 4: "tab:purple"}
    for d in results["depths"]:
        for i, m in enumerate(d["layout"]):
            if m["task"] != cfg.tasks[0]:
                continue
            c = colors.get(d["depth"], "tab:red")
            kw = {"color": c, "alpha": 0.6, "lw": 0.9, "ls": "--" if d["depth"] == 1 else "-",
                  "label": f"{d['depth']} layer(s)" if i == 0 else None}
            a1.plot(d["steps"], d["induction"][:, i].flatten(1).max(1).values if d["depth"] == 1
                    else later(d["induction"][:, i]), **kw)
            a2.plot(d["steps"], d["loss_second"][:, i], **kw)
    a1.axhline(cfg.score_threshold, color="k", ls=":", lw=0.8)
    a1.set(xlabel="training step", ylabel="best induction score",
           title=f"task {cfg.tasks[0]}: layer >= 1 (1 layer: layer 0)")
    a2.set(xlabel="training step", ylabel="second-copy loss (nats)", title="in-context loss, second copy")
    a2.axhline(cfg.icl_loss, color="k", ls=":", lw=0.8)
    a1.legend(fontsize=8)
    made.append(_save(fig, out, "phase_change.png", plt))
    return made


def _save(fig, out, name, plt) -> str:
    fig.tight_layout()
    tmp = os.path.join(out, f".{name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, os.path.join(out, name))
    return name


def run_induction(cfg: InductionConfig, out: str, data_path: str, device: str = "cpu", threads: int | None = None,
                  log=print) -> dict:
    """Check the folder and the data, run ``induction_experiment`` under ``threads``, write everything."""
    names = load_names(data_path, cfg.block_size - 1)
    names, _ = split_names(names, 0.1, torch.Generator().manual_seed(cfg.seed))  # held-out names unused here
    claim_folder(out)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        env = environment(torch.device(device), __version__)
        write_json(os.path.join(out, MARKER), {"config": dataclasses.asdict(cfg), "environment": env,
                                               "data": os.path.abspath(data_path)})
        log(f"popgpt induction: {cfg.members} members per depth {list(cfg.depths)}, {cfg.steps} steps, "
            f"threads {env['threads']}, device {device}, out {out}")
        start = time.perf_counter()
        results = induction_experiment(cfg, names, Engine(default_engine(torch.device(device))), log, device)
        results["seconds"] = time.perf_counter() - start
        write_induction(out, results, cfg, env, log)
    finally:
        torch.set_num_threads(previous)
    return results
