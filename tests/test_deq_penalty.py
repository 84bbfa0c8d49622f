"""jacobian_penalty (Hutchinson) and spectral_radius (Arnoldi) against exact Jacobians."""

from __future__ import annotations

import pytest
import torch

import equilibria as eq
from deq_problems import (
    TanhCell,
    one_thread,  # noqa: F401  (autouse fixture: active here)
)


def _jacobians(cell, z, x):
    """Exact per-sample ∂f/∂z, (batch, n, n), by autograd.functional."""
    return torch.stack([
        torch.autograd.functional.jacobian(lambda v, i=i: cell(v[None], x[i: i + 1])[0], z[i])
        for i in range(z.shape[0])
    ])


def test_hutchinson_penalty_matches_the_exact_frobenius_norm():
    cell = TanhCell(6, contraction=0.9)
    x = torch.randn(3, 6, dtype=torch.float64)
    z = torch.randn(3, 6, dtype=torch.float64)
    jac = _jacobians(cell, z, x)
    exact = jac.pow(2).sum(dim=(1, 2)) / 6
    n_samples = 4000
    estimate = eq.jacobian_penalty(cell, z, x, n_samples=n_samples)
    # Var(εᵀAε) = 2‖A‖_F² for Gaussian ε and symmetric A = J Jᵀ: the estimate's std error.
    gram = jac @ jac.transpose(1, 2)
    std_error = (2 * gram.pow(2).sum(dim=(1, 2)) / n_samples).sqrt() / 6
    assert bool(((estimate - exact).abs() < 4 * std_error).all())
    assert bool((std_error < 0.05 * exact).all())  # the check has teeth


def test_penalty_is_differentiable_and_its_gradient_is_right():
    cell = TanhCell(4, contraction=0.8)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 4, dtype=torch.float64)

    def penalty():
        generator = torch.Generator().manual_seed(7)  # the same probes every call
        return eq.jacobian_penalty(cell, z, x, n_samples=3, generator=generator).sum()

    value = penalty()
    assert value.requires_grad
    grad_w, grad_x = torch.autograd.grad(value, [cell.W.weight, x])
    h = 1e-6
    for tensor, grad in ((cell.W.weight, grad_w), (x, grad_x)):
        flat = tensor.data.view(-1)
        for i in range(flat.numel()):
            keep = flat[i].item()
            flat[i] = keep + h
            plus = penalty().item()
            flat[i] = keep - h
            minus = penalty().item()
            flat[i] = keep
            assert abs((plus - minus) / (2 * h) - grad.view(-1)[i].item()) < 1e-7
    with torch.no_grad():
        assert not penalty().requires_grad


def test_penalty_regularisation_shrinks_the_jacobian():
    torch.manual_seed(3)
    cell = TanhCell(8, contraction=0.95)
    x = torch.randn(16, 8, dtype=torch.float64)
    deq = eq.DEQ(cell)

    def measured() -> float:
        with torch.no_grad():
            deq(x)
            return float(eq.jacobian_penalty(cell, deq.last_solution.value, x, 16).mean())

    before = measured()
    optimizer = torch.optim.SGD(cell.parameters(), lr=0.5)
    for _ in range(20):
        optimizer.zero_grad()
        deq(x)
        eq.jacobian_penalty(cell, deq.last_solution.value, x).mean().backward()
        optimizer.step()
    assert measured() < 0.5 * before


@pytest.mark.parametrize("width", [5, 12])
def test_spectral_radius_is_exact_with_a_full_krylov_space(width):
    cell = TanhCell(width, contraction=2.0)  # non-symmetric W: complex eigenvalues
    x = torch.randn(4, width, dtype=torch.float64)
    z = torch.randn(4, width, dtype=torch.float64)
    exact = torch.linalg.eigvals(_jacobians(cell, z, x)).abs().amax(dim=1)
    estimate = eq.spectral_radius(cell, z, x, n_iters=width)
    torch.testing.assert_close(estimate, exact, rtol=1e-9, atol=0)


def test_spectral_radius_with_few_iterations_on_a_larger_map():
    torch.manual_seed(5)
    cell = TanhCell(64, contraction=0.9)
    x = torch.randn(3, 64, dtype=torch.float64)
    z = torch.randn(3, 64, dtype=torch.float64)
    exact = torch.linalg.eigvals(_jacobians(cell, z, x)).abs().amax(dim=1)
    estimate = eq.spectral_radius(cell, z, x, n_iters=30)
    assert bool(((exact - estimate).abs() / exact < 0.01).all())


def test_spectral_radius_handles_breakdown_and_zero_jacobians():
    class Diagonal(torch.nn.Module):
        def forward(self, z, x):
            return 0.3 * z + x  # J = 0.3 I: the Krylov space is one-dimensional

    z = torch.randn(2, 10, dtype=torch.float64)
    rho = eq.spectral_radius(Diagonal(), z, torch.zeros_like(z), n_iters=8)
    torch.testing.assert_close(rho, torch.full((2,), 0.3, dtype=torch.float64))

    class Constant(torch.nn.Module):
        def forward(self, z, x):
            return x.clone()  # ∂f/∂z = 0

    rho = eq.spectral_radius(Constant(), z, torch.ones_like(z), n_iters=4)
    assert rho.tolist() == [0.0, 0.0]
    assert eq.jacobian_penalty(Constant(), z, torch.ones_like(z)).tolist() == [0.0, 0.0]


def test_float32_and_bad_input():
    cell = TanhCell(6, dtype=torch.float32)
    z = torch.randn(2, 6)
    x = torch.randn(2, 6)
    assert eq.spectral_radius(cell, z, x).dtype == torch.float32
    assert eq.jacobian_penalty(cell, z, x).dtype == torch.float32
    with pytest.raises(TypeError, match="z_star"):
        eq.jacobian_penalty(cell, z.tolist(), x)
    with pytest.raises(ValueError, match="n_samples"):
        eq.jacobian_penalty(cell, z, x, n_samples=0)
    with pytest.raises(ValueError, match="n_iters"):
        eq.spectral_radius(cell, z, x, n_iters=0)
    with pytest.raises(ValueError, match="batch"):
        eq.spectral_radius(cell, torch.tensor(1.0), x)
    with pytest.raises(ValueError, match="shaped like z"):
        eq.jacobian_penalty(lambda z, x: z[:, :3], z, x)
    with pytest.raises(TypeError, match="callable"):
        eq.spectral_radius("f", z, x)
    with pytest.raises(TypeError):
        eq.jacobian_penalty(cell, z, x, samples=3)  # unknown keyword
