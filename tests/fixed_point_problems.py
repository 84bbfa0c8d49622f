"""Shared fixed-point problems with known answers (float64), used by the equilibrium tests.

Each problem gives f(z, x), z0, x and the exact fixed point, so any solver can be checked
against it. Import from tests: `from fixed_point_problems import ...`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

COS_FIXED_POINT = 0.7390851332151607  # the Dottie number: cos(z) = z


@dataclass
class Problem:
    name: str
    f: Any
    z0: torch.Tensor
    x: Any
    solution: torch.Tensor | None  # None when there is no fixed point to compare with


def cos_problem(batch: int = 3, width: int = 2) -> Problem:
    """cos(z) = z elementwise from z0 = -1 (Picard converges, rate |sin z*| = 0.67)."""
    z0 = -torch.ones(batch, width, dtype=torch.float64)
    return Problem("cos", lambda z: torch.cos(z), z0, None, torch.full_like(z0, COS_FIXED_POINT))


def matrix_with_spectrum(eigenvalues: torch.Tensor, seed: int, symmetric: bool) -> torch.Tensor:
    """A real n x n matrix with the given real eigenvalues (orthogonal or general similarity)."""
    generator = torch.Generator().manual_seed(seed)
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    if symmetric:
        return q @ torch.diag(eigenvalues.double()) @ q.T
    # A mildly non-normal similarity keeps the spectrum but makes the problem less trivial.
    s = q + 0.3 * torch.randn(n, n, generator=generator, dtype=torch.float64) / n**0.5
    return s @ torch.diag(eigenvalues.double()) @ torch.linalg.inv(s)


def linear_problem(
    eigenvalues: torch.Tensor, batch: int = 4, seed: int = 0, symmetric: bool = False
) -> Problem:
    """f(z, b) = A z + b, a different b per sample; z* = (I - A)^{-1} b."""
    a = matrix_with_spectrum(eigenvalues, seed, symmetric)
    n = a.shape[0]
    generator = torch.Generator().manual_seed(seed + 1)
    b = torch.randn(batch, n, generator=generator, dtype=torch.float64)
    solution = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - a, b.T).T
    z0 = torch.zeros(batch, n, dtype=torch.float64)
    return Problem("linear", lambda z, x: z @ a.T + x, z0, b, solution)


def rowwise(problem: Problem, a: torch.Tensor) -> Problem:
    """The same linear map computed row by row (elementwise product, sum over the last dim),
    so that a row's f is bit-identical whatever the batch (a matmul's blocking depends on the
    batch size and changes the last bits). Used to test per-sample independence exactly."""
    return Problem(problem.name, lambda z, x: (z.unsqueeze(1) * a).sum(-1) + x, problem.z0,
                   problem.x, problem.solution)


def contractive_linear(batch: int = 4, n: int = 8, seed: int = 0, exact_rows: bool = False
                       ) -> Problem:
    """Spectral radius 0.9 (eigenvalues spread over [-0.9, 0.9]). With exact_rows, f is
    computed row by row (see `rowwise`)."""
    eigenvalues = torch.linspace(-0.9, 0.9, n)
    problem = linear_problem(eigenvalues, batch, seed)
    if exact_rows:
        problem = rowwise(problem, matrix_with_spectrum(eigenvalues.double(), seed, False))
    return problem


def robust_linear(batch: int = 3, n: int = 6, seed: int = 2) -> Problem:
    """Eigenvalues with real part < 1 but modulus > 1 (down to -1.5): Picard diverges, the
    flow dz/dt = (A - I) z + b is stable (its eigenvalues are <= -0.3 - ... down to -2.5)."""
    eigenvalues = torch.tensor([-1.5, -1.2, -0.5, 0.0, 0.3, 0.6][:n])
    return linear_problem(eigenvalues, batch, seed, symmetric=True)


def divergent_problem(batch: int = 4) -> Problem:
    """f = 2z + 1 (unstable fixed point z = -1) on the samples flagged by x; others cos."""
    z0 = torch.zeros(batch, 2, dtype=torch.float64)
    flags = torch.tensor([i % 2 == 1 for i in range(batch)])

    def f(z: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
        return torch.where(flag[:, None], 2 * z + 1, torch.cos(z))

    return Problem("divergent", f, z0, flags, None)
