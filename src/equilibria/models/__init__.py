"""equilibria.models: ready-made equilibrium models (y = 2x, the seed's MNIST DEQ, a conv DEQ)."""

from .linear2x import Linear2xDEQ as Linear2xDEQ
from .mnist import ConvMnistDEQ as ConvMnistDEQ
from .mnist import SeedMnistDEQ as SeedMnistDEQ
