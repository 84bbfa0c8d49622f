"""equilibria.data: offline data sets (MNIST, Fashion-MNIST, y = 2x, concentric rings)."""

from .fashion_mnist import load_fashion_mnist as load_fashion_mnist
from .linear2x import linear2x_data as linear2x_data
from .mnist import MnistArrays as MnistArrays
from .mnist import MnistCorruptError as MnistCorruptError
from .mnist import MnistNotFoundError as MnistNotFoundError
from .mnist import load_mnist as load_mnist
from .mnist import normalize_images as normalize_images

# --- rings (owned by mechanics) ---
