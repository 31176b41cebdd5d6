"""popgpt: a laboratory for populations of tiny GPTs, trained together with torch.func."""

__version__ = "0.1.0"

from .data import DataError, decode, encode, load_names  # noqa: E402
from .engine import Engine  # noqa: E402
from .evolution import EvolutionConfig  # noqa: E402
from .experiment import DataConfig, RunConfig, VirusConfig, evolve  # noqa: E402
from .model import MicroGPT, ModelConfig  # noqa: E402
from .population import AdamState, Population, default_seeds  # noqa: E402
from .train import TrainConfig, train  # noqa: E402
from .virus import ImmunityResult, Virus  # noqa: E402

__all__ = ["AdamState", "DataConfig", "DataError", "Engine", "EvolutionConfig", "ImmunityResult", "MicroGPT",
           "ModelConfig", "Population", "RunConfig", "TrainConfig", "Virus", "VirusConfig", "decode",
           "default_seeds", "encode", "evolve", "load_names", "train"]
