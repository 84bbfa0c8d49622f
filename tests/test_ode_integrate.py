"""odeint: accuracy against references, convergence order, per-sample semantics, statuses."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import equilibria as eq
from equilibria.ode import odeint
from problems import ADAPTIVE_PROBLEMS, FORCED, LINEAR, VAN_DER_POL

ADAPTIVE = [eq.Bosh3(), eq.Dopri5(), eq.Tsit5(), eq.Dopri8()]
FIXED = [eq.Euler(), eq.Midpoint(), eq.Heun(), eq.RK4()]
_SCIPY_PEER = {"Bosh3": "RK23", "Dopri5": "RK45", "Tsit5": "RK45", "Dopri8": "DOP853"}


def _name(solver):
    return type(solver).__name__


def _scaled_error(value, ref, rtol, atol):
    return float(((value - ref).abs() / (atol + rtol * ref.abs())).max())


@pytest.mark.parametrize("solver", ADAPTIVE, ids=_name)
@pytest.mark.parametrize("problem", ADAPTIVE_PROBLEMS, ids=lambda p: p.name)
@pytest.mark.parametrize("tight", [False, True], ids=["loose", "tight"])
def test_accuracy_against_reference(problem, solver, tight):
    """Global error at t1, in units of the tolerance, is small and no worse than scipy's
    solver of the same order at the same tolerances (global error can exceed the local
    tolerance: it accumulates over the oscillations of these problems)."""
    # tight: 1e-7 (1e-6 for the 3rd-order Bosh3, whose cost grows fastest) ; loose: 1e-4
    rtol = (1e-6 if solver.order == 3 else 1e-7) if tight else 1e-4
    atol = rtol * 1e-2
    sol = odeint(problem.f, problem.initial(), problem.t_span, solver=solver, rtol=rtol,
                 atol=atol)
    assert bool((sol.status == eq.Status.SUCCESS).all())
    assert torch.all(sol.stats["t"] == problem.t_span[1])
    ref = problem.reference([problem.t_span[1]])[0]
    ours = _scaled_error(sol.value, ref, rtol, atol)
    scipy_worst = 0.0
    for b, y0 in enumerate(problem.y0):
        peer = solve_ivp(problem.f_numpy, problem.t_span, np.array(y0),
                         method=_SCIPY_PEER[_name(solver)], rtol=rtol, atol=atol)
        scipy_worst = max(scipy_worst, _scaled_error(torch.tensor(peer.y[:, -1]), ref[b], rtol,
                                                     atol))
    assert ours < 30.0
    assert ours <= 2.0 * scipy_worst + 1.0


@pytest.mark.parametrize("solver", FIXED + ADAPTIVE, ids=_name)
def test_convergence_order(solver):
    """Fitted log-log slope of the global error against dt matches the tableau's order.

    Order <= 4: Van der Pol on [0, 1]. Order 5: the linear problem on [0, 5] (Dopri5 and
    Tsit5 are tuned so that their 5th-order error terms are tiny: on Van der Pol the
    6th-order terms dominate at any dt well above round-off and the fitted slope is ~6;
    their nonlinear 5th-order conditions are checked algebraically in test_ode_tableau).
    """
    if solver.order >= 8:
        # the forced problem: on the linear one the 9th-order term still dominates (slope 8.9)
        # at any dt whose error stays above round-off
        problem, t_span, steps = FORCED, FORCED.t_span, [12, 16, 24, 32]
    elif solver.order >= 5:
        problem, t_span, steps = LINEAR, LINEAR.t_span, [32, 64, 128, 256]
    else:
        problem, t_span = VAN_DER_POL, (0.0, 1.0)
        steps = [16, 32, 64, 128] if solver.order >= 3 else [64, 128, 256, 512]
    ref = problem.reference([t_span[1]], t_span)[0]
    errors = []
    for n in steps:
        sol = odeint(problem.f, problem.initial(), t_span, solver=solver, n_steps=n)
        assert bool((sol.stats["n_steps"] == n).all())
        errors.append(float((sol.value - ref).abs().max()))
    slope = np.polyfit(np.log(1.0 / np.array(steps)), np.log(errors), 1)[0]
    assert abs(slope - solver.order) <= 0.3, (slope, errors)


def _rotation(t, y, omega):
    return omega[:, None] * torch.stack([y[:, 1], -y[:, 0]], dim=1)


@pytest.mark.parametrize("solver", ADAPTIVE, ids=_name)
def test_sample_does_not_depend_on_batch_mates(solver):
    y0 = torch.tensor([[1.0, 0.5], [0.3, -1.0]], dtype=torch.float64)
    omega = torch.tensor([1.0, 20.0], dtype=torch.float64)  # the second varies much faster
    tol = {"rtol": 1e-5, "atol": 1e-7}
    alone = odeint(_rotation, y0[:1], (0.0, 1.5), solver=solver, args=(omega[:1],), **tol)
    both = odeint(_rotation, y0, (0.0, 1.5), solver=solver, args=(omega,), compact=False,
                  **tol)
    assert torch.allclose(alone.value[0], both.value[0], rtol=0, atol=1e-12)
    for key in ("nfe", "n_steps", "n_rejected"):
        assert alone.stats[key][0] == both.stats[key][0]
    assert both.stats["n_steps"][1] > 5 * both.stats["n_steps"][0]


def test_compaction_saves_work_and_changes_nothing():
    rows_seen = []

    def field(t, y, omega):
        rows_seen.append(y.shape[0])
        return _rotation(t, y, omega)

    y0 = torch.randn(8, 2, dtype=torch.float64)
    omega = torch.tensor([1.0] * 7 + [20.0], dtype=torch.float64)
    compacted = odeint(field, y0, (0.0, 1.5), args=(omega,), rtol=1e-5)
    work_compacted, rows_seen[:] = sum(rows_seen), []
    full = odeint(field, y0, (0.0, 1.5), args=(omega,), rtol=1e-5, compact=False)
    work_full = sum(rows_seen)
    # Same steps; values equal up to the last bits (CPU kernels for pow in the controller round
    # differently on a vectorised body and a scalar tail, so dt can differ by an ulp).
    assert torch.allclose(compacted.value, full.value, rtol=0, atol=1e-12)
    for key in ("nfe", "n_steps", "n_rejected"):
        assert torch.equal(compacted.stats[key], full.stats[key])
    assert work_compacted < 0.5 * work_full


def test_closure_over_batch_tensor_gets_a_clear_error_when_compacted():
    omega = torch.tensor([1.0, 1.0, 1.0, 20.0], dtype=torch.float64)
    y0 = torch.ones(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="args="):
        odeint(lambda t, y: _rotation(t, y, omega), y0, (0.0, 1.5), rtol=1e-5)
    sol = odeint(lambda t, y: _rotation(t, y, omega), y0, (0.0, 1.5), rtol=1e-5,
                 compact=False)
    assert bool(sol.success.all())


@pytest.mark.parametrize("solver", ADAPTIVE + [eq.RK4()], ids=_name)
def test_t_eval_dense_output(solver):
    """Values at t_eval are as accurate as scipy's dense output at the same tolerances."""
    problem = VAN_DER_POL
    rtol = 1e-6 if solver.order == 3 else 1e-7
    atol = rtol * 1e-2
    t_eval = torch.linspace(0.0, 6.0, 41, dtype=torch.float64)
    extra = {} if solver.adaptive else {"dt0": 0.02}
    sol = odeint(problem.f, problem.initial(), problem.t_span, solver=solver, rtol=rtol,
                 atol=atol, t_eval=t_eval, **extra)
    plain = odeint(problem.f, problem.initial(), problem.t_span, solver=solver, rtol=rtol,
                   atol=atol, **extra)
    assert sol.value.shape == (41, 3, 2)
    ref = problem.reference(t_eval.numpy())
    if solver.adaptive:
        ours = _scaled_error(sol.value, ref, rtol, atol)
        scipy_worst = 0.0
        for b, y0 in enumerate(problem.y0):
            peer = solve_ivp(problem.f_numpy, problem.t_span, np.array(y0),
                             method=_SCIPY_PEER[_name(solver)], rtol=rtol, atol=atol,
                             t_eval=t_eval.numpy())
            scipy_worst = max(scipy_worst, _scaled_error(torch.tensor(peer.y.T), ref[:, b],
                                                         rtol, atol))
        assert ours <= 2.0 * scipy_worst + 1.0, (ours, scipy_worst)
    else:
        assert float((sol.value - ref).abs().max()) < 2e-6  # RK4, dt = 0.02: error ~ dt^4
    # t_eval does not change the steps, and the last point is the end state exactly (Dopri8
    # evaluates 5 extra dense-output stages on a step with t_eval points: tests/test_ode_dense)
    assert torch.equal(sol.stats["n_steps"], plain.stats["n_steps"])
    if not isinstance(solver, eq.Dopri8):
        assert torch.equal(sol.stats["nfe"], plain.stats["nfe"])
    assert torch.equal(sol.value[-1], plain.value)
    assert torch.equal(sol.value[0], problem.initial())


@pytest.mark.parametrize(
    ("solver", "order"),
    [(eq.Dopri5(), 5), (eq.Tsit5(), 5), (eq.Bosh3(), 4), (eq.RK4(), 4)],
    ids=lambda x: _name(x) if not isinstance(x, int) else str(x),
)
def test_dense_output_local_order(solver, order):
    """One step from the exact state: the interpolant's error at theta = 0.5 is O(dt^order)
    (Dopri5/Tsit5: 4th-order interpolants, local error dt^5; Hermite: dt^4; Dopri8's 7th
    order: tests/test_ode_dense.py)."""
    problem = VAN_DER_POL
    errors = []
    for dt in (0.1, 0.05, 0.025):
        t_point = torch.tensor([0.5 * dt], dtype=torch.float64)
        sol = odeint(problem.f, problem.initial(), (0.0, dt), solver=solver, n_steps=1,
                     t_eval=t_point)
        ref = problem.reference(t_point.numpy(), (0.0, dt))[0]
        errors.append(float((sol.value[0] - ref).abs().max()))
    slope = np.polyfit(np.log([0.1, 0.05, 0.025]), np.log(errors), 1)[0]
    assert slope > order - 0.3, (slope, errors)


def test_backwards_in_time():
    problem = LINEAR
    y_end = problem.reference([5.0])[0]
    t_eval = torch.tensor([5.0, 3.0, 1.0, 0.0])
    sol = odeint(problem.f, y_end, (5.0, 0.0), solver=eq.Tsit5(), rtol=1e-9, atol=1e-12,
                 t_eval=t_eval)
    assert bool(sol.success.all())
    expected = problem.reference([5.0, 3.0, 1.0, 0.0])
    assert torch.allclose(sol.value, expected, rtol=0, atol=1e-7)
    assert torch.allclose(sol.value[-1], problem.initial(), rtol=0, atol=1e-7)
    assert torch.all(sol.stats["t"] == 0.0)
    fixed = odeint(problem.f, y_end, (5.0, 0.0), solver=eq.RK4(), dt0=0.01)
    assert torch.allclose(fixed.value, problem.initial(), rtol=0, atol=1e-7)


def test_terminate_hook_gives_event_per_sample():
    y0 = torch.tensor([[1.0], [10.0], [0.1]], dtype=torch.float64)

    def steady(t, y, dydt):
        return dydt.abs().flatten() <= 1e-3

    sol = odeint(lambda t, y: -y, y0, (0.0, 50.0), rtol=1e-8, atol=1e-10, terminate=steady)
    assert sol.status.tolist() == [eq.Status.EVENT] * 3
    # |dy/dt| = y0 e^-t crosses 1e-3 at t* = ln(1e3 y0); each sample stops just after its t*
    t_star = torch.log(1e3 * y0.flatten())
    assert torch.all(sol.stats["t"] >= t_star) and torch.all(sol.stats["t"] < t_star + 1.0)
    assert torch.all(sol.value.abs().flatten() <= 1e-3)
    assert bool(sol.success.all())


def test_statuses_and_last_good_state():
    # y' = y^2 from 1 blows up at t = 1: the step size collapses
    blow = odeint(lambda t, y: y * y, torch.ones(1, 1, dtype=torch.float64), (0.0, 2.0))
    assert blow.status.tolist() == [eq.Status.STEP_SIZE_TOO_SMALL]
    assert float(blow.stats["t"][0]) < 1.001 and bool(torch.isfinite(blow.value).all())

    # f returns NaN past t = 0.5: NONFINITE, the state is the last finite one
    def poisoned(t, y):
        return torch.where(t > 0.5, torch.nan, -y)

    for solver, extra in ((eq.Tsit5(), {}), (eq.RK4(), {"dt0": 0.1})):
        sol = odeint(poisoned, torch.ones(2, 3, dtype=torch.float64), (0.0, 1.0), solver=solver,
                     **extra)
        assert sol.status.tolist() == [eq.Status.NONFINITE] * 2
        assert bool(torch.isfinite(sol.value).all())
        assert torch.all(sol.stats["t"] <= 0.5 + 1e-12)
        t_last = sol.stats["t"][0]
        assert torch.allclose(sol.value[0], torch.exp(-t_last).expand(3), atol=1e-5)

    nan_at_start = odeint(lambda t, y: y * torch.nan, torch.ones(2, 1), (0.0, 1.0))
    assert nan_at_start.status.tolist() == [eq.Status.NONFINITE] * 2
    assert int(nan_at_start.stats["nfe"][0]) <= 2

    capped = odeint(VAN_DER_POL.f, VAN_DER_POL.initial(), (0.0, 6.0), max_steps=5)
    assert capped.status.tolist() == [eq.Status.MAX_STEPS] * 3
    assert torch.all(capped.stats["n_steps"] + capped.stats["n_rejected"] == 5)
    with pytest.raises(eq.EquilibriaError, match="MAX_STEPS"):
        odeint(VAN_DER_POL.f, VAN_DER_POL.initial(), (0.0, 6.0), max_steps=5, throw=True)


@pytest.mark.parametrize("t_span", [(0.0, 0.3), (1.0, -0.7)])
def test_n_steps_takes_exactly_n_steps_and_lands_on_t1(t_span):
    y0 = torch.ones(2, 1, dtype=torch.float64)
    for n in (70, 333):
        sol = odeint(_ok, y0, t_span, solver=eq.RK4(), n_steps=n)
        assert torch.all(sol.stats["n_steps"] == n) and torch.all(sol.stats["t"] == t_span[1])
        exact = math.exp(-(t_span[1] - t_span[0]))
        assert abs(float(sol.value[0, 0]) - exact) < 1e-6


def test_empty_span_and_single_tensor_args():
    y0 = torch.randn(3, 2, dtype=torch.float64)
    same = odeint(_ok, y0, (1.0, 1.0), t_eval=[1.0])
    assert torch.equal(same.value[0], y0) and bool(same.success.all())
    assert torch.all(same.stats["nfe"] == 0)
    omega = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    sol = odeint(_rotation, y0, (0.0, 1.0), args=omega, rtol=1e-9, atol=1e-11)
    angle = omega[:, None]
    expected = torch.cat([y0[:, :1] * torch.cos(angle) + y0[:, 1:] * torch.sin(angle),
                          -y0[:, :1] * torch.sin(angle) + y0[:, 1:] * torch.cos(angle)], dim=1)
    assert torch.allclose(sol.value, expected, atol=1e-8)


def test_float32_and_stats():
    y0 = VAN_DER_POL.initial(torch.float32)
    sol = odeint(VAN_DER_POL.f, y0, (0.0, 6.0), rtol=1e-5, atol=1e-6)
    assert sol.value.dtype == torch.float32 and bool(sol.success.all())
    ref = VAN_DER_POL.reference([6.0])[0]
    assert _scaled_error(sol.value.double(), ref, 1e-5, 1e-6) < 30.0
    for key in ("nfe", "n_steps", "n_rejected"):
        assert sol.stats[key].shape == (3,) and sol.stats[key].dtype == torch.int64
    # FSAL: nfe = 2 (f(y0) + initial step) + 6 per attempted Tsit5 step
    attempts = sol.stats["n_steps"] + sol.stats["n_rejected"]
    assert torch.equal(sol.stats["nfe"], 2 + 6 * attempts)


def _ok(t, y):
    return -y


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"y0": torch.tensor([[1.0, float("nan")]])}, ValueError, "y0 contains inf or NaN"),
        ({"y0": [[1.0]]}, TypeError, "y0 must be a torch.Tensor"),
        ({"y0": torch.tensor(1.0)}, ValueError, "batch in dim 0"),
        ({"rtol": 0.0}, ValueError, "rtol"),
        ({"atol": -1e-9}, ValueError, "atol"),
        ({"max_steps": 0}, ValueError, "max_steps"),
        ({"solver": "tsit5"}, TypeError, "solver must be"),
        ({"solver": eq.RK4()}, ValueError, "dt0"),
        ({"t_eval": [0.5, 1.5]}, ValueError, "inside t_span"),
        ({"t_eval": [0.5, 0.2]}, ValueError, "monotone"),
        ({"t_span": (0.0, 1.0), "t_eval": [[[0.5]]]}, ValueError, r"\(n,\) or \(batch, n\)"),
        ({"t_span": (0.0,)}, ValueError, "t_span"),
        ({"t_span": (0.0, float("inf"))}, ValueError, "finite"),
        ({"f": lambda t, y: y[:, :1]}, ValueError, "f returned"),
        ({"f": lambda t, y: y.float()}, ValueError, "dtype"),
        ({"f": "not callable"}, TypeError, "callable"),
        ({"terminate": lambda t, y, d: True}, ValueError, "terminate must return"),
        ({"args": (torch.ones(3),)}, ValueError, "args\\[0\\]"),
        ({"solver": eq.RK4(), "dt0": 0.1, "n_steps": 10}, ValueError, "not both"),
        ({"controller": "pi"}, TypeError, "PIController"),
    ],
)
def test_bad_input(kwargs, error, match):
    call = {"f": _ok, "y0": torch.ones(2, 2, dtype=torch.float64), "t_span": (0.0, 1.0)}
    call.update(kwargs)
    with pytest.raises(error, match=match):
        odeint(call.pop("f"), call.pop("y0"), **call)


def test_bad_controller():
    with pytest.raises(ValueError, match="safety"):
        eq.ode.PIController(safety=1.5)
    with pytest.raises(ValueError, match="min_factor"):
        eq.ode.PIController(min_factor=2.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_device_preserved(dtype):
    y0 = VAN_DER_POL.initial(dtype, "cuda")
    sol = odeint(VAN_DER_POL.f, y0, (0.0, 6.0), t_eval=torch.linspace(0, 6, 5))
    assert sol.value.device.type == "cuda" and sol.value.dtype == dtype
    assert sol.status.device.type == "cuda" and bool(sol.success.all())
    cpu = odeint(VAN_DER_POL.f, y0.cpu(), (0.0, 6.0), t_eval=torch.linspace(0, 6, 5))
    assert torch.allclose(sol.value.cpu(), cpu.value, rtol=1e-4, atol=1e-5)


def test_time_broadcasts_against_y_when_batch_equals_features():
    """f sees t shaped (batch, 1): torchdiffeq-style `sin(t) * y` is right even when the
    batch equals the feature size (with a (batch,) t it broadcast along features instead and
    silently gave a wrong answer). y' = sin(t) y has y(t) = y0 exp(1 - cos t)."""
    y0 = torch.arange(1.0, 10.0, dtype=torch.float64).reshape(3, 3)
    seen = []

    def field(t, y):
        seen.append(tuple(t.shape))
        return torch.sin(t) * y

    sol = odeint(field, y0, (0.0, 2.0), rtol=1e-10, atol=1e-12)
    assert set(seen) == {(3, 1)}
    exact = y0 * math.exp(1.0 - math.cos(2.0))
    assert torch.allclose(sol.value, exact, rtol=1e-8, atol=0)
    # one more dim: t is (batch, 1, 1)
    seen.clear()
    odeint(field, y0[:, None, :].expand(3, 2, 3).contiguous(), (0.0, 0.5))
    assert set(seen) == {(3, 1, 1)}


def test_old_time_convention_gets_a_hint():
    """Code written for a (batch,) t (`t[:, None] * y`) now returns an extra dimension: the
    error says what t is."""
    with pytest.raises(ValueError, match=r"t has shape \(batch, 1, \.\.\., 1\)"):
        odeint(lambda t, y: t[:, None] * y, torch.ones(2, 3), (0.0, 1.0))


@pytest.mark.parametrize("solver", [eq.Tsit5(), eq.Kvaerno5()], ids=_name)
def test_per_sample_t_eval_equals_single_sample_runs(solver):
    """t_eval of shape (batch, n): row b's values at its own times equal those of sample b
    solved alone with that row as its t_eval (and the exact solution)."""
    y0 = torch.tensor([[1.0, 0.0], [0.5, -1.5], [2.0, 1.0]], dtype=torch.float64)
    grid = torch.tensor([[0.0, 0.7, 1.9, 5.0], [0.3, 0.4, 2.5, 4.9], [1.0, 2.0, 3.0, 4.0]],
                        dtype=torch.float64)
    rtol = 1e-9 if solver.order == 5 and not isinstance(solver, eq.ImplicitRK) else 1e-7
    tol = {"rtol": rtol, "atol": rtol * 1e-2}
    sol = odeint(LINEAR.f, y0, (0.0, 5.0), solver=solver, t_eval=grid, **tol)
    assert sol.value.shape == (4, 3, 2)
    for b in range(3):
        alone = odeint(LINEAR.f, y0[b : b + 1], (0.0, 5.0), solver=solver, t_eval=grid[b],
                       **tol)
        assert torch.allclose(sol.value[:, b], alone.value[:, 0], rtol=0, atol=1e-12)
        exact = torch.stack([torch.tensor(LINEAR.closed_form(np.array([float(s)]),
                                                             y0[b].numpy())[0])
                             for s in grid[b]])
        assert torch.allclose(sol.value[:, b], exact, rtol=0, atol=100 * rtol)


def test_per_sample_t_eval_is_checked():
    y0 = torch.ones(2, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\(batch, n\) = \(2, n\)"):
        odeint(_ok, y0, (0.0, 1.0), t_eval=torch.rand(3, 4))
    with pytest.raises(ValueError, match=r"monotone .*\(rows \[1\]\); sort each row"):
        odeint(_ok, y0, (0.0, 1.0), t_eval=[[0.1, 0.5], [0.5, 0.1]])
    with pytest.raises(ValueError, match="inside t_span"):
        odeint(_ok, y0, (0.0, 1.0), t_eval=[[0.1, 0.5], [0.2, 1.5]])
    # odeint_adjoint takes one through its checkpointed backward only
    with pytest.raises(ValueError, match=r"checkpoints=False.*per-sample \(batch, n\) t_eval"):
        eq.odeint_adjoint(_ok, y0, (0.0, 1.0), t_eval=[[0.1, 0.5], [0.2, 0.3]],
                          gradient=eq.Adjoint(checkpoints=False))
