"""equilibria.train: run configuration, the classifier training loop (MNIST, Fashion-MNIST),
the y = 2x demo, evaluation."""

from .checkpoint import CheckpointError as CheckpointError
from .config import TrainConfig as TrainConfig
from .evaluate_run import evaluate_run as evaluate_run
from .health import TrainingDiverged as TrainingDiverged
from .linear2x import train_linear2x as train_linear2x
from .loop import RunDirError as RunDirError
from .loop import train_classifier as train_classifier
