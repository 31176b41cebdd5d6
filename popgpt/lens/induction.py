"""Induction heads across a population: who grows them, when, and are they the cause?

Populations of 1-layer (the negative control: induction needs two layers)
and 2-layer MicroGPTs train side by side with the same budget on two tasks:

- ``repeat``: ``. u s g s .`` (``induction_task.py``): a string s of random
  length written twice after a random prefix u with a random gap g between
  the copies; every choice of what that row holds and which tokens are
  trained (``distinct``, ``gap_max``, ``loss``, ``vocab``) is a field here.
- ``names``: names as they are, one per row (the rest of popgpt's data).

Members are a grid per depth: task x init seed x data order. The same init
seeds start both tasks (paired), and members of one data order see the
same row indices, so a phase step's dependence on the init seed and on the
data order can be told apart.

Scores (``induction_scores.py``) are taken every ``every`` steps on
``eval_seqs`` scoring rows of random length, prefix and gap with distinct
tokens, so a head that attends a fixed distance back does not score as an
induction head, and a perfect induction head scores 1. An *induction head*
is a head of layer >= 1 (a layer-0 head cannot know which token followed an
earlier copy) with induction score >= ``score_threshold``; a member that
has one *grew* induction heads, and grew *textbook* ones when its best
layer-0 previous-token score also reaches the threshold and that head's
K-composition into its induction head exceeds the Gaussian chance level.
Its *phase step* is the first checkpoint where a layer >= 1 head reaches
the threshold; its *loss step* the first where its second-copy loss falls
below ``icl_loss`` nats.

Causal check: zero the member's induction heads (its best layer >= 1 head
when none passes; its best head at depth 1), and separately one control
head drawn at random among the heads that are neither those nor a layer-0
head they read from (the layer-0 head with the largest K-composition into
each, and every layer-0 previous-token head >= the threshold): the change
of the second-copy loss says whether the heads cause the copying.
"""

import math
from dataclasses import dataclass

import torch

from ..data import VOCAB_SIZE, docs_to_tensor, inputs_targets
from ..engine import Engine
from ..model import ModelConfig
from ..population import Population
from ..settings import fresh_member_seeds, tool_seed
from ..step import Batches, TrainConfig
from .cache import ablate_heads
from .induction_rows import summary_rows
from .induction_scores import SCORES, chance, head_scores, k_composition, k_composition_chance, later
from .induction_task import LOSSES, TaskSpec, scoring_rows, task_rows

TASKS = ("repeat", "names")
TRACKED = (*SCORES, "shift", "loss_first", "loss_second")


@dataclass(frozen=True)
class InductionConfig:
    depths: tuple = (1, 2)  # 1 layer: the negative control
    tasks: tuple = TASKS
    inits: int = 8  # init seeds per depth and task
    orders: int = 4  # data orders per init seed
    steps: int = 3000  # training steps, the same for every member
    every: int = 100  # checkpoint (measure every score) every this many steps
    batch_size: int = 32
    lr: float = 3e-3  # Adam; 1e-2 (popgpt's names rate) is the source preset
    min_len: int = 4  # shortest repeated string (varied: no positional shortcut)
    max_len: int = 10  # longest; 2 * max_len + gap_max + 1 must fit block_size
    gap_max: int = 8  # tokens between the copies, drawn in 0..gap_max per row: breaks "attend k - 1 back"
    distinct_letters: bool = True  # no token twice in a row's prefix, string and gap: one earlier occurrence
    loss: str = "second"  # train on the second copy only (nothing else to learn), or on every next token
    repeat_rows: int = 2000  # distinct rows of the repeat table (measured: 2,000 grew textbook heads, ~26,000 shifted circuits)
    vocab: int = 64  # tokens with the boundary; > 27 adds synthetic tokens beyond the letters
    n_embd: int = 48  # residual width of the members (head size 12)
    n_head: int = 4
    attn_only: bool = True  # no MLP, as in the standard induction-head studies
    eval_seqs: int = 200  # scoring rows
    score_threshold: float = 0.4  # a layer >= 1 head with induction score >= this is an induction head
    icl_loss: float = 1.0  # nats: second-copy loss below this marks the loss drop
    block_size: int = 32  # room for a prefix before the repeat (names need 16)
    seed: int = 0

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"--tasks: unknown task {bad[0] if bad else '(none)'}; choose from {', '.join(TASKS)}")
        if not self.depths or any(d < 1 for d in self.depths):
            raise ValueError(f"--depths must be integers >= 1, got {self.depths}")
        for name in ("inits", "orders", "steps", "every", "batch_size", "eval_seqs", "n_embd", "n_head", "repeat_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n-embd {self.n_embd} is not divisible by --n-head {self.n_head}")
        if self.vocab < VOCAB_SIZE and "names" in self.tasks:
            raise ValueError(f"--vocab {self.vocab}: the names task needs >= {VOCAB_SIZE} (26 letters + boundary)")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        self.spec.check()
        if not (0 < self.score_threshold < 1 and math.isfinite(self.lr) and self.lr > 0 and self.icl_loss > 0):
            raise ValueError("--score-threshold must be in (0, 1); --lr and --icl-loss > 0")

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(self.min_len, self.max_len, self.gap_max, self.distinct_letters, self.vocab, self.block_size)

    @property
    def members(self) -> int:
        """Members per depth."""
        return len(self.tasks) * self.inits * self.orders

    def model(self, depth: int) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab, block_size=self.block_size, n_embd=self.n_embd,
                           n_head=self.n_head, n_layer=depth, mlp=not self.attn_only)

    def layout(self) -> list[dict]:
        """Task, init-seed index and data-order index of every member of a depth."""
        return [{"task": t, "init": i, "order": o} for t in self.tasks for i in range(self.inits)
                for o in range(self.orders)]


def _bank(cfg: InductionConfig, names: list[str], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (K, N, block_size): one table per task, all N rows long (N: the larger of the
    names and ``repeat_rows``; the ``repeat_rows`` distinct repeat rows are tiled to fill N)."""
    n = max(len(names), cfg.repeat_rows) if "names" in cfg.tasks else cfg.repeat_rows
    xs, ys = [], []
    for task in cfg.tasks:
        if task == "names":
            x, y = inputs_targets(docs_to_tensor([names[i % len(names)] for i in range(n)], cfg.block_size))
        else:
            x, y = task_rows(cfg.spec, cfg.repeat_rows, cfg.loss, g)
            x, y = x[torch.arange(n) % cfg.repeat_rows], y[torch.arange(n) % cfg.repeat_rows]
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


def train_depth(depth: int, cfg: InductionConfig, names: list[str], engine: Engine | None = None,
                log=print, device="cpu") -> dict:
    """Train one depth's members, measuring every score every ``cfg.every`` steps.

    Returns ``steps`` (K,), per-score trajectories (K, P, L, H), copy losses (K, P), the final population.
    """
    seeds = fresh_member_seeds(cfg.seed, "induction", 0, cfg.inits)
    lay = cfg.layout()
    pop = Population.from_seeds(cfg.model(depth), [seeds[m["init"]] for m in lay], device=device)
    g = torch.Generator().manual_seed(tool_seed(cfg.seed, "induction", 0, "data"))
    x, y = _bank(cfg, names, g)  # the same tables for every depth
    order_rows = torch.randint(x.shape[1], (cfg.steps, cfg.orders, cfg.batch_size), generator=g)
    rows = order_rows[:, [m["order"] for m in lay]]  # (steps, P, B): members of one order share rows
    table = torch.tensor([cfg.tasks.index(m["task"]) for m in lay])
    batches = Batches(x.to(device), table.to(device), rows.to(device), targets=y.to(device))
    scoring = scoring_rows(cfg.spec, cfg.eval_seqs,
                           torch.Generator().manual_seed(tool_seed(cfg.seed, "induction", 0, "eval")))
    engine = engine or Engine("eager")
    hp = TrainConfig(lr=cfg.lr, batch_size=cfg.batch_size, steps=cfg.steps)
    marks = sorted({0, *range(cfg.every, cfg.steps, cfg.every), cfg.steps})
    traj = {k: [] for k in TRACKED}
    for a, b in zip([0, *marks[:-1]], marks):
        if b > a:
            engine.run(pop, Batches(batches.bank, batches.table, batches.rows[a:b], targets=batches.targets), hp)
        for k, v in head_scores(pop, scoring).items():
            traj[k].append(v.cpu())
        best = later(traj["induction"][-1]) if depth > 1 else traj["induction"][-1].flatten(1).max(1).values
        log(f"depth {depth} step {b:>5}: best induction score (layer {'>= 1' if depth > 1 else '0'}) median "
            f"{best.median():.2f}, layer-0 previous-token median "
            f"{traj['previous'][-1][:, 0].flatten(1).max(1).values.median():.2f}, second-copy loss median "
            f"{traj['loss_second'][-1].median():.2f} (first copy {traj['loss_first'][-1].median():.2f})")
    return {"depth": depth, "steps": torch.tensor(marks), "layout": lay, "seeds": seeds, "population": pop,
            "scoring": scoring, "chance": chance(scoring), **{k: torch.stack(v) for k, v in traj.items()}}


def first_step(values: torch.Tensor, steps: torch.Tensor, reached) -> torch.Tensor:
    """Per member, the first checkpoint step where ``reached(values)`` holds, NaN if never: [P].

    ``values``: (K, P) trajectories over the K checkpoints ``steps``."""
    hit = reached(values)  # (K, P) bool
    first = hit.float().argmax(0)  # the first True (0 when none)
    return torch.where(hit.any(0), steps[first].float(), torch.tensor(float("nan")))


def phase_steps(traj: dict, cfg: InductionConfig) -> dict:
    """Each member's phase step (a layer >= 1 head's induction score reaches the threshold) and loss step
    (second-copy loss falls below ``icl_loss``), NaN if never: [P] each."""
    return {"phase_step": first_step(later(traj["induction"]), traj["steps"], lambda v: v >= cfg.score_threshold),
            "loss_step": first_step(traj["loss_second"], traj["steps"], lambda v: v < cfg.icl_loss)}


def candidate_heads(induction: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(detected [P], heads (P, L, H)): the layer >= 1 heads at or above ``threshold``; where none is,
    the best layer >= 1 head (the best head at depth 1)."""
    P, L, H = induction.shape
    scores = induction.clone()
    if L > 1:
        scores[:, 0] = -math.inf
    flat = scores.flatten(1)
    detected = (flat.max(1).values >= threshold) if L > 1 else torch.zeros(P, dtype=torch.bool)
    best = torch.nn.functional.one_hot(flat.argmax(1), L * H).bool()
    heads = torch.where(detected[:, None], flat >= threshold, best)
    return detected, heads.view(P, L, H)


def read_from(pop: Population, heads: torch.Tensor, previous: torch.Tensor, threshold: float) -> torch.Tensor:
    """Layer-0 heads the candidate ``heads`` (P, L, H) read from: (P, L, H) with layer 0 only marked: the
    layer-0 head of largest K-composition into each candidate of a later layer, and every layer-0 head
    whose previous-token score (``previous`` (P, L, H)) reaches ``threshold``."""
    out = torch.zeros_like(heads)
    if heads.shape[1] < 2:
        return out
    out[:, 0] = previous[:, 0] >= threshold
    for layer in range(1, heads.shape[1]):
        kc = k_composition(pop, layer).cpu()  # (P, H0, H1)
        feeder = torch.nn.functional.one_hot(kc.argmax(1), heads.shape[2]).bool()  # (P, H1, H0)
        out[:, 0] |= (feeder & heads[:, layer, :, None]).any(1)
    return out


@torch.no_grad()
def causal_check(pop: Population, scoring, scores: dict, threshold: float, generator: torch.Generator) -> dict:
    """Second-copy (and first-copy) loss change per member when its induction heads are ablated, and when
    one control head drawn at random is: [P] each, plus the masks (P, L, H) (see the module docstring).

    ``scores``: the members' final ``head_scores`` (``induction`` and ``previous`` (P, L, H) are read)."""
    detected, heads = candidate_heads(scores["induction"].cpu(), threshold)
    shape = heads.shape
    excluded = heads | read_from(pop, heads, scores["previous"].cpu(), threshold)
    weights = (~excluded).flatten(1).float()
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, (~heads).flatten(1).float() + 1e-12)
    other = torch.multinomial(weights, 1, generator=generator)[:, 0]
    control = (torch.nn.functional.one_hot(other, weights.shape[1]).bool().view(shape)) & ~heads
    base = head_scores(pop, scoring)
    out = {"detected": detected, "induction_heads": heads, "random_head": control, "excluded": excluded}
    for label, mask in (("induction", heads), ("random", control)):
        after = head_scores(pop, scoring, ablate_heads(pop, mask.to(pop.device)))
        out[f"{label}_second"] = (after["loss_second"] - base["loss_second"]).cpu()
        out[f"{label}_first"] = (after["loss_first"] - base["loss_first"]).cpu()
    return out


def composition(pop: Population, scores: dict, threshold: float) -> dict:
    """Per member: K-composition of its best layer-0 previous-token head into its best layer-1 induction
    head, the Gaussian chance level, and whether the member grew textbook induction heads: [P] each."""
    P, L, H = scores["induction"].shape
    if L < 2:
        nan = torch.full((P,), math.nan)
        return {"k_composition": nan, "k_chance": math.nan, "textbook": torch.zeros(P, dtype=torch.bool)}
    prev = scores["previous"][:, 0].cpu().argmax(1)  # (P,)
    ind = scores["induction"][:, 1].cpu().argmax(1)
    kc = k_composition(pop, 1).cpu()[torch.arange(P), prev, ind]
    k_chance = k_composition_chance(pop)
    textbook = ((later(scores["induction"].cpu()) >= threshold)
                & (scores["previous"][:, 0].cpu().max(1).values >= threshold) & (kc > k_chance))
    return {"k_composition": kc, "k_chance": k_chance, "textbook": textbook}


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
        final = {k: d[k][-1] for k in ("induction", "previous")}
        g = torch.Generator().manual_seed(tool_seed(cfg.seed, "induction", depth, "causal"))
        d["causal"] = causal_check(d["population"], d["scoring"], final, cfg.score_threshold, g)
        d.update(composition(d["population"], final, cfg.score_threshold))
        d["seed_dependence"] = [seed_dependence(d["phase_step"], d["layout"], t) for t in cfg.tasks]
        depths.append(d)
    return {"depths": depths, "table": summary_rows(depths, cfg)}
