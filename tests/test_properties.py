"""Property-based tests (hypothesis) of fixed_point, odeint and DEQ: the contract on random inputs.

This file: fixed_point. test_properties_odeint.py and test_properties_deq.py: the same
contract for odeint and DEQ; properties.py: the shared strategies and independent checks.

The contract: every call either raises a clear error (TypeError / ValueError /
EquilibriaError whose message names the argument) or returns a Solution whose status and
stats tell the truth, checked here independently of the library:

- a SUCCESS sample passes its tolerance test when recomputed in float64 from f;
- stats["residual"] is the residual at the returned value;
- a sample's value does not depend on its batch-mates, nor on the memory layout of the inputs;
- shapes, dtypes and devices of value, status and stats are the documented ones;
- odeint: a SUCCESS sample reached t1, and on y' = a y (a < 0 elementwise) the value agrees
  with exp(a t) y0 within a factor of the tolerance (RK4 with dt0: with the method's own
  stability polynomial, to rounding);
- DEQ: output shape, last_solution, finite gradients, and (float64) the Implicit gradient
  against central finite differences.

Problems are row-exact (elementwise products, `roll`, additions): a row's f is bit-identical
in any batch and any layout, so a difference between a sample alone and in a batch can only
come from the solver. Examples are bounded and derandomized: the three files run in about 20 s
on one core and every failure reproduces.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import equilibria as eq
from equilibria import Status
from properties import (  # noqa: F401  (one_thread: the autouse fixture)
    BAD_COUNTS,
    BAD_NUMBERS,
    BATCHES,
    COUNTS,
    DTYPES,
    FIXED_POINT_SOLVERS,
    GMRES_INSIDE,
    LAYOUTS,
    NAN_WHEN_UNROLLED,
    SCALES,
    SETTINGS,
    TOLERANCES,
    Map,
    check_fixed_point_contract,
    expect_clear_error,
    frames,
    generator,
    identical,
    one_thread,
    relayout,
    rms64,
    slack,
    uniform,
)


@st.composite
def fixed_point_problems(draw, batches=BATCHES):
    dtype, shape, batch, seed = draw(frames(batches))
    # mostly contractions, some slow ones, some that Picard cannot solve (|coef| > 1)
    contraction = draw(st.sampled_from([0.1, 0.5, 0.9, 0.99, 1.5, 1.5]))
    # |coef| in [c/2, c] with random signs: spectral radius between c/2 and c
    sign = torch.randint(0, 2, shape, generator=generator(seed + 3)) * 2 - 1
    coef = sign * uniform(shape, contraction / 2, contraction, seed, dtype)
    scale = draw(SCALES)
    limit = draw(st.sampled_from([math.inf, math.inf, 30 * scale]))
    out_layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    f = Map(coef, nonlinear=draw(st.booleans()), limit=limit, out_layout=out_layout)
    x = scale * torch.randn((batch, *shape), generator=generator(seed + 1),
                            dtype=torch.float64).to(dtype)
    z0 = draw(st.sampled_from([0.0, 1.0])) * torch.randn(
        (batch, *shape), generator=generator(seed + 2), dtype=torch.float64).to(dtype)
    return f, relayout(z0, draw(LAYOUTS)), relayout(x, draw(LAYOUTS))


def _runaway(limit: float = math.inf) -> tuple[Map, torch.Tensor, torch.Tensor]:
    """A map Picard runs away from (|coef| > 1): DIVERGED, or NONFINITE past `limit`."""
    coef = torch.tensor([1.4, -1.3, 1.45], dtype=torch.float64)
    x = torch.tensor([[0.3, -1.0, 2.0], [1e-3, 0.0, -5.0]], dtype=torch.float64)
    return Map(coef, nonlinear=False, limit=limit), torch.zeros_like(x), x


# every status at least once, whatever the generated examples are
@example(problem=_runaway(), solver_name="picard", atol=1e-8, rtol=1e-8, max_steps=150,
         compact=True, trace=True, differentiate=False)
@example(problem=_runaway(limit=10.0), solver_name="picard", atol=1e-8, rtol=1e-8, max_steps=7,
         compact=False, trace=False, differentiate=True)
@settings(max_examples=200, **SETTINGS)
@given(
    problem=fixed_point_problems(),
    solver_name=st.sampled_from(sorted(FIXED_POINT_SOLVERS)),
    atol=TOLERANCES,
    rtol=TOLERANCES,
    max_steps=st.sampled_from([1, 2, 7, 40, 150]),
    compact=st.booleans(),
    trace=st.booleans(),
    differentiate=st.booleans(),
)
def test_fixed_point_status_and_stats_tell_the_truth(problem, solver_name, atol, rtol, max_steps,
                                                     compact, trace, differentiate):
    f, z0, x = problem
    solver = FIXED_POINT_SOLVERS[solver_name]
    solution = eq.fixed_point(f, z0, x, solver=solver, atol=atol, rtol=rtol,
                              max_steps=max_steps, compact=compact, trace=trace)
    COUNTS["fixed_point"].cases += 1
    COUNTS["fixed_point"].status(solution.status)
    check_fixed_point_contract(f, z0, x, solution, atol, rtol, max_steps, solver)
    if trace and z0.shape[0]:
        # entry 0 at z0, then one per step, each (batch,) (compaction or not)
        assert len(solution.trace) == int(solution.stats["n_steps"].max()) + 1
        assert all(entry.shape == (z0.shape[0],) for entry in solution.trace)
        start = rms64(f(z0, x).double() - z0.double())
        torch.testing.assert_close(solution.trace[0].double(), start,
                                   atol=0, rtol=64 * torch.finfo(z0.dtype).eps, equal_nan=True)
    # The layout of z0 changes nothing (the loop copies it contiguous); a strided x makes f's
    # output strided too, which may change the reduction order of the solver's dot products:
    # then equal to rounding (a few hundred ulps of the state's scale, after amplification).
    if not (z0.is_contiguous() and x.is_contiguous()):
        plain = eq.fixed_point(f, z0.contiguous(), x.contiguous(), solver=solver, atol=atol,
                               rtol=rtol, max_steps=max_steps, compact=compact)
        if x.is_contiguous():
            assert torch.equal(plain.status, solution.status)
            assert torch.equal(plain.value, solution.value)
        elif z0.shape[0]:
            check_fixed_point_contract(f, z0, x, plain, atol, rtol, max_steps, solver)
            same = plain.status == solution.status
            eps = torch.finfo(z0.dtype).eps
            scale = (rms64(solution.value) + rms64(x))[:, None]
            gap = (plain.value - solution.value).double().abs().reshape(z0.shape[0], -1)
            assert bool((gap <= 256 * eps * scale)[same].all()), (gap.max(), scale)
    # Differentiating through the iterations (autograd recording, x requiring grad) computes
    # the same iterates; the gradient of a converged solve is finite.
    if differentiate and max_steps <= 7 and z0.shape[0] and z0.shape[0] * z0[0].numel():
        x_leaf = x.detach().clone().requires_grad_(True)
        recorded = eq.fixed_point(f, z0, x_leaf, solver=solver, atol=atol, rtol=rtol,
                                  max_steps=max_steps, compact=compact)
        assert identical(recorded.status, solution.status)
        assert identical(recorded.value.detach(), solution.value)
        if not recorded.value.requires_grad:  # every sample passed at z0, which has no x in it
            assert bool((recorded.stats["n_steps"] == 0).all())
        elif bool(recorded.success.all()) and solver_name not in NAN_WHEN_UNROLLED:
            (gradient,) = torch.autograd.grad(recorded.value.sum(), x_leaf)
            assert bool(torch.isfinite(gradient).all())
    # throw=True raises exactly when a sample failed, and says which status
    failed = not bool((solution.status == int(Status.SUCCESS)).all())
    if failed:
        with pytest.raises(eq.EquilibriaError, match=r"samples (MAX_STEPS|DIVERGED|NONFINITE)"):
            eq.fixed_point(f, z0, x, solver=solver, atol=atol, rtol=rtol, max_steps=max_steps,
                           compact=compact, throw=True)


@settings(max_examples=120, **SETTINGS)
@given(
    problem=fixed_point_problems(batches=st.integers(2, 6)),
    solver_name=st.sampled_from(sorted(FIXED_POINT_SOLVERS)),
    atol=TOLERANCES,
    rtol=TOLERANCES,
    max_steps=st.sampled_from([1, 5, 60]),
    compact=st.booleans(),
    index=st.integers(0, 5),
)
def test_fixed_point_sample_does_not_depend_on_its_batch_mates(problem, solver_name, atol, rtol,
                                                               max_steps, compact, index):
    f, z0, x = problem
    z0, x = z0.contiguous(), x.contiguous()
    index = index % z0.shape[0]
    solver = FIXED_POINT_SOLVERS[solver_name]
    kwargs = dict(solver=solver, atol=atol, rtol=rtol, max_steps=max_steps, compact=compact)
    together = eq.fixed_point(f, z0, x, **kwargs)
    alone = eq.fixed_point(f, z0[index : index + 1], x[index : index + 1], **kwargs)
    COUNTS["fixed_point"].cases += 2
    # f is row-exact, so the solver's per-sample arithmetic is all that could differ: equal
    # bits. Except inside GMRES (NewtonKrylov, SteadyState()): its batched triangular solves
    # and products round differently for another batch size (measured: 1-2 ulps in a Newton
    # direction, then a sample may take one step more or less), so there the answers agree
    # as two answers within the tolerance do.
    if solver_name not in GMRES_INSIDE:
        assert alone.status[0] == together.status[index]
        for key in alone.stats:
            assert identical(alone.stats[key][0], together.stats[key][index]), key
        assert identical(alone.value[0], together.value[index])
        return
    both = bool(alone.success[0]) and bool(together.success[index])
    if both and f.contraction < 1:
        size = float(rms64(alone.value)[0])
        bound = 2 * (atol + rtol * size + float(slack(z0.dtype, rms64(alone.value)))) * math.sqrt(
            z0[0].numel()) / (1 - f.contraction)
        gap = float((alone.value[0] - together.value[index]).abs().max())
        assert gap <= bound, (gap, bound)


# --- bad input: a clear error that names the argument ------------------------------------


def _tanh(z, x=None):
    return torch.tanh(0.5 * z + (0 if x is None else x))


@settings(max_examples=120, **SETTINGS)
@given(
    name=st.sampled_from(["atol", "rtol", "divergence_factor", "max_steps", "throw", "compact",
                          "trace"]),
    bad=st.sampled_from(BAD_NUMBERS + BAD_COUNTS + [1.0, "yes", 1]),
    solver_name=st.sampled_from(sorted(FIXED_POINT_SOLVERS)),
    dtype=DTYPES,
)
def test_fixed_point_bad_keyword_is_a_clear_error(name, bad, solver_name, dtype):
    flag = name in ("throw", "compact", "trace")
    if (flag and isinstance(bad, bool)) or (name == "max_steps" and type(bad) is int and bad > 0):
        return  # a valid value
    if not flag and name != "max_steps" and type(bad) in (int, float) and bad > 1 and (
            bad < math.inf):
        return
    if name in ("atol", "rtol") and type(bad) in (int, float) and 0 < bad < math.inf:
        return
    z0 = torch.zeros(2, 3, dtype=dtype)
    expect_clear_error(lambda: eq.fixed_point(_tanh, z0, solver=FIXED_POINT_SOLVERS[solver_name],
                                              **{name: bad}), name)


FIXED_POINT_BAD_CALLS = {
    "z0 int": (lambda: eq.fixed_point(_tanh, torch.zeros(2, 3, dtype=torch.int64)), "z0"),
    "z0 0-dim": (lambda: eq.fixed_point(_tanh, torch.tensor(0.0)), "z0"),
    "z0 nan": (lambda: eq.fixed_point(_tanh, torch.tensor([[0.0, math.nan]])), "z0"),
    "z0 list": (lambda: eq.fixed_point(_tanh, [[0.0, 1.0]]), "z0"),
    "z0 half": (lambda: eq.fixed_point(_tanh, torch.zeros(2, 3, dtype=torch.float16)), "z0"),
    "z0 complex": (lambda: eq.fixed_point(_tanh, torch.zeros(2, 3, dtype=torch.complex64)),
                   "z0"),
    "x batch": (lambda: eq.fixed_point(_tanh, torch.zeros(2, 3), torch.zeros(3, 3)), "x"),
    "x 0-dim": (lambda: eq.fixed_point(_tanh, torch.zeros(2, 3), torch.tensor(1.0)), "x"),
    "x inf": (lambda: eq.fixed_point(_tanh, torch.zeros(1, 3), torch.full((1, 3), math.inf)),
              "x"),
    "x tuple item": (lambda: eq.fixed_point(_tanh, torch.zeros(2, 3), (torch.zeros(2, 3), 1.0)),
                     "x[1]"),
    "x string": (lambda: eq.fixed_point(_tanh, torch.zeros(2, 3), "x"), "x"),
    "solver name": (lambda: eq.fixed_point(_tanh, torch.zeros(2, 3), solver="anderson"),
                    "solver"),
    "solver class": (lambda: eq.fixed_point(_tanh, torch.zeros(2, 3), solver=eq.Anderson),
                     "solver"),
    "f not callable": (lambda: eq.fixed_point(1.0, torch.zeros(2, 3)), "f"),
    "f shape": (lambda: eq.fixed_point(lambda z: z[:, :1], torch.zeros(2, 3)), "f"),
    "f dtype": (lambda: eq.fixed_point(lambda z: z.double(), torch.zeros(2, 3)), "f"),
    "f none": (lambda: eq.fixed_point(lambda z: None, torch.zeros(2, 3)), "f"),
    "unknown keyword": (lambda: eq.fixed_point(_tanh, torch.zeros(2, 3), tol=1e-3), "tol"),
    "throw": (lambda: eq.fixed_point(lambda z: 2 * z + 1, torch.zeros(2, 3), solver=eq.Picard(),
                                     max_steps=3, throw=True), "max_steps"),
    "Picard damping": (lambda: eq.Picard(damping=0.0), "damping"),
    "Picard damping > 1": (lambda: eq.Picard(damping=1.5), "damping"),
    "Anderson m": (lambda: eq.Anderson(m=0), "m"),
    "Anderson regularization": (lambda: eq.Anderson(regularization=-1.0), "regularization"),
    "Anderson damping": (lambda: eq.Anderson(damping=math.nan), "damping"),
    "Broyden memory": (lambda: eq.Broyden(memory=0), "memory"),
    "Broyden alphas": (lambda: eq.Broyden(alphas=(0.5, 1.0)), "alphas"),
    "Broyden growth": (lambda: eq.Broyden(growth=0.5), "growth"),
    "NewtonKrylov eta_max": (lambda: eq.NewtonKrylov(eta_max=1.0), "eta_max"),
    "NewtonKrylov linear_solver": (lambda: eq.NewtonKrylov(linear_solver="gmres"),
                                   "linear_solver"),
    "NewtonKrylov max_backtracks": (lambda: eq.NewtonKrylov(max_backtracks=-1),
                                    "max_backtracks"),
    "SteadyState solver": (lambda: eq.SteadyState("tsit5"), "solver"),
    "SteadyState dt0": (lambda: eq.SteadyState(eq.Tsit5(), dt0=0.0), "dt0"),
    "SteadyState rtol": (lambda: eq.SteadyState(eq.Tsit5(), rtol=-1.0), "rtol"),
    "SteadyState ignored dt0": (lambda: eq.SteadyState(dt0=0.5), "dt0"),
    "ImplicitEuler dt0": (lambda: eq.ImplicitEuler(dt0=0.0), "dt0"),
    "ImplicitEuler dt_max": (lambda: eq.ImplicitEuler(dt_max=-1.0), "dt_max"),
    "GMRES restart": (lambda: eq.GMRES(restart=0), "restart"),
    "GMRES max_iters": (lambda: eq.GMRES(max_iters=1.5), "max_iters"),
    "GMRES atol": (lambda: eq.GMRES(atol=0.0), "atol"),
}


@pytest.mark.parametrize("call, name", list(FIXED_POINT_BAD_CALLS.values()),
                         ids=list(FIXED_POINT_BAD_CALLS))
def test_fixed_point_bad_call_is_a_clear_error(call, name):
    expect_clear_error(call, name)


# --- reproducers of the bugs the properties found -------------------------------------------


@pytest.mark.parametrize("solver", [eq.SteadyState(), eq.SteadyState(eq.Tsit5())],
                         ids=["implicit", "tsit5"])
def test_steady_state_t_is_present_when_z0_passes(solver):
    solution = eq.fixed_point(lambda z: z, torch.zeros(2, 3), solver=solver)
    assert solution.success.all()
    assert torch.equal(solution.stats["t"], torch.zeros(2))


def test_tiny_float32_residual_is_not_read_as_zero():
    def f(z):
        return 0.5 * z + 1e-30

    solution = eq.fixed_point(f, torch.zeros(1, 4), solver=eq.Picard(), atol=1e-35, rtol=1e-6)
    # observed: SUCCESS at step 0 (value 0, stats residual 0); the residual there is 1e-30
    true_residual = rms64(f(solution.value) - solution.value)
    torch.testing.assert_close(solution.stats["residual"].double(), true_residual,
                               rtol=1e-3, atol=0)


@pytest.mark.parametrize("solver", [eq.NewtonKrylov(), eq.Broyden()], ids=["newton-krylov",
                                                                           "broyden"])
def test_unrolled_gradient_of_an_exactly_converged_sample_is_finite(solver):
    def f(z, x):  # sample 0 linear (Newton/Broyden land exactly), sample 1 not
        shift, weight = x[:, :1], x[:, 1:]
        return 0.5 * z + shift + weight * torch.tanh(z)

    x = torch.tensor([[1.0, 0.0], [1.0, 0.4]], dtype=torch.float64, requires_grad=True)
    solution = eq.fixed_point(f, torch.zeros(2, 1, dtype=torch.float64), x, solver=solver,
                              atol=1e-12, rtol=1e-12)
    assert solution.success.all() and solution.stats["residual"][0] == 0
    (gradient,) = torch.autograd.grad(solution.value.sum(), x)
    assert torch.isfinite(gradient).all()  # observed: row 0 NaN
