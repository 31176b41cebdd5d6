"""The run's configuration, in one place: frozen dataclasses, one per concern.

``RunConfig`` nests them; the CLI maps flags onto their fields, and every
run saves the resolved config in ``config.json``. The defaults are the
source experiment as ``docs/definitions.md`` states it. Seeds are derived
here too, by name: a run has a few random streams (``stream_seed``), and
tools that make fresh members or draw their own randomness derive their
seeds from the run seed and their own name (``tool_seed``,
``fresh_member_seeds``), never from ad-hoc offsets.
"""

import dataclasses
import hashlib
from dataclasses import dataclass, field

from .model import ModelConfig
from .virus import VIRUSES

ENGINES = ("eager", "compile", "graph")
_CLASSIC_TRIGGER, _CLASSIC_PAYLOAD = VIRUSES["classic"]


@dataclass(frozen=True)
class DataConfig:
    path: str = "names.txt"  # one lower-case a-z name per line
    val_frac: float = 0.1  # held out, never infected, never trained on
    eval_docs: int = 1000  # held-out names scored for every fitness evaluation


@dataclass(frozen=True)
class VirusConfig:
    trigger: str = _CLASSIC_TRIGGER
    payload: str = _CLASSIC_PAYLOAD
    rate: float = 0.15  # fraction of training names infected
    mutate_every: int = 7  # generations between trigger mutations (0: never)
    n_samples: int = 5  # continuations sampled per member in the immunity test
    threshold: int = 2  # vulnerable when the payload appears in this many samples


@dataclass(frozen=True)
class TrainConfig:
    """One training round."""

    steps: int = 100  # optimizer steps per round (the source experiment: 100)
    batch_size: int = 32  # documents per member per step (the source experiment: 32)
    lr: float = 1e-2  # tiny models, few steps: a large constant rate
    beta1: float = 0.9
    beta2: float = 0.99  # shorter second-moment memory suits 100-step rounds
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled (AdamW-style) when > 0

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class EvolutionConfig:
    """The evolutionary loop (``docs/definitions.md`` gives the defaults' reasons)."""

    pop_size: int = 200  # members P (per replicate)
    replicates: int = 1  # independent populations evolved side by side in one batch
    generations: int = 20  # evolution steps after generation 0
    survivor_frac: float = 0.2  # top fraction kept unchanged
    crossover_p: float = 0.5  # probability a tensor comes from the first parent
    mutation_rate: float = 0.01  # probability each child weight is perturbed
    mutation_std: float = 0.02  # std of the N(0, std^2) perturbation
    vulnerable_penalty: float = 0.3  # selection multiplies a vulnerable member's fitness by this
    finetune_steps: int = 100  # training steps for every child, on the current infected data

    def __post_init__(self):
        if self.pop_size < 2:
            raise ValueError(f"pop_size must be >= 2, got {self.pop_size}")
        if self.replicates < 1:
            raise ValueError(f"replicates must be >= 1, got {self.replicates}")
        if self.generations < 0:
            raise ValueError(f"generations must be >= 0, got {self.generations}")
        for name in ("survivor_frac", "crossover_p", "mutation_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 1 <= self.n_survivors < self.pop_size:
            raise ValueError(f"survivor_frac={self.survivor_frac} keeps {self.n_survivors} of "
                             f"{self.pop_size}; need at least 1 survivor and 1 child")
        if self.mutation_std < 0 or self.finetune_steps < 0:
            raise ValueError("mutation_std and finetune_steps must be >= 0")

    @property
    def n_survivors(self) -> int:
        return int(round(self.pop_size * self.survivor_frac))


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    virus: VirusConfig = field(default_factory=VirusConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    seed: int = 0  # everything random in the run derives from this
    device: str = "cpu"
    engine: str = "auto"  # eager | compile | graph; auto: graph on CUDA, eager on CPU
    keep_all_checkpoints: bool = False  # else keep generation 0 and the newest
    n_sample_names: int = 20  # names written to samples.txt per sampled member

    def __post_init__(self):
        if self.engine not in ("auto", *ENGINES):
            raise ValueError(f"engine must be auto or one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.n_sample_names < 1:
            raise ValueError(f"n_sample_names must be >= 1, got {self.n_sample_names}")

    @property
    def n_members(self) -> int:
        """Members on the device: replicates x pop_size."""
        return self.evolution.replicates * self.evolution.pop_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        parts = {"model": ModelConfig, "data": DataConfig, "virus": VirusConfig,
                 "train": TrainConfig, "evolution": EvolutionConfig}
        return cls(**{k: parts[k](**v) if k in parts else v for k, v in d.items()})


def resolve(config: RunConfig, names: list[str]) -> RunConfig:
    """Fix the block size so the longest infected name is never cut off."""
    longest = max(map(len, names)) + len(config.virus.trigger) + len(config.virus.payload)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, block_size=longest + 1))


# A run's random streams. Their seeds are spaced by a prime stride, so the
# streams of different run seeds never share a seed.
STREAMS = ("split", "host", "device", "samples", "samples_last")
_STREAM_STRIDE = 1_000_003


def stream_seed(run_seed: int, stream: str) -> int:
    """Seed of one of the run's streams: ``split`` (train/held-out split), ``host``
    (infection, trigger mutation), ``device`` (batches, breeding, immunity samples),
    ``samples`` and ``samples_last`` (the names in samples.txt)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; the run's streams are {', '.join(STREAMS)}")
    return run_seed * _STREAM_STRIDE + STREAMS.index(stream)


def _digest(*parts) -> int:
    """A 62-bit integer determined by ``parts`` (stable across processes and machines)."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 2


def tool_seed(run_seed: int, tool: str, seed: int, stream: str) -> int:
    """Seed of stream ``stream`` of a post-hoc tool (``vaccine``, ``revival``, ``retest``, ...)
    run with its own ``seed`` on a run of ``run_seed``."""
    return _digest("tool", run_seed, tool, seed, stream)


# Run members' init seeds are (k * 137 + 42) for small k; fresh members made by
# tools get seeds at or above 2**62, so the two can never coincide.
FRESH_SEED_BASE = 2 ** 62


def fresh_member_seeds(run_seed: int, purpose: str, seed: int, n: int) -> list[int]:
    """Init seeds of ``n`` fresh members that no run member uses (``purpose``: the tool's name)."""
    start = FRESH_SEED_BASE + _digest("fresh", run_seed, purpose, seed) % (2 ** 61)
    return [start + i for i in range(n)]
