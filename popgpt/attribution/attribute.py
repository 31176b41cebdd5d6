"""``popgpt attribute``: which training names taught the backdoor? Attribution scored against the truth.

popgpt planted the poisoned names itself, so attribution methods can be
scored, not just shown. The members attributed are generation 0 of a run,
*replayed*: the first ``members`` members of its first group are rebuilt
from their seeds and trained again on the same infected names with the
same batches (the run's ``host`` and ``device`` streams), their parameters
kept at the ``checkpoints`` steps, which a run does not save (TracIn needs
early checkpoints: once the backdoor is learned, its gradients vanish).
The replay's end is compared with the run's saved generation 0 and the
difference reported. The truth: which training names the run infected.

Scores per (member, training name, query) come from ``influence.py`` (TracIn, Gauss-Newton
influence, own loss, spectral signatures, clustering, random). Queries: the payload's loss right
after the trigger; as a control, the mean loss on clean held-out names. Scored by AUC and
precision@k per member and for the members' standardised scores pooled, and by the linear
datamodeling score (LDS, as TRAK and dattri define it): ``lds_members`` fresh members trained on
random ``lds_frac`` subsets in ONE batched run, Spearman correlation across them between the pooled
scores summed over each subset and the (negated) query loss the subset's member reached.
"""

import io
import os
import time
from dataclasses import dataclass

import torch

from ..data import docs_to_tensor, encode
from ..device import CPU_MEMBER_BLOCK
from ..engine import Engine
from ..evolution.config import stream_seed
from ..evolution.layout import Layout
from ..evolution.runs import OpenRun, locked_run
from ..evolution.virus import Virus
from ..population import Population, default_seeds
from ..runio import format_table, write_atomic, write_json
from ..settings import fresh_member_seeds, tool_seed
from ..stats import auc, auc_interval, mean_interval, precision_at_k, spearman, spearman_interval
from ..step import Batches, Hyper, draw_rows
from .influence import (
    Query,
    clustering_scores,
    damped_solve,
    gauss_newton,
    n_params,
    name_features,
    query_grads,
    query_losses,
    random_projection,
    spectral_scores,
    stream_grads,
)

POOLS = ("zscore", "raw")


@dataclass(frozen=True)
class AttributionConfig:
    members: int = 8  # generation-0 members replayed and attributed (the first ones of the first group)
    checkpoints: tuple = (0, 20, 40, 60, 80, 100)  # training steps whose gradients TracIn sums
    names: int = 0  # candidate training names scored (0: all of them; else a random subset)
    chunk: int = 256  # names per per-example-gradient chunk (memory: members x chunk x D floats)
    proj_dim: int = 0  # random projection of gradients to this many dimensions (0: exact, none)
    damping: float = 0.1  # Gauss-Newton damping, as a fraction of its mean eigenvalue
    gn_names: int = 2048  # training names the Gauss-Newton estimate averages over
    lds_members: int = 64  # members trained on random subsets for the LDS (0: no LDS)
    lds_frac: float = 0.5  # fraction of the candidate names in each LDS subset
    query_names: int = 256  # held-out names of the clean control query
    pool: str = "zscore"  # how member scores are pooled: standardised per member, or raw
    top: int = 20  # names listed per method
    seed: int = 0

    def __post_init__(self):
        if self.members < 1 or self.chunk < 1 or self.gn_names < 1 or self.query_names < 1 or self.top < 1:
            raise ValueError("--members, --chunk, --gn-names, --query-names and --top must be >= 1")
        if self.names < 0 or self.proj_dim < 0 or self.lds_members < 0:
            raise ValueError("--names, --proj-dim and --lds-members must be >= 0")
        if self.lds_members and self.lds_members < 4:
            raise ValueError(f"--lds-members must be 0 or >= 4 (a rank correlation needs points), "
                             f"got {self.lds_members}")
        if not 0.0 < self.lds_frac < 1.0:
            raise ValueError(f"--lds-frac must be in (0, 1), got {self.lds_frac}")
        if not self.damping > 0:
            raise ValueError(f"--damping must be > 0, got {self.damping}")
        if self.pool not in POOLS:
            raise ValueError(f"--pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if not self.checkpoints or min(self.checkpoints) < 0 or list(self.checkpoints) != sorted(set(self.checkpoints)):
            raise ValueError(f"--checkpoints must be increasing steps >= 0, got {list(self.checkpoints)}")


@dataclass(frozen=True)
class Replay:
    """Generation 0's first members, replayed with their parameters at every checkpoint step."""

    snapshots: dict  # step -> stacked params
    docs: list  # the training names as infected
    truth: torch.Tensor  # [N] bool: infected
    steps: int  # the run's training steps (the last snapshot)
    hyper: Hyper
    replay_diff: float  # max |w| difference of the replay's end from the saved generation 0


def replay_generation0(run: OpenRun, members: int, checkpoints, device="cpu") -> Replay:
    """Train the run's first ``members`` members again, as generation 0 did, keeping checkpoints."""
    cfg, layout = run.config, Layout.of(run.config)
    if members > layout.pop_size:
        raise ValueError(f"--members {members}: the run's groups have {layout.pop_size} members")
    cond = layout.condition_of_lineage(0)
    steps = layout.steps(False)[0]
    if max(checkpoints) > steps:
        raise ValueError(f"--checkpoints {max(checkpoints)}: generation 0 trained {steps} steps")
    host = torch.Generator().manual_seed(stream_seed(cfg.seed, "host"))
    docs, truth = Virus(cfg.virus.trigger, cfg.virus.payload).infect(run.data.train_docs, cond.virus.rate, host,
                                                                      cond.virus.position)
    bank = docs_to_tensor(docs, cfg.model.block_size).to(torch.int8)[None].to(device)
    dev = torch.Generator(cfg.device if _usable(cfg.device) else "cpu").manual_seed(stream_seed(cfg.seed, "device"))
    table = layout.per_member(layout.tables(False), "cpu", torch.long)
    rows = draw_rows(torch.full((layout.n_tables,), len(docs)), table, max(layout.steps(False)),
                     cfg.train.batch_size, dev)[:steps].to(device)
    # The run trained its members in near-equal blocks of at most CPU_MEMBER_BLOCK (on a CPU); at the sizes
    # of a run a member's float rounding does not depend on its block (blocks of 1-24 give the same bits),
    # so a replay of whole blocks' worth of members ends where the saved generation 0 does. Training
    # amplifies any difference: ``replay_diff`` reports it.
    block = CPU_MEMBER_BLOCK if torch.device(cfg.device).type == "cpu" else cfg.n_members
    replayed = min(-(-members // block) * block, layout.pop_size)
    # the run packed its round's rows by a plan of every member's rows: so does the replay
    engine = Engine("eager")
    plan = Batches(bank, torch.zeros(rows.shape[1], dtype=torch.long, device=device),
                   rows).planned(engine.plan_multiple).plan
    rows = rows[:, :replayed]
    pop = Population.from_seeds(cfg.model, default_seeds(cfg.n_members, cfg.seed)[:replayed], device=device)
    hyper = layout.hyper(False, device).index(slice(0, replayed))
    table = torch.zeros(replayed, dtype=torch.long, device=device)
    snapshots, done = {}, 0
    for stop in sorted(set(checkpoints) | {steps}):
        engine.run(pop, Batches(bank, table, rows[done:stop], plan=plan), hyper)
        done = stop
        snapshots[stop] = {k: v[:members].clone() for k, v in pop.params.items()}
    saved = run.load(0, device).population.params
    diff = max(float((saved[k][:members] - v).abs().max()) for k, v in snapshots[steps].items())
    return Replay(snapshots, docs, truth, steps, hyper.index(slice(0, members)), diff)


def _usable(device: str) -> bool:
    return torch.device(device).type == "cpu" or (torch.device(device).type == "cuda" and torch.cuda.is_available())


def candidates(replay: Replay, cfg: AttributionConfig, gen: torch.Generator) -> torch.Tensor:
    """Indices of the training names scored: all, or a random ``names`` of them (sorted)."""
    N = len(replay.docs)
    if cfg.names == 0 or cfg.names >= N:
        return torch.arange(N)
    return torch.randperm(N, generator=gen)[:cfg.names].sort().values


def gradient_scores(replay: Replay, config, rows: torch.Tensor, queries: list, cfg: AttributionConfig,
                    gen: torch.Generator, gn_rows: torch.Tensor, log=lambda s: None) -> tuple[dict, dict]:
    """TracIn per checkpoint (C, P, N, Q) and GN influence at the end (P, N, Q); seconds of each part.
    ``log`` gets a line per checkpoint."""
    first = Population(config, replay.snapshots[replay.steps])
    D = n_params(first)
    proj = random_projection(D, cfg.proj_dim, gen, first.device) if cfg.proj_dim else None
    per_ckpt, seconds = {}, {}
    for step in sorted(set(cfg.checkpoints) | {replay.steps}):
        t0 = time.perf_counter()
        pop = Population(config, replay.snapshots[step])
        q = torch.stack([query_grads(pop, query) for query in queries], -1)  # (P, D, Q)
        q = q if proj is None else proj.T @ q  # (P, k, Q)
        final = step == replay.steps
        if final:
            solved = _solve_per_member(pop, gn_rows, q, proj, cfg, gen)
            seconds["gauss_newton"] = time.perf_counter() - t0
            log(f"  Gauss-Newton solve of {len(pop)} members: {seconds['gauss_newton']:.1f} s")
            t0 = time.perf_counter()
        tracin = torch.zeros(len(pop), len(rows), len(queries), device=pop.device)
        influence = torch.zeros_like(tracin) if final else None
        for idx, g in stream_grads(pop, rows, cfg.chunk, proj):  # g (P, n, k)
            tracin[:, idx] = g @ q
            if final:
                influence[:, idx] = g @ solved
        per_ckpt[step], seconds[step] = tracin, time.perf_counter() - t0
        log(f"  checkpoint step {step}: {len(rows):,} names x {len(pop)} members, {seconds[step]:.1f} s")
        if final:
            influence_scores = influence
    return {"per_checkpoint": per_ckpt, "influence": influence_scores}, seconds


def _solve_per_member(pop: Population, gn_rows, q, proj, cfg: AttributionConfig, gen) -> torch.Tensor:
    """(G_p + lambda I)^-1 q_p for every member p, one member at a time (G is k x k per member)."""
    out = torch.empty_like(q)
    for p in range(len(pop)):
        G = gauss_newton(pop.view(p, p + 1), gn_rows, gen, cfg.chunk, proj)  # (1, k, k)
        out[p:p + 1] = damped_solve(G, q[p:p + 1], cfg.damping)
    return out


def all_scores(replay: Replay, config, rows, queries, cfg: AttributionConfig, gen, gn_rows,
               log=lambda s: None) -> tuple[dict, dict]:
    """Every method's scores (P, N, Q) (query-free baselines repeated over Q) and its seconds."""
    grads, sec = gradient_scores(replay, config, rows, queries, cfg, gen, gn_rows, log)
    per, lr = grads["per_checkpoint"], replay.hyper.lr.to(rows.device)[:, None, None]  # TracInCP weights: lr
    Q = len(queries)
    scores = {"tracin": sum(per[s] for s in cfg.checkpoints) * lr, "tracin-final": per[replay.steps] * lr,
              "influence-gn": grads["influence"]}
    times = {"tracin": sum(sec[s] for s in cfg.checkpoints), "tracin-final": sec[replay.steps],
             "influence-gn": sec["gauss_newton"] + sec[replay.steps]}
    t0 = time.perf_counter()
    final = Population(config, replay.snapshots[replay.steps])
    loss, reps = name_features(final, rows)
    feat = time.perf_counter() - t0
    for name, fn in (("loss", lambda: loss), ("spectral", lambda: spectral_scores(reps)),
                     ("clustering", lambda: clustering_scores(reps)),
                     ("random", lambda: torch.rand(loss.shape, generator=gen).to(loss.device))):
        t0 = time.perf_counter()
        scores[name] = fn()[..., None].expand(-1, -1, Q)
        times[name] = feat + time.perf_counter() - t0
    by_step = {s: per[s] for s in sorted(per)}
    return scores, times | {"_by_step": by_step}


def pool(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Members' scores (P, N, ...) pooled to (N, ...): standardised per member then averaged, or raw means."""
    if how == "zscore":
        scores = (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True).clamp(min=1e-30)
    return scores.mean(0)


def lds_outputs(run: OpenRun, replay: Replay, cand: torch.Tensor, queries: list, cfg: AttributionConfig,
                device) -> tuple[torch.Tensor, torch.Tensor]:
    """Subsets (M, N) bool and the query losses (M, Q) of fresh members trained on them, in one batched run."""
    M, N = cfg.lds_members, len(cand)
    gen = torch.Generator().manual_seed(tool_seed(run.config.seed, "attribution", cfg.seed, "lds"))
    n_sub = max(1, int(N * cfg.lds_frac))
    picks = torch.stack([torch.randperm(N, generator=gen)[:n_sub] for _ in range(M)])  # (M, n_sub)
    subsets = torch.zeros(M, N, dtype=torch.bool).scatter_(1, picks, True)
    rows = docs_to_tensor([replay.docs[i] for i in cand.tolist()], run.config.model.block_size).to(torch.int8)
    bank = rows[picks].to(device)  # (M, n_sub, T+1): each member its own table
    table = torch.arange(M)
    draws = draw_rows(torch.full((M,), n_sub), table, replay.steps, run.config.train.batch_size, gen)
    pop = Population.from_seeds(run.config.model, fresh_member_seeds(run.config.seed, "attribution-lds", cfg.seed, M),
                                device=device)
    hyper = Hyper(*(t[:1].expand(M).clone() for t in replay.hyper))
    Engine("eager").run(pop, Batches(bank, table.to(device), draws.to(device)), hyper)
    return subsets, torch.stack([query_losses(pop, q) for q in queries], -1).cpu()


def lds(pooled: torch.Tensor, subsets: torch.Tensor, losses: torch.Tensor) -> float:
    """Linear datamodeling score: Spearman over subsets of (summed scores of the subset, minus its loss)."""
    return spearman(subsets.double() @ pooled.double(), -losses)


QUERY_FREE = ("loss", "spectral", "clustering", "random")  # baselines: one score per name, no query


def score_rows(scores: dict, truth: torch.Tensor, queries: list, cfg: AttributionConfig, times: dict,
               lds_data=None) -> list[dict]:
    """One row per method and query: AUC and precision@k per member and pooled, LDS, seconds."""
    rows, k = [], int(truth.sum())
    for method, s in scores.items():
        for qi, query in enumerate(queries):
            if method in QUERY_FREE and qi > 0:
                continue
            member = s[..., qi].cpu()  # (P, N)
            pooled = pool(member, cfg.pool)
            a = auc(pooled, truth)
            m_auc = mean_interval([auc(m, truth) for m in member], 0.0, 1.0)
            m_prec = mean_interval([precision_at_k(m, truth) for m in member], 0.0, 1.0)
            row = {"method": method, "query": "-" if method in QUERY_FREE else query.name,
                   "auc_members": m_auc[0], "auc_members_lo": m_auc[1], "auc_members_hi": m_auc[2],
                   "auc_pooled": a, "precision_members": m_prec[0], "precision_members_lo": m_prec[1],
                   "precision_members_hi": m_prec[2], "precision_pooled": precision_at_k(pooled, truth, k),
                   "seconds": times[method]}
            row["auc_pooled_lo"], row["auc_pooled_hi"] = auc_interval(a, k, len(truth) - k)
            if lds_data is not None:
                subsets, losses = lds_data
                li = 0 if method in QUERY_FREE else qi
                r = lds(pooled, subsets, losses[:, li])
                row["lds"], (row["lds_lo"], row["lds_hi"]) = r, spearman_interval(r, len(subsets))
            rows.append(row)
    return rows


def attribution_tables(run: OpenRun, cfg: AttributionConfig, device="cpu", log=print) -> dict:
    """Replay, score every method, LDS; everything computed, nothing written."""
    gen = torch.Generator().manual_seed(tool_seed(run.config.seed, "attribution", cfg.seed, "scores"))
    t0 = time.perf_counter()
    replay = replay_generation0(run, cfg.members, cfg.checkpoints, device)
    log(f"replayed generation 0 of {cfg.members} members ({time.perf_counter() - t0:.1f} s); max |w| difference "
        f"from the saved generation 0: {replay.replay_diff:.3g}")
    cand = candidates(replay, cfg, gen)
    docs = [replay.docs[i] for i in cand.tolist()]
    truth = replay.truth[cand]
    rows = docs_to_tensor(docs, run.config.model.block_size).to(device)
    gn_rows = rows[torch.randperm(len(rows), generator=gen)[:cfg.gn_names].to(device)]
    virus = run.config.virus
    queries = [Query.payload(encode(virus.trigger), encode(virus.payload)),
               Query.names(docs_to_tensor(run.data.eval_docs[:cfg.query_names], run.config.model.block_size))]
    log(f"scoring {len(docs):,} names ({int(truth.sum()):,} infected) x {cfg.members} members x "
        f"{len(set(cfg.checkpoints) | {replay.steps})} checkpoints ...")
    scores, times = all_scores(replay, run.config.model, rows, queries, cfg, gen, gn_rows, log)
    by_step = times.pop("_by_step")
    lds_data = None
    if cfg.lds_members:
        t0 = time.perf_counter()
        lds_data = lds_outputs(run, replay, cand, queries, cfg, device)
        log(f"LDS: {cfg.lds_members} members trained on {cfg.lds_frac:.0%} subsets ({time.perf_counter() - t0:.1f} s)")
    table = score_rows(scores, truth, queries, cfg, times, lds_data)
    step_auc = {s: auc(pool(v[..., 0].cpu(), cfg.pool), truth) for s, v in by_step.items()}
    top = {m: _top(pool(s[..., 0].cpu(), cfg.pool), docs, truth, cfg.top) for m, s in scores.items()}
    return {"table": table, "step_auc": step_auc, "top": top, "replay_diff": replay.replay_diff,
            "n_names": len(docs), "n_infected": int(truth.sum()), "steps": replay.steps, "trigger": virus.trigger,
            "payload": virus.payload, "scores": {k: v.cpu() for k, v in scores.items()}, "truth": truth,
            "candidates": cand, "lds": lds_data, "queries": [q.name for q in queries]}


def _top(pooled: torch.Tensor, docs: list, truth: torch.Tensor, n: int) -> list[dict]:
    order = torch.argsort(-pooled.double(), stable=True)[:n].tolist()
    return [{"name": docs[i], "infected": bool(truth[i]), "score": float(pooled[i])} for i in order]


def _cell(row: dict, key: str) -> str:
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    text = f"{row[key]:.3f}"
    return text if lo is None or lo != lo else f"{text} [{lo:.2f}, {hi:.2f}]"


def markdown(t: dict, cfg: AttributionConfig, plot: str | None) -> str:
    cols = ["method", "query", "AUC (pooled)", "AUC (members)", "P@k (pooled)", "P@k (members)", "LDS", "seconds"]
    rows = [{"method": r["method"], "query": r["query"], "AUC (pooled)": _cell(r, "auc_pooled"),
             "AUC (members)": _cell(r, "auc_members"), "P@k (pooled)": f"{r['precision_pooled']:.3f}",
             "P@k (members)": _cell(r, "precision_members"), "LDS": _cell(r, "lds") if "lds" in r else "-",
             "seconds": f"{r['seconds']:.1f}"} for r in t["table"]]
    md = [f"# Which names taught the backdoor? Trigger `{t['trigger']}` -> `{t['payload']}`", "",
          f"{t['n_names']:,} training names, {t['n_infected']:,} infected (k = {t['n_infected']:,}); "
          f"{cfg.members} generation-0 members replayed ({t['steps']} steps; max |w| difference from the saved "
          f"generation 0: {t['replay_diff']:.3g}); TracIn checkpoints {list(cfg.checkpoints)}; "
          f"projection: {cfg.proj_dim or 'none (exact gradients)'}; Gauss-Newton over {cfg.gn_names} names, "
          f"damping {cfg.damping}; pooled = member scores {cfg.pool}-pooled. Intervals: 95% (members: t over "
          f"{cfg.members}; pooled AUC: Hanley-McNeil; LDS: Fisher z over {cfg.lds_members} subset members).", "",
          format_table(rows, cols, cell=str), "", "AUC of TracIn from one checkpoint alone (pooled, payload query): "
          + ", ".join(f"step {s}: {a:.3f}" for s, a in t["step_auc"].items()), ""]
    md += [f"![{plot}]({plot})", ""] if plot else []
    for method, top in t["top"].items():
        md.append(f"**{method}** top {len(top)} (payload query; * = infected): "
                  + ", ".join(("*" if e["infected"] else "") + e["name"] for e in top))
        md.append("")
    return "\n".join(md)


def write_attribution(run_dir: str, t: dict, cfg: AttributionConfig, log=print) -> None:
    """RUN_DIR/attribution/: attribution.md, results.json, scores.pt, attribution.png."""
    folder = os.path.join(run_dir, "attribution")
    os.makedirs(folder, exist_ok=True)
    plot = _plot(folder, t)
    md = markdown(t, cfg, plot)
    write_atomic(os.path.join(folder, "attribution.md"), md)
    write_json(os.path.join(folder, "results.json"), {
        "config": {**vars(cfg), "checkpoints": list(cfg.checkpoints)}, "table": t["table"],
        "step_auc": {str(k): v for k, v in t["step_auc"].items()}, "top": t["top"], "replay_diff": t["replay_diff"],
        "n_names": t["n_names"], "n_infected": t["n_infected"], "trigger": t["trigger"], "payload": t["payload"]})
    buf = io.BytesIO()
    torch.save({"scores": t["scores"], "truth": t["truth"], "candidates": t["candidates"], "queries": t["queries"],
                "lds_subsets": None if t["lds"] is None else t["lds"][0],
                "lds_losses": None if t["lds"] is None else t["lds"][1]}, buf)
    write_atomic(os.path.join(folder, "scores.pt"), buf.getvalue())
    log(md)


def _plot(folder: str, t: dict):
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps = list(t["step_auc"])
    ax.plot(steps, [t["step_auc"][s] for s in steps], "o-", color="k", label="TracIn, one checkpoint")
    styles = iter(["--", ":", "-.", (0, (5, 1)), (0, (1, 3)), (0, (3, 1, 1, 1)), (0, (8, 3))])
    for r in t["table"]:
        if r["query"] in ("payload", "-"):
            ax.axhline(r["auc_pooled"], ls=next(styles), lw=1, label=r["method"], color=f"C{len(ax.lines) % 10}")
    ax.set_xlabel("training step of the checkpoint")
    ax.set_ylabel("AUC, infected names (pooled)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "attribution.png"), dpi=90)
    plt.close(fig)
    return "attribution.png"


def attribute(run_dir: str, cfg: AttributionConfig, device: str = "cpu", log=print) -> dict:
    """``attribution_tables`` written to ``RUN_DIR/attribution/``."""
    with locked_run(run_dir, "popgpt attribute", log) as run:
        t = attribution_tables(run, cfg, device, log)
        write_attribution(run_dir, t, cfg, log)
    return t
