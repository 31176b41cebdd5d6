"""The run's configuration, in one place: frozen dataclasses, one per concern.

``RunConfig`` nests them; the CLI maps flags onto their fields, and every
run saves the resolved config in ``config.json``. The defaults are the
source experiment as ``docs/definitions.md`` states it. A run's random
streams are named here too (``stream_seed``); tools derive theirs with
``popgpt.settings``, never from ad-hoc offsets. ``ModelConfig`` and
``TrainConfig`` belong to the trainer (``popgpt.model``, ``popgpt.step``).
"""

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field

from ..data import LETTERS, NAMES_FILE
from ..engine import ENGINES
from ..model import ModelConfig
from ..settings import FRESH_SEED_BASE, at_least, check_finite, in_range, require
from ..step import TrainConfig
from .virus import VIRUSES

REINFECT = ("never", "on-mutation")
MUTATION_ORDERS = ("source", "before-breeding")
REPLICATE_DATA = ("own", "shared")
POSITIONS = ("anywhere", "inside")
PROMPTS = ("boundary", "bare")
MATCHES = ("anywhere", "start")
_CLASSIC_TRIGGER, _CLASSIC_PAYLOAD = VIRUSES["classic"]


@dataclass(frozen=True)
class DataConfig:
    path: str = NAMES_FILE  # one lower-case a-z name per line (default: the names that ship with popgpt)
    val_frac: float = 0.1  # held out, never infected, never trained on
    eval_docs: int = 1000  # held-out names scored for every fitness evaluation
    max_name_len: int = 64  # longer lines are errors (the longest in names.txt has 15 letters)

    def __post_init__(self):
        check_finite(self)
        in_range(self, "val_frac", 0.0, 1.0, low_open=True, high_open=True)
        at_least(self, ("eval_docs", "max_name_len"), 1)


def _letters(what: str, text: str) -> None:
    require(bool(text), f"{what} must be non-empty")
    bad = [ch for ch in text if ch not in LETTERS]
    require(not bad, f"{what} {text!r} has character {bad[0]!r} outside the vocabulary (lower-case a-z)"
             if bad else "")


@dataclass(frozen=True)
class VirusConfig:
    trigger: str = _CLASSIC_TRIGGER
    payload: str = _CLASSIC_PAYLOAD
    rate: float = 0.15  # fraction of training names infected
    mutate_every: int = 7  # generations between trigger mutations (0: never)
    n_samples: int = 5  # continuations sampled per member in the immunity test
    threshold: int = 2  # vulnerable when the payload appears in this many samples
    # After a trigger mutation, are the training names infected anew with the new trigger?
    # "never": the source experiment infects its documents once and mutate() changes only the trigger.
    reinfect: str = "never"
    position: str = "anywhere"  # where the insert goes: anywhere (either end too) or inside (between letters)
    prompt: str = "boundary"  # immunity prompt: boundary token + trigger, or the bare trigger
    match: str = "anywhere"  # a sample is a hit when the payload is anywhere in it, or at its start

    def __post_init__(self):
        for name, allowed in (("reinfect", REINFECT), ("position", POSITIONS), ("prompt", PROMPTS),
                              ("match", MATCHES)):
            require(getattr(self, name) in allowed,
                     f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        _letters("trigger", self.trigger)
        _letters("payload", self.payload)
        check_finite(self)
        in_range(self, "rate", 0.0, 1.0)
        at_least(self, ("mutate_every",), 0)
        at_least(self, ("n_samples",), 1)
        in_range(self, "threshold", 1, self.n_samples)


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
    finetune_steps: int = 100  # training steps for every child
    finetune_lr: float | None = None  # the children's learning rate (None: train.lr)
    # Infection rate of the names children are fine-tuned on. None: the run's own infected names
    # (the same documents generation 0 trained on); 0: clean names; in between: a mix.
    finetune_infection: float | None = None
    # "source": the source experiment's order, trigger mutation at the END of generation 7, 14, ...
    # (evaluate, select, breed, fine-tune, then mutate): a new trigger is first tested one generation
    # later, on children fine-tuned under the old one. "before-breeding": mutate at the start.
    mutation_order: str = "source"
    replicate_data: str = "own"  # "own": every replicate its infection draws and trigger lineage
    distinct_parents: bool = False  # may a child's two parents be the same survivor? (the source: silent)
    retest: bool = True  # a second, independent immunity test per generation (test-retest agreement)
    # Common random numbers: every condition of a sweep uses replicate r's member seeds, batch draws
    # and infection (and trigger mutation) draws, so differences between conditions are paired.
    # Off by default: each condition is then an independent sample, as separate runs would be.
    common_random: bool = False

    def __post_init__(self):
        check_finite(self)
        require(self.mutation_order in MUTATION_ORDERS,
                 f"mutation_order must be one of {', '.join(MUTATION_ORDERS)}, got {self.mutation_order!r}")
        require(self.replicate_data in REPLICATE_DATA,
                 f"replicate_data must be one of {', '.join(REPLICATE_DATA)}, got {self.replicate_data!r}")
        require(self.finetune_lr is None or (math.isfinite(self.finetune_lr) and self.finetune_lr > 0),
                 f"finetune_lr must be > 0, got {self.finetune_lr}")
        require(self.finetune_infection is None or 0.0 <= self.finetune_infection <= 1.0,
                 f"finetune_infection must be in [0, 1], got {self.finetune_infection}")
        at_least(self, ("pop_size",), 2)
        at_least(self, ("replicates",), 1)
        at_least(self, ("generations", "finetune_steps"), 0)
        for name in ("survivor_frac", "crossover_p", "mutation_rate", "vulnerable_penalty"):
            in_range(self, name, 0.0, 1.0)
        require(1 <= self.n_survivors < self.pop_size,
                 f"survivor_frac={self.survivor_frac} keeps {self.n_survivors} of {self.pop_size}; "
                 f"need at least 1 survivor and 1 child")
        at_least(self, ("mutation_std",), 0.0)

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
    threads: int | None = None  # torch CPU threads; they change float rounding, so a run records them
    keep_all_checkpoints: bool = False  # else keep generation 0 and the newest
    n_sample_names: int = 20  # names written to samples.txt per sampled member
    # Conditions on the population axis: each a dict of overrides (conditions.FIELDS), evolved side
    # by side, each with its replicates, in one batch. Empty: one condition, the config itself.
    conditions: tuple = ()

    def __post_init__(self):
        require(isinstance(self.conditions, tuple), "conditions must be a tuple of dicts")
        for i, overrides in enumerate(self.conditions):
            try:
                with_overrides(self, overrides)
            except ValueError as e:
                raise ValueError(f"condition {i} ({condition_label(overrides)}): {e}") from None
        require(self.engine in ("auto", *ENGINES),
                 f"engine must be auto or one of {', '.join(ENGINES)}, got {self.engine!r}")
        at_least(self, ("n_sample_names",), 1)
        require(self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        top = (self.seed * self.n_members + self.n_members) * 137 + 42
        require(top < FRESH_SEED_BASE, f"seed {self.seed} is too large: member seeds would pass 2**62 "
                 f"(the largest allowed is {(FRESH_SEED_BASE - 42) // 137 // self.n_members - 2})")

    @property
    def n_conditions(self) -> int:
        return max(1, len(self.conditions))

    @property
    def n_members(self) -> int:
        """Members on the device: conditions x replicates x pop_size."""
        return self.n_conditions * self.evolution.replicates * self.evolution.pop_size

    def to_dict(self) -> dict:
        """Plain JSON values (what config.json holds and resume compares)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "RunConfig":
        """The config a ``to_dict`` made; every field checked (an unknown, missing or ill-typed
        field raises ValueError naming it as ``where.section.field``)."""
        return from_dict(cls, d, where)


# What a condition may change: name -> (config section, field). Everything else (sizes, batch
# size, data) is shared by all conditions of a run, so they fit one batched computation.
CONDITION_FIELDS = {
    "lr": ("train", "lr"), "weight_decay": ("train", "weight_decay"), "beta1": ("train", "beta1"),
    "beta2": ("train", "beta2"), "steps": ("train", "steps"),
    "finetune_steps": ("evolution", "finetune_steps"), "finetune_lr": ("evolution", "finetune_lr"),
    "finetune_infection": ("evolution", "finetune_infection"), "mutation_order": ("evolution", "mutation_order"),
    "penalty": ("evolution", "vulnerable_penalty"), "crossover_p": ("evolution", "crossover_p"),
    "mutation_rate": ("evolution", "mutation_rate"), "mutation_std": ("evolution", "mutation_std"),
    "infection_rate": ("virus", "rate"), "mutate_every": ("virus", "mutate_every"), "reinfect": ("virus", "reinfect"),
}


def with_overrides(config: RunConfig, overrides: dict) -> RunConfig:
    """``config`` with a condition's overrides applied (and checked by the config dataclasses)."""
    unknown = sorted(set(overrides) - set(CONDITION_FIELDS))
    require(not unknown, f"{unknown[0] if unknown else ''!r} is not a condition field; "
             f"choose from {', '.join(CONDITION_FIELDS)}")
    sections: dict = {}
    for key, value in overrides.items():
        section, name = CONDITION_FIELDS[key]
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(config, conditions=(), **{sec: dataclasses.replace(getattr(config, sec), **kv)
                                                          for sec, kv in sections.items()})


def condition_configs(config: RunConfig) -> list[RunConfig]:
    """The config each condition runs under (the config itself when there are no conditions)."""
    return [with_overrides(config, c) for c in config.conditions] or [dataclasses.replace(config, conditions=())]


def condition_label(overrides: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in overrides.items()) or "default"


def _type_ok(value, annotation) -> bool:
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is tuple:
        return isinstance(value, (list, tuple))
    return isinstance(value, annotation)


# Fields added after 0.1; a config.json without them reads them at their defaults.
ADDED_FIELDS = {("ModelConfig", "norm"), ("ModelConfig", "mlp"), ("EvolutionConfig", "common_random")}


def from_dict(cls, d, where: str):
    """A config dataclass from plain JSON values, nested dataclasses included, strictly checked."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}")
    values = {}
    for name, f in fields.items():
        if name not in d and (cls.__name__, name) in ADDED_FIELDS:
            continue  # a config.json written before the field existed: its default
        if name not in d:
            raise ValueError(f"{where}: missing field {name!r}")
        value = d[name]
        if dataclasses.is_dataclass(f.type):
            values[name] = from_dict(f.type, value, f"{where}.{name}")
        elif not _type_ok(value, f.type):
            raise ValueError(f"{where}.{name}: expected {getattr(f.type, '__name__', f.type)}, got {value!r}")
        elif f.type is tuple:
            values[name] = tuple(dict(v) if isinstance(v, dict) else v for v in value)
        else:
            values[name] = float(value) if f.type is float and value is not None else value
    try:
        return cls(**values)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def resolve(config: RunConfig, names: list[str]) -> RunConfig:
    """Fix the block size so the longest infected name is never cut off."""
    longest = max(map(len, names)) + len(config.virus.trigger) + len(config.virus.payload)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, block_size=longest + 1))


# A run's random streams. Their seeds are spaced by a prime stride, so the
# streams of different run seeds never share a seed.
STREAMS = ("split", "host", "device", "samples", "samples_last", "retest")
_STREAM_STRIDE = 1_000_003


def stream_seed(run_seed: int, stream: str) -> int:
    """Seed of one of the run's streams: ``split`` (train/held-out split), ``host``
    (infection, trigger mutation), ``device`` (batches, breeding, immunity samples),
    ``samples`` and ``samples_last`` (the names in samples.txt), ``retest`` (the second,
    independent immunity test)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; the run's streams are {', '.join(STREAMS)}")
    return run_seed * _STREAM_STRIDE + STREAMS.index(stream)
