"""Training: one run for images and text (`Run`, `train`), its settings (`Config`), tasks, data,
the training step, the run directory and progress reports. `import revnets` does not load it."""
from .run import Interrupted, Run, train
from .settings import Config
from .step import NonFiniteError, train_step

__all__ = ["Config", "Interrupted", "NonFiniteError", "Run", "train", "train_step"]
