"""Training: full precision and QAT in one loop, distributed with torchrun, atomic resumable checkpoints.

    from qmambair.train import TrainConfig, train
    train(TrainConfig(preset="light-sr-x2", data="builtin", iters=500, batch=8, patch=64))
"""

from .checkpoint import load_checkpoint, model_from_training_checkpoint
from .config import TrainConfig, load_config_file, make_config
from .trainer import Trainer, TrainingDiverged, train

__all__ = [
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "load_checkpoint",
    "load_config_file",
    "make_config",
    "model_from_training_checkpoint",
    "train",
]
