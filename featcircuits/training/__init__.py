"""Training SAEs and transcoders: activation store, disk cache, trainer, metrics, checkpoints, ranks.

Entry point: :func:`featcircuits.train` (``featcircuits.training.api.train``) with a :class:`TrainConfig`.
"""

from .api import run_training, train
from .cache import CacheSource, write_cache
from .config import TrainConfig, apply_overrides, load_train_config
from .dictionary_trainer import DictionaryTrainer
from .module import TrainableDictionary, geometric_median
from .sources import ModelSource
from .store import ActivationStore, NonFiniteActivationError
from .synthetic import SuperpositionData, SyntheticSource, max_cosine_similarity
from .trainer import Trainer

__all__ = [
    "train", "run_training", "TrainConfig", "apply_overrides", "load_train_config", "ActivationStore",
    "NonFiniteActivationError", "ModelSource", "CacheSource", "write_cache", "DictionaryTrainer", "Trainer",
    "TrainableDictionary", "geometric_median", "SuperpositionData", "SyntheticSource", "max_cosine_similarity",
]
