"""The leakage-vs-KL frontier: each method swept over its own strength knob in ONE batched run.

The population is tiled once per strength (strengths are another axis of
the population, as ``sweep`` does for conditions): copy ``i`` of every
member gets ``values[i]``. Members stay independent, so the copy at
strength ``s`` is exactly the cure at ``s`` alone. Knobs (``KNOBS``):

- ``counterfactual``: ``cf_lambda``, the weight of the clean KL;
- ``subspace``: ``kl_bound``;
- ``ablate``: the ablation strength ``a`` of ``W - a d d^T W``, at the site
  the default search picks for each member.

Each point is measured as ``popgpt cure`` measures a method (measure.py).
"KL at matched leakage": per method, the lowest swept mean KL (mean and p99)
among strengths whose mean sampled leakage is <= ``leak``; the ratio of two
methods' values compares them at the same leakage, never points of
different leakage.
"""

import math
import os
import time

import torch

from ..evolution.runs import locked_run
from ..population import Population
from ..runio import write_atomic, write_json
from ..settings import tool_seed
from ..stats import count_interval, mean_interval
from .counterfactual import cf_order, cure_counterfactual, lora_init
from .cureset import CureSet, build_cure_set, fitting_names
from .measure import measure
from .methods import ablation_patch, cure
from .objectives import SITES, CureConfig, batch_order, contrast_directions
from .run import _evaluation, cure_triggers
from .subspace import cure_subspace

KNOBS = {"counterfactual": ("cf_lambda", (3.0, 10.0, 30.0, 100.0, 300.0)),
         "subspace": ("kl_bound", (0.001, 0.003, 0.01, 0.03, 0.1)),
         "ablate": ("strength", (0.25, 0.5, 0.75, 1.0, 1.5, 2.0))}


def tile(cs: CureSet, k: int) -> CureSet:
    """The cure set of a population tiled ``k`` times (per-member fields repeated along P)."""
    fields = list(cs.__dataclass_fields__)
    return CureSet(cs.clean, cs.gap, *(getattr(cs, f).repeat(k, *([1] * (getattr(cs, f).dim() - 1)))
                                       for f in fields[2:]))


def sweep(pop: Population, cs: CureSet, cfg: CureConfig, method: str, values, generator: torch.Generator):
    """(tiled population, its patch, the strength of every tiled member [k P])."""
    if method not in KNOBS:
        raise ValueError(f"argument --method: the frontier sweeps {', '.join(KNOBS)}, got {method!r}")
    k, P = len(values), len(pop)
    big = Population.cat([pop] * k)
    strength = torch.tensor(values, dtype=torch.float32, device=pop.device).repeat_interleave(P)  # (k P,)
    tiled = tile(cs, k).to(pop.device)
    if method == "counterfactual":
        order, init = cf_order(cfg, len(cs.clean), generator).to(pop.device), lora_init(pop.params, cfg, generator)
        patch, _ = cure_counterfactual(big, tiled, cfg, order, init, strength)
    elif method == "subspace":
        dirs = contrast_directions(big, tiled, cfg.rank)
        patch, _ = cure_subspace(big, tiled, cfg, batch_order(cfg, len(cs.clean), generator).to(pop.device), dirs,
                                 strength)
    else:
        _, info = cure(pop, cs, cfg, "ablate", generator)  # the site each member's search picks
        dirs = contrast_directions(pop, cs.to(pop.device), cfg.rank)
        d = torch.stack([dirs.mean[s] for s in SITES])[info["site"], torch.arange(P, device=pop.device)]  # (P, C)
        patch = ablation_patch(big, d.repeat(k, 1), strength)
    return big, patch, strength


def summarise(members: dict, strength: torch.Tensor, values, threshold: float) -> list[dict]:
    """One row per strength: population means with 95% intervals (t; Wilson for shares)."""
    rows = []
    for v in values:
        sel = (strength.cpu() == float(v))
        m = {key: val[sel] for key, val in members.items()}
        row = {"strength": float(v), "n": int(sel.sum())}
        for key in ("leak", "leak_start", "leak_inside", "kl_mean", "kl_p99", "kl_first", "nll_ratio",
                    "payload_prob_original"):
            if key in m:
                row[key], row[key + "_lo"], row[key + "_hi"] = mean_interval(m[key].tolist(), low=0.0)
        for key, flags in (("vulnerable", m["vulnerable_original"] > 0.5),
                           ("leaking_members", m.get("leak", torch.zeros(0)) > threshold)):
            row[key], row[key + "_lo"], row[key + "_hi"] = count_interval(flags.tolist())
        if "leak" in m:
            row["leak_worst"] = float(m["leak"].max())
        rows.append(row)
    return rows


def matched_kl(curves: dict, leak: float = 0.01) -> dict:
    """Per method, the lowest mean KL and p99 KL among strengths with mean leakage <= ``leak``
    (NaN: no swept strength reaches it), and every method's ratio to the lowest."""
    out = {}
    for name, rows in curves.items():
        ok = [r for r in rows if r.get("leak", math.inf) <= leak]
        out[name] = {"kl_mean": min((r["kl_mean"] for r in ok), default=math.nan),
                     "kl_p99": min((r["kl_p99"] for r in ok), default=math.nan)}
    for key in ("kl_mean", "kl_p99"):
        best = min((v[key] for v in out.values() if not math.isnan(v[key])), default=math.nan)
        for v in out.values():
            v[key + "_ratio_to_best"] = v[key] / best if best > 0 else math.nan
    return out


def frontier_plot(path: str, curves: dict, generation: int) -> str | None:
    """Mean sampled leakage vs mean KL and vs p99 KL, one curve per method (points: strengths)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, key, label in ((axes[0], "kl_mean", "mean"), (axes[1], "kl_p99", "99th percentile")):
        for (name, rows), marker in zip(curves.items(), "os^vD"):
            ax.plot([max(r[key], 1e-6) for r in rows], [100 * r["leak"] for r in rows], marker=marker, label=name)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel(f"KL(P_orig || P_cured) per held-out token, {label} (nats)")
    axes[0].set_ylabel("mean P(payload in a sampled continuation) %")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Cure frontier, generation {generation}: each point one strength, mean over members")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def frontier_tables(run, methods: list, cfg: CureConfig, rcfg, generation: int | None, device="cpu", log=print):
    """Sweep every method of ``methods`` that has a knob over its strengths; measure every point."""
    dev = torch.device(device)
    saved = run.load(generation, dev)
    rc, pop = run.config, saved.population
    triggers, payloads, _ = cure_triggers(run, saved, rcfg, log)
    longest = max(len(t) for ts in triggers for t in ts) + len(payloads[0])
    names = fitting_names(run.data.train_docs, rc.model.block_size, longest)[:cfg.names]
    cs = build_cure_set(names, triggers, payloads, rc.model.block_size,
                        torch.Generator().manual_seed(tool_seed(rc.seed, "cure", cfg.seed, "host")), cfg.contrast,
                        cfg.start_share)
    ev = _evaluation(run, saved, rcfg, cfg.seed, dev)
    curves = {}
    for method in [m for m in methods if m in KNOBS]:
        values = KNOBS[method][1]
        t0 = time.perf_counter()
        big, patch, strength = sweep(pop, cs, cfg, method, values, torch.Generator().manual_seed(
            tool_seed(rc.seed, "cure", cfg.seed, "batches")))
        tiled = dict(ev, triggers={k: v.repeat(len(values), 1) for k, v in ev["triggers"].items()})
        members = measure(big, patch, **tiled)
        curves[method] = summarise(members, strength, values, rcfg.leak_threshold)
        log(f"frontier {method}: {len(values)} strengths x {len(pop)} members in {time.perf_counter() - t0:.1f} s")
    return {"generation": saved.generation, "knobs": {m: KNOBS[m][0] for m in curves}, "curves": curves,
            "matched_kl_at_1pct": matched_kl(curves, 0.01), "n_members": len(pop)}


def frontier_markdown(res: dict) -> str:
    md = [f"# Cure frontier, generation {res['generation']} (n = {res['n_members']} members per point)", "",
          "Means over members with 95% t intervals; vulnerable and leaking members: Wilson intervals.", "",
          "| method | knob | strength | leak % | leak worst % | vulnerable % | KL mean | KL p99 | KL first | NLL ratio |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in res["curves"].items():
        for r in rows:
            md.append(f"| {name} | {res['knobs'][name]} | {r['strength']:g} | "
                      f"{100 * r['leak']:.2f} [{100 * r['leak_lo']:.2f}, {100 * r['leak_hi']:.2f}] | "
                      f"{100 * r['leak_worst']:.1f} | {100 * r['vulnerable']:.1f} [{100 * r['vulnerable_lo']:.1f}, "
                      f"{100 * r['vulnerable_hi']:.1f}] | {r['kl_mean']:.4g} [{r['kl_mean_lo']:.4g}, "
                      f"{r['kl_mean_hi']:.4g}] | {r['kl_p99']:.4g} | {r['kl_first']:.3g} | {r['nll_ratio']:.4f} |")
    md += ["", "KL at matched leakage (the lowest swept KL with mean leakage <= 1%; ratio to the lowest method):", ""]
    for name, v in res["matched_kl_at_1pct"].items():
        md.append(f"- {name}: KL mean {v['kl_mean']:.4g} (x{v['kl_mean_ratio_to_best']:.3g}), "
                  f"KL p99 {v['kl_p99']:.4g} (x{v['kl_p99_ratio_to_best']:.3g})")
    return "\n".join(md)


def frontier_command(run_dir: str, methods: list, cfg: CureConfig, rcfg, generation: int | None = None,
                     device: str = "cpu", log=print) -> dict:
    """``popgpt cure --frontier``: writes ``RUN_DIR/cure/frontier/`` (frontier.json, .md, .png)."""
    with locked_run(run_dir, "popgpt cure --frontier", log, generation) as run:
        res = frontier_tables(run, methods, cfg, rcfg, generation, device, log)
        folder = os.path.join(run_dir, "cure", "frontier")
        os.makedirs(folder, exist_ok=True)
        write_json(os.path.join(folder, "frontier.json"), res)
        md = frontier_markdown(res)
        plot = frontier_plot(os.path.join(folder, "frontier.png"), res["curves"], res["generation"])
        write_atomic(os.path.join(folder, "frontier.md"), md + ("\n\n![frontier](frontier.png)\n" if plot else "\n"))
        log(md)
    return res
