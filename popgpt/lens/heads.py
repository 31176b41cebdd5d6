"""Per-head measurements: does an immune member silence the trigger or redirect it?

Every quantity is taken on the head's OUTPUT in the residual stream (its
``z`` mapped through its slice of ``attn_out``) or on its attention pattern,
so none changes under the head's internal reparametrisations (rotating its
queries and keys, or trading scale between its values and its output slice).
Per member, layer and head:

- ``norm_clean``: mean norm of the head's output over clean held-out names;
- ``norm_trigger``: the same at the positions from the last trigger
  character on, in ``boundary + trigger + payload``;
- ``attn_to_trigger``: attention those positions pay to the trigger characters;
- ``payload_dla``: the head's direct contribution to the logit of the
  payload character each of those positions predicts (output scaled by the
  final RMSNorm of the full residual, dotted with that character's
  ``lm_head`` row);
- ``usefulness``: increase of the clean NLL (nats/char) when the head is
  ablated (its output zeroed).

All of them are read from the batched activation cache (``cache.py``:
``hook_z``, ``hook_pattern``, ``hook_resid_post``) and its ablation sweep
(``patching.py``).

Classification of an immune member, on its "trigger head" (the head paying
most attention to the trigger), against the vulnerable members' trigger
heads as reference: *silenced* when its output norm on triggered input and
its usefulness are both below the vulnerable members' 25th percentiles;
*redirected* when its usefulness is at or above that percentile while its
payload contribution is below the vulnerable members' 25th percentile;
*unclear* otherwise.
"""

import os

import torch
from einops import rearrange

from ..data import BOUNDARY, encode, inputs_targets
from ..evaluate import on_device
from ..evolution.analysis import special_by_replicate
from ..evolution.runs import OpenRun, locked_run
from ..population import Population
from ..runio import format_table, write_atomic, write_json
from .cache import run_with_cache
from .patching import ablation_sweep, mean_nll

METRICS = ("norm_clean", "norm_trigger", "attn_to_trigger", "payload_dla", "usefulness")


def head_outputs(pop: Population, cache: dict, layer: int) -> torch.Tensor:
    """Each head's output in the residual stream: (P, B, T, H, C)."""
    z = cache[f"blocks.{layer}.attn.hook_z"]  # (P, B, T, H, D)
    prefix = pop.config.block_prefixes()[layer]
    w = rearrange(pop.params[prefix + "attn_out"], "p c (h d) -> p c h d", h=pop.config.n_head)
    return torch.einsum("pbthd,pchd->pbthc", z, w)


@torch.no_grad()
def head_metrics(pop: Population, trigger: list[int], payload: list[int], clean_rows: torch.Tensor) -> dict:
    """Every metric of ``METRICS`` as a (P, n_layer, H) tensor."""
    cfg = pop.config
    L, H = cfg.n_layer, cfg.n_head
    seq = on_device([BOUNDARY, *trigger, *payload], pop.device)
    t0 = len(trigger)  # the last trigger character's position: it predicts payload[0]
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(L)]
    pattern_names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(L)]
    _, cache = run_with_cache(pop, seq[None, :-1], [*z_names, *pattern_names, f"blocks.{L - 1}.hook_resid_post"])
    final = cache[f"blocks.{L - 1}.hook_resid_post"][:, 0]  # (P, T, C)
    scale = torch.rsqrt(final.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)[:, t0:]  # (P, n, 1)
    unembed = pop.params["lm_head"][:, seq[t0 + 1:]]  # (P, n, C): the row of each predicted payload char

    x, y = inputs_targets(clean_rows.to(pop.device))
    _, clean_cache = run_with_cache(pop, x, z_names)
    valid = (y >= 0).float()  # (B, T)
    out = {k: torch.zeros(len(pop), L, H, device=pop.device) for k in METRICS}
    for layer in range(L):
        trig = head_outputs(pop, cache, layer)[:, 0, t0:]  # (P, n, H, C)
        out["norm_trigger"][:, layer] = trig.norm(dim=-1).mean(1)
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][:, 0]  # (P, H, T, T)
        out["attn_to_trigger"][:, layer] = pattern[:, :, t0:, 1:t0 + 1].sum(-1).mean(-1)
        out["payload_dla"][:, layer] = torch.einsum("pnhc,pnc->ph", trig * scale[:, :, None], unembed) / trig.shape[1]
        norms = head_outputs(pop, clean_cache, layer).norm(dim=-1)  # (P, B, T, H)
        out["norm_clean"][:, layer] = (norms * valid[None, :, :, None]).sum((1, 2)) / valid.sum()
    out["usefulness"] = ablation_sweep(pop, x, mean_nll(y))
    return out


def trigger_head(metrics: dict) -> dict:
    """Each member's metrics at its head with the most attention to the trigger: {name: [P]}."""
    P = metrics["attn_to_trigger"].shape[0]
    best = metrics["attn_to_trigger"].view(P, -1).argmax(-1)
    return {k: v.view(P, -1)[torch.arange(P), best] for k, v in metrics.items()} | {"head": best}


def classify(head: dict, vulnerable: torch.Tensor) -> list[str]:
    """'silenced', 'redirected' or 'unclear' per member (meaningful for immune members)."""
    if not vulnerable.any():
        raise ValueError("classification needs vulnerable members as reference; there are none")
    ref = {k: torch.quantile(head[k][vulnerable].float(), 0.25) for k in ("norm_trigger", "usefulness", "payload_dla")}
    labels = []
    for i in range(len(vulnerable)):
        quiet = head["norm_trigger"][i] < ref["norm_trigger"] and head["usefulness"][i] < ref["usefulness"]
        useful = head["usefulness"][i] >= ref["usefulness"]
        if quiet:
            labels.append("silenced")
        elif useful and head["payload_dla"][i] < ref["payload_dla"]:
            labels.append("redirected")
        else:
            labels.append("unclear")
    return labels


def heads_tables(run: OpenRun, generation: int | None = None, n_names: int = 200, sigma: float = 1.5,
                 device: str = "cpu") -> dict:
    """Per-head metrics of a saved generation and their means over special, ordinary-immune and
    vulnerable members (computed, nothing written)."""
    if n_names < 1:
        raise ValueError(f"argument --names: must be >= 1, got {n_names}")
    saved = run.load(generation, device)
    pop, virus = saved.population, saved.virus
    rows, _ = run.data.encode(run.data.val_docs[:n_names])
    metrics = head_metrics(pop, encode(virus.trigger), encode(virus.payload), rows)
    head = {k: v.cpu() for k, v in trigger_head(metrics).items()}
    q, vul = saved.metrics["quality"], saved.metrics["vulnerable"]
    special, _ = special_by_replicate(q, ~vul, saved.layout.n_groups, sigma)
    labels = classify(head, vul) if vul.any() else ["n/a (no vulnerable reference)"] * len(vul)
    groups = {"special": special, "ordinary immune": ~vul & ~special, "vulnerable": vul}
    table = []
    for name, mask in groups.items():
        row = {"group": name, "members": int(mask.sum())}
        for k in METRICS:
            row[k] = float(head[k][mask].mean()) if mask.any() else float("nan")
        for label in ("silenced", "redirected", "unclear"):
            row[label] = sum(1 for i in mask.nonzero().flatten().tolist() if labels[i] == label)
        table.append(row)
    return {"generation": saved.generation, "trigger": virus.trigger, "payload": virus.payload,
            "n_names": len(rows), "metrics": metrics, "trigger_head": head, "groups": groups,
            "labels": labels, "table": table}


def analyze_heads(run_dir: str, generation: int | None = None, n_names: int = 200, sigma: float = 1.5,
                  device: str = "cpu", log=print) -> dict:
    """``heads_tables`` written to ``RUN_DIR/heads/`` (heads.md, results.json, heads.png)."""
    with locked_run(run_dir, "popgpt heads", log, generation) as run:
        t = heads_tables(run, generation, n_names, sigma, device)
        _write(run_dir, t, log)
    return t


def _write(run_dir: str, t: dict, log) -> None:
    folder = os.path.join(run_dir, "heads")
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "results.json"), {
        "generation": t["generation"], "trigger": t["trigger"], "payload": t["payload"],
        "metrics": {k: v.cpu().tolist() for k, v in t["metrics"].items()},
        "trigger_head": t["trigger_head"]["head"].tolist(), "labels": t["labels"], "table": t["table"]})
    plot = _scatter(folder, t["trigger_head"], t["groups"])
    md = [f"# Heads of generation {t['generation']}: trigger `{t['trigger']}` -> `{t['payload']}`",
          "", "Means over each group's members, at each member's trigger head (the head paying most attention "
          "to the trigger); silenced / redirected / unclear as defined in `popgpt/heads.py`. Usefulness: clean "
          f"NLL increase (nats/char) when the head is ablated, on {t['n_names']} held-out names.", "",
          format_table(t["table"], ["group", "members", *METRICS, "silenced", "redirected", "unclear"]), ""]
    md += [f"![{plot}]({plot})"] if plot else []
    write_atomic(os.path.join(folder, "heads.md"), "\n".join(md) + "\n")
    log("\n".join(md))


def _scatter(folder, head, groups):
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for (name, mask), marker in zip(groups.items(), ("*", "o", "x")):
        if mask.any():
            ax.scatter(head["usefulness"][mask], head["payload_dla"][mask], marker=marker, label=name, alpha=0.7)
    ax.set_xlabel("usefulness of the trigger head (clean NLL increase when ablated)")
    ax.set_ylabel("its direct contribution to the payload logit")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "heads.png"), dpi=110)
    plt.close(fig)
    return "heads.png"
