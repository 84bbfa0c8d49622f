"""The research toolkit of the DEQ layer: parametrizations once per solve, variational
dropout, fixed-point correction states, per-call settings and traces."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import equilibria as eq
from deq_problems import one_thread  # noqa: F401  (autouse fixture: active here)

WIDTH = 6


class Counted(nn.Module):
    """A parametrization W -> 0.5 W / ||W||_2-ish that counts its evaluations."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return 0.5 * weight / torch.linalg.matrix_norm(weight, 2)


class Cell(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64, dropout: nn.Module | None = None):
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH, dtype=dtype)
        self.dropout = nn.Identity() if dropout is None else dropout

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dropout(self.linear(z)) + x)


def _x(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, WIDTH, dtype=torch.float64)


def test_parametrization_is_evaluated_once_per_solve_and_once_for_the_backward():
    torch.manual_seed(0)
    cell = Cell()
    counted = Counted()
    parametrize.register_parametrization(cell.linear, "weight", counted)
    counted.calls = 0  # registering evaluates it once
    deq = eq.DEQ(cell, solver=eq.Anderson(), rtol=1e-10, atol=1e-12)
    z = deq(_x())
    assert int(deq.last_solution.stats["nfe"].max()) > 5  # many evaluations of f ...
    assert counted.calls == 2  # ... one weight for the solve, one (with grad) for backward
    z.sum().backward()
    assert counted.calls == 2
    with torch.no_grad():
        deq(_x())
    assert counted.calls == 3


def test_parametrized_gradient_matches_central_differences():
    torch.manual_seed(1)
    cell = Cell()
    parametrizations.weight_norm(cell.linear, "weight")
    deq = eq.DEQ(cell, atol=1e-13, rtol=1e-13, max_steps=300,
                 backward=eq.Implicit(linear_solver=eq.GMRES(rtol=1e-12, atol=1e-14)))
    x = _x(3)
    weights = torch.randn(3, WIDTH, dtype=torch.float64)

    def loss() -> torch.Tensor:
        return (weights * deq(x)).sum()

    originals = list(cell.linear.parametrizations.weight.parameters())  # g and v
    loss().backward()
    for parameter in originals:
        assert parameter.grad is not None  # the gradient reaches weight_g and weight_v
        numeric = torch.zeros_like(parameter)
        with torch.no_grad():
            for index in range(parameter.numel()):
                flat = parameter.view(-1)
                flat[index] += 1e-6
                up = float(loss())
                flat[index] -= 2e-6
                down = float(loss())
                flat[index] += 1e-6
                numeric.view(-1)[index] = (up - down) / 2e-6
        error = float((parameter.grad - numeric).norm() / numeric.norm())
        assert error < 1e-6, error


def test_gradient_survives_a_users_cached_context():
    torch.manual_seed(2)
    cell = Cell()
    parametrizations.weight_norm(cell.linear, "weight")
    deq = eq.DEQ(cell)
    with parametrize.cached():  # by hand, this used to drop weight_g's gradient
        deq(_x()).square().sum().backward()
    for parameter in cell.linear.parametrizations.weight.parameters():
        assert parameter.grad is not None and float(parameter.grad.abs().sum()) > 0


def test_spectral_norm_power_iteration_advances_once_per_call():
    torch.manual_seed(3)
    cell = Cell()
    parametrizations.spectral_norm(cell.linear, "weight")
    reference = copy.deepcopy(cell.linear)
    deq = eq.DEQ(cell, solver=eq.Anderson(), rtol=1e-8)
    deq(_x()).sum().backward()
    assert int(deq.last_solution.stats["nfe"].max()) > 3
    _ = reference.weight  # one train-mode evaluation: one power iteration
    spectral, expected = (module.parametrizations.weight[0] for module in (cell.linear,
                                                                            reference))
    torch.testing.assert_close(spectral._u, expected._u, rtol=0, atol=0)
    assert spectral.training  # restored after the call


def test_variational_dropout_converges_where_dropout_does_not():
    torch.manual_seed(4)
    plain = eq.DEQ(Cell(dropout=nn.Dropout(0.2)), max_steps=40, rtol=1e-6)
    with pytest.warns(RuntimeWarning, match="VariationalDropout"):
        plain(_x())
    assert not plain.last_solution.success.any()
    variational = eq.DEQ(Cell(dropout=eq.VariationalDropout(0.2)), max_steps=40, rtol=1e-6)
    variational(_x())
    assert variational.last_solution.success.all()


def test_variational_dropout_mask_is_the_same_in_the_backward():
    torch.manual_seed(5)
    dropout = eq.VariationalDropout(0.3)
    cell = Cell(dropout=dropout)
    deq = eq.DEQ(cell, atol=1e-12, rtol=1e-12, max_steps=200,
                 backward=eq.Implicit(linear_solver=eq.GMRES(rtol=1e-12, atol=1e-14)))
    x = _x(3)
    deq(x).sum().backward()
    implicit = cell.linear.weight.grad.clone()
    mask = dropout._mask.clone()
    assert ((mask == 0) | torch.isclose(mask, torch.tensor(1 / 0.7, dtype=mask.dtype))).all()

    class Fixed(nn.Module):  # the same cell with that mask held constant
        def forward(self, values):
            return values * mask

    cell.dropout = Fixed()
    cell.linear.weight.grad = None
    eq.DEQ(cell, atol=1e-12, rtol=1e-12, max_steps=200, backward=eq.Implicit(
        linear_solver=eq.GMRES(rtol=1e-12, atol=1e-14)))(x).sum().backward()
    torch.testing.assert_close(implicit, cell.linear.weight.grad)


def test_variational_dropout_follows_compaction_and_is_identity_in_eval():
    torch.manual_seed(6)
    dropout = eq.VariationalDropout2d(0.25)

    class ConvCell(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1, dtype=torch.float64)
            with torch.no_grad():
                self.conv.weight.mul_(0.3)
            self.dropout = dropout

        def forward(self, z, x):
            return torch.tanh(self.dropout(self.conv(z)) + x)

    cell = ConvCell()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    x[0] *= 0  # converges first: compaction drops it while the others run
    compact = eq.DEQ(cell, compact=True, rtol=1e-9)
    z_compact = compact(x)
    mask = dropout._mask.clone()
    assert mask.shape == (5, 2, 1, 1)
    cell.dropout = type("Fixed", (nn.Module,), {"forward": lambda self, v: v * mask})()
    z_fixed = eq.DEQ(cell, rtol=1e-9)(x)
    torch.testing.assert_close(z_compact, z_fixed, rtol=1e-7, atol=1e-8)
    cell.dropout = dropout
    cell.eval()
    assert torch.equal(dropout(x), x)


def test_variational_dropout_rejects_a_bad_p():
    with pytest.raises(ValueError, match="p must be a dropout probability"):
        eq.VariationalDropout(1.0)


def test_n_states_returns_states_along_the_path_with_gradients():
    torch.manual_seed(7)
    cell = Cell()
    deq = eq.DEQ(cell, solver=eq.Picard(), max_steps=30, rtol=1e-10, atol=1e-12)
    x = _x(3)
    states = deq(x, n_states=3)
    assert len(states) == 3
    with torch.no_grad():
        direct = eq.fixed_point(cell, torch.zeros_like(x), x, solver=eq.Picard(), max_steps=30,
                                rtol=1e-10, atol=1e-12, keep_steps=(10, 20))
    # The earlier states carry a one-step gradient: their value is f(z_i, x).
    for state, kept in zip(states[:2], direct.stats["kept"]):
        torch.testing.assert_close(state, cell(kept, x))
    # z* is f(z_N, x) (one step past the solver's z_N): within the residual of z_N
    bound = 2 * float(deq.last_solution.stats["residual"].max()) * WIDTH**0.5
    torch.testing.assert_close(states[-1].detach(), deq.last_solution.value, atol=bound, rtol=0)
    residuals = [float((cell(s, x) - s).detach().norm()) for s in states]
    assert residuals[0] > residuals[1] > residuals[2]
    loss = sum(w * s.square().sum() for w, s in zip((0.2, 0.3, 1.0), states))
    loss.backward()
    assert cell.linear.weight.grad is not None


def test_n_states_under_unrolled_keeps_the_recorded_graph():
    cell = Cell()
    deq = eq.DEQ(cell, solver=eq.Picard(), backward=eq.Unrolled(), max_steps=12)
    states = deq(_x(2), n_states=4)
    assert len(states) == 4 and all(s.requires_grad for s in states)
    sum(s.sum() for s in states).backward()


def test_per_call_overrides_trace_and_eval_budget():
    torch.manual_seed(8)
    deq = eq.DEQ(Cell(), solver=eq.Picard(), max_steps=50, eval_max_steps=3, rtol=1e-10)
    x = _x()
    deq(x, max_steps=2, trace=True)
    assert int(deq.last_solution.stats["n_steps"].max()) == 2
    assert len(deq.last_solution.trace) == 3
    deq(x, solver=eq.Anderson(), rtol=1e-3)
    assert deq.last_solution.trace is None and deq.last_solution.success.all()
    deq.eval()
    with torch.no_grad():
        deq(x)
    assert int(deq.last_solution.stats["n_steps"].max()) == 3
    with pytest.raises(TypeError, match="solver must be a solver object"):
        deq(x, solver="anderson")
    with pytest.raises(ValueError, match="rtol must be finite and > 0"):
        deq(x, rtol=-1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'tol'"):
        deq(x, tol=1e-3)
    with pytest.raises(ValueError, match="n_states .* must be <= max_steps"):
        deq(x, n_states=5, max_steps=2)


def test_correction_loss_weights_states_towards_the_fixed_point():
    states = [torch.full((2,), float(i)) for i in range(3)]

    def loss(state, target):
        return (state - target).square().sum()

    target = torch.zeros(2)
    expected = 0.64 * 0 + 0.8 * 2 + 1.0 * 8
    assert float(eq.correction_loss(loss, states, target)) == pytest.approx(expected)
    assert float(eq.correction_loss(loss, states, target, weights=(1, 1, 1))) == 10
    with pytest.raises(ValueError, match="gamma must be in"):
        eq.correction_loss(loss, states, target, gamma=0)
    with pytest.raises(ValueError, match="weights must be 3 finite"):
        eq.correction_loss(loss, states, target, weights=(1, 2))
    with pytest.raises(ValueError, match="states must be a non-empty list"):
        eq.correction_loss(loss, [], target)


@pytest.mark.parametrize("solver", [eq.SteadyState(eq.Tsit5()), eq.SteadyState(), eq.Broyden()],
                         ids=["steady-tsit5", "steady-implicit", "broyden"])
def test_kept_states_with_solvers_that_report_stats_or_reject_trials(solver):
    """keep_steps alongside a solver's own per-sample stats (SteadyState's t): the stats'
    bookkeeping once overwrote the list of kept states."""
    z0 = torch.zeros(3, 2, dtype=torch.float64)
    solution = eq.fixed_point(lambda z: 0.5 * z + 1, z0, solver=solver, keep_steps=(1, 2),
                              max_steps=50, atol=1e-10, rtol=1e-10)
    kept = solution.stats["kept"]
    assert isinstance(kept, list) and len(kept) == 2
    assert all(state.shape == z0.shape for state in kept)
    residuals = [float((0.5 * s + 1 - s).abs().max()) for s in (z0, *kept)]
    assert residuals[0] >= residuals[1] >= residuals[2]
