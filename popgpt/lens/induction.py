"""Induction heads across a population: who grows them, when, and are they the cause?

Populations of 1-layer (the negative control: induction needs two layers)
and 2-layer MicroGPTs train side by side with the same budget on two tasks:

- ``repeat``: a random string s of ``min_len``..``max_len`` letters written
  twice after a random-letter prefix u of random length, ``. u s s .`` (one
  row per sequence). The second copy is predictable only by copying from
  the first; the length of s and where it repeats vary independently, so
  no positional rule (attend k - 1 back, or "late positions belong to long
  strings") solves it: the task rewards induction and nothing else.
- ``names``: names as they are, one per row (the rest of popgpt's data).
  Names are short and rarely repeat a stretch, so induction may not pay.

Members are a grid per depth: task x init seed x data order. The same init
seeds start both tasks (paired), and members of one data order see the
same row indices, so a phase step's dependence on the init seed and on the
data order can be told apart.

Scores, per member, layer and head, on ``eval_seqs`` repeated random
sequences ``. r_1..r_n r_1..r_n`` (n = ``eval_len``; positions 0..2n), each
the attention mass a query puts where the pattern predicts, averaged over
sequences and queries:

- previous-token: query t (1..2n) on key t-1;
- duplicate-token: query n+i (second copy) on key i, the earlier copy of
  its own token;
- induction: query n+i on key i+1, the token after that earlier copy.

In-context loss: mean NLL on the first copy's tokens 2..n and on the second
copy's n+2..2n (each the n-1 tokens that follow another letter of the
same copy). A member *grew an induction head* when one of its heads scores
>= ``score_threshold`` at the end of training; its *phase step* is the first
checkpoint where its best induction score reaches the threshold, and its
*loss step* the first where its second-copy loss falls below ``icl_loss``
nats (a model that only knows which letters occurred, not where, cannot go
below about ln(distinct letters) ~ 2.1). Causal check: ablate (zero) the
member's induction heads (its best head if none passes), and separately one
other head drawn at random, and measure how the second-copy loss changes.
"""

import math
from dataclasses import dataclass

import torch

from ..data import BOUNDARY, IGNORE, docs_to_tensor
from ..engine import Engine
from ..model import ModelConfig
from ..population import Population
from ..settings import fresh_member_seeds, tool_seed
from ..stats import mean_interval, wilson
from ..step import Batches, TrainConfig
from .cache import ablate_heads, run_with_cache

TASKS = ("repeat", "names")
SCORES = ("previous", "duplicate", "induction")


@dataclass(frozen=True)
class InductionConfig:
    depths: tuple = (1, 2)  # 1 layer: the negative control
    tasks: tuple = TASKS
    inits: int = 8  # init seeds per depth and task
    orders: int = 4  # data orders per init seed
    steps: int = 3000  # training steps, the same for every member
    every: int = 100  # checkpoint (measure every score) every this many steps
    batch_size: int = 32
    lr: float = 1e-2  # Adam, as popgpt trains names
    min_len: int = 4  # shortest repeated string in training (varied: no positional shortcut)
    max_len: int = 10  # longest; 2 * max_len + 2 tokens must fit block_size + 1
    eval_len: int = 10  # n of the scoring sequences (the standard test: r r)
    eval_seqs: int = 200
    score_threshold: float = 0.4  # a head with induction score >= this is an induction head
    icl_loss: float = 1.0  # nats: second-copy loss below this marks the loss drop
    block_size: int = 32  # room for a prefix before the repeat (names need 16)
    seed: int = 0

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"--tasks: unknown task {bad[0] if bad else '(none)'}; choose from {', '.join(TASKS)}")
        if not self.depths or any(d < 1 for d in self.depths):
            raise ValueError(f"--depths must be integers >= 1, got {self.depths}")
        for name in ("inits", "orders", "steps", "every", "batch_size", "eval_seqs", "min_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_len < self.min_len or 2 * self.max_len + 1 > self.block_size:
            raise ValueError(f"--min-len {self.min_len} .. --max-len {self.max_len}: need min <= max and "
                             f"2 * max + 1 <= block size {self.block_size}")
        if not 2 <= self.eval_len <= (self.block_size - 1) // 2:
            raise ValueError(f"--eval-len must be in [2, {(self.block_size - 1) // 2}], got {self.eval_len}")
        if not (0 < self.score_threshold < 1 and math.isfinite(self.lr) and self.lr > 0 and self.icl_loss > 0):
            raise ValueError("--score-threshold must be in (0, 1); --lr and --icl-loss > 0")

    @property
    def members(self) -> int:
        """Members per depth."""
        return len(self.tasks) * self.inits * self.orders

    def layout(self) -> list[dict]:
        """Task, init-seed index and data-order index of every member of a depth."""
        return [{"task": t, "init": i, "order": o} for t in self.tasks for i in range(self.inits)
                for o in range(self.orders)]


def repeat_rows(n: int, min_len: int, max_len: int, block_size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, block_size + 1) rows ``. u s s .``: s random letters of random length in [min_len, max_len]
    written twice after a random-letter prefix u of random length (as long as the row fits), so that
    neither the length of s nor the position where it repeats can be read from positions. IGNORE padding."""
    out = torch.full((n, block_size + 1), IGNORE, dtype=torch.long)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator)
    room = block_size - 1 - 2 * lengths  # letters left for the prefix
    prefixes = (torch.rand(n, generator=generator, dtype=torch.float64) * (room + 1)).long()
    letters = torch.randint(1, 27, (n, block_size), generator=generator)
    for i, (k, p) in enumerate(zip(lengths.tolist(), prefixes.tolist())):
        u, s = letters[i, :p], letters[i, p:p + k]
        out[i, :p + 2 * k + 2] = torch.cat([torch.tensor([BOUNDARY]), u, s, s, torch.tensor([BOUNDARY])])
    return out


def repeated_sequences(n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 2 * length + 1) scoring sequences ``. r r`` with r random letters."""
    r = torch.randint(1, 27, (n, length), generator=generator)
    return torch.cat([torch.full((n, 1), BOUNDARY), r, r], 1)


def copy_losses(logits: torch.Tensor, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL per member on the first copy's tokens 2..n and the second's n+2..2n: [P] each."""
    n = (seqs.shape[1] - 1) // 2
    logp = logits[:, :, :-1].log_softmax(-1)  # (P, B, 2n, V): position j predicts token j+1
    nll = -logp.gather(-1, seqs[None, :, 1:, None].to(logits.device).expand(len(logits), -1, -1, 1))[..., 0]
    return nll[:, :, 1:n].mean((1, 2)), nll[:, :, n + 1:2 * n].mean((1, 2))


@torch.no_grad()
def head_scores(pop: Population, seqs: torch.Tensor, edits=()) -> dict:
    """Previous-token, duplicate-token and induction scores (P, L, H), and the copy losses [P]."""
    L, n = pop.config.n_layer, (seqs.shape[1] - 1) // 2
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(L)]
    logits, cache = run_with_cache(pop, seqs, names, edits)
    t_all = torch.arange(1, 2 * n + 1)
    second = torch.arange(n + 1, 2 * n + 1)
    out = {k: torch.zeros(len(pop), L, pop.config.n_head, device=pop.device) for k in SCORES}
    for layer, name in enumerate(names):
        pattern = cache[name]  # (P, B, H, T, T)
        out["previous"][:, layer] = pattern[..., t_all, t_all - 1].mean((1, 3))
        out["duplicate"][:, layer] = pattern[..., second, second - n].mean((1, 3))
        out["induction"][:, layer] = pattern[..., second, second - n + 1].mean((1, 3))
    out["loss_first"], out["loss_second"] = copy_losses(logits, seqs)
    return out


def _bank(cfg: InductionConfig, names: list[str], g: torch.Generator) -> torch.Tensor:
    """(K, N, block_size + 1): one table of rows per task, all of the same length."""
    tables = []
    for task in cfg.tasks:
        if task == "names":
            tables.append(docs_to_tensor(names, cfg.block_size))
        else:
            tables.append(repeat_rows(len(names), cfg.min_len, cfg.max_len, cfg.block_size, g))
    return torch.stack(tables)


def train_depth(depth: int, cfg: InductionConfig, names: list[str], engine: Engine | None = None,
                log=print, device="cpu") -> dict:
    """Train one depth's members, measuring every score every ``cfg.every`` steps.

    Returns ``steps`` (K,), per-score trajectories (K, P, L, H), copy losses (K, P), the final population.
    """
    mcfg = ModelConfig(n_layer=depth, block_size=cfg.block_size)
    seeds = fresh_member_seeds(cfg.seed, "induction", 0, cfg.inits)
    lay = cfg.layout()
    pop = Population.from_seeds(mcfg, [seeds[m["init"]] for m in lay], device=device)
    g = torch.Generator().manual_seed(tool_seed(cfg.seed, "induction", 0, "data"))
    bank = _bank(cfg, names, g)  # the same tables for every depth
    order_rows = torch.randint(bank.shape[1], (cfg.steps, cfg.orders, cfg.batch_size), generator=g)
    rows = order_rows[:, [m["order"] for m in lay]]  # (steps, P, B): members of one order share rows
    table = torch.tensor([cfg.tasks.index(m["task"]) for m in lay])
    bank, rows, table = bank.to(device), rows.to(device), table.to(device)
    seqs = repeated_sequences(cfg.eval_seqs, cfg.eval_len,
                              torch.Generator().manual_seed(tool_seed(cfg.seed, "induction", 0, "eval"))).to(device)
    engine = engine or Engine("eager")
    hp = TrainConfig(lr=cfg.lr, batch_size=cfg.batch_size, steps=cfg.steps)
    marks = sorted({0, *range(cfg.every, cfg.steps, cfg.every), cfg.steps})
    traj = {k: [] for k in (*SCORES, "loss_first", "loss_second")}
    for a, b in zip([0, *marks[:-1]], marks):
        if b > a:
            engine.run(pop, Batches(bank, table, rows[a:b]), hp)
        for k, v in head_scores(pop, seqs).items():
            traj[k].append(v.cpu())
        best = traj["induction"][-1].flatten(1).max(1).values
        log(f"depth {depth} step {b:>5}: best induction score median {best.median():.2f}, second-copy loss "
            f"median {traj['loss_second'][-1].median():.2f} (first {traj['loss_first'][-1].median():.2f})")
    return {"depth": depth, "steps": torch.tensor(marks), "layout": lay, "seeds": seeds, "population": pop,
            "seqs": seqs, **{k: torch.stack(v) for k, v in traj.items()}}


def first_step(values: torch.Tensor, steps: torch.Tensor, reached) -> torch.Tensor:
    """Per member, the first checkpoint step where ``reached(values)`` holds, NaN if never: [P].

    ``values``: (K, P) trajectories over the K checkpoints ``steps``."""
    hit = reached(values)  # (K, P) bool
    first = hit.float().argmax(0)  # the first True (0 when none)
    return torch.where(hit.any(0), steps[first].float(), torch.tensor(float("nan")))


def phase_steps(traj: dict, cfg: InductionConfig) -> dict:
    """Each member's phase step (best induction score reaches the threshold) and loss step
    (second-copy loss falls below ``icl_loss``), NaN if never: [P] each."""
    best = traj["induction"].flatten(2).max(2).values  # (K, P)
    return {"phase_step": first_step(best, traj["steps"], lambda v: v >= cfg.score_threshold),
            "loss_step": first_step(traj["loss_second"], traj["steps"], lambda v: v < cfg.icl_loss)}


@torch.no_grad()
def causal_check(pop: Population, seqs: torch.Tensor, induction: torch.Tensor, threshold: float,
                 generator: torch.Generator) -> dict:
    """Second-copy (and first-copy) loss change per member when its induction heads are ablated, and
    when one other head drawn at random is: [P] each, plus the masks (P, L, H).

    A member with no head at or above ``threshold`` has its best-scoring head ablated (``detected``
    False). The random head is drawn uniformly among the heads not ablated in the first case."""
    flat = induction.flatten(1)  # (P, L*H)
    detected = flat.max(1).values >= threshold
    heads = torch.where(detected[:, None], flat >= threshold,
                        torch.nn.functional.one_hot(flat.argmax(1), flat.shape[1]).bool())
    weights = (~heads).float() + 1e-12 * heads.float()  # every member has a head left unless all are ablated
    other = torch.multinomial(weights.cpu(), 1, generator=generator)[:, 0].to(flat.device)
    random_head = torch.nn.functional.one_hot(other, flat.shape[1]).bool() & ~heads
    shape = induction.shape
    base = head_scores(pop, seqs)
    out = {"detected": detected, "induction_heads": heads.view(shape), "random_head": random_head.view(shape)}
    for label, mask in (("induction", heads), ("random", random_head)):
        after = head_scores(pop, seqs, ablate_heads(pop, mask.view(shape).to(pop.device)))
        out[f"{label}_second"] = (after["loss_second"] - base["loss_second"]).cpu()
        out[f"{label}_first"] = (after["loss_first"] - base["loss_first"]).cpu()
    return out


def _cell(values) -> str:
    mean, lo, hi = mean_interval(values)
    if math.isnan(mean):
        return "-"
    return f"{mean:.3f}" + ("" if math.isnan(lo) else f" [{lo:.3f}, {hi:.3f}]")


def _share(k: int, n: int) -> str:
    lo, hi = wilson(k / n, n) if n else (math.nan, math.nan)
    return f"{k}/{n} ({100 * k / n:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}])" if n else "-"


def summary_rows(depths: list[dict], cfg: InductionConfig) -> list[dict]:
    """One row per depth and task: members that grew induction heads (Wilson 95%), phase and loss
    steps, final scores and losses, the causal check (means with 95% t intervals over members)."""
    rows = []
    for d in depths:
        for task in cfg.tasks:
            idx = [i for i, m in enumerate(d["layout"]) if m["task"] == task]
            grew = d["causal"]["detected"][idx]
            later = (grew & d["causal"]["induction_heads"][idx, 1:].flatten(1).any(1)).sum()
            steps = [float(d["phase_step"][i]) for i in idx]
            rows.append({"depth": d["depth"], "task": task, "members": len(idx),
                         "grew induction heads": _share(int(grew.sum()), len(idx)),
                         "of which in layer >= 1": int(later),
                         "phase step": _cell(steps), "loss step": _cell([float(d["loss_step"][i]) for i in idx]),
                         "best induction score": _cell(d["induction"][-1].flatten(1).max(1).values[idx].tolist()),
                         "best previous-token score": _cell(d["previous"][-1].flatten(1).max(1).values[idx].tolist()),
                         "loss 1st copy": _cell(d["loss_first"][-1, idx].tolist()),
                         "loss 2nd copy": _cell(d["loss_second"][-1, idx].tolist()),
                         "ablate induction heads: d loss 2nd": _cell(d["causal"]["induction_second"][idx].tolist()),
                         "ablate a random other head: d loss 2nd": _cell(d["causal"]["random_second"][idx].tolist())})
    return rows


def seed_dependence(steps: torch.Tensor, layout: list[dict], task: str) -> dict:
    """How much of the phase step's spread the init seed and the data order explain, among one task's
    members that reached it: the share of the total sum of squares between init-seed means and between
    data-order means (each 0..1; a grid of independent seeds gives about (groups - 1) / (n - 1) by chance)."""
    pairs = [(m, float(s)) for m, s in zip(layout, steps.tolist()) if m["task"] == task and not math.isnan(s)]
    n = len(pairs)
    if n < 3:
        return {"task": task, "n": n, "init_share": math.nan, "order_share": math.nan}
    mean = sum(s for _, s in pairs) / n
    total = sum((s - mean) ** 2 for _, s in pairs)
    out = {"task": task, "n": n}
    for key in ("init", "order"):
        groups: dict = {}
        for m, s in pairs:
            groups.setdefault(m[key], []).append(s)
        between = sum(len(v) * (sum(v) / len(v) - mean) ** 2 for v in groups.values())
        out[f"{key}_share"] = between / total if total > 0 else math.nan
        out[f"{key}_groups"] = len(groups)
    return out


def induction_experiment(cfg: InductionConfig, names: list[str], engine: Engine | None = None, log=print,
                         device="cpu") -> dict:
    """Train every depth, find phase steps, run the causal check; returns the tables (nothing written)."""
    depths = []
    for depth in cfg.depths:
        d = train_depth(depth, cfg, names, engine, log, device)
        d.update(phase_steps(d, cfg))
        g = torch.Generator().manual_seed(tool_seed(cfg.seed, "induction", depth, "causal"))
        d["causal"] = causal_check(d["population"], d["seqs"], d["induction"][-1], cfg.score_threshold, g)
        d["seed_dependence"] = [seed_dependence(d["phase_step"], d["layout"], t) for t in cfg.tasks]
        depths.append(d)
    return {"depths": depths, "table": summary_rows(depths, cfg)}


def member_rows(depths: list[dict]) -> list[dict]:
    """One row per member: its place in the grid, final scores, phase steps and causal check."""
    rows = []
    for d in depths:
        c = d["causal"]
        for i, m in enumerate(d["layout"]):
            best = d["induction"][-1, i].flatten()
            H = d["induction"].shape[-1]
            rows.append({"depth": d["depth"], "member": i, **m, "init_seed": d["seeds"][m["init"]],
                         "best_induction_score": float(best.max()), "best_layer": int(best.argmax()) // H,
                         "best_head": int(best.argmax()) % H,
                         "best_previous_score": float(d["previous"][-1, i].max()),
                         "best_duplicate_score": float(d["duplicate"][-1, i].max()),
                         "loss_first": float(d["loss_first"][-1, i]), "loss_second": float(d["loss_second"][-1, i]),
                         "phase_step": float(d["phase_step"][i]), "loss_step": float(d["loss_step"][i]),
                         "grew_induction_heads": bool(c["detected"][i]),
                         "induction_heads": " ".join(f"L{j // H}H{j % H}" for j in
                                                     c["induction_heads"][i].flatten().nonzero().flatten().tolist()),
                         "random_head": "L{0}H{1}".format(*divmod(int(c["random_head"][i].flatten().int().argmax()),
                                                                   H)),
                         "ablate_induction_d_loss_second": float(c["induction_second"][i]),
                         "ablate_random_d_loss_second": float(c["random_second"][i]),
                         "ablate_induction_d_loss_first": float(c["induction_first"][i]),
                         "ablate_random_d_loss_first": float(c["random_first"][i])})
    return rows
