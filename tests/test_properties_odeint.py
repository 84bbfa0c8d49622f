"""Property-based tests of odeint: statuses, stats["t"] and values against closed forms.

The contract and the shared checks: test_properties.py, properties.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import equilibria as eq
from equilibria import Status
from properties import (  # noqa: F401  (one_thread: the autouse fixture)
    BAD_COUNTS,
    BAD_NUMBERS,
    BATCHES,
    COUNTS,
    LAYOUTS,
    ODE_STATUSES,
    SCALES,
    SETTINGS,
    expect_clear_error,
    frames,
    generator,
    identical,
    one_thread,
    relayout,
    uniform,
)

# --- odeint --------------------------------------------------------------------------------

ADAPTIVE = {"tsit5": eq.Tsit5(), "dopri5": eq.Dopri5(), "bosh3": eq.Bosh3()}


@dataclass
class Decay:
    """y' = a y (a < 0 elementwise, a diagonal stable A), or with time_dependent
    y' = 2 t a y; exactly y(t) = exp(a (t - t0)) y0, resp. exp(a (t^2 - t0^2)) y0. The rates
    a have the sample shape (shared) or the batch shape (per sample, passed as args)."""

    time_dependent: bool

    def __call__(self, t: torch.Tensor, y: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
        if self.time_dependent:
            # t arrives as (batch,) or already broadcastable (batch, 1, ..., 1): both reshape
            return 2 * t.reshape(-1, *[1] * (y.dim() - 1)) * rates * y
        return rates * y

    def exact(self, y0: torch.Tensor, rates: torch.Tensor, t0: float,
              t: torch.Tensor) -> torch.Tensor:
        """float64 exact solution at each sample's time t (batch,)."""
        t = t.double().reshape(-1, *[1] * (y0.dim() - 1))
        elapsed = t.square() - t0**2 if self.time_dependent else t - t0
        return y0.double() * torch.exp(rates.double() * elapsed)


@st.composite
def decay_problems(draw, batches=BATCHES):
    dtype, shape, batch, seed = draw(frames(batches))
    per_sample = draw(st.booleans())
    rates = uniform((batch, *shape) if per_sample else shape, -2.0, -0.1, seed, dtype)
    if not per_sample:
        rates = rates.expand(batch, *shape)  # args need the batch in dim 0: a shared view
    scale = draw(SCALES)
    y0 = scale * torch.randn((batch, *shape), generator=generator(seed + 1),
                             dtype=torch.float64).to(dtype)
    t0 = draw(st.sampled_from([0.0, 0.5]))
    t1 = t0 + draw(st.sampled_from([-1.0, 0.25, 1.0, 2.0]))
    field = Decay(time_dependent=draw(st.booleans()))
    return field, relayout(y0, draw(LAYOUTS)), rates, (t0, t1)


def check_odeint_contract(y0, t_span, solution, max_steps, n_fixed_steps=None) -> None:
    batch = y0.shape[0]
    value, status, stats = solution.value, solution.status, solution.stats
    assert value.shape == y0.shape and value.dtype == y0.dtype and value.device == y0.device
    assert status.shape == (batch,) and status.dtype == torch.int64
    assert set(status.tolist()) <= ODE_STATUSES
    for key in ("nfe", "n_steps", "n_rejected"):
        assert stats[key].shape == (batch,) and stats[key].dtype == torch.int64, key
    assert stats["t"].shape == (batch,) and stats["t"].dtype == torch.float64
    if batch == 0:
        return
    t0, t1 = t_span
    attempts = stats["n_steps"] + stats["n_rejected"]
    assert bool((attempts <= max_steps).all())
    assert bool((stats["nfe"] >= attempts + 1).all())  # f at t0 counted
    success = status == int(Status.SUCCESS)
    # SUCCESS means t1 reached, exactly; any other status stopped short of it
    assert bool((stats["t"][success] == t1).all()), stats["t"]
    assert bool((stats["t"][~success] != t1).all()), (status, stats["t"])
    out_of_steps = status == int(Status.MAX_STEPS)
    assert bool((attempts[out_of_steps] == max_steps).all())
    # t moved from t0 towards t1 and not past it
    progress = (stats["t"] - t0) / (t1 - t0)
    assert bool(((progress >= 0) & (progress <= 1)).all())
    assert bool(torch.isfinite(value).all())
    if n_fixed_steps is not None:
        assert bool((stats["n_steps"][success] == n_fixed_steps).all())


@settings(max_examples=120, **SETTINGS)
@given(
    problem=decay_problems(),
    solver_name=st.sampled_from(sorted(ADAPTIVE)),
    # 1e-12 is below float32's resolution: such a sample grinds to max_steps (truthfully)
    rtol=st.sampled_from([1e-12, 1e-9, 1e-6, 1e-3, 1e-1]),
    atol_ratio=st.sampled_from([1e-6, 1e-2, 1.0]),
    max_steps=st.sampled_from([1, 4, 30, 600]),
    compact=st.booleans(),
)
def test_odeint_status_stats_and_value_tell_the_truth(problem, solver_name, rtol, atol_ratio,
                                                      max_steps, compact):
    """On y' = a y: SUCCESS samples reach t1, and every sample's value is exp(a t) y0 at its
    stats["t"] within a factor of the tolerance per step (the problem damps errors, so the
    global error is at most the sum of the local ones; backwards it grows by exp(|a| T))."""
    field, y0, rates, t_span = problem
    atol = rtol * atol_ratio
    solver = ADAPTIVE[solver_name]
    solution = eq.odeint(field, y0, t_span, solver=solver, rtol=rtol, atol=atol,
                         max_steps=max_steps, compact=compact, args=(rates,))
    COUNTS["odeint"].cases += 1
    COUNTS["odeint"].status(solution.status)
    check_odeint_contract(y0, t_span, solution, max_steps)
    batch = y0.shape[0]
    if batch == 0:
        return
    exact = field.exact(y0, rates, t_span[0], solution.stats["t"])
    eps = torch.finfo(y0.dtype).eps
    peak = y0.double().abs().reshape(batch, -1).amax(dim=1)
    t0, t1 = t_span
    horizon = max(abs(t0), abs(t1))
    # how much an error made on the way can grow by t1: exp(max|a'| |t1 - t0|)
    lipschitz = 2.0 * (2 * horizon if field.time_dependent else 1.0)
    growth = math.exp(lipschitz * abs(t1 - t0)) if t1 < t0 else 1.0
    if t1 < t0:
        peak = peak * math.exp(2.0 * (abs(t1**2 - t0**2) if field.time_dependent else t0 - t1))
    steps = solution.stats["n_steps"].double() + 1
    # local test: RMS(err / (atol + rtol |y|)) <= 1, so a component's local error is at most
    # sqrt(n) (atol + rtol |y|); 4x for the higher-order propagated solution's own error
    # (Tsit5/Dopri5 estimate the lower-order one) and 16 ulps a step for rounding
    width = y0[0].numel()
    per_step = 4 * math.sqrt(width) * (atol + rtol * peak) + 16 * eps * peak
    bound = growth * steps * per_step
    error = (solution.value.double() - exact).abs().reshape(batch, -1).amax(dim=1)
    assert bool((error <= bound).all()), (error / bound, solution.status, solution.stats)
    # The layout of y0 changes nothing. (Below the dtype's resolution, rtol < 1e3 eps, the
    # accept/reject decisions are made on rounding noise, which follows the layout's
    # reduction order: measured, a float32 rtol=1e-12 run differs after some hundred steps.)
    if not y0.is_contiguous() and rtol >= 1e3 * eps:
        plain = eq.odeint(field, y0.contiguous(), t_span, solver=solver, rtol=rtol, atol=atol,
                          max_steps=max_steps, compact=compact, args=(rates,))
        assert identical(plain.value, solution.value) and identical(plain.status, solution.status)


@settings(max_examples=60, **SETTINGS)
@given(problem=decay_problems(), dt0=st.sampled_from([0.013, 0.1, 0.3, 0.7, 5.0]))
def test_odeint_rk4_with_dt0_is_its_stability_polynomial(problem, dt0):
    """RK4 on y' = a y multiplies y by R(a h) = 1 + ah + (ah)^2/2 + (ah)^3/6 + (ah)^4/24 per
    step: steps of dt0, the last one shortened to land on t1. The value must be that
    product, to rounding."""
    field, y0, rates, t_span = problem
    field = Decay(time_dependent=False)
    solution = eq.odeint(field, y0, t_span, solver=eq.RK4(), dt0=dt0, args=(rates,))
    t0, t1 = t_span
    span = abs(t1 - t0)
    n_full = math.ceil(span / dt0 * (1 - 1e-9)) - 1  # full steps before the last
    check_odeint_contract(y0, t_span, solution, 10_000, n_fixed_steps=n_full + 1)
    COUNTS["odeint"].cases += 1
    COUNTS["odeint"].status(solution.status)
    assert bool(solution.success.all())
    direction = 1.0 if t1 > t0 else -1.0
    steps = [direction * dt0] * n_full + [direction * (span - n_full * dt0)]
    value = y0.double()
    for h in steps:
        z = rates.double() * h
        value = value * (1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24)
    eps = torch.finfo(y0.dtype).eps
    bound = 16 * eps * len(steps) * y0.double().abs().amax(dim=tuple(range(1, y0.dim())),
                                                          keepdim=True) + 1e-300
    assert bool(((solution.value.double() - value).abs() <= bound).all())


@settings(max_examples=80, **SETTINGS)
@given(
    problem=decay_problems(batches=st.integers(2, 6)),
    solver_name=st.sampled_from(sorted(ADAPTIVE)),
    rtol=st.sampled_from([1e-9, 1e-6, 1e-3]),
    max_steps=st.sampled_from([3, 10_000]),
    compact=st.booleans(),
    index=st.integers(0, 5),
)
def test_odeint_sample_does_not_depend_on_its_batch_mates(problem, solver_name, rtol, max_steps,
                                                          compact, index):
    """Elementwise field: a sample's steps, stats and value are the same bits alone as in a
    batch (where rows finish at different times and compaction drops them)."""
    field, y0, rates, t_span = problem
    y0, rates = y0.contiguous(), rates.contiguous()
    index = index % y0.shape[0]
    kwargs = dict(solver=ADAPTIVE[solver_name], rtol=rtol, atol=rtol * 1e-2,
                  max_steps=max_steps, compact=compact)
    together = eq.odeint(field, y0, t_span, args=(rates,), **kwargs)
    alone = eq.odeint(field, y0[index : index + 1], t_span, args=(rates[index : index + 1],),
                      **kwargs)
    COUNTS["odeint"].cases += 2
    assert alone.status[0] == together.status[index]
    for key in alone.stats:
        assert identical(alone.stats[key][0], together.stats[key][index]), key
    assert identical(alone.value[0], together.value[index])


@settings(max_examples=60, **SETTINGS)
@given(
    problem=decay_problems(),
    solver_name=st.sampled_from(sorted(ADAPTIVE)),
    rtol=st.sampled_from([1e-8, 1e-5, 1e-3]),
    max_steps=st.sampled_from([2, 600]),
    fractions=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5, unique=True),
    threshold=st.sampled_from([0.0, 0.5]),
    compact=st.booleans(),
)
def test_odeint_t_eval_and_terminate_tell_the_truth(problem, solver_name, rtol, max_steps,
                                                    fractions, threshold, compact):
    """Dense output at t_eval agrees with exp(a t) y0 like the steps do; a sample that stopped
    early (MAX_STEPS, or EVENT from terminate = "max |y| fell below threshold max |y0|") holds
    its final value at the later points; an EVENT sample satisfies its condition there."""
    field, y0, rates, t_span = problem
    t0, t1 = t_span
    times = list(dict.fromkeys(t0 + (t1 - t0) * f for f in sorted(fractions)))  # towards t1
    batch = y0.shape[0]
    start = y0.detach().abs().flatten(1).amax(dim=1) if batch else None
    level = threshold * float(start.max()) if batch else 0.0

    def terminate(t, y, dydt):  # row-wise (compaction drops finished rows)
        return y.abs().flatten(1).amax(dim=1) < level

    solution = eq.odeint(field, y0, t_span, solver=ADAPTIVE[solver_name], rtol=rtol,
                         atol=rtol * 1e-2, t_eval=times, max_steps=max_steps, args=(rates,),
                         terminate=terminate if threshold else None, compact=compact)
    COUNTS["odeint"].cases += 1
    COUNTS["odeint"].status(solution.status)
    assert solution.value.shape == (len(times), *y0.shape)
    if batch == 0:
        return
    status, reached = solution.status, solution.stats["t"]
    assert set(status.tolist()) <= ODE_STATUSES | {int(Status.EVENT)}
    assert bool((reached[status == int(Status.SUCCESS)] == t1).all())
    event = status == int(Status.EVENT)
    final = solution.value[-1]
    eps = torch.finfo(y0.dtype).eps
    steps = float(solution.stats["n_steps"].max()) + 1
    peak = start.double() * (math.exp(2.0 * (abs(t1**2 - t0**2) + abs(t1 - t0))) if t1 < t0
                             else 1.0)
    width = y0[0].numel()
    growth = math.exp(2.0 * (2 * max(abs(t0), abs(t1)) + 1) * abs(t1 - t0)) if t1 < t0 else 1.0
    bound = growth * steps * (4 * math.sqrt(width) * rtol * (1e-2 + peak) + 16 * eps * peak)
    for k, time in enumerate(times):
        before = (time - reached) * (t1 - t0) <= 0  # the sample got this far
        exact = field.exact(y0, rates, t0, torch.full((batch,), time, dtype=torch.float64))
        error = (solution.value[k].double() - exact).abs().reshape(batch, -1).amax(dim=1)
        assert bool((error[before] <= 8 * bound[before]).all()), (k, error, bound)
        # the points after an early stop hold the final state (as the last point does)
        assert identical(solution.value[k][~before], final[~before])
    # an EVENT sample stopped short of t1, where its condition held: its final state, held
    # at the t_eval points after its stop, is below the threshold
    assert bool((reached[event] != t1).all())
    held = event & ((times[-1] - reached) * (t1 - t0) > 0)
    if bool(held.any()):
        last = solution.value[-1][held].abs().flatten(1).amax(dim=1)
        assert bool((last < level).all())


# --- bad input: a clear error that names the argument ------------------------------------


def _decay(t, y):
    return -y


ODEINT_BAD_CALLS = {
    "y0 int": (lambda: eq.odeint(_decay, torch.ones(2, 3, dtype=torch.int64)), "y0"),
    "y0 0-dim": (lambda: eq.odeint(_decay, torch.tensor(1.0)), "y0"),
    "y0 nan": (lambda: eq.odeint(_decay, torch.tensor([[math.nan]])), "y0"),
    "t_span short": (lambda: eq.odeint(_decay, torch.ones(2, 3), (0.0,)), "t_span"),
    "t_span inf": (lambda: eq.odeint(_decay, torch.ones(2, 3), (0.0, math.inf)), "t_span"),
    "t_span nan": (lambda: eq.odeint(_decay, torch.ones(2, 3), (math.nan, 1.0)), "t_span"),
    "t_span string": (lambda: eq.odeint(_decay, torch.ones(2, 3), "0 1"), "t_span"),
    "t_eval outside": (lambda: eq.odeint(_decay, torch.ones(2, 3), t_eval=[0.5, 2.0]), "t_eval"),
    "t_eval order": (lambda: eq.odeint(_decay, torch.ones(2, 3), t_eval=[0.5, 0.2]), "t_eval"),
    "t_eval empty": (lambda: eq.odeint(_decay, torch.ones(2, 3), t_eval=[]), "t_eval"),
    "t_eval nan": (lambda: eq.odeint(_decay, torch.ones(2, 3), t_eval=[math.nan]), "t_eval"),
    "solver name": (lambda: eq.odeint(_decay, torch.ones(2, 3), solver="tsit5"), "solver"),
    "solver fixed-point": (lambda: eq.odeint(_decay, torch.ones(2, 3), solver=eq.Anderson()),
                           "solver"),
    "RK4 without dt0": (lambda: eq.odeint(_decay, torch.ones(2, 3), solver=eq.RK4()), "dt0"),
    "dt0 and n_steps": (lambda: eq.odeint(_decay, torch.ones(2, 3), dt0=0.1, n_steps=3), "dt0"),
    "n_steps 0": (lambda: eq.odeint(_decay, torch.ones(2, 3), solver=eq.RK4(), n_steps=0),
                  "n_steps"),
    "args batch": (lambda: eq.odeint(lambda t, y, a: -a * y, torch.ones(2, 3),
                                     args=(torch.ones(3, 3),)), "args"),
    "terminate": (lambda: eq.odeint(_decay, torch.ones(2, 3), terminate=1), "terminate"),
    "controller": (lambda: eq.odeint(_decay, torch.ones(2, 3), controller="pi"), "controller"),
    "error_norm": (lambda: eq.odeint(_decay, torch.ones(2, 3), error_norm=2), "error_norm"),
    "f not callable": (lambda: eq.odeint(None, torch.ones(2, 3)), "f"),
    "f shape": (lambda: eq.odeint(lambda t, y: y[:, :1], torch.ones(2, 3)), "f"),
    "f dtype": (lambda: eq.odeint(lambda t, y: y.double(), torch.ones(2, 3)), "f"),
    "unknown keyword": (lambda: eq.odeint(_decay, torch.ones(2, 3), method="rk45"), "method"),
    "throw": (lambda: eq.odeint(_decay, torch.ones(2, 3), (0.0, 10.0), max_steps=2, throw=True),
              "max_steps"),
}


@pytest.mark.parametrize("call, name", list(ODEINT_BAD_CALLS.values()), ids=list(ODEINT_BAD_CALLS))
def test_odeint_bad_call_is_a_clear_error(call, name):
    expect_clear_error(call, name)


@settings(max_examples=80, **SETTINGS)
@given(
    name=st.sampled_from(["atol", "rtol", "max_steps", "dt0", "n_steps"]),
    bad=st.sampled_from(BAD_NUMBERS + BAD_COUNTS),
    solver_name=st.sampled_from(["tsit5", "dopri5", "bosh3", "rk4"]),
)
def test_odeint_bad_keyword_is_a_clear_error(name, bad, solver_name):
    solver = {**ADAPTIVE, "rk4": eq.RK4()}[solver_name]
    if bad is None and name in ("dt0", "n_steps"):
        return  # the default
    if name in ("atol", "rtol") and type(bad) in (int, float) and 0 < bad < math.inf:
        return
    if name == "dt0" and type(bad) in (int, float) and 0 < abs(bad) < math.inf:
        return  # documented: the sign of dt0 is ignored
    if name == "dt0" and bad is True:
        return  # the bug of test_odeint_dt0_true_is_refused
    if name in ("max_steps", "n_steps") and type(bad) is int and bad > 0:
        return
    extra = {"dt0": 0.1} if solver == eq.RK4() and name not in ("dt0", "n_steps") else {}
    expect_clear_error(lambda: eq.odeint(_decay, torch.ones(2, 3), solver=solver,
                                         **{name: bad}, **extra), name)


# --- reproducers of the bugs the properties found -------------------------------------------


def test_odeint_dt0_true_is_refused():
    with pytest.raises(TypeError, match="dt0"):
        eq.odeint(_decay, torch.ones(1, 1), solver=eq.RK4(), dt0=True)


def test_odeint_half_state_is_refused_like_fixed_points():
    # (it was accepted and reported NONFINITE: the default atol is 0 in float16)
    for dtype in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match="y0 has dtype .*autocast"):
            eq.odeint(_decay, torch.ones(2, 3, dtype=dtype))


def test_odeint_tolerances_below_the_dtype_are_not_reported_as_nonfinite():
    # (they were accepted, and err / 0 = inf read as f's inf: NONFINITE after 10 rejections)
    with pytest.raises(ValueError, match="atol=1e-300 is below the smallest normal"):
        eq.odeint(_decay, torch.ones(2, 3), rtol=1e-300, atol=1e-300)
    solution = eq.odeint(_decay, torch.ones(2, 3, dtype=torch.float64), rtol=1e-300,
                         atol=1e-300, max_steps=50)
    assert not (solution.status == int(Status.NONFINITE)).any()


def test_odeint_batched_t_span_names_t_span():
    with pytest.raises((TypeError, ValueError), match="t_span"):
        eq.odeint(_decay, torch.ones(2, 3), (torch.zeros(2), torch.ones(2)))


def test_float32_long_span_from_zero_is_not_step_size_too_small():
    def f(t, y):  # y' = cos t, y(0) = 0: y = sin t; float64 needs 8 steps
        return torch.cos(t).reshape(-1, *[1] * (y.dim() - 1)).expand_as(y)

    # It stopped as STEP_SIZE_TOO_SMALL at t = 1e-4 after one step (the floor was 10 eps of
    # float32 times the span). At float32's own precision (rtol 1e-4; the default 1e-6 is
    # within 10x of its eps, 8k steps for 160 periods: MAX_STEPS, honestly) it succeeds.
    solution = eq.odeint(f, torch.zeros(1, 1), (0.0, 1000.0), rtol=1e-4, atol=1e-6)
    assert solution.status.tolist() == [int(Status.SUCCESS)]
    # (f sees t rounded to float32: up to 3e-5 at t = 1000, hence the loose check)
    torch.testing.assert_close(solution.value, torch.full((1, 1), math.sin(1000.0)),
                               atol=0.05, rtol=0)
