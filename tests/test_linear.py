"""GMRES against torch.linalg.solve on batched systems; per-sample semantics; bad input."""

from __future__ import annotations

import pytest
import torch

import equilibria as eq
from equilibria._solution import Status


def _systems(batch=5, n=40, seed=0, spread=0.5):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, n, n, generator=generator, dtype=torch.float64)
    a = torch.eye(n, dtype=torch.float64) * 2 + spread * noise / n**0.5
    b = torch.randn(batch, n, generator=generator, dtype=torch.float64)
    return a, b


def _matvec(a):
    return lambda v: torch.einsum("bij,bj->bi", a, v)


@pytest.mark.parametrize("restart", [5, 20, 60])
def test_matches_dense_solve(restart):
    a, b = _systems()
    sol = eq.GMRES(restart=restart, max_iters=300, atol=1e-13, rtol=1e-13).solve(_matvec(a), b)
    assert bool((sol.status == Status.SUCCESS).all())
    torch.testing.assert_close(sol.value, torch.linalg.solve(a, b), atol=1e-11, rtol=0)
    true_residual = (b - _matvec(a)(sol.value)).pow(2).mean(dim=1).sqrt()
    assert bool((true_residual <= 2e-13 * (1 + b.pow(2).mean(dim=1).sqrt())).all())


def test_initial_guess_and_shapes():
    a, b = _systems(batch=3, n=12)
    exact = torch.linalg.solve(a, b)
    x0 = exact + 1e-3 * torch.randn_like(exact)
    solver = eq.GMRES(atol=1e-12, rtol=1e-12)
    sol = solver.solve(lambda v: _matvec(a)(v.reshape(3, 12)).reshape(3, 3, 4),
                       b.reshape(3, 3, 4), x0.reshape(3, 3, 4))
    assert sol.value.shape == (3, 3, 4)
    torch.testing.assert_close(sol.value.reshape(3, 12), exact, atol=1e-10, rtol=0)
    # Starting at the solution costs one product (the initial residual) and no iteration.
    started = solver.solve(_matvec(a), b, exact)
    assert started.stats["n_iters"].tolist() == [0, 0, 0]


def test_sample_alone_equals_sample_in_batch():
    a, b = _systems(batch=4, n=30)
    # Make sample 3 hard (ill-conditioned): its iterations must not change the others.
    a[3] = a[3] @ torch.diag(torch.logspace(-3, 0, 30, dtype=torch.float64))
    solver = eq.GMRES(restart=10, max_iters=200, atol=1e-12, rtol=1e-12)
    together = solver.solve(_matvec(a), b)
    for i in range(3):
        alone = solver.solve(_matvec(a[i : i + 1]), b[i : i + 1])
        assert int(alone.stats["n_iters"][0]) == int(together.stats["n_iters"][i])
        torch.testing.assert_close(alone.value[0], together.value[i], atol=1e-13, rtol=0)
    assert int(together.stats["n_iters"][3]) > int(together.stats["n_iters"][:3].max())


def test_max_iters_is_a_status():
    a, b = _systems(batch=2, n=50, spread=3.0)
    sol = eq.GMRES(restart=3, max_iters=4, atol=1e-14, rtol=1e-14).solve(_matvec(a), b)
    assert bool((sol.status == Status.MAX_STEPS).all())
    assert sol.stats["n_iters"].tolist() == [4, 4]
    assert bool(torch.isfinite(sol.value).all())


def test_identity_converges_in_one_iteration_and_zero_rhs():
    b = torch.randn(3, 7, dtype=torch.float64)
    b[1] = 0
    sol = eq.GMRES().solve(lambda v: v, b)
    assert bool((sol.status == Status.SUCCESS).all())
    torch.testing.assert_close(sol.value, b)
    assert sol.stats["n_iters"].tolist() == [1, 0, 1]


def test_float32():
    a, b = _systems(batch=3, n=20)
    sol = eq.GMRES(atol=1e-6, rtol=1e-6).solve(_matvec(a.float()), b.float())
    assert sol.value.dtype == torch.float32
    assert bool((sol.status == Status.SUCCESS).all())
    torch.testing.assert_close(sol.value.double(), torch.linalg.solve(a, b), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: eq.GMRES(restart=0), ValueError, "restart"),
        (lambda: eq.GMRES(max_iters=0), ValueError, "max_iters"),
        (lambda: eq.GMRES(atol=0.0), ValueError, "atol"),
        (lambda: eq.GMRES(rtol=float("nan")), ValueError, "rtol"),
        (lambda: eq.GMRES(restart=2.0), TypeError, "restart"),
    ],
)
def test_bad_fields(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_solve_input():
    solver = eq.GMRES()
    b = torch.ones(2, 3)
    with pytest.raises(TypeError, match="matvec must be callable"):
        solver.solve(None, b)
    with pytest.raises(TypeError, match="b must be a floating"):
        solver.solve(lambda v: v, torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="b contains inf"):
        solver.solve(lambda v: v, torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="x0 must match b"):
        solver.solve(lambda v: v, b, torch.ones(2, 4))
    with pytest.raises(ValueError, match="matvec must return"):
        solver.solve(lambda v: v[:, :1], b)
    with pytest.raises(TypeError, match="unexpected keyword"):
        solver.solve(lambda v: v, b, tol=1e-3)


@pytest.mark.cuda
def test_cuda_matches_dense_solve():
    a, b = _systems(batch=4, n=32)
    sol = eq.GMRES(atol=1e-12, rtol=1e-12).solve(_matvec(a.cuda()), b.cuda())
    assert sol.value.device.type == "cuda"
    assert bool((sol.status == Status.SUCCESS).all())
    torch.testing.assert_close(sol.value.cpu(), torch.linalg.solve(a, b), atol=1e-10, rtol=0)
