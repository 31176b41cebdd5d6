"""The population sharded over processes: which members a rank holds, and what the ranks exchange.

Under ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) a run's members are
split into contiguous shards, one per rank, in the population's order
(``bounds``: the first ``total % world`` ranks hold one member more). A
rank trains and evaluates its own members only. What crosses between
ranks, per generation:

- ``gather_rows``: every member's metrics and selection fitness (a few
  floats per member), so every rank selects the same survivors;
- ``share``: the survivors' parameters and Adam state, so every rank can
  breed its own children and keep the survivors that land in its shard;
- ``gather_population``: the whole population to rank 0, for the checkpoint
  (rank 0 alone writes the run folder).

Every rank draws the random numbers of the whole population from the run's
generators (and uses its rows), so the generators stay in step and a
sharded run draws exactly what one process draws. One rank (``world`` 1)
exchanges nothing and each call is the plain operation.

A collective that fails (a rank died, or did not answer within the
process group's timeout) raises ``RunError`` saying so; the run stops and
``--resume`` continues from the last checkpoint.
"""

import datetime
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..population import AdamState, Population
from ..runio import RunError

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


class FromRankZero(RunError):
    """Rank 0's error, as the other ranks receive it (rank 0 reports it; they need not repeat it)."""


def bounds(total: int, world: int) -> list[tuple[int, int]]:
    """Contiguous shards of ``total`` members over ``world`` ranks: [(start, stop)] per rank."""
    base, extra = divmod(total, world)
    starts = [r * base + min(r, extra) for r in range(world + 1)]
    return list(zip(starts[:-1], starts[1:]))


def rank_world() -> tuple[int, int]:
    """This process's rank and the number of ranks (0, 1 without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world() -> int:
    """The number of ranks a launcher started (``WORLD_SIZE``; 1 when run directly)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise RunError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of ranks") from None


def launched_rank() -> int:
    """This process's rank as the launcher numbered it (``RANK``; 0 when run directly)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def rank_device(name: str) -> torch.device:
    """The device of this rank: ``cuda`` means ``cuda:LOCAL_RANK`` when several ranks share a machine."""
    device = torch.device(name)
    if device.type != "cuda" or device.index is not None or rank_world()[1] == 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise RunError(f"--device {name}: local rank {local} needs cuda:{local}, but this machine has "
                       f"{torch.cuda.device_count()} CUDA devices; start at most that many ranks per machine "
                       f"(torchrun --nproc-per-node)")
    return torch.device("cuda", local)


def init(timeout_s: float) -> bool:
    """Join the launcher's process group when it started several ranks: gloo for CPU tensors (and
    the small Python objects rank 0 hands out), NCCL for CUDA tensors where there is a GPU.

    Returns whether a group was started here (the caller ends it with ``finish``)."""
    if launched_world() <= 1 or dist.is_initialized():
        return False
    backend = "gloo"
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local < torch.cuda.device_count():
            torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:
        raise RunError(f"could not join the other ranks ({_first_line(e)}); start popgpt with torchrun, "
                       f"which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT") from None
    return True


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def pack(pop: Population) -> torch.Tensor:
    """Every member's parameters, Adam moments and step count as one row: (P, n) in the population's dtype."""
    parts = [t.flatten(1) for d in (pop.params, pop.opt.exp_avg, pop.opt.exp_avg_sq) for t in d.values()]
    return torch.cat(parts + [pop.opt.step[:, None]], 1)


def unpack(config, rows: torch.Tensor) -> Population:
    """The population ``pack`` made ``rows`` (P, n) from: bit for bit."""
    shapes = config.param_shapes()
    sizes = [math.prod(s) for s in shapes.values()]
    pieces = list(rows.split(sizes * 3 + [1], 1))
    P = rows.shape[0]

    def tensors(offset):
        return {k: pieces[offset + i].reshape((P,) + s) for i, (k, s) in enumerate(shapes.items())}

    n = len(shapes)
    return Population(config, tensors(0), AdamState(tensors(n), tensors(2 * n), pieces[-1][:, 0]))


@dataclass
class Shard:
    """Members ``start .. stop-1`` of ``total``, held by ``rank`` of ``world``; counts what it exchanged."""

    rank: int
    world: int
    start: int
    stop: int
    total: int
    device: torch.device = torch.device("cpu")
    sent: dict = field(default_factory=dict)  # exchange -> bytes this rank handed to collectives
    seconds: dict = field(default_factory=dict)  # exchange -> seconds this rank spent in them (waiting included)

    @classmethod
    def current(cls, total: int, device: torch.device) -> "Shard":
        """This process's shard of a population of ``total`` members."""
        rank, world = rank_world()
        if world > total:
            raise RunError(f"{world} ranks for {total} members: every rank needs at least one member; start "
                           f"at most {total} ranks (torchrun --nproc-per-node) or give a larger --pop-size")
        start, stop = bounds(total, world)[rank]
        return cls(rank, world, start, stop, total, torch.device(device))

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def lead(self) -> bool:
        """Rank 0: the one that writes the run folder."""
        return self.rank == 0

    @property
    def members(self) -> slice:
        return slice(self.start, self.stop)

    def _call(self, kind: str, what: str, fn, tensor: torch.Tensor, *args, **kwargs):
        """``fn(*args)``, a collective handed ``tensor`` (counted under ``kind``); its failure a RunError."""
        self.sent[kind] = self.sent.get(kind, 0) + tensor.numel() * tensor.element_size()
        t0 = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
            if tensor.device.type == "cuda":
                torch.cuda.synchronize(tensor.device)
            self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - t0
            return out
        except RuntimeError as e:
            raise RunError(f"rank {self.rank} of {self.world}: lost contact with the other ranks while exchanging "
                           f"{what} ({_first_line(e)}): another rank stopped (see its output) or did not answer "
                           f"within --dist-timeout; the run stops here, continue it with --resume RUN_DIR") from None

    def _padded(self, rows: torch.Tensor) -> torch.Tensor:
        longest = max(b - a for a, b in bounds(self.total, self.world))
        return torch.cat([rows, rows.new_zeros((longest - len(rows),) + rows.shape[1:])])

    def gather_rows(self, rows: torch.Tensor, what: str) -> torch.Tensor:
        """This shard's rows (size, ...) -> every member's rows (total, ...), on every rank."""
        if self.world == 1:
            return rows
        mine = self._padded(rows.contiguous())
        out = [torch.empty_like(mine) for _ in range(self.world)]
        self._call(what, what, dist.all_gather, mine, out, mine)
        return torch.cat([o[: b - a] for o, (a, b) in zip(out, bounds(self.total, self.world))])

    def share(self, pop: Population, index: torch.Tensor) -> Population:
        """Members ``index`` (population indices, the same tensor on every rank) with their Adam
        state, on every rank, bit for bit: each rank fills the rows it holds, zeros elsewhere, and
        an integer sum of the bit patterns (x + 0 = x exactly) combines them without a host read."""
        if self.world == 1:
            return pop[index]
        rows = pack(pop)  # (size, n)
        local = (index - self.start).clamp(0, self.size - 1)
        held = ((index >= self.start) & (index < self.stop))[:, None]  # (K, 1)
        mine = torch.where(held, rows[local], torch.zeros((), dtype=rows.dtype, device=rows.device))
        bits = mine.contiguous().view(torch.int32 if rows.dtype == torch.float32 else torch.int64)
        self._call("survivors", "the survivors' parameters", dist.all_reduce, bits, bits, dist.ReduceOp.SUM)
        return unpack(pop.config, bits.view(rows.dtype))

    def gather_population(self, pop: Population) -> Population | None:
        """The whole population on rank 0 (None on the others), for its checkpoint."""
        if self.world == 1:
            return pop
        mine = self._padded(pack(pop))
        out = [torch.empty_like(mine) for _ in range(self.world)] if self.lead else None
        self._call("checkpoint", "the population for the checkpoint", dist.gather, mine, mine, out, dst=0)
        if not self.lead:
            return None
        return unpack(pop.config, torch.cat([o[: b - a] for o, (a, b) in zip(out, bounds(self.total, self.world))]))

    def from_first(self, fn):
        """``fn()`` run on rank 0 alone; its result on every rank. An error there stops every rank
        with rank 0's message (rank 0 raises its own)."""
        return from_first(fn)

    def same_everywhere(self, what: str, value) -> None:
        """Stop every rank, naming ``what``, unless all ranks hold the same ``value``."""
        if self.world == 1:
            return
        values = [None] * self.world
        try:
            dist.all_gather_object(values, value)
        except RuntimeError as e:
            raise RunError(f"rank {self.rank} of {self.world}: could not compare {what} with the other ranks "
                           f"({_first_line(e)})") from None
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise RunError(f"the ranks disagree on {what}: rank {differ[0]} has {values[differ[0]]}, "
                           f"rank 0 has {values[0]}; start every rank with the same flags, files and versions")


def from_first(fn):
    """``fn()`` run on rank 0 alone; its result (or error message) given to every rank.

    Without a process group it is ``fn()``."""
    rank, world = rank_world()
    if world == 1:
        return fn()
    box, error = [None, None], None
    if rank == 0:
        try:
            box[0] = fn()
        except BaseException as e:  # every rank must hear of it, else they would wait for rank 0 forever
            error, box[1] = e, f"{_first_line(e) if not isinstance(e, RunError) else str(e)}"
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as e:
        raise RunError(f"rank {rank} of {world}: lost contact with rank 0 ({_first_line(e)})") from None
    if error is not None:
        raise error
    if box[1] is not None:
        raise FromRankZero(f"rank 0 stopped the run: {box[1]}")
    return box[0]
