"""Property-based tests (hypothesis) of fixed_point, odeint and DEQ: the contract on random inputs.

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
come from the solver. Examples are bounded and derandomized: the file runs in seconds on one
core and every failure reproduces.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import equilibria as eq
from equilibria import Status

# Function-scoped autouse fixtures (conftest's seeding) run once per test, not per example:
# the examples build their tensors from their own seeds, so that is what is wanted.
SETTINGS = dict(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    print_blob=True,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors on a shared machine: intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- shared strategies --------------------------------------------------------------------

DTYPES = st.sampled_from([torch.float32, torch.float64])
SAMPLE_SHAPES = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)
BATCHES = st.sampled_from([0, 1, 2, 3, 6])
LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced", "expanded"])
# very tight (below float32's and even float64's reach for rtol) to very loose
TOLERANCES = st.sampled_from([1e-15, 1e-12, 1e-8, 1e-5, 1e-3, 1e-1, 10.0])
SEEDS = st.integers(0, 2**31 - 1)
# Magnitudes of the data, float32's extremes included: 1e20 (squares overflow: norms must be
# taken wider) and 1e-15. Below ~1e-19 float32 squares underflow, which the library does not
# handle yet: see test_tiny_float32_residual_is_not_read_as_zero.
SCALES = st.sampled_from([1e-15, 1e-3, 1.0, 1e3, 1e20])

FIXED_POINT_SOLVERS = {
    "picard": eq.Picard(),
    "picard-damped": eq.Picard(damping=0.6),
    "anderson": eq.Anderson(),
    "anderson-m2": eq.Anderson(m=2, damping=0.8),
    "broyden": eq.Broyden(),
    "newton-krylov": eq.NewtonKrylov(),
    "steady-implicit": eq.SteadyState(),
    "steady-tsit5": eq.SteadyState(eq.Tsit5()),
}
# Solvers whose nfe counts the batched GMRES products made on a sample's row after it finished
# its own Krylov iteration (documented: GMRES stats["nmatvec"]).
GMRES_INSIDE = {"newton-krylov", "steady-implicit"}
# The bug of test_unrolled_gradient_of_an_exactly_converged_sample_is_finite.
NAN_WHEN_UNROLLED = {"newton-krylov", "broyden"}
FIXED_POINT_STATUSES = {int(s) for s in (Status.SUCCESS, Status.MAX_STEPS, Status.DIVERGED,
                                         Status.NONFINITE)}
ODE_STATUSES = {int(s) for s in (Status.SUCCESS, Status.MAX_STEPS, Status.NONFINITE,
                                 Status.STEP_SIZE_TOO_SMALL)}


def rms64(tensor: torch.Tensor) -> torch.Tensor:
    """Per-sample RMS in float64 (the independent recomputation), scaled by the row's largest
    magnitude so that neither overflow nor underflow of the squares can touch it."""
    flat = tensor.detach().double().reshape(tensor.shape[0], -1)
    if flat.shape[1] == 0:
        return flat.new_zeros(flat.shape[0])
    peak = flat.abs().amax(dim=1, keepdim=True)
    peak = torch.where((peak > 0) & torch.isfinite(peak), peak, torch.ones_like(peak))
    return (flat / peak).pow(2).mean(dim=1).sqrt() * peak.squeeze(1)


def frames(batches=BATCHES):
    """(dtype, sample shape, batch size, seed) of one example."""
    return st.tuples(DTYPES, SAMPLE_SHAPES, batches, SEEDS)


def relayout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """A non-contiguous view with `tensor`'s shape ("expanded": every row equal to row 0)."""
    if layout == "transposed":
        return tensor.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "sliced":
        wide = tensor.new_zeros(*tensor.shape[:-1], 2 * tensor.shape[-1])
        wide[..., ::2] = tensor
        return wide[..., ::2]
    if layout == "expanded" and tensor.shape[0] > 0:
        return tensor[:1].expand_as(tensor)
    return tensor


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise-equal values (NaN equal to NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(
        ((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def uniform(shape, low, high, seed, dtype=torch.float64) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator(seed), dtype=torch.float64
                                           ).to(dtype)


# --- fixed_point ---------------------------------------------------------------------------


@dataclass
class Map:
    """f(z, x) = x + coef * h(roll(z)) with h = identity or tanh (1-Lipschitz): a contraction
    of factor max|coef| in the max norm when that is < 1; row-exact in any batch. NaN where
    |z| > limit (a map that blows up away from its fixed point, e.g. a log or a sqrt). Its
    output is strided like `out_layout` (a permuted or sliced view, same values)."""

    coef: torch.Tensor  # the sample shape
    nonlinear: bool
    limit: float = math.inf
    out_layout: str = "contiguous"

    def __call__(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mixed = z.roll(1, dims=-1)
        if self.nonlinear:
            mixed = torch.tanh(mixed)
        out = x + self.coef * mixed
        if self.limit < math.inf:
            out = torch.where(z.abs() > self.limit, math.nan, out)
        return relayout(out, self.out_layout)

    def double(self) -> Map:
        return Map(self.coef.double(), self.nonlinear, self.limit)

    @property
    def contraction(self) -> float:
        return float(self.coef.abs().max())


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


def slack(dtype: torch.dtype, *scales: torch.Tensor) -> torch.Tensor:
    """What float rounding may move a residual by: the solver forms f(z) - z (and the ODE path
    f(z) = (f(z) - z) + z) in the state's dtype, so each element carries an error of a few
    ulps of |z| and |f(z)|. 16 ulps of the RMS of both, per sample."""
    return 16 * torch.finfo(dtype).eps * sum(scales)


@dataclass
class Counts:
    cases: int = 0
    clear_errors: int = 0
    statuses: dict | None = None

    def status(self, codes: torch.Tensor) -> None:
        self.statuses = self.statuses or {}
        for code in codes.tolist():
            name = Status(code).name
            self.statuses[name] = self.statuses.get(name, 0) + 1


COUNTS = {"fixed_point": Counts(), "odeint": Counts(), "deq": Counts(), "bad_input": Counts()}


def check_fixed_point_contract(f, z0, x, solution, atol, rtol, max_steps, solver) -> None:
    """The documented shapes, and stats / statuses that the float64 recomputation confirms."""
    batch = z0.shape[0]
    value, status, stats = solution.value, solution.status, solution.stats
    assert value.shape == z0.shape and value.dtype == z0.dtype and value.device == z0.device
    assert status.shape == (batch,) and status.dtype == torch.int64
    assert set(status.tolist()) <= FIXED_POINT_STATUSES
    for key in ("n_steps", "nfe"):
        assert stats[key].shape == (batch,) and stats[key].dtype == torch.int64, key
    assert stats["residual"].shape == (batch,) and stats["residual"].dtype == z0.dtype
    if isinstance(solver, eq.SteadyState):
        if "t" not in stats:  # the bug of test_steady_state_t_is_missing_when_z0_passes
            assert bool((stats["n_steps"] == 0).all())
        else:
            assert stats["t"].shape == (batch,) and bool((stats["t"] >= 0).all())
    if batch == 0:
        return
    n_steps, nfe = stats["n_steps"], stats["nfe"]
    assert bool((n_steps >= 0).all()) and bool((n_steps <= max_steps).all())
    assert bool((nfe >= n_steps + 1).all()), (nfe, n_steps)  # the initial evaluation counted
    # Every iterate the solver returns is finite (z0 is): NONFINITE keeps the best finite one.
    assert bool(torch.isfinite(value).all())

    fz = f(value, x)
    true_residual = rms64(fz.double() - value.double())
    size = rms64(value)
    allowed = slack(z0.dtype, size, rms64(fz))
    reported = stats["residual"].double()
    # stats["residual"] is the residual at the returned value (NaN where f is NaN there: a
    # NONFINITE sample whose best iterate is z0)
    finite = torch.isfinite(reported)
    assert torch.equal(finite, torch.isfinite(true_residual)), (reported, true_residual)
    assert bool((status[~finite] == int(Status.NONFINITE)).all())
    gap = (reported - true_residual).abs()
    assert bool((gap[finite] <= allowed[finite] + 1e-300).all()), (
        "stats['residual'] is not the residual at the value", reported, true_residual)
    # a SUCCESS sample passes its tolerance test when checked again
    success = status == int(Status.SUCCESS)
    passes = true_residual <= atol + rtol * size + allowed
    assert bool(passes[success].all()), ("SUCCESS sample fails its test", true_residual,
                                         atol + rtol * size)
    # ... and a MAX_STEPS / DIVERGED sample really did not pass it (up to the same slack)
    failed = (status == int(Status.MAX_STEPS)) | (status == int(Status.DIVERGED))
    strict = true_residual > atol + rtol * size - allowed
    assert bool(strict[failed].all()), ("a failed sample passes its test", status, true_residual)
    # a failed sample returns its best iterate: never worse than the start (a SUCCESS may
    # have a larger residual than z0 had, with a larger tolerance rtol * rms(z) that it passes)
    start = rms64(f(z0, x).double() - z0.double())
    no_worse = true_residual <= start + allowed + slack(z0.dtype, rms64(z0))
    assert bool(no_worse[torch.isfinite(start) & ~success].all())
    # a contraction with a fixed point converges from anywhere: SUCCESS is reachable when the
    # tolerance is above the rounding floor; the answer is then within tol / (1 - c) of z*
    if isinstance(f, Map) and f.contraction <= 0.5:
        bound = (atol + rtol * size + allowed) / (1 - f.contraction)
        refined = eq.fixed_point(f.double(), value.double(), x.double(), solver=eq.Picard(),
                                 atol=1e-300, rtol=1e-15, max_steps=80)
        distance = (value.double() - refined.value).abs().reshape(batch, -1).amax(dim=1)
        # max-norm contraction: |z - z*|_max <= |f(z) - z|_max / (1 - c), and the max norm of
        # the residual is at most sqrt(n) times its RMS
        width = value[0].numel()
        bound = bound * math.sqrt(width)
        assert bool((distance[success] <= 2 * bound[success]).all()), (distance, bound)


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
)
def test_odeint_t_eval_and_terminate_tell_the_truth(problem, solver_name, rtol, max_steps,
                                                    fractions, threshold):
    """Dense output at t_eval agrees with exp(a t) y0 like the steps do; a sample that stopped
    early (MAX_STEPS, or EVENT from terminate = "max |y| fell below threshold |y0|") holds its
    final value at the later points; an EVENT sample satisfies its condition at stats["t"]."""
    field, y0, rates, t_span = problem
    t0, t1 = t_span
    times = list(dict.fromkeys(t0 + (t1 - t0) * f for f in sorted(fractions)))  # towards t1
    batch = y0.shape[0]
    start = y0.detach().abs().flatten(1).amax(dim=1) if batch else None

    def terminate(t, y, dydt):  # compact=False: every row, every time
        return y.abs().flatten(1).amax(dim=1) < threshold * start

    solution = eq.odeint(field, y0, t_span, solver=ADAPTIVE[solver_name], rtol=rtol,
                         atol=rtol * 1e-2, t_eval=times, max_steps=max_steps, args=(rates,),
                         terminate=terminate if threshold else None, compact=False)
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
        assert bool((last < threshold * start[held]).all())


# --- DEQ -----------------------------------------------------------------------------------


class Cell(nn.Module):
    """f(z, x) = tanh(W z + U x + b) on the last dim, ||W||_2 = contraction (< 1 contractive);
    rows (and every leading index of a sample) independent."""

    def __init__(self, width: int, contraction: float, dtype: torch.dtype, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.W = nn.Linear(width, width, bias=False, dtype=dtype)
        self.U = nn.Linear(width, width, dtype=dtype)
        with torch.no_grad():
            self.W.weight.mul_(contraction / torch.linalg.matrix_norm(self.W.weight.double(), 2)
                               .to(dtype))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.W(z) + self.U(x))


BACKWARDS = {
    "implicit": eq.Implicit(),
    "implicit-anderson": eq.Implicit(linear_solver=eq.Anderson()),
    "unrolled": eq.Unrolled(),
    "one-step": eq.OneStep(),
    "phantom": eq.Phantom(k=3, damping=0.5),
}


@settings(max_examples=150, **SETTINGS)
@given(
    frame=frames(),
    layout=LAYOUTS,
    contraction=st.sampled_from([0.3, 0.9, 1.3]),
    solver_name=st.sampled_from(sorted(FIXED_POINT_SOLVERS)),
    backward_name=st.sampled_from(sorted(BACKWARDS)),
    atol=st.sampled_from([1e-12, 1e-6, 1e-2]),
    rtol=st.sampled_from([1e-12, 1e-4, 1e-1]),
    max_steps=st.sampled_from([1, 5, 40]),
    grad=st.booleans(),
)
def test_deq_output_last_solution_and_gradient(frame, layout, contraction, solver_name,
                                               backward_name, atol, rtol, max_steps, grad):
    dtype, shape, batch, seed = frame
    cell = Cell(shape[-1], contraction, dtype, seed)
    solver = FIXED_POINT_SOLVERS[solver_name]
    backward = BACKWARDS[backward_name]
    deq = eq.DEQ(cell, solver=solver, backward=backward, atol=atol, rtol=rtol,
                 max_steps=max_steps)
    x = relayout(torch.randn((batch, *shape), generator=generator(seed), dtype=torch.float64)
                 .to(dtype), layout).requires_grad_(grad)
    with torch.set_grad_enabled(grad), warnings_ignored():
        z = deq(x)
    COUNTS["deq"].cases += 1
    solution = deq.last_solution
    COUNTS["deq"].status(solution.status)
    assert z.shape == x.shape and z.dtype == dtype
    with torch.no_grad():
        check_fixed_point_contract(cell, x.new_zeros(x.shape), x.detach(), solution, atol, rtol,
                                   max_steps, solver)
    assert not solution.value.requires_grad
    if batch == 0:
        return
    residual = solution.stats["residual"].double()
    allowed = slack(dtype, rms64(solution.value), rms64(z))
    moved = rms64(z.detach().double() - solution.value.double())
    finite = torch.isfinite(residual)
    if not grad or backward_name == "unrolled":
        assert identical(z.detach(), solution.value)  # the solver's z* itself
    elif backward_name.startswith("implicit") or backward_name == "one-step":
        # z = f(z*, x): one step from z*, by exactly the residual
        assert bool(((moved - residual).abs() <= allowed)[finite].all()), (moved, residual)
    else:  # phantom: k damped steps from z*, each at most the (shrinking or growing) residual
        assert bool((moved <= backward.k * (1 + contraction) ** backward.k * residual
                     + allowed)[finite].all())
    if not grad:
        return
    weights = torch.randn(z.shape, generator=generator(seed + 1), dtype=torch.float64).to(dtype)
    with warnings_ignored():
        (z * weights).sum().backward()
    stats = deq.last_backward_stats
    assert stats is not None and stats["status"].shape == (batch,)
    assert stats["nfe"].shape == (batch,) and bool((stats["nfe"] >= 1).all())
    # a finite, correctly shaped gradient wherever the solves succeeded
    fine = solution.success & (stats["status"] == int(Status.SUCCESS))
    assert x.grad is not None and x.grad.shape == x.shape
    assert bool(torch.isfinite(x.grad[fine]).all())
    if bool(fine.all()):
        for parameter in cell.parameters():
            assert parameter.grad is not None and bool(torch.isfinite(parameter.grad).all())


@contextlib.contextmanager
def warnings_ignored():
    """The backward's RuntimeWarning on failed linear solves is expected for some examples
    (their status says so); the stats are what is checked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


IMPLICIT_LINEAR_SOLVERS = {
    # (strategy, the relative accuracy its linear solve promises)
    "gmres-default": (eq.Implicit(), 1e-6),
    "gmres-tight": (eq.Implicit(linear_solver=eq.GMRES(rtol=1e-11, atol=1e-14)), 1e-11),
    "anderson": (eq.Implicit(linear_solver=eq.Anderson(), atol=1e-12, rtol=1e-11,
                             max_steps=300), 1e-11),
}


@settings(max_examples=30, **SETTINGS)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple),
    batch=st.integers(1, 3),
    seed=SEEDS,
    contraction=st.sampled_from([0.2, 0.5, 0.8]),
    solver_name=st.sampled_from(["anderson", "broyden", "newton-krylov", "picard",
                                 "steady-implicit"]),
    linear_name=st.sampled_from(sorted(IMPLICIT_LINEAR_SOLVERS)),
)
def test_deq_implicit_gradient_matches_finite_differences(shape, batch, seed, contraction,
                                                          solver_name, linear_name):
    """float64, contractive cell: d/ds L(x + s v) and d/ds L(W + s V) at s = 0 by central
    differences (h = 1e-5: truncation ~1e-10, forward-solve noise 1e-13 / h ~ 1e-8, both
    relative to sum|dL/dz| max|v|) against the Implicit gradient's directional derivative, to
    the linear solve's accuracy. (Measured: the worst gap is 3% of this bound.)"""
    cell = Cell(shape[-1], contraction, torch.float64, seed)
    backward, accuracy = IMPLICIT_LINEAR_SOLVERS[linear_name]
    deq = eq.DEQ(cell, solver=FIXED_POINT_SOLVERS[solver_name], backward=backward,
                 atol=1e-13, rtol=1e-13, max_steps=500)
    x = torch.randn((batch, *shape), generator=generator(seed), dtype=torch.float64)
    weights = torch.randn(x.shape, generator=generator(seed + 1), dtype=torch.float64)
    x_direction = torch.randn(x.shape, generator=generator(seed + 2), dtype=torch.float64)
    w_direction = torch.randn(cell.W.weight.shape, generator=generator(seed + 3),
                              dtype=torch.float64)

    def loss(inputs: torch.Tensor) -> torch.Tensor:
        return (deq(inputs) * weights).sum()

    inputs = x.clone().requires_grad_(True)
    loss(inputs).backward()
    assert bool(deq.last_solution.success.all())
    assert bool((deq.last_backward_stats["status"] == int(Status.SUCCESS)).all())
    analytic_x = float((inputs.grad * x_direction).sum())
    analytic_w = float((cell.W.weight.grad * w_direction).sum())
    h = 1e-5
    with torch.no_grad():
        numeric_x = float(loss(x + h * x_direction) - loss(x - h * x_direction)) / (2 * h)
        weight = cell.W.weight.clone()
        cell.W.weight.copy_(weight + h * w_direction)
        plus = float(loss(x))
        cell.W.weight.copy_(weight - h * w_direction)
        minus = float(loss(x))
        cell.W.weight.copy_(weight)
        numeric_w = (plus - minus) / (2 * h)
    COUNTS["deq"].cases += 5
    # the adjoint's relative error is at most accuracy * cond(I - df/dz) <= accuracy / (1 - c)
    scale = float(weights.abs().sum()) * (float(x_direction.abs().max()) +
                                          float(w_direction.abs().max()))
    tolerance = (10 * accuracy / (1 - contraction) + 1e-8) * scale
    assert abs(analytic_x - numeric_x) <= tolerance, (analytic_x, numeric_x, tolerance)
    assert abs(analytic_w - numeric_w) <= tolerance, (analytic_w, numeric_w, tolerance)


# --- bad input: a clear error that names the argument ------------------------------------

BAD_NUMBERS = [0, 0.0, -1e-6, math.nan, math.inf, -math.inf, True, "1e-6", None,
               torch.tensor([1e-6, 1e-6])]
BAD_COUNTS = [0, -3, 1.5, True, "10", None, math.inf]


def expect_clear_error(call, name: str) -> None:
    """TypeError / ValueError / EquilibriaError whose message names `name`: never a raw error
    from inside torch, an assert, or a silently accepted value."""
    with pytest.raises((TypeError, ValueError, eq.EquilibriaError)) as caught:
        call()
    assert name in str(caught.value), (name, str(caught.value))
    COUNTS["bad_input"].cases += 1
    COUNTS["bad_input"].clear_errors += 1


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



def _cell() -> Cell:
    return Cell(3, 0.5, torch.float64, 0)


def _deq_call(x, **kwargs):
    return lambda: eq.DEQ(_cell(), **kwargs)(x)


_X = torch.zeros(2, 3, dtype=torch.float64)
DEQ_BAD_CALLS = {
    "f_module function": (lambda: eq.DEQ(torch.tanh), "f_module"),
    "init function": (lambda: eq.DEQ(_cell(), init=torch.tanh), "init"),
    "solver name": (lambda: eq.DEQ(_cell(), solver="anderson"), "solver"),
    "solver ode": (lambda: eq.DEQ(_cell(), solver=eq.Tsit5()), "solver"),
    "backward name": (lambda: eq.DEQ(_cell(), backward="implicit"), "backward"),
    "atol": (lambda: eq.DEQ(_cell(), atol=0.0), "atol"),
    "rtol": (lambda: eq.DEQ(_cell(), rtol=math.nan), "rtol"),
    "max_steps": (lambda: eq.DEQ(_cell(), max_steps=0), "max_steps"),
    "z_shape": (lambda: eq.DEQ(_cell(), z_shape=(0,)), "z_shape"),
    "z_shape int": (lambda: eq.DEQ(_cell(), z_shape=3), "z_shape"),
    "compact": (lambda: eq.DEQ(_cell(), compact="yes"), "compact"),
    "throw": (lambda: eq.DEQ(_cell(), throw=1), "throw"),
    "spectral_radius_iters": (lambda: eq.DEQ(_cell(), spectral_radius_iters=-1),
                              "spectral_radius_iters"),
    "unknown keyword": (lambda: eq.DEQ(_cell(), tol=1e-3), "tol"),
    "Implicit linear_solver": (lambda: eq.Implicit(linear_solver="gmres"), "linear_solver"),
    "Implicit atol with GMRES": (lambda: eq.Implicit(atol=1e-6), "atol"),
    "Phantom k": (lambda: eq.Phantom(k=0), "k"),
    "Phantom damping": (lambda: eq.Phantom(damping=2.0), "damping"),
    "x string": (_deq_call("x"), "x"),
    "x none without z0": (_deq_call(None), "z0"),
    "x int without z_shape": (_deq_call(torch.zeros(2, 3, dtype=torch.int64)), "z_shape"),
    "z0 shape": (lambda: eq.DEQ(_cell())(_X, z0=torch.zeros(2, 4, dtype=torch.float64)), "z0"),
    "z0 list": (lambda: eq.DEQ(_cell())(_X, z0=[[0.0] * 3] * 2), "z0"),
    "x nan": (_deq_call(torch.full((2, 3), math.nan, dtype=torch.float64)), "x"),
    "throw on failure": (_deq_call(_X + 1, max_steps=1, atol=1e-15, rtol=1e-15, throw=True),
                         "max_steps"),
}


@pytest.mark.parametrize("call, name", list(DEQ_BAD_CALLS.values()), ids=list(DEQ_BAD_CALLS))
def test_deq_bad_call_is_a_clear_error(call, name):
    expect_clear_error(call, name)


# --- reproducers of the bugs the properties found -------------------------------------------


@pytest.mark.xfail(strict=True, reason="stats['t'] of SteadyState is missing when every sample "
                   "passes its test at z0 (present for an empty batch and otherwise)")
@pytest.mark.parametrize("solver", [eq.SteadyState(), eq.SteadyState(eq.Tsit5())],
                         ids=["implicit", "tsit5"])
def test_steady_state_t_is_missing_when_z0_passes(solver):
    solution = eq.fixed_point(lambda z: z, torch.zeros(2, 3), solver=solver)
    assert solution.success.all()
    assert torch.equal(solution.stats["t"], torch.zeros(2))


@pytest.mark.xfail(strict=True, reason="odeint(dt0=True) runs with dt0=1 (abs(True) = 1 passes "
                   "check_positive, which refuses bools everywhere else)")
def test_odeint_dt0_true_is_refused():
    with pytest.raises(TypeError, match="dt0"):
        eq.odeint(_decay, torch.ones(1, 1), solver=eq.RK4(), dt0=True)


@pytest.mark.xfail(strict=True, reason="odeint accepts a float16 y0 (fixed_point refuses half "
                   "states with the fix) and reports NONFINITE on y' = -y: the default atol "
                   "1e-8 underflows to 0 in float16")
def test_odeint_half_state_is_refused_like_fixed_points():
    y0 = torch.ones(2, 3, dtype=torch.float16)
    solution = eq.odeint(_decay, y0)  # observed: status NONFINITE, t = 0, y = y0
    assert solution.status.tolist() != [int(Status.NONFINITE)] * 2
    with pytest.raises(TypeError, match="y0"):
        eq.odeint(_decay, y0)


@pytest.mark.xfail(strict=True, reason="odeint reports NONFINITE for a finite f when atol and "
                   "rtol underflow in the state's dtype (err / 0 = inf is read as f's inf)")
def test_odeint_tolerances_below_the_dtype_are_not_reported_as_nonfinite():
    solution = eq.odeint(_decay, torch.ones(2, 3), rtol=1e-300, atol=1e-300)
    # observed: NONFINITE after 10 rejected steps at t = 0 (its fix: "f returned inf or NaN")
    assert not (solution.status == int(Status.NONFINITE)).any()


@pytest.mark.xfail(strict=True, reason="odeint(t_span=(tensor of 2, tensor of 2)) raises torch's "
                   "raw 'only one element tensors can be converted' without naming t_span")
def test_odeint_batched_t_span_names_t_span():
    with pytest.raises((TypeError, ValueError), match="t_span"):
        eq.odeint(_decay, torch.ones(2, 3), (torch.zeros(2), torch.ones(2)))


@pytest.mark.xfail(strict=True, reason="rms_norm squares underflow in float32 (elements below "
                   "~1e-19): a residual of 1e-30 reads as 0, a false SUCCESS and a false "
                   "stats['residual']")
def test_tiny_float32_residual_is_not_read_as_zero():
    def f(z):
        return 0.5 * z + 1e-30

    solution = eq.fixed_point(f, torch.zeros(1, 4), solver=eq.Picard(), atol=1e-35, rtol=1e-6)
    # observed: SUCCESS at step 0 (value 0, stats residual 0); the residual there is 1e-30
    true_residual = rms64(f(solution.value) - solution.value)
    torch.testing.assert_close(solution.stats["residual"].double(), true_residual,
                               rtol=1e-3, atol=0)


@pytest.mark.xfail(strict=True, reason="Implicit backward: rms(g) underflows to 0 for a float32 "
                   "loss below ~1e-22, so the adjoint system is not normalised and its absolute "
                   "tolerance passes at u = g: the OneStep gradient, with status SUCCESS")
def test_implicit_gradient_of_a_tiny_float32_loss_is_the_gradient():
    cell = Cell(4, 0.5, torch.float32, 0)
    x = torch.randn(2, 4, generator=generator(0))
    deq = eq.DEQ(cell)

    def weight_gradient(scale: float) -> torch.Tensor:
        cell.zero_grad()
        (deq(x).sum() * scale).backward()
        assert bool((deq.last_backward_stats["status"] == int(Status.SUCCESS)).all())
        return cell.W.weight.grad / scale

    reference = weight_gradient(1.0)
    # observed: 40-70% off (it equals the OneStep gradient), status SUCCESS, no warning
    torch.testing.assert_close(weight_gradient(1e-25), reference, rtol=1e-3, atol=1e-4)


@pytest.mark.xfail(strict=True, reason="differentiating through NewtonKrylov / Broyden: a sample "
                   "that converged exactly (residual 0) while a batch-mate runs on gets a NaN "
                   "gradient (the frozen row's step divides by its zero residual; torch.where "
                   "passes 0 * NaN back); through a DEQ(backward=Unrolled()) every parameter's")
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
