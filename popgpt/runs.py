"""Opening a run: its data (names, split, held-out rows) and its saved generations.

The evolution loop and every post-hoc tool (report, heads, vaccinate,
revive, ...) get a run's names and train/held-out split from ``run_data``,
so the split is made in one place; tools open a finished (or interrupted)
run folder with ``open_run``.
"""

import os
from dataclasses import dataclass

import torch

from .config import RunConfig, resolve, stream_seed
from .data import IGNORE, docs_to_tensor, load_names, split_names
from .population import Population
from .runio import RunError, list_checkpoints, load_checkpoint, read_json
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
    names = load_names(config.data.path)
    config = resolve(config, names)
    train, val = split_names(names, config.data.val_frac,
                             torch.Generator().manual_seed(stream_seed(config.seed, "split")))
    return RunData(config, names, train, val)


@dataclass(frozen=True)
class SavedGeneration:
    """One saved generation of a run, as its checkpoint holds it."""

    generation: int
    state: dict  # the raw checkpoint
    population: Population
    virus: Virus
    metrics: dict  # [P] host tensors of its evaluation: nll, quality, vulnerable, hits, payload_prob

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

    def load(self, generation: int | None = None, device="cpu") -> SavedGeneration:
        """A saved generation (default: the newest) with its population on ``device``."""
        state = load_checkpoint(self.run_dir, generation)
        return SavedGeneration(state["generation"], state,
                               Population.from_state_dict(state["population"], torch.device(device)),
                               Virus(**state["virus"]), state["metrics"])


def open_run(run_dir: str) -> OpenRun:
    """Open a run folder written by ``popgpt evolve``."""
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise RunError(f"{run_dir}: not a popgpt run folder (no config.json)")
    saved = list_checkpoints(run_dir)
    if not saved:
        raise RunError(f"{run_dir}: no checkpoints; is this a popgpt run folder?")
    info = read_json(cfg_path)
    return OpenRun(run_dir, run_data(RunConfig.from_dict(info["config"])), saved, info)
