"""popgpt: a laboratory for populations of tiny GPTs, trained together with torch.func."""

from ._version import __version__
from .evolution.config import DataConfig, EvolutionConfig, RunConfig, VirusConfig
from .step import TrainConfig
from .data import DataError, decode, encode, load_names
from .engine import Engine, train
from .evaluate import ImmunityResult, immunity
from .evolution.experiment import evolve
from .model import MicroGPT, ModelConfig
from .population import AdamState, Population, default_seeds
from .evolution.runs import open_run
from .evolution.virus import Virus

__all__ = ["AdamState", "DataConfig", "DataError", "Engine", "EvolutionConfig", "ImmunityResult", "MicroGPT",
           "ModelConfig", "Population", "RunConfig", "TrainConfig", "Virus", "VirusConfig", "__version__",
           "decode", "default_seeds", "encode", "evolve", "immunity", "load_names", "open_run", "train"]
