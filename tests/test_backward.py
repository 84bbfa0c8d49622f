"""Backward strategies: exactness of Implicit, agreement with Unrolled, descent of the
approximate ones, O(1) memory of Implicit."""

from __future__ import annotations

import warnings

import pytest
import torch

import equilibria as eq
from deq_problems import (
    TanhCell,
    flat_grad,
    one_thread,  # noqa: F401  (autouse fixture: active here)
    saved_bytes,
)
from equilibria.equilibrium._solver import FixedPointSolver
from equilibria.nn import DEQ, Implicit, OneStep, Phantom, Unrolled

WIDTH, BATCH = 5, 3
TIGHT = {"atol": 1e-13, "rtol": 1e-13, "max_steps": 300}


def _problem(contraction: float = 0.5):
    cell = TanhCell(WIDTH, contraction=contraction)
    x = torch.randn(BATCH, WIDTH, dtype=torch.float64)
    weights = torch.randn(BATCH, WIDTH, dtype=torch.float64)
    return cell, x, weights


def _reference_loss(cell: TanhCell, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L(θ, x) = Σ w · z*(θ, x), z* to rounding by plain iteration (no solver, no autograd)."""
    with torch.no_grad():
        z = torch.zeros_like(x)
        for _ in range(120):  # contraction <= 0.8: 0.8**120 < 1e-11, then rounding
            z = cell(z, x)
        assert float((cell(z, x) - z).abs().max()) < 1e-15
    return (weights * z).sum()


_FD_CACHE: dict[str, torch.Tensor] = {}


def _central_differences(cell, x, weights, h=1e-5):
    """Central differences of the reference loss w.r.t. every parameter entry and x."""
    tensors = [*cell.parameters(), x]
    out = []
    for tensor in tensors:
        flat = tensor.data.view(-1)
        for i in range(flat.numel()):
            keep = flat[i].item()
            flat[i] = keep + h
            plus = _reference_loss(cell, x, weights).item()
            flat[i] = keep - h
            minus = _reference_loss(cell, x, weights).item()
            flat[i] = keep
            out.append((plus - minus) / (2 * h))
    return torch.tensor(out, dtype=torch.float64)


def _deq_grad(cell, x, weights, backward, **options):
    deq = DEQ(cell, backward=backward, **{**TIGHT, **options})
    x = x.clone().requires_grad_(True)
    loss = (weights * deq(x)).sum()
    return flat_grad(loss, [*cell.parameters(), x]), deq


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class InterleavedPicard(FixedPointSolver):
    """Picard that evaluates f on the even and the odd rows separately (fn(z_rows, rows)),
    as line searches and compaction do: the adjoint map must accept row subsets."""

    def init(self, fn, z, fz):
        return {"z": z, "fz": fz}

    def step(self, fn, state, step_index):
        z = state["fz"]
        even = torch.arange(0, z.shape[0], 2)
        odd = torch.arange(1, z.shape[0], 2)
        fz = torch.zeros_like(z).index_copy(0, even, fn(z[even], even))
        return {"z": z, "fz": fz.index_copy(0, odd, fn(z[odd], odd))}, 1


@pytest.mark.parametrize(
    "backward",
    [
        Implicit(eq.GMRES(atol=1e-15, rtol=1e-13)),
        Implicit(eq.Picard(), atol=1e-15, rtol=1e-14, max_steps=500),
        Implicit(eq.Anderson(), atol=1e-15, rtol=1e-14, max_steps=200),
        Implicit(eq.Broyden(), atol=1e-15, rtol=1e-14, max_steps=200),
        Implicit(eq.NewtonKrylov(), atol=1e-15, rtol=1e-14, max_steps=50),
        Implicit(InterleavedPicard(), atol=1e-15, rtol=1e-14, max_steps=500),
    ],
    ids=["gmres", "picard", "anderson", "broyden", "newton-krylov", "row-subsets"],
)
def test_implicit_gradient_matches_central_differences(backward):
    cell, x, weights = _problem()  # the same problem in every case (seeded per test)
    if "fd" not in _FD_CACHE:
        _FD_CACHE["fd"] = _central_differences(cell, x, weights)
    finite_differences = _FD_CACHE["fd"]
    grad, deq = _deq_grad(cell, x, weights, backward)
    assert _relative_error(grad, finite_differences) < 1e-6
    stats = deq.last_backward_stats
    assert stats["strategy"] == "Implicit"
    assert bool((stats["status"] == eq.Status.SUCCESS).all())
    assert stats["nfe"].shape == (BATCH,) and int(stats["nfe"].min()) >= 2


def test_implicit_matches_unrolled_at_tight_tolerance():
    cell, x, weights = _problem(contraction=0.8)
    implicit, _ = _deq_grad(cell, x, weights, Implicit(eq.GMRES(atol=1e-15, rtol=1e-13)))
    unrolled, deq = _deq_grad(cell, x, weights, Unrolled(), solver=eq.Picard())
    assert int(deq.last_solution.stats["n_steps"].max()) > 20  # a real unrolled graph
    assert deq.last_backward_stats["nfe"].tolist() == deq.last_solution.stats["nfe"].tolist()
    assert _relative_error(implicit, unrolled) < 1e-9


@pytest.mark.parametrize("backward", [OneStep(), Phantom(k=5, damping=0.5), Phantom(k=1)])
def test_approximate_gradients_are_descent_directions(backward):
    cell, x, weights = _problem(contraction=0.5)
    params = list(cell.parameters())
    true_grad, _ = _deq_grad(cell, x, weights, Implicit(eq.GMRES(atol=1e-15, rtol=1e-13)))
    approx, deq = _deq_grad(cell, x, weights, backward)
    true_grad, approx = true_grad[: -x.numel()], approx[: -x.numel()]  # the parameters
    cosine = float(true_grad @ approx / (true_grad.norm() * approx.norm()))
    assert cosine > 0.5
    assert 1e-6 < _relative_error(approx, true_grad)  # really an approximation
    # The loss decreases along -approx for a small step.
    before = _reference_loss(cell, x, weights)
    step = 1e-3 / float(approx.norm())
    with torch.no_grad():
        offset = 0
        for p in params:
            p -= step * approx[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
    after = _reference_loss(cell, x, weights)
    assert float(after) < float(before)
    expected_nfe = 1 if isinstance(backward, OneStep) else backward.k
    assert deq.last_backward_stats["nfe"].tolist() == [expected_nfe] * BATCH


def test_phantom_with_many_steps_approaches_the_implicit_gradient():
    cell, x, weights = _problem(contraction=0.5)
    exact, _ = _deq_grad(cell, x, weights, Implicit(eq.GMRES(atol=1e-15, rtol=1e-13)))
    few, _ = _deq_grad(cell, x, weights, Phantom(k=2, damping=1.0))
    many, _ = _deq_grad(cell, x, weights, Phantom(k=40, damping=1.0))
    assert _relative_error(many, exact) < 1e-9 < _relative_error(few, exact)


@pytest.mark.parametrize("backward", [Implicit(), Implicit(eq.Anderson()), OneStep(), Phantom()])
def test_memory_saved_for_backward_does_not_grow_with_forward_steps(backward):
    cell = TanhCell(16, contraction=0.95)
    x = torch.randn(8, 16, dtype=torch.float64)
    # tolerances nobody reaches: exactly max_steps forward steps are taken
    forced = {"atol": 1e-300, "rtol": 1e-300, "solver": eq.Picard()}
    short = saved_bytes(DEQ(cell, backward=backward, max_steps=10, **forced), x)
    long = saved_bytes(DEQ(cell, backward=backward, max_steps=50, **forced), x)
    assert short == long > 0
    unrolled_short = saved_bytes(DEQ(cell, backward=Unrolled(), max_steps=10, **forced), x)
    unrolled_long = saved_bytes(DEQ(cell, backward=Unrolled(), max_steps=50, **forced), x)
    assert unrolled_long > 4 * unrolled_short > 4 * short


def test_backward_nonconvergence_is_recorded_and_warned_not_raised():
    cell, x, weights = _problem(contraction=0.9)
    deq = DEQ(cell, backward=Implicit(eq.Picard(), atol=1e-14, rtol=1e-14, max_steps=2))
    x = x.requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="Implicit backward did not converge"):
        (weights * deq(x)).sum().backward()
    stats = deq.last_backward_stats
    assert bool((stats["status"] == eq.Status.MAX_STEPS).all())
    assert torch.isfinite(x.grad).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per DEQ: the second failure is silent
        (weights * deq(x)).sum().backward()
    assert bool((deq.last_backward_stats["status"] == eq.Status.MAX_STEPS).all())
    throwing = DEQ(cell, throw=True,
                   backward=Implicit(eq.Picard(), atol=1e-14, rtol=1e-14, max_steps=2))
    with pytest.raises(eq.EquilibriaError, match="max_steps"):
        (weights * throwing(x)).sum().backward()


def test_backward_stats_are_per_sample_and_reset_each_call():
    cell, x, weights = _problem()
    deq = DEQ(cell)
    z = deq(x)
    assert deq.last_backward_stats is None  # no backward yet
    (weights * z).sum().backward()
    assert deq.last_backward_stats["residual"].shape == (BATCH,)
    deq(x)
    assert deq.last_backward_stats is None


def test_strategy_objects_validate_their_fields():
    with pytest.raises(ValueError, match="damping"):
        Phantom(damping=0.0)
    with pytest.raises(ValueError, match="k must be"):
        Phantom(k=0)
    with pytest.raises(TypeError, match="linear_solver"):
        Implicit(linear_solver="gmres")
    with pytest.raises(ValueError, match="own"):
        Implicit(eq.GMRES(), rtol=1e-3)  # GMRES carries its own tolerances
    with pytest.raises(ValueError, match="atol"):
        Implicit(eq.Picard(), atol=0.0)
    with pytest.raises(ValueError, match="max_steps"):
        Implicit(eq.Picard(), max_steps=0)
    with pytest.raises(TypeError):
        Implicit(eq.GMRES(), tol=1e-3)  # unknown keyword


def test_nonfinite_incoming_gradient_is_a_status_for_that_sample_only():
    cell, x, weights = _problem()
    deq = DEQ(cell, backward=Implicit(eq.GMRES(atol=1e-15, rtol=1e-13)), **TIGHT)
    x = x.clone().requires_grad_(True)
    weights = weights.clone()
    weights[1] = float("nan")
    with pytest.warns(RuntimeWarning, match="NONFINITE"):
        (weights * deq(x)).sum().backward()
    status = deq.last_backward_stats["status"].tolist()
    assert status == [eq.Status.SUCCESS, eq.Status.NONFINITE, eq.Status.SUCCESS]
    assert torch.isfinite(x.grad[[0, 2]]).all() and not torch.isfinite(x.grad[1]).all()
    clean, _ = _deq_grad(cell, x.detach()[[0, 2]], weights[[0, 2]],
                         Implicit(eq.GMRES(atol=1e-15, rtol=1e-13)))
    torch.testing.assert_close(x.grad[[0, 2]].reshape(-1), clean[-2 * WIDTH:])


@pytest.mark.parametrize(
    "solver",
    [eq.Picard(), eq.Anderson(), eq.Broyden(), eq.NewtonKrylov(), eq.SteadyState(),
     eq.SteadyState(eq.Tsit5())],
    ids=["picard", "anderson", "broyden", "newton-krylov", "steady-implicit", "steady-tsit5"],
)
@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
def test_every_forward_solver_gives_the_exact_gradient(solver, backward):
    cell, x, weights = _problem(contraction=0.8)
    exact, _ = _deq_grad(cell, x, weights, Implicit(eq.GMRES(atol=1e-15, rtol=1e-13)),
                         solver=eq.Picard())
    strategy = Implicit(eq.GMRES(atol=1e-15, rtol=1e-13)) if backward == "implicit" else Unrolled()
    grad, deq = _deq_grad(cell, x, weights, strategy, solver=solver, atol=1e-12, rtol=1e-12)
    assert bool(deq.last_solution.success.all())
    # Unrolled differentiates the iterates actually taken: exact up to the forward residual.
    assert _relative_error(grad, exact) < (1e-10 if backward == "implicit" else 1e-8)


def test_double_backward_through_implicit_is_refused_not_wrong():
    cell, x, weights = _problem()
    deq = DEQ(cell)
    x = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((weights * deq(x)).sum(), x, create_graph=True)
    # Unrolled supports it: d/dx of the gradient exists
    unrolled = DEQ(cell, backward=Unrolled(), solver=eq.Picard())
    (grad_x,) = torch.autograd.grad((weights * unrolled(x)).sum(), x, create_graph=True)
    grad_x.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_newton_krylov_adjoint_solves_the_linear_system_in_a_few_newton_steps():
    cell, x, weights = _problem(contraction=0.8)
    exact, _ = _deq_grad(cell, x, weights, Implicit(eq.GMRES(atol=1e-15, rtol=1e-13)))
    grad, deq = _deq_grad(cell, x, weights,
                          Implicit(eq.NewtonKrylov(), atol=1e-15, rtol=1e-14, max_steps=50))
    # the adjoint map is linear: Newton converges at once up to the inner GMRES forcing;
    # Picard would need ~50 steps at this contraction
    assert int(deq.last_backward_stats["n_steps"].max()) <= 6
    assert _relative_error(grad, exact) < 1e-10


def test_gmres_adjoint_works_where_the_adjoint_iteration_diverges():
    """Eigenvalues of ∂f/∂z with modulus > 1 but real part < 1: SteadyState finds z*, the
    adjoint fixed-point iteration u ← u J + g diverges, GMRES on (I − Jᵀ) u = g does not."""

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
            spectrum = torch.tensor([-1.5, -1.2, 0.3, 0.5], dtype=torch.float64)
            self.A = torch.nn.Parameter(q @ torch.diag(spectrum) @ q.T)

        def forward(self, z, x):
            return z @ self.A.T + x

    cell = Linear()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 4, dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)
    expected = torch.linalg.solve(eye - cell.A.detach().T, weights.T).T  # dL/dx = (I − A)^-T w
    deq = DEQ(cell, solver=eq.SteadyState(), atol=1e-12, rtol=1e-12, max_steps=200,
              backward=Implicit(eq.GMRES(atol=1e-14, rtol=1e-13)))
    (weights * deq(x)).sum().backward()
    assert bool(deq.last_solution.success.all())
    torch.testing.assert_close(x.grad, expected, atol=1e-10, rtol=0)
    x.grad = None
    diverging = DEQ(cell, solver=eq.SteadyState(), atol=1e-12, rtol=1e-12, max_steps=200,
                    backward=Implicit(eq.Picard(), max_steps=200))
    with pytest.warns(RuntimeWarning, match="DIVERGED"):
        (weights * diverging(x)).sum().backward()
    assert bool((diverging.last_backward_stats["status"] == eq.Status.DIVERGED).all())
