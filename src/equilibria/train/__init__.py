"""equilibria.train: run configuration, the MNIST training loop, the y = 2x demo, evaluation."""

from .checkpoint import CheckpointError as CheckpointError
from .config import TrainConfig as TrainConfig
from .evaluate_run import evaluate_run as evaluate_run
from .health import TrainingDiverged as TrainingDiverged
from .linear2x import train_linear2x as train_linear2x
from .mnist_loop import RunDirError as RunDirError
from .mnist_loop import train_mnist as train_mnist
