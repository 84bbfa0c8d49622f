"""Fashion-MNIST, offline: the Debian package, IDX files from a directory, or torchvision.

Fashion-MNIST (Xiao, Rasul & Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking
Machine Learning Algorithms", arXiv 1708.07747, 2017; © Zalando SE, MIT licence) is 60,000
training and 10,000 test 28x28 grey images of clothing in 10 balanced classes, in MNIST's IDX
format. It is a harder drop-in for MNIST (a linear classifier reaches ~84%, not ~92%).

Sources, tried in this order (`load_fashion_mnist`):

1. ``data_dir`` (``--data-dir``): the four standard IDX files (as for MNIST); when given, the
   only source tried.
2. The Debian package ``dataset-fashion-mnist``: the four ``.gz`` IDX files under
   ``/usr/share/datasets/fashion-mnist/`` (``make`` installs it where apt is available).
3. torchvision, when installed: ``torchvision.datasets.FashionMNIST(root, download=False)``
   under ``$EQUILIBRIA_DATA`` (default ``~/.cache/equilibria``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .mnist import MnistArrays, MnistNotFoundError, _checked, _load_idx_dir

__all__ = [
    "DEBIAN_DIR",
    "FASHION_CLASSES",
    "FASHION_MEAN",
    "FASHION_STD",
    "HOW_TO_GET_FASHION_MNIST",
    "load_fashion_mnist",
]

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
# Statistics of the 60k training pixels scaled to [0, 1].
FASHION_MEAN = 0.2860
FASHION_STD = 0.3530
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")

HOW_TO_GET_FASHION_MNIST = (
    "Fashion-MNIST was not found. Three ways to provide it (all work offline once installed):\n"
    "  1. the Debian package (what `make` installs where apt is available, as root):\n"
    "     apt-get install dataset-fashion-mnist\n"
    "     (the files land under /usr/share/datasets/fashion-mnist/);\n"
    "  2. the four standard IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte,\n"
    "     t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally .gz) in a directory,\n"
    "     passed as --data-dir DIR (from https://github.com/zalandoresearch/fashion-mnist);\n"
    "  3. torchvision: pip install torchvision, then once with network\n"
    "     python -c \"import torchvision as tv; tv.datasets.FashionMNIST('DIR', download=True)\"\n"
    "     and pass --data-dir DIR (or set EQUILIBRIA_DATA=DIR)."
)

_CACHE: dict[str, MnistArrays] = {}


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> MnistArrays:
    """Load the official Fashion-MNIST split from the first available offline source.

    Arguments:
        data_dir: a directory of IDX files; when given, the only source tried. None tries
            the Debian package's directory, then torchvision.

    Returns:
        MnistArrays (uint8 images (N, 28, 28), int64 labels in 0..9; cached per source).

    Raises:
        MnistNotFoundError: no source is available (the message names all three).
        MnistCorruptError: a source exists but its contents are not valid.
    """
    if data_dir is not None:
        directory = Path(data_dir).expanduser()
        return _cached(f"idx:{directory.resolve()}", lambda: _from_idx(directory))
    if DEBIAN_DIR.is_dir():
        return _cached(f"deb:{DEBIAN_DIR}", lambda: _from_idx(DEBIAN_DIR))
    root = Path(os.environ.get("EQUILIBRIA_DATA", "~/.cache/equilibria")).expanduser()
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        return _cached(f"tv:{root.resolve()}", lambda: _from_torchvision(root))
    raise MnistNotFoundError(HOW_TO_GET_FASHION_MNIST)


def checksum(arrays: MnistArrays) -> str:
    """sha256 over the four tensors' bytes (images and labels, train then test): what the
    tests compare against the official files."""
    digest = hashlib.sha256()
    for tensor in (arrays.train_images, arrays.train_labels, arrays.test_images,
                   arrays.test_labels):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _cached(key: str, load) -> MnistArrays:
    if key not in _CACHE:
        _CACHE[key] = load()
    return _CACHE[key]


def _from_idx(directory: Path) -> MnistArrays:
    try:
        arrays = _load_idx_dir(directory)
    except MnistNotFoundError as error:
        # The MNIST loader's message names MNIST's sources: name Fashion-MNIST's instead.
        first = str(error).splitlines()[0]
        raise MnistNotFoundError(f"{first}\n{HOW_TO_GET_FASHION_MNIST}") from None
    return MnistArrays(arrays.train_images, arrays.train_labels, arrays.test_images,
                       arrays.test_labels, source=f"Fashion-MNIST IDX files in {directory}")


def _from_torchvision(root: Path) -> MnistArrays:
    import torchvision  # optional dependency

    try:
        train = torchvision.datasets.FashionMNIST(str(root), train=True, download=False)
        test = torchvision.datasets.FashionMNIST(str(root), train=False, download=False)
    except RuntimeError as error:
        raise MnistNotFoundError(
            f"torchvision found no Fashion-MNIST under {root} ({error}).\n"
            f"{HOW_TO_GET_FASHION_MNIST}"
        ) from error
    return _checked(train.data.to(torch.uint8), train.targets.to(torch.int64),
                    test.data.to(torch.uint8), test.targets.to(torch.int64),
                    source=f"torchvision FashionMNIST under {root}")
