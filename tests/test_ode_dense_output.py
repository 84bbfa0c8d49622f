"""odeint(..., dense=True): the solution queried after the solve (`DenseOutput.evaluate`),
against scipy's dense output at rtol 1e-12, closed forms, t_eval solves and finite
differences; per-sample spans (terminal events, samples that stopped early) and errors."""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import equilibria as eq
from equilibria.ode import odeint, odeint_adjoint
from problems import LOTKA_VOLTERRA, MLPField, central_difference

SOLVERS = [eq.Tsit5(), eq.Dopri5(), eq.Dopri8(), eq.Bosh3(), eq.Kvaerno5()]


def _scipy_dense(problem, t_span):
    """One scipy DOP853 dense solution per sample at rtol 1e-12, atol 1e-14."""
    sols = []
    for y0 in problem.y0:
        out = solve_ivp(problem.f_numpy, t_span, np.array(y0), method="DOP853", rtol=1e-12,
                        atol=1e-14, dense_output=True)
        assert out.success
        sols.append(out.sol)
    return sols


@pytest.mark.parametrize("solver", [eq.Tsit5(), eq.Dopri5(), eq.Dopri8()],
                         ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("t_span", [(0.0, 5.0), (5.0, 0.0)], ids=["forward", "backward"])
def test_values_against_scipy_dense_output(solver, t_span):
    """Random unsorted per-sample times on Lotka–Volterra, against scipy's DOP853 dense
    output at rtol 1e-12: the error (in units of atol + rtol |y|) is at most the solve's own
    error at its step ends plus 3 — the interpolant adds at most 3 tolerances to the
    integration's global error (measured on 400 points: Tsit5 3.21 vs 1.25 at the steps,
    Dopri5 5.18 vs 3.83, Dopri8 0.99 vs 0.83); the global error itself (which is not what
    this tests: up to 5.0 measured, Dopri5 backwards) stays below 8."""
    rtol, atol = 1e-8, 1e-10
    problem = LOTKA_VOLTERRA
    if t_span[0] > t_span[1]:  # backwards from the forward solution's end: the same orbit
        end = problem.reference([5.0])[0]
        problem = type(problem)(**{**problem.__dict__, "y0": tuple(map(tuple, end.tolist()))})
    y0 = problem.initial()
    sol = odeint(problem.f, y0, t_span, solver=solver, rtol=rtol, atol=atol, dense=True)
    gen = torch.Generator().manual_seed(0)
    times = torch.rand(y0.shape[0], 50, generator=gen, dtype=torch.float64) * 5.0
    values = sol.dense.evaluate(times)  # (50, batch, 2)
    assert values.shape == (50, y0.shape[0], 2)
    refs = _scipy_dense(problem, t_span)
    ref = torch.stack([torch.tensor(refs[b](times[b].numpy()).T) for b in range(len(refs))],
                      dim=1)
    dense_error = float(((values - ref).abs() / (atol + rtol * ref.abs())).max())
    dense = sol.dense
    owner = torch.repeat_interleave(torch.arange(y0.shape[0]), dense.n_steps)
    at_steps = torch.tensor(np.stack([refs[int(b)](float(t))
                                      for b, t in zip(owner, dense.t_end)]))
    step_error = float(((dense.y_end - at_steps).abs()
                        / (atol + rtol * at_steps.abs())).max())
    assert step_error <= 8.0, step_error
    assert dense_error <= step_error + 3.0, (dense_error, step_error)


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_equals_a_t_eval_solve(solver):
    """Per-sample grids through evaluate equal a per-sample t_eval solve: the same steps and
    the same interpolant, to rounding: the weight polynomials b_i(theta) are one matmul over
    the queries, whose summation order (so the last bits) depends on how many share it,
    and Dopri8's coefficients (up to 768) amplify that to ~1e-13 on values of order 1."""
    y0 = LOTKA_VOLTERRA.initial()
    grid = torch.stack([torch.linspace(0.0, 5.0, 41, dtype=torch.float64) * s
                        for s in (1.0, 0.7, 0.9)])
    kwargs = dict(solver=solver, rtol=1e-7, atol=1e-9)
    ref = odeint(LOTKA_VOLTERRA.f, y0, (0.0, 5.0), t_eval=grid, **kwargs)
    sol = odeint(LOTKA_VOLTERRA.f, y0, (0.0, 5.0), dense=True, **kwargs)
    assert torch.equal(sol.value, odeint(LOTKA_VOLTERRA.f, y0, (0.0, 5.0), **kwargs).value)
    values = sol.dense.evaluate(grid)
    rounding = dict(rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(values, ref.value, **rounding)
    # one time per sample, and one float for all, are the same queries
    torch.testing.assert_close(sol.dense.evaluate(grid[:, 7]), values[7], **rounding)
    assert torch.equal(sol.dense.evaluate(0.0), y0)
    assert torch.equal(sol.dense.evaluate(5.0), sol.value)


def _ball():
    """A ball dropped from heights h_b (y = (height, velocity), y'' = -g), stopped by a
    terminal event at the ground: closed form h - g t^2 / 2 up to t_hit = sqrt(2 h / g)."""
    g = 9.81
    heights = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
    y0 = torch.stack([heights, torch.zeros(3, dtype=torch.float64)], dim=1)

    def f(t, y):
        return torch.stack([y[:, 1], torch.full_like(y[:, 1], -g)], dim=1)

    event = eq.Event(lambda t, y: y[:, 0], direction=-1, terminal=True)
    return f, y0, event, heights, g


def test_per_sample_spans_end_at_each_event():
    f, y0, event, heights, g = _ball()
    sol = odeint(f, y0, (0.0, 10.0), solver=eq.Tsit5(), rtol=1e-10, atol=1e-12, event=event,
                 dense=True)
    t_hit = torch.sqrt(2 * heights / g)
    torch.testing.assert_close(sol.dense.t_final, sol.stats["t"], rtol=0, atol=0)
    torch.testing.assert_close(sol.dense.t_final, t_hit, rtol=1e-9, atol=0)
    fractions = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    times = sol.dense.t_final[:, None] * fractions  # each sample up to its own event
    values = sol.dense.evaluate(times)
    closed = heights - g * times.T**2 / 2
    torch.testing.assert_close(values[..., 0], closed, rtol=0, atol=1e-9)
    # at its event time a sample is its event state
    torch.testing.assert_close(values[-1], sol.stats["event_y"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="outside sample 0's solved span"):
        sol.dense.evaluate(float(t_hit[0]) + 0.01)


def test_samples_that_stopped_early_are_finite_and_refused_past_their_stop():
    """y' = y^2 blows up at t = 1/y0 for y0 > 0: sample 0 stops early (not SUCCESS), sample
    1 (y0 = -1) runs to t1 and matches y0 / (1 - y0 t); queries are NaN-free on each span."""
    y0 = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    sol = odeint(lambda t, y: y * y, y0, (0.0, 2.0), solver=eq.Tsit5(), rtol=1e-9,
                 atol=1e-12, dense=True, max_steps=2000)
    assert int(sol.status[0]) != int(eq.Status.SUCCESS)
    assert int(sol.status[1]) == int(eq.Status.SUCCESS)
    t_stop = float(sol.dense.t_final[0])
    assert 0.9 < t_stop < 1.0 + 1e-6  # at the blow-up, to the tolerance
    times = torch.stack([torch.linspace(0.0, t_stop, 20, dtype=torch.float64),
                         torch.linspace(0.0, 2.0, 20, dtype=torch.float64)])
    values = sol.dense.evaluate(times)
    assert torch.isfinite(values).all()
    closed = -1.0 / (1.0 + times[1])
    torch.testing.assert_close(values[:, 1, 0], closed, rtol=1e-7, atol=0)
    torch.testing.assert_close(values[-1, 0], sol.value[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"sample 0's solved span.*status is"):
        sol.dense.evaluate(torch.tensor([1.5, 1.5], dtype=torch.float64))


def test_gradients_match_central_differences():
    """Under Backprop, values at per-sample times are differentiable w.r.t. y0 and the
    parameters of f; fixed steps keep the map smooth, so float64 central differences of
    the same solve agree to 1e-7."""
    field = MLPField(dim=3, hidden=8)
    gen = torch.Generator().manual_seed(3)
    y0 = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    times = torch.rand(4, 5, generator=gen, dtype=torch.float64) * 2.0
    weights = torch.randn(5, 4, 3, generator=gen, dtype=torch.float64)

    def loss():
        sol = odeint(field, y0, (0.0, 2.0), solver=eq.Tsit5(), n_steps=17, dense=True)
        return (sol.dense.evaluate(times) * weights).sum()

    tensors = [y0, *field.parameters()]
    grads = torch.autograd.grad(loss(), tensors)
    directions = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in tensors]
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, directions))
    numeric = central_difference(loss, tensors, directions)
    assert abs(analytic - numeric) <= 1e-7 * max(1.0, abs(numeric)), (analytic, numeric)


def test_an_empty_span_is_solved_at_t0_only():
    y0 = torch.ones(2, 3, dtype=torch.float64)
    sol = odeint(lambda t, y: -y, y0, (1.0, 1.0), dense=True)
    assert torch.equal(sol.dense.evaluate(1.0), y0)
    with pytest.raises(ValueError, match="outside"):
        sol.dense.evaluate(1.5)


def test_bad_queries_and_options_get_clear_errors():
    y0 = torch.ones(2, 1, dtype=torch.float64)
    sol = odeint(lambda t, y: -y, y0, (0.0, 1.0), dense=True)
    assert odeint(lambda t, y: -y, y0, (0.0, 1.0)).dense is None
    with pytest.raises(ValueError, match=r"\(batch,\) tensor.*t.expand\(2, n\)"):
        sol.dense.evaluate(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="outside sample 0's solved span"):
        sol.dense.evaluate(-0.1)
    with pytest.raises(ValueError, match="NaN or inf"):
        sol.dense.evaluate(float("nan"))
    with pytest.raises(ValueError, match="t.detach"):
        sol.dense.evaluate(torch.tensor(0.5, dtype=torch.float64, requires_grad=True))
    with pytest.raises(TypeError, match="t must be a float or a tensor"):
        sol.dense.evaluate("half")
    with pytest.raises(TypeError, match="dense must be True or False"):
        odeint(lambda t, y: -y, y0, (0.0, 1.0), dense="yes")
    with pytest.raises(ValueError, match=r"odeint\(f, y0, ..., dense=True\)"):
        odeint_adjoint(lambda t, y: -y, y0, (0.0, 1.0), dense=True)
