"""How training steps execute: eager, torch.compile, or one captured CUDA graph.

Every engine runs the one step function, ``step.step``, on the same
batches (the round's batch indices are drawn up front in one call, so the
random stream does not depend on the engine), and on MicroGPTs with the
default loss it runs it on packed rows (``packed.py``: each round's rows
sorted by length into groups of static shapes, computed once per round;
``Engine(packed=False)`` runs the padded arithmetic instead):

- ``eager``: one Python-dispatched step after another (the reference).
- ``compile``: the vmapped forward + loss and the Adam update compiled with
  ``torch.compile``; the backward comes from AOTAutograd.
- ``graph``: forward, backward and Adam captured once as one CUDA graph over
  static buffers (parameters, moments, step counts, the encoded names and a
  batch-index slot); a step is then one index copy and one graph replay. On
  a CPU the same static-buffer step runs without capture, which is how the
  tests check its arithmetic on machines without a GPU.

The work per member-step is tiny (~10 MFLOP packed), so on a GPU the cost is
kernel launches and host round-trips, which is what ``graph`` removes.
"""

import dataclasses
import functools

import torch

from .device import CPU_MEMBER_BLOCK, cpu_workers, in_threads, member_blocks
from .loss import losses_of
from .model import MicroGPT
from .population import AdamState, Population
from .step import Batches, Hyper, TrainConfig, adam_step, as_hyper, step, train_step

ENGINES = ("eager", "compile", "graph")
# Packed row lengths of the compile engine are rounded up to this: it then sees ~4 distinct shapes in a
# run (each one a compilation) instead of ~10, and stays under torch.compile's recompile limit. Eager
# and graph engines keep the exact lengths (1): 10% fewer positions, the same plan for both (the same
# numbers, bit for bit on a CPU); a CUDA graph is captured per plan, and at most MAX_GRAPHS are kept.
PLAN_MULTIPLE = 4
MAX_GRAPHS = 4


def plan_multiple(kind: str) -> int:
    """What an engine rounds its packed row lengths up to."""
    return PLAN_MULTIPLE if kind == "compile" else 1


def default_engine(device: torch.device) -> str:
    """The engine ``auto`` means: ``graph`` on CUDA, ``eager`` elsewhere."""
    return "graph" if torch.device(device).type == "cuda" else "eager"


class Engine:
    """Runs training rounds; keeps compiled functions and captured graphs between rounds.

    ``workers``: on a CPU the eager engine deals its blocks out to this many
    threads at one torch thread each (``"auto"``: one per torch thread;
    small operations run faster side by side than split across threads);
    the results are those of the one-thread loop over the same blocks, bit
    for bit. ``member_block``: eager and compile engines train the
    population in contiguous blocks of at most this many members, of
    near-equal sizes and dealt to the workers in equal shares (members are
    independent, so the result is the same up to float rounding); ``"auto"``: ``CPU_MEMBER_BLOCK`` on a CPU, the whole
    population at once on a GPU; ``None``: always all at once.
    """

    def __init__(self, kind: str = "eager", member_block: int | str | None = "auto", packed: bool = True,
                 workers: int | str = "auto"):
        if kind not in ENGINES:
            raise ValueError(f"unknown engine {kind!r}; choose one of {', '.join(ENGINES)}")
        if not (member_block in ("auto", None) or (isinstance(member_block, int) and member_block >= 1)):
            raise ValueError(f"member_block must be 'auto', None or an int >= 1, got {member_block!r}")
        if not (workers == "auto" or (isinstance(workers, int) and workers >= 1)):
            raise ValueError(f"workers must be 'auto' or an int >= 1, got {workers!r}")
        self.kind = kind
        self.member_block = member_block
        self.workers = workers
        self.packed = packed
        self.plan_multiple = plan_multiple(kind)
        self._graphs: dict = {}
        self._step = train_step
        if kind == "compile":
            self._step = functools.partial(train_step, losses_fn=torch.compile(losses_of, dynamic=False),
                                           update_fn=torch.compile(adam_step, dynamic=False))

    def run(self, pop: Population, batches: Batches, hp: Hyper | TrainConfig, loss=None) -> torch.Tensor:
        """Train ``pop`` in place on ``batches``; returns losses (steps, P).

        ``hp``: per-member hyperparameters, or one TrainConfig for all.
        ``loss``: (outputs, targets) -> [P] (``loss.py``); None: next-token cross-entropy.
        """
        hp = as_hyper(hp, pop)
        history = torch.zeros(batches.steps, len(pop), device=pop.device)
        if batches.steps == 0:
            return history
        if not self.packed or loss is not None:
            batches = dataclasses.replace(batches, plan=None)
        elif batches.plan is None and batches.targets is None and isinstance(pop.base, MicroGPT):
            batches = batches.planned(multiple=self.plan_multiple)
        if self.kind == "graph":
            self._graph_round(pop, batches, hp, history, loss)
            return history
        block = self.member_block
        if block == "auto":
            block = CPU_MEMBER_BLOCK if pop.device.type == "cpu" else None
        workers = self._workers(pop)
        blocks = member_blocks(len(pop), block or len(pop), workers)
        if workers > 1:
            self._shared_out(pop, batches, hp, history, loss, blocks, workers)
        else:
            self._blocks(pop, batches, hp, history, loss, blocks)
        return history

    def _workers(self, pop: Population) -> int:
        """Python threads training member shares side by side: ``auto`` means one per torch thread for the
        eager engine on a CPU (never more than there are members), else 1."""
        if self.workers == "auto" and self.kind != "eager":
            return 1
        return cpu_workers(self.workers, len(pop), pop.device)

    def _shared_out(self, pop, batches: Batches, hp: Hyper, history, loss, blocks: list, workers: int):
        """The blocks dealt out in contiguous shares of near-equal size, one per worker thread at one torch
        thread each; each share trains a copy of its members over its own base module (in-place updates
        of views of one storage would collide in autograd; ``functional_call`` swaps a module's tensors),
        copied back after. Every block computes as it would alone: results are those of the one-thread
        loop over the same blocks, bit for bit."""
        cuts = [len(blocks) * i // workers for i in range(workers + 1)]
        shares = [blocks[i:j] for i, j in zip(cuts[:-1], cuts[1:])]
        bounds = [(share[0][0], share[-1][1]) for share in shares]
        parts = [pop[torch.arange(a, b, device=pop.device)].own_base() for a, b in bounds]

        def train(i):
            (a, b), share = bounds[i], shares[i]
            self._blocks(parts[i], batches.members(a, b), hp.index(slice(a, b)), history[:, a:b], loss,
                         [(s - a, e - a) for s, e in share])

        in_threads(train, list(range(len(shares))), len(shares))
        with torch.no_grad():
            for (a, b), part in zip(bounds, parts):
                for k in pop.params:
                    pop.params[k][a:b].copy_(part.params[k])
                    pop.opt.exp_avg[k][a:b].copy_(part.opt.exp_avg[k])
                    pop.opt.exp_avg_sq[k][a:b].copy_(part.opt.exp_avg_sq[k])
                pop.opt.step[a:b].copy_(part.opt.step)

    def _blocks(self, pop, batches: Batches, hp: Hyper, history, loss, blocks: list):
        """Train ``pop`` block after block (``blocks``: (start, stop) pairs); ``history`` (steps, P)
        receives the losses."""
        for a, b in blocks:  # block-major: a block's tensors stay in cache
            whole = (a, b) == (0, len(pop))
            part, data, part_hp = (pop, batches, hp) if whole else (pop.view(a, b), batches.members(a, b),
                                                                     hp.index(slice(a, b)))
            for s in range(batches.steps):
                x, y = data.at(s)  # (P_block, B, T) each
                active = None if data.active is None else data.active[s]
                history[s, a:b] = self._step(part, x, y, part_hp, active, loss=loss, plan=data.plan)

    def _graph_round(self, pop, batches: Batches, hp: Hyper, history, loss):
        targets = None if batches.targets is None else (tuple(batches.targets.shape), batches.targets.dtype)
        key = (len(pop), tuple(batches.rows.shape[1:]), tuple(batches.bank.shape), batches.bank.dtype, targets,
               batches.active is not None, _architecture(pop), str(pop.device), loss, batches.plan)
        static = self._graphs.pop(key, None) or _StaticStep(pop, batches, hp, loss)
        self._graphs[key] = static  # the most recently used last
        while len(self._graphs) > MAX_GRAPHS:
            del self._graphs[next(iter(self._graphs))]
        static.load(pop, batches, hp)
        for s in range(batches.steps):
            static.rows.copy_(batches.rows[s])
            if batches.active is not None:
                static.active.copy_(batches.active[s])
            static.replay()
            history[s].copy_(static.losses)
        static.store(pop)


def _architecture(pop: Population):
    """What makes two populations' steps the same graph: MicroGPT's config, else the module type and shapes."""
    if pop.config is not None:
        return pop.config
    return type(pop.base), tuple((k, tuple(v.shape[1:])) for k, v in pop.functional().items())


class _StaticStep:
    """One training step over fixed buffers; captured as a CUDA graph on CUDA devices."""

    def __init__(self, pop: Population, batches: Batches, hp: Hyper, loss=None):
        self.base, self.loss, self.plan = pop.base, loss, batches.plan
        self.buffers = {k: v.clone() for k, v in pop.buffers.items()}
        self.params = {k: v.detach().clone() for k, v in pop.params.items()}
        self.opt = AdamState({k: v.clone() for k, v in pop.opt.exp_avg.items()},
                             {k: v.clone() for k, v in pop.opt.exp_avg_sq.items()}, pop.opt.step.clone())
        self.hp = Hyper(*(t.clone() for t in hp))
        self.data = Batches(batches.bank.clone(), batches.table.clone(), batches.rows[:1].clone(),
                            targets=None if batches.targets is None else batches.targets.clone())
        self.rows = torch.zeros_like(batches.rows[0])  # (P, B): the step's slot
        self.active = None if batches.active is None else torch.zeros_like(batches.active[0])
        self.losses = torch.zeros(len(pop), device=pop.device)
        self.graph = None
        if pop.device.type == "cuda":
            self._capture()

    def _step(self):
        x, y = self.data.gather(self.data.table, self.rows)  # (P, B, ...) each
        self.losses.copy_(step(self.base, self.params, self.opt, x, y, self.hp, self.active, loss=self.loss,
                               buffers=self.buffers, plan=self.plan))

    def _capture(self):
        # Warm-up on a side stream (as CUDA graph capture requires) changes the
        # buffers; load() overwrites them with the real state before any replay.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def replay(self):
        if self.graph is None:
            self._step()
        else:
            self.graph.replay()

    @torch.no_grad()
    def load(self, pop: Population, batches: Batches, hp: Hyper):
        for k in self.params:
            self.params[k].copy_(pop.params[k])
            self.opt.exp_avg[k].copy_(pop.opt.exp_avg[k])
            self.opt.exp_avg_sq[k].copy_(pop.opt.exp_avg_sq[k])
        self.opt.step.copy_(pop.opt.step)
        for mine, theirs in zip(self.hp, hp):
            mine.copy_(theirs)
        self.data.bank.copy_(batches.bank)
        self.data.table.copy_(batches.table)
        if batches.targets is not None:
            self.data.targets.copy_(batches.targets)
        for k, v in self.buffers.items():
            v.copy_(pop.buffers[k])

    @torch.no_grad()
    def store(self, pop: Population):
        for k in self.params:
            pop.params[k].copy_(self.params[k])
            pop.opt.exp_avg[k].copy_(self.opt.exp_avg[k])
            pop.opt.exp_avg_sq[k].copy_(self.opt.exp_avg_sq[k])
        pop.opt.step.copy_(self.opt.step)


