"""Shared strategies and independent checks of the property-based tests (test_properties*.py).

Everything here recomputes what the library reports, in float64 and without the library's
helpers: rms64 for residuals, the tolerance test, and the status/stats contract of a
fixed-point Solution. See test_properties.py for the contract itself.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck
from hypothesis import strategies as st

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
    "broyden-retry": eq.Broyden(memory=3, alphas=(1.0, 0.5), growth=1.0),
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


@contextlib.contextmanager
def warnings_ignored():
    """The backward's RuntimeWarning on failed linear solves is expected for some examples
    (their status says so); the stats are what is checked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
