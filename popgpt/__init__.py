"""popgpt: populations of tiny GPTs, trained together with torch.func.

``import popgpt`` loads the batched trainer (the package root): ``MicroGPT``,
``Population``, ``train``, ``Engine``, ``evaluate``'s tools. The experiment
families live in folders, loaded when first used: ``popgpt.evolution`` (the
backdoor experiment; ``popgpt.evolve``, ``popgpt.RunConfig``,
``popgpt.open_run`` and ``popgpt.Virus`` reach it), ``popgpt.lens``,
``popgpt.cure``, ``popgpt.attribution``, ``popgpt.grok``.
"""

import importlib

from ._version import __version__
from .data import DataError, decode, encode, load_names
from .engine import Engine
from .evaluate import ImmunityResult, immunity
from .model import MicroGPT, ModelConfig
from .population import AdamState, Population, default_seeds
from .step import TrainConfig
from .trainer import train

# name -> module that defines it, imported on first use
_LAZY = {"DataConfig": "evolution.config", "EvolutionConfig": "evolution.config", "RunConfig": "evolution.config",
         "VirusConfig": "evolution.config", "evolve": "evolution.experiment", "open_run": "evolution.runs",
         "Virus": "evolution.virus"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'popgpt' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["AdamState", "DataConfig", "DataError", "Engine", "EvolutionConfig", "ImmunityResult", "MicroGPT",
           "ModelConfig", "Population", "RunConfig", "TrainConfig", "Virus", "VirusConfig", "__version__",
           "decode", "default_seeds", "encode", "evolve", "immunity", "load_names", "open_run", "train"]
