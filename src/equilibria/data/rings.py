"""Concentric rings: a disc of class 0 inside a ring of class 1, in the plane.

The set on which a 2-D neural ODE must fail: a flow is a homeomorphism of the plane, so the
image of the ring still encloses the image of the disc and no line separates them (Dupont,
Doucet & Teh, "Augmented Neural ODEs", NeurIPS 2019, Fig. 1; Ruseckas, arXiv 1909.03767).
Padding the state with a zero coordinate (3-D) removes the obstruction.

Points are drawn uniformly by area: radius r = sqrt(U(r_lo², r_hi²)), angle U(0, 2π).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import check_positive_int

__all__ = ["Rings", "make_rings"]


def make_rings(
    n_samples: int,
    *,
    inner_radius: float = 1.0,
    ring_radii: tuple[float, float] = (1.5, 2.0),
    noise: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the concentric-rings set: half the points in the disc, half in the ring.

    Arguments:
        n_samples: total number of points (>= 2); class 0 gets n_samples // 2, class 1 the rest.
        inner_radius: radius of the class-0 disc, > 0.
        ring_radii: (r_lo, r_hi) of the class-1 annulus, inner_radius <= r_lo < r_hi.
        noise: standard deviation of Gaussian noise added to every coordinate (>= 0); with
            noise > 0 the classes may overlap.
        seed: seed of a private generator (the global torch RNG is not touched).
        dtype: floating dtype of the points.

    Returns:
        (x, y): x of shape (n_samples, 2) in `dtype`, y of shape (n_samples,) int64 labels,
        classes interleaved in random order.

    Raises:
        TypeError / ValueError: naming the argument, for non-int n_samples, radii that are not
        positive or not ordered, negative noise, or a non-floating dtype.
    """
    check_positive_int("n_samples", n_samples, minimum=2)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}.")
    inner = _number("inner_radius", inner_radius)
    if inner <= 0:
        raise ValueError(f"inner_radius must be > 0, got {inner_radius!r}.")
    if not isinstance(ring_radii, (tuple, list)) or len(ring_radii) != 2:
        raise TypeError(f"ring_radii must be a pair (r_lo, r_hi), got {ring_radii!r}.")
    r_lo, r_hi = (_number("ring_radii", r) for r in ring_radii)
    if not inner <= r_lo < r_hi:
        raise ValueError(
            f"ring_radii must satisfy inner_radius <= r_lo < r_hi, got inner_radius={inner}, "
            f"ring_radii={tuple(ring_radii)}; e.g. ring_radii=({2 * inner}, {3 * inner})."
        )
    noise = _number("noise", noise)
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise!r}.")

    generator = torch.Generator().manual_seed(seed)
    n_inner = n_samples // 2
    n_ring = n_samples - n_inner

    def annulus(n: int, lo: float, hi: float) -> torch.Tensor:
        # Uniform by area: the radius' square is uniform.
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        radius = torch.sqrt(lo**2 + (hi**2 - lo**2) * u)
        angle = 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
        return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)

    x = torch.cat([annulus(n_inner, 0.0, inner), annulus(n_ring, r_lo, r_hi)])
    y = torch.cat([torch.zeros(n_inner, dtype=torch.int64), torch.ones(n_ring, dtype=torch.int64)])
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    order = torch.randperm(n_samples, generator=generator)
    return x[order].to(dtype), y[order]


@dataclass(frozen=True)
class Rings(torch.utils.data.Dataset):
    """The concentric-rings set as a map-style Dataset of (point (2,), label ()) pairs.

    Same arguments as `make_rings`; the points are drawn once at construction.
    """

    n_samples: int = 1000
    inner_radius: float = 1.0
    ring_radii: tuple[float, float] = (1.5, 2.0)
    noise: float = 0.0
    seed: int = 0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        x, y = make_rings(
            self.n_samples,
            inner_radius=self.inner_radius,
            ring_radii=self.ring_radii,
            noise=self.noise,
            seed=self.seed,
            dtype=self.dtype,
        )
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    def __len__(self) -> int:
        return self.n_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    return float(value)
