"""Training MeDiM on PyTorch distributed: config, trainer, checkpoints, distillation (see docs/training.md).

Example:
    >>> from medim.training import Trainer, load_config
    >>> Trainer(load_config("configs/tiny.yaml", ["model.init=runs/base", "data.cache=cache"])).fit()
"""

from medim.training.config import TrainConfig, load_config
from medim.training.distill import Distiller, distill
from medim.training.guard import TrainingDiverged
from medim.training.trainer import Trainer, TrainOutput, train

__all__ = ["TrainConfig", "load_config", "Trainer", "TrainOutput", "TrainingDiverged", "train", "Distiller", "distill"]
