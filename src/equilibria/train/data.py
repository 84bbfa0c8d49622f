"""The training data: a data set by name, normalised, on the device, with fixed subsets.

`DATASETS` maps the command-line name to its loader and pixel statistics; adding a data set of
28x28 grey images with 10 classes is one entry here (see ARCHITECTURE.md).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ..data.fashion_mnist import FASHION_MEAN, FASHION_STD, load_fashion_mnist
from ..data.mnist import MNIST_MEAN, MNIST_STD, load_mnist
from .config import TrainConfig

__all__ = ["DATASETS", "normalize", "prepare_data", "seed_everything", "subset_indices"]

# name -> (loader(data_dir) -> MnistArrays, mean, std of the training pixels in [0, 1])
DATASETS = {
    "mnist": (load_mnist, MNIST_MEAN, MNIST_STD),
    "fashion-mnist": (load_fashion_mnist, FASHION_MEAN, FASHION_STD),
}


def normalize(images: torch.Tensor, dataset: str) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), standardised with the data set's
    statistics."""
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (as the loaders return), got {images.dtype}.")
    _, mean, std = DATASETS[dataset]
    return ((images.float() / 255.0 - mean) / std).unsqueeze(1)


def subset_indices(total: int, count: int | None, salt: int) -> torch.Tensor:
    """A fixed random subset (independent of the training seed), or everything."""
    if count is None or count >= total:
        return torch.arange(total)
    generator = torch.Generator().manual_seed(20_240_000 + salt)
    return torch.randperm(total, generator=generator)[:count].sort().values


def prepare_data(config: TrainConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """Normalised float images and labels on `device` for the configured data set and
    subsets."""
    load = DATASETS[config.dataset][0]
    arrays = load(config.data_dir)
    train = subset_indices(arrays.train_images.shape[0], config.subset, salt=1)
    test = subset_indices(arrays.test_images.shape[0], config.test_subset, salt=2)
    return {
        "train_x": normalize(arrays.train_images[train], config.dataset).to(device),
        "train_y": arrays.train_labels[train].to(device),
        "test_x": normalize(arrays.test_images[test], config.dataset).to(device),
        "test_y": arrays.test_labels[test].to(device),
        "test_u8": arrays.test_images[test],
        "source": arrays.source,
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
