"""Opening a run: its data (names, split, held-out rows) and its saved generations.

The evolution loop and every post-hoc tool (report, heads, vaccinate,
revive, ...) get a run's names and train/held-out split from ``run_data``,
so the split is made in one place; tools open a finished (or interrupted)
run folder with ``open_run``.
"""

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..data import IGNORE, DataError, docs_to_tensor, encode, load_names, split_names
from ..population import Population
from ..runio import RunError, RunLock, list_checkpoints, load_checkpoint, read_json
from .config import RunConfig, resolve, stream_seed
from .layout import Layout
from .virus import Virus


@dataclass(frozen=True)
class RunData:
    """A run's names and split; ``config`` has the block size resolved for them."""

    config: RunConfig
    names: list[str]
    train_docs: list[str]  # infected (a fraction of them) and trained on
    val_docs: list[str]  # held out: never infected, never trained on

    @property
    def eval_docs(self) -> list[str]:
        """The held-out names scored at every evaluation."""
        return self.val_docs[: self.config.data.eval_docs]

    @property
    def fresh_docs(self) -> list[str]:
        """Held-out names the run never scored (for re-tests)."""
        return self.val_docs[self.config.data.eval_docs:]

    def encode(self, docs: list[str], device="cpu") -> tuple[torch.Tensor, int]:
        """Encoded rows on ``device`` and their number of non-padding targets (counted on the host)."""
        rows = docs_to_tensor(docs, self.config.model.block_size)
        return rows.to(device), int((rows[:, 1:] != IGNORE).sum())


def run_data(config: RunConfig) -> RunData:
    """Load the names file, resolve the block size and split the names with the run's split stream."""
    names = load_names(config.data.path, config.data.max_name_len)
    config = resolve(config, names)
    train, val = split_names(names, config.data.val_frac,
                             torch.Generator().manual_seed(stream_seed(config.seed, "split")))
    if config.data.eval_docs > len(val):
        raise DataError(f"--eval-docs {config.data.eval_docs}: only {len(val)} names are held out "
                        f"(--val-frac {config.data.val_frac} of {len(names)} in {config.data.path})")
    return RunData(config, names, train, val)


@dataclass(frozen=True)
class SavedGeneration:
    """One saved generation of a run, as its checkpoint holds it."""

    generation: int
    state: dict  # the raw checkpoint
    population: Population
    viruses: tuple  # the virus of every lineage (layout.py), as it stood after this generation
    metrics: dict  # [P] host tensors of its evaluation: nll, quality, vulnerable, hits, payload_prob, ...
    layout: Layout

    @property
    def virus(self) -> Virus:
        """The first lineage's virus (every lineage's, when replicates share their data)."""
        return self.viruses[0]

    def __len__(self) -> int:
        return len(self.population)

    def member(self, i: int):
        """Member ``i`` as a standalone ``MicroGPT`` (``.sample(n)`` writes names)."""
        return self.population.member(i)

    def member_triggers(self) -> torch.Tensor:
        """Each member's trigger as token ids (P, L): its lineage's."""
        triggers = torch.tensor([encode(v.trigger) for v in self.viruses])
        return triggers[self.layout.lineage_of_member("cpu")]

    @property
    def rows(self) -> list[dict]:
        """generations.csv rows up to and including this generation."""
        return self.state["rows"]

    @property
    def parents(self) -> list[torch.Tensor]:
        """(P, 2) parent indices per generation after 0 (lineage)."""
        return self.state["parents"]


@dataclass(frozen=True)
class OpenRun:
    """A run folder: its resolved config, data and saved generations."""

    run_dir: str
    data: RunData
    saved: dict  # generation -> checkpoint path
    info: dict  # config.json as saved: config, seeds, environment

    @property
    def config(self) -> RunConfig:
        return self.data.config

    @property
    def environment(self) -> dict:
        """Versions, device and threads the run was started with."""
        return self.info["environment"]

    @property
    def replicates(self) -> int:
        return self.config.evolution.replicates

    @property
    def pop_size(self) -> int:
        """Members per replicate."""
        return self.config.evolution.pop_size

    @property
    def finished(self) -> bool:
        """Whether the run saved its last generation and wrote results.json."""
        return (max(self.saved) == self.config.evolution.generations
                and os.path.isfile(os.path.join(self.run_dir, "results.json")))

    def note(self, generation: int | None = None) -> str | None:
        """A line telling that the run is unfinished and which generation a tool reads (None if finished)."""
        if self.finished:
            return None
        reading = max(self.saved) if generation is None else generation
        return (f"note: {self.run_dir} is an unfinished run (generation {max(self.saved)} of "
                f"{self.config.evolution.generations} saved); reading generation {reading}")

    def load(self, generation: int | None = None, device="cpu") -> SavedGeneration:
        """A saved generation (default: the newest) with its population on ``device``."""
        state = load_checkpoint(self.run_dir, generation)
        return SavedGeneration(state["generation"], state,
                               Population.from_state_dict(state["population"], torch.device(device)),
                               tuple(Virus(**v) for v in state["viruses"]), state["metrics"], Layout.of(self.config))


def read_run_info(run_dir: str) -> tuple[dict, RunConfig]:
    """A run folder's config.json and the RunConfig in it; a RunError names the file and the field."""
    if not os.path.isdir(run_dir):
        raise RunError(f"{run_dir}: no such run folder")
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise RunError(f"{run_dir}: not a popgpt run folder (no config.json)")
    try:
        info = read_json(cfg_path)
        if not isinstance(info, dict) or not {"config", "environment"} <= set(info):
            raise ValueError(f"{cfg_path}: not a popgpt config.json (expected fields 'config' and 'environment')")
        return info, RunConfig.from_dict(info["config"], where=f"{cfg_path}: config")
    except ValueError as e:
        raise RunError(str(e)) from None


def open_run(run_dir: str) -> OpenRun:
    """Open a run folder written by ``popgpt evolve`` (finished or not: see ``OpenRun.note``)."""
    info, config = read_run_info(run_dir)
    saved = list_checkpoints(run_dir)
    if not saved:
        raise RunError(f"{run_dir}: no saved generation yet (the run is still in generation 0, "
                       f"or stopped before saving it)")
    return OpenRun(run_dir, run_data(config), saved, info)


@contextmanager
def locked_run(run_dir: str, command: str, log=None, generation: int | None = None):
    """Open a run folder for a tool that writes into it: checked to be a run folder first (a lock
    file is never left in a folder that is not one), then locked for the tool's life. ``log``
    gets the unfinished-run note, if any."""
    read_run_info(run_dir)
    with RunLock(run_dir, command):
        run = open_run(run_dir)
        if log is not None and run.note(generation):
            log(run.note(generation))
        yield run


# Settings that do not change what a run is, but change its float rounding, so
# a resume under another value continues with other numbers than the run would
# have had: resume refuses them unless forced (the CLI flag that sets each).
SETTINGS = {"threads": "--threads", "device": "--device", "engine": "--engine"}


def resume_changes(info: dict, config: RunConfig, env: dict) -> list[str]:
    """Settings and versions this process has that the saved run did not, as 'flag: saved -> now'."""
    saved = info["config"]
    changes = [f"{flag}: {saved[key]} -> {getattr(config, key)}" for key, flag in SETTINGS.items()
               if saved.get(key) != getattr(config, key)]
    for key in ("torch", "popgpt"):
        if info["environment"].get(key) != env[key]:
            changes.append(f"{key} version: {info['environment'].get(key)} -> {env[key]}")
    return changes


def check_resume(run_dir: str, info: dict, config: RunConfig, data_sha256: str, env: dict,
                 force: bool) -> list[str]:
    """Refuse a resume that would not continue the same run; returns the (forced) setting changes."""
    saved = {k: v for k, v in info["config"].items() if k not in SETTINGS}
    given = {k: v for k, v in config.to_dict().items() if k not in SETTINGS}
    if saved != given:
        diff = sorted(k for k in set(saved) | set(given) if saved.get(k) != given.get(k))
        raise RunError(f"{os.path.join(run_dir, 'config.json')}: the saved config differs from the one given "
                       f"(in {', '.join(diff)}); resume with the saved config")
    if info.get("data_sha256") != data_sha256:
        raise RunError(f"{config.data.path}: the names file changed since the run started (its SHA-256 differs "
                       f"from the one in {os.path.join(run_dir, 'config.json')}); restore it to resume")
    changes = resume_changes(info, config, env)
    if changes and not force:
        raise RunError("resuming here would change the numbers of later generations ("
                       + "; ".join(changes) + "): resume where the run started, or pass --force to continue "
                       "anyway (config.json records the change)")
    return changes
