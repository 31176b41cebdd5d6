"""popgpt: a laboratory for populations of tiny GPTs, trained together with torch.func."""

from .data import DataError, decode, encode, load_names
from .model import MicroGPT, ModelConfig
from .population import AdamState, Population, default_seeds
from .train import TrainConfig, train
from .virus import ImmunityResult, Virus

__version__ = "0.1.0"
