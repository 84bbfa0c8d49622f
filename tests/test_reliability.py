"""Issue 10, library side: results that were silently wrong and errors that were raw.

Each test is the reproducer of one case (a few lines), asserting the fixed behaviour.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import equilibria as eq
from deq_problems import one_thread  # noqa: F401  (autouse fixture: active here)

SOLVERS = [eq.Picard(), eq.Anderson(), eq.Broyden(), eq.NewtonKrylov(), eq.SteadyState(),
           eq.SteadyState(eq.Tsit5())]
SOLVER_IDS = ["picard", "anderson", "broyden", "newton-krylov", "steady-implicit",
              "steady-tsit5"]


class GroupNormCell(nn.Module):
    """f(z, x) = GroupNorm(tanh(W z + x)) · 0.5: a normalised cell whose loss gradient at z*
    is small for z.square().mean() (the reproducer of the absolute-tolerance bug)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width, dtype=torch.float64)
        self.norm = nn.GroupNorm(2, width, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.mul_(0.5 / torch.linalg.matrix_norm(self.linear.weight, 2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.norm(torch.tanh(self.linear(z) + x))


def _parameter_grad(deq: eq.DEQ, x: torch.Tensor, scale: float) -> torch.Tensor:
    deq.zero_grad()
    z = deq(x)
    (scale * z.square().mean()).backward()
    return torch.cat([p.grad.reshape(-1) for p in deq.f_module.parameters()])


@pytest.mark.parametrize("linear_solver", [eq.GMRES(), eq.Anderson()], ids=["gmres", "anderson"])
def test_implicit_gradient_is_right_across_loss_scales(linear_solver):
    torch.manual_seed(0)
    cell = GroupNormCell()
    x = torch.randn(4, 8, dtype=torch.float64)
    tight = {"atol": 1e-12, "rtol": 1e-12, "max_steps": 300}
    reference_deq = eq.DEQ(cell, solver=eq.Picard(), backward=eq.Implicit(
        linear_solver=eq.Picard(), **tight), **tight)
    reference = _parameter_grad(reference_deq, x, 1.0)
    deq = eq.DEQ(cell, solver=eq.Anderson(), backward=eq.Implicit(linear_solver=linear_solver),
                 atol=1e-12, rtol=1e-10)
    for scale in (1e-8, 1e-4, 1.0, 1e4, 1e8):
        grad = _parameter_grad(deq, x, scale) / scale
        error = float((grad - reference).norm() / reference.norm())
        assert error < 1e-5, (scale, error)


def _switching_map(after: int, bad):
    calls = [0]

    def f(z):
        calls[0] += 1
        out = torch.tanh(0.5 * z + 1)
        return bad(out) if calls[0] > after else out

    return f


@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
@pytest.mark.parametrize(
    "bad, error, match",
    [
        (lambda out: out.float(), ValueError, "dtype"),
        (lambda out: out[:, :2], ValueError, "shape"),
        (lambda out: None, TypeError, "must return a torch.Tensor"),
    ],
    ids=["dtype", "shape", "none"],
)
def test_every_call_of_f_is_checked(solver, bad, error, match):
    z0 = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(error, match=match):
        eq.fixed_point(_switching_map(2, bad), z0, solver=solver, atol=1e-14, rtol=1e-14)


@pytest.mark.parametrize("solver", [eq.Broyden(), eq.SteadyState(), eq.SteadyState(eq.Tsit5()),
                                    eq.Anderson(), eq.Picard(), eq.NewtonKrylov()],
                         ids=["broyden", "steady-implicit", "steady-tsit5", "anderson", "picard",
                              "newton-krylov"])
def test_nan_from_f_mid_solve_is_nonfinite(solver):
    f = _switching_map(3, lambda out: out * float("nan"))
    solution = eq.fixed_point(f, torch.zeros(2, 3), solver=solver, max_steps=40)
    assert solution.status.tolist() == [int(eq.Status.NONFINITE)] * 2
    with pytest.raises(eq.EquilibriaError, match="NONFINITE") as caught:
        solution.raise_if_failed("fixed_point")
    assert "max_steps" not in str(caught.value)


def test_gmres_on_a_zero_operator_is_singular_with_the_true_residual():
    b = torch.randn(3, 4, dtype=torch.float64)
    solution = eq.GMRES().solve(lambda v: 0 * v, b)
    assert solution.status.tolist() == [int(eq.Status.SINGULAR)] * 3
    assert torch.equal(solution.value, torch.zeros_like(b))  # argmin ||b - 0 x|| at x = 0
    torch.testing.assert_close(solution.stats["residual"], b.pow(2).mean(1).sqrt())


def test_gmres_on_a_singular_operator_gives_the_least_squares_answer():
    torch.manual_seed(1)
    matrix = torch.randn(6, 6, dtype=torch.float64)
    matrix[:, 0] = matrix[:, 1]  # rank 5, and b generically outside its range
    b = torch.randn(3, 6, dtype=torch.float64)
    solution = eq.GMRES().solve(lambda v: v @ matrix.T, b)
    assert solution.status.tolist() == [int(eq.Status.SINGULAR)] * 3
    least_squares = (torch.linalg.pinv(matrix) @ b.T).T
    best = (b - least_squares @ matrix.T).pow(2).mean(1).sqrt()
    true = (b - solution.value @ matrix.T).pow(2).mean(1).sqrt()
    torch.testing.assert_close(true, best, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(solution.stats["residual"], true, rtol=1e-10, atol=1e-14)
    assert "least-squares" in eq.Status.SINGULAR.fix


def test_gmres_on_a_singular_but_consistent_system_succeeds():
    matrix = torch.diag(torch.tensor([1.0, 2.0, 0.0, 3.0], dtype=torch.float64))
    b = torch.tensor([[1.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    solution = eq.GMRES().solve(lambda v: v @ matrix, b)
    assert solution.status.tolist() == [int(eq.Status.SUCCESS)]
    torch.testing.assert_close(solution.value @ matrix, b)


@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
def test_empty_batch(solver):
    solution = eq.fixed_point(torch.tanh, torch.zeros(0, 3), solver=solver)
    assert solution.value.shape == (0, 3) and solution.status.shape == (0,)
    assert solution.stats["nfe"].shape == (0,)


@pytest.mark.parametrize("backward", [eq.Implicit(), eq.Unrolled(), eq.OneStep(), eq.Phantom()],
                         ids=["implicit", "unrolled", "one-step", "phantom"])
def test_empty_batch_through_a_deq(backward):
    deq = eq.DEQ(GroupNormCell(), backward=backward)
    x = torch.zeros(0, 8, dtype=torch.float64)
    z = deq(x)
    assert z.shape == (0, 8)
    z.sum().backward()  # nothing to solve, nothing raised
    with torch.no_grad():
        assert deq(x).shape == (0, 8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_state_is_refused_with_the_fix(dtype):
    with pytest.raises(TypeError, match=r"z0 has dtype .*autocast"):
        eq.fixed_point(torch.tanh, torch.zeros(2, 3, dtype=dtype))


@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
def test_expanded_z0_is_accepted(solver):
    def f(z):
        return torch.tanh(0.5 * z + 1)

    shared = torch.zeros(1, 3).expand(4, 3)
    expanded = eq.fixed_point(f, shared, solver=solver)
    plain = eq.fixed_point(f, shared.contiguous(), solver=solver)
    assert torch.equal(expanded.value, plain.value)
    assert expanded.success.all()


def test_state_near_float32_overflow_is_measured_not_nonfinite():
    # rms of a 1e19 state overflows a float32 sum of squares: it read as an infinite
    # tolerance, which passed every residual (SUCCESS with a residual of 5e18).
    z0 = torch.full((3, 512), 1e19)
    halving = eq.fixed_point(lambda z: 0.5 * z, z0, solver=eq.Picard(), max_steps=5)
    assert halving.status.tolist() == [int(eq.Status.MAX_STEPS)] * 3
    torch.testing.assert_close(halving.stats["residual"], torch.full((3,), 1e19 / 64))
    constant = eq.fixed_point(lambda z: torch.full_like(z, 2e19), z0, solver=eq.Picard())
    assert constant.success.all()
    assert torch.isfinite(constant.stats["residual"]).all()


def test_max_steps_fix_names_the_knobs_of_each_kind_of_solve():
    ode = eq.odeint(lambda t, y: -y, torch.ones(2, 1), t_span=(0.0, 100.0), max_steps=2)
    with pytest.raises(eq.EquilibriaError) as caught:
        ode.raise_if_failed("odeint")
    assert "Anderson" not in str(caught.value) and "implicit solver" in str(caught.value)
    linear = eq.GMRES(max_iters=1).solve(lambda v: v * torch.arange(1.0, 6.0), torch.ones(2, 5))
    with pytest.raises(eq.EquilibriaError) as caught:
        linear.raise_if_failed("GMRES")
    assert "max_iters" in str(caught.value) and "Anderson" not in str(caught.value)


def test_deq_backward_warning_names_the_linear_solver():
    torch.manual_seed(0)
    cell = GroupNormCell()
    deq = eq.DEQ(cell, backward=eq.Implicit(linear_solver=eq.GMRES(max_iters=1, restart=1)))
    with pytest.warns(RuntimeWarning, match="GMRES\\(max_iters"):
        deq(torch.randn(3, 8, dtype=torch.float64)).square().sum().backward()
