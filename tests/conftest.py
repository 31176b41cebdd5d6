import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = os.path.join(ROOT, "popgpt", "names.txt")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def names_path():
    return NAMES


@pytest.fixture(scope="module")
def make_tiny_run(tmp_path_factory):
    """Factory for a tiny finished run (2,000 names, P=8, 1 generation); keywords override sizes."""
    from popgpt.data import load_names
    from popgpt.evolution.config import (
        DataConfig,
        EvolutionConfig,
        RunConfig,
        VirusConfig,
    )
    from popgpt.evolution.experiment import evolve
    from popgpt.step import TrainConfig

    def make(n_names=2000, eval_docs=60, mutate_every=0, pop_size=8, generations=1, **evolution):
        names = tmp_path_factory.mktemp("data") / "names.txt"
        names.write_text("\n".join(load_names(NAMES)[:n_names]) + "\n")
        run = str(tmp_path_factory.mktemp("run") / "run")
        config = RunConfig(data=DataConfig(path=str(names), eval_docs=eval_docs),
                           virus=VirusConfig(mutate_every=mutate_every), train=TrainConfig(steps=3, batch_size=8),
                           evolution=EvolutionConfig(pop_size=pop_size, generations=generations,
                                                     finetune_steps=2, **evolution),
                           n_sample_names=3)
        evolve(config, run, log=lambda s: None)
        return run

    return make
