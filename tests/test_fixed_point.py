"""fixed_point(): every solver on problems with known answers; per-sample semantics; errors."""

from __future__ import annotations

import pytest
import torch

import equilibria as eq
from equilibria._solution import Status
from fixed_point_problems import (
    COS_FIXED_POINT,
    contractive_linear,
    cos_problem,
    divergent_problem,
    linear_problem,
    robust_linear,
)

SOLVERS = [
    pytest.param(eq.Picard(), id="picard"),
    pytest.param(eq.Picard(damping=0.8), id="picard-damped"),
    pytest.param(eq.Anderson(), id="anderson"),
    pytest.param(eq.Anderson(m=3, damping=0.9), id="anderson-m3"),
    pytest.param(eq.Broyden(), id="broyden"),
    pytest.param(eq.NewtonKrylov(), id="newton-krylov"),
    pytest.param(eq.SteadyState(), id="steady-implicit-euler"),
    pytest.param(eq.SteadyState(eq.Tsit5()), id="steady-tsit5"),
    pytest.param(eq.SteadyState(eq.Kvaerno3()), id="steady-kvaerno3"),
    pytest.param(eq.SteadyState(eq.Kvaerno5()), id="steady-kvaerno5"),
]


@pytest.mark.parametrize("solver", SOLVERS)
def test_cos_to_1e10(solver):
    problem = cos_problem()
    sol = eq.fixed_point(problem.f, problem.z0, solver=solver, atol=1e-10, rtol=1e-10,
                         max_steps=500)
    assert bool((sol.status == Status.SUCCESS).all())
    assert (sol.value - COS_FIXED_POINT).abs().max() < 1e-9
    assert bool((sol.stats["residual"] <= 1e-10 + 1e-10 * COS_FIXED_POINT).all())
    assert bool((sol.stats["nfe"] >= sol.stats["n_steps"] + 1).all())


@pytest.mark.parametrize("solver", SOLVERS)
def test_linear_matches_closed_form(solver):
    problem = contractive_linear()
    sol = eq.fixed_point(problem.f, problem.z0, problem.x, solver=solver, atol=1e-12,
                         rtol=1e-12, max_steps=2000)
    assert bool((sol.status == Status.SUCCESS).all())
    torch.testing.assert_close(sol.value, problem.solution, atol=1e-9, rtol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_sample_alone_equals_sample_in_batch(solver):
    # Row-by-row f: a row's f is then bit-identical in any batch, so every difference would
    # come from the solver mixing samples. (With a matmul f, adaptive solvers amplify the
    # last-bit differences of BLAS blocking into differences of the order of the tolerance.)
    easy = contractive_linear(batch=3, seed=3, exact_rows=True)
    # A hard batch-mate: same A, a right-hand side 1e3 times larger and a far-away start.
    x = torch.cat([easy.x, 1e3 * easy.x[:1]])
    z0 = torch.cat([easy.z0, 50 * torch.ones_like(easy.z0[:1])])
    kwargs = dict(atol=1e-10, rtol=1e-10, max_steps=3000)
    together = eq.fixed_point(easy.f, z0, x, solver=solver, **kwargs)
    for i in range(3):
        alone = eq.fixed_point(easy.f, easy.z0[i : i + 1], easy.x[i : i + 1], solver=solver,
                               **kwargs)
        assert alone.stats["n_steps"][0] == together.stats["n_steps"][i]
        torch.testing.assert_close(alone.value[0], together.value[i], atol=1e-12, rtol=0)


# Root-finders see the unstable fixed point z = -1 of f = 2z + 1 as an ordinary root and
# (correctly) converge to it; iterations that follow the flow (Picard, the ODE) run away.
ROOT_FINDERS = ("Anderson", "Broyden", "NewtonKrylov")


@pytest.mark.parametrize("solver", SOLVERS)
def test_divergent_samples_flagged_others_converge(solver):
    problem = divergent_problem()
    sol = eq.fixed_point(problem.f, problem.z0, problem.x, solver=solver, max_steps=200)
    flags = problem.x
    assert bool((sol.status[~flags] == Status.SUCCESS).all())
    assert bool(torch.isfinite(sol.value).all())
    torch.testing.assert_close(sol.value[~flags], torch.full_like(sol.value[~flags],
                               COS_FIXED_POINT), atol=1e-5, rtol=0)
    if type(solver).__name__ in ROOT_FINDERS:
        assert bool((sol.status[flags] == Status.SUCCESS).all())
        # |z + 1| = |f(z) - z| <= atol + rtol |z| = 2e-6 at the default tolerances.
        torch.testing.assert_close(sol.value[flags], -torch.ones_like(sol.value[flags]),
                                   atol=2.1e-6, rtol=0)
        return
    if isinstance(solver, eq.SteadyState) and isinstance(solver.solver, eq.ImplicitEuler):
        # Implicit Euler with dt > 1 / (2 - 1) on the unstable mode dz/dt = z + 1 steps
        # *towards* its equilibrium (z_new + 1 = (z + 1) / (1 - dt)): pseudo-transient
        # continuation, like Newton, finds the unstable fixed point z = -1.
        assert bool((sol.status[flags] == Status.SUCCESS).all())
        torch.testing.assert_close(sol.value[flags], -torch.ones_like(sol.value[flags]),
                                   atol=2.1e-6, rtol=0)
        # With a first step below 1 it follows the unstable flow instead, shrinking dt as the
        # residual grows (SER): no divergence within 200 steps, MAX_STEPS and the best
        # iterate (z0).
        small = eq.fixed_point(problem.f, problem.z0, problem.x, max_steps=200,
                               solver=eq.SteadyState(eq.ImplicitEuler(dt0=0.5)))
        assert bool((small.status[flags] == Status.MAX_STEPS).all())
        assert bool((small.value[flags] == 0).all())
        return
    if isinstance(solver, eq.SteadyState) and isinstance(solver.solver, eq.ImplicitRK):
        # Its first step (dt0 = 1) on dz/dt = z + 1 grows the residual by R(1) ~ 2.7 (the
        # method follows the unstable flow), so it is rejected; from then on dt shrinks as
        # the residual grows (SER), as implicit Euler's with a first step below 1 above:
        # MAX_STEPS and the best iterate (z0), not a run-away.
        assert bool((sol.status[flags] == Status.MAX_STEPS).all())
        assert bool((sol.value[flags] == 0).all())
        return
    assert bool((sol.status[flags] == Status.DIVERGED).all())
    assert float(sol.stats["residual"][flags].max()) <= 1.0  # the best iterate: z0's residual
    with pytest.raises(eq.EquilibriaError, match="DIVERGED.*SteadyState"):
        eq.fixed_point(problem.f, problem.z0, problem.x, solver=solver, max_steps=200,
                       throw=True)


def test_robust_case_picard_diverges():
    problem = robust_linear()
    sol = eq.fixed_point(problem.f, problem.z0, problem.x, solver=eq.Picard(), max_steps=500)
    assert bool((sol.status == Status.DIVERGED).all())


def test_nonfinite_is_a_status_with_best_iterate():
    z0 = torch.ones(2, 3, dtype=torch.float64)
    flag = torch.tensor([False, True])

    def f(z, flag):
        # Sample 1 blows up to inf on its second evaluation.
        return torch.where(flag[:, None] & (z > 1.5), torch.full_like(z, float("inf")),
                           0.5 * z + 1)

    sol = eq.fixed_point(f, z0, flag, solver=eq.Picard(), max_steps=100)
    assert sol.status.tolist() == [Status.SUCCESS, Status.NONFINITE]
    assert bool(torch.isfinite(sol.value).all())


@pytest.mark.parametrize("solver", SOLVERS)
def test_compact_same_result_fewer_rows(solver):
    # Samples converge at very different steps: contraction factors 0.1 ... 0.95.
    # Sample 0 (f = 1) starts at its fixed point and is done before the first step.
    rates = torch.tensor([0.0, 0.1, 0.3, 0.6, 0.95], dtype=torch.float64)
    z0 = torch.ones(5, 3, dtype=torch.float64)
    rows_seen = []

    def f(z, rate):
        rows_seen.append(z.shape[0])
        return rate[:, None] * torch.sin(z) + 1

    full = eq.fixed_point(f, z0, rates, solver=solver, atol=1e-10, rtol=1e-10, max_steps=1000)
    full_rows = sum(rows_seen)
    rows_seen.clear()
    compacted = eq.fixed_point(f, z0, rates, solver=solver, atol=1e-10, rtol=1e-10,
                               max_steps=1000, compact=True)
    assert bool((full.status == Status.SUCCESS).all())
    torch.testing.assert_close(compacted.value, full.value, atol=1e-13, rtol=0)
    assert torch.equal(compacted.stats["n_steps"], full.stats["n_steps"])
    assert torch.equal(compacted.status, full.status)
    # With 5 rows every finished row is dropped at once (on CPU), so f saw exactly the rows
    # that were still running: the per-sample nfe, summed. (Not for the implicit ODE
    # solvers: a batched Newton iteration evaluates f on rows whose stage already converged,
    # which their per-sample nfe does not count, and a vmapped Jacobian is one call of n JVPs.)
    if isinstance(solver.solver if isinstance(solver, eq.SteadyState) else None, eq.ImplicitRK):
        assert sum(rows_seen) < full_rows
    else:
        assert sum(rows_seen) == int(compacted.stats["nfe"].sum()) < full_rows


def test_trace_records_each_step():
    problem = cos_problem(batch=2)
    sol = eq.fixed_point(problem.f, problem.z0, solver=eq.Picard(), trace=True, max_steps=300)
    assert len(sol.trace) == int(sol.stats["n_steps"].max()) + 1
    assert sol.trace[-1].shape == (2,)
    assert float(sol.trace[-1][0]) < float(sol.trace[0][0]) * 1e-4


def test_converged_sample_is_frozen():
    # Sample 0 converges in a few steps; its value must be the iterate at which it passed.
    rates = torch.tensor([0.01, 0.9], dtype=torch.float64)
    z0 = torch.ones(2, 1, dtype=torch.float64)
    sol = eq.fixed_point(lambda z, r: r[:, None] * z, z0, rates, solver=eq.Picard(), atol=1e-8,
                         rtol=1e-8, max_steps=500)
    steps = int(sol.stats["n_steps"][0])
    assert steps == 4  # 0.01**4 = 1e-8 on z, residual 0.99e-8 <= 1e-8
    assert float(sol.value[0, 0]) == pytest.approx(0.01**steps, rel=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
def test_gradient_flows_through_iterations(solver):
    # Unrolled differentiation through the solver's own steps (the DEQ "Unrolled" backward)
    # must approach the implicit-function gradient dz*/db = (I - df/dz)^{-1} at a tight
    # tolerance: z* = 0.5 tanh(z*) + b gives dz*/db = 1 / (1 - 0.5 sech^2 z*) elementwise.
    b = torch.tensor([[0.3, -0.2]], dtype=torch.float64, requires_grad=True)
    sol = eq.fixed_point(lambda z, x: 0.5 * torch.tanh(z) + x, torch.zeros_like(b), b,
                         solver=solver, atol=1e-12, rtol=1e-12, max_steps=500)
    assert bool((sol.status == Status.SUCCESS).all())
    sol.value.sum().backward()
    z = sol.value.detach()
    expected = 1 / (1 - 0.5 / torch.cosh(z) ** 2)
    torch.testing.assert_close(b.grad, expected, atol=1e-9, rtol=0)


def test_no_grad_records_nothing():
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        sol = eq.fixed_point(lambda z: w * z + 1, torch.zeros(2, 2, dtype=torch.float64))
    assert not sol.value.requires_grad


def test_anderson_singular_mixing_system_falls_back():
    # A constant map: after one step every residual is 0 -> a singular Gram matrix; and a
    # map whose residuals are all parallel (rank one history).
    c = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    sol = eq.fixed_point(lambda z: c.expand_as(z), torch.zeros(1, 2, dtype=torch.float64),
                         solver=eq.Anderson(m=4, regularization=0.0), atol=1e-12, rtol=1e-12)
    assert bool((sol.status == Status.SUCCESS).all())
    torch.testing.assert_close(sol.value, c)
    sol = eq.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(2, 3, dtype=torch.float64),
                         solver=eq.Anderson(m=5, regularization=0.0), atol=1e-12, rtol=1e-12)
    assert bool((sol.status == Status.SUCCESS).all())
    torch.testing.assert_close(sol.value, torch.full_like(sol.value, 2.0))


def test_float32_and_shapes():
    z0 = -torch.ones(2, 3, 4)
    sol = eq.fixed_point(lambda z, x: torch.cos(z) + 0 * x[0], z0, (torch.zeros(2, 3, 4),))
    assert sol.value.dtype == torch.float32 and sol.value.shape == (2, 3, 4)
    assert bool((sol.status == Status.SUCCESS).all())


# --- bad input ---------------------------------------------------------------------------

def _f(z, x=None):
    return torch.cos(z)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=torch.zeros(3, 2)), ValueError, "x must have the batch"),
        (dict(x=(torch.zeros(2, 2), torch.zeros(5))), ValueError, r"x\[1\] must have"),
        (dict(x=(torch.zeros(2, 2), 3.0)), TypeError, r"x\[1\] must be a torch.Tensor"),
        (dict(x=torch.full((2, 2), float("nan"))), ValueError, "x contains inf or NaN"),
        (dict(atol=0.0), ValueError, "atol"),
        (dict(rtol=-1.0), ValueError, "rtol"),
        (dict(max_steps=0), ValueError, "max_steps"),
        (dict(max_steps=2.5), TypeError, "max_steps"),
        (dict(solver="anderson"), TypeError, "eq.Picard"),
        (dict(divergence_factor=1.0), ValueError, "divergence_factor"),
        (dict(compact=1), TypeError, "compact"),
    ],
)
def test_bad_input(kwargs, error, match):
    x = kwargs.pop("x", torch.zeros(2, 2))
    with pytest.raises(error, match=match):
        eq.fixed_point(_f, torch.zeros(2, 2), x, **kwargs)


def test_bad_z0_and_f():
    with pytest.raises(ValueError, match="z0 contains inf"):
        eq.fixed_point(_f, torch.tensor([[float("inf")]]))
    with pytest.raises(TypeError, match="z0 must be a floating"):
        eq.fixed_point(_f, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="f returned shape"):
        eq.fixed_point(lambda z: z[:, :1], torch.zeros(2, 2))
    with pytest.raises(ValueError, match="f returned dtype"):
        eq.fixed_point(lambda z: z.double(), torch.zeros(2, 2))
    with pytest.raises(TypeError, match="unexpected keyword"):
        eq.fixed_point(_f, torch.zeros(2, 2), tol=1e-3)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: eq.Picard(damping=0.0), "damping"),
        (lambda: eq.Picard(damping=1.5), "damping"),
        (lambda: eq.Anderson(m=0), "m must be"),
        (lambda: eq.Anderson(regularization=-1.0), "regularization"),
        (lambda: eq.Anderson(damping=2.0), "damping"),
    ],
)
def test_bad_solver_fields(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_linear_problem_helper_is_right():
    problem = linear_problem(torch.tensor([0.5, -0.5, 0.2]), batch=2)
    residual = problem.f(problem.solution, problem.x) - problem.solution
    assert float(residual.abs().max()) < 1e-12


# --- the new solvers' fields and the continuous path -------------------------------------

@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: eq.Broyden(memory=0), ValueError, "memory"),
        (lambda: eq.Broyden(alphas=(0.5, 1.0)), ValueError, "alphas"),
        (lambda: eq.Broyden(alphas=[1.0]), TypeError, "alphas"),
        (lambda: eq.Broyden(growth=0.5), ValueError, "growth"),
        (lambda: eq.NewtonKrylov(linear_solver="gmres"), TypeError, "GMRES"),
        (lambda: eq.NewtonKrylov(eta_max=1.0), ValueError, "eta_max"),
        (lambda: eq.NewtonKrylov(max_backtracks=-1), ValueError, "max_backtracks"),
        (lambda: eq.SteadyState("tsit5"), TypeError, "ImplicitEuler"),
        (lambda: eq.SteadyState(eq.ImplicitEuler(), rtol=1e-4), ValueError, "ImplicitEuler"),
        (lambda: eq.SteadyState(eq.Tsit5(), dt0=0.0), ValueError, "dt0"),
        (lambda: eq.ImplicitEuler(dt0=-1.0), ValueError, "dt0"),
        (lambda: eq.ImplicitEuler(reject_factor=1.0), ValueError, "reject_factor"),
        (lambda: eq.ImplicitEuler(eta_max=1e-9), ValueError, "eta_max"),
    ],
)
def test_bad_new_solver_fields(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("solver", [eq.SteadyState(), eq.SteadyState(eq.Tsit5()),
                                    eq.SteadyState(eq.Dopri5()), eq.SteadyState(eq.Kvaerno3()),
                                    eq.Broyden(),
                                    eq.NewtonKrylov(), eq.Anderson()])
def test_robust_case_flow_converges(solver):
    # Eigenvalues of df/dz down to -1.5: modulus > 1 (Picard diverges, see above) but real
    # part < 1, so the flow dz/dt = f(z) - z is stable.
    problem = robust_linear()
    sol = eq.fixed_point(problem.f, problem.z0, problem.x, solver=solver, atol=1e-10,
                         rtol=1e-10, max_steps=1000)
    assert bool((sol.status == Status.SUCCESS).all())
    torch.testing.assert_close(sol.value, problem.solution, atol=1e-9, rtol=0)


def test_explicit_euler_with_unit_step_is_picard():
    problem = cos_problem()
    picard = eq.fixed_point(problem.f, problem.z0, solver=eq.Picard(), atol=1e-10, rtol=1e-10,
                            max_steps=500)
    euler = eq.fixed_point(problem.f, problem.z0, solver=eq.SteadyState(eq.Euler(), dt0=1.0),
                           atol=1e-10, rtol=1e-10, max_steps=500)
    torch.testing.assert_close(euler.value, picard.value, atol=1e-15, rtol=0)
    assert torch.equal(euler.stats["n_steps"], picard.stats["n_steps"])
    assert torch.equal(euler.stats["t"], picard.stats["n_steps"].double())


def test_steady_state_time_follows_the_flow():
    # dz/dt = -(z - 1): the flow's time to shrink the residual 1e6-fold is ln(1e6) = 13.8.
    # An explicit solver that follows the flow reaches about that t (the last step, near the
    # stability limit dt ~ 3, may overshoot); pseudo-transient continuation takes far larger
    # pseudo-time steps once the residual falls.
    z0 = torch.zeros(2, 1, dtype=torch.float64)
    tsit5 = eq.fixed_point(lambda z: torch.ones_like(z), z0, solver=eq.SteadyState(eq.Tsit5()),
                           atol=1e-6, rtol=1e-12, max_steps=500)
    assert bool((tsit5.status == Status.SUCCESS).all())
    t = tsit5.stats["t"]
    assert bool(((t > 12.0) & (t < 20.0)).all())
    implicit = eq.fixed_point(lambda z: torch.ones_like(z), z0, solver=eq.SteadyState(),
                              atol=1e-6, rtol=1e-12)
    assert bool((implicit.status == Status.SUCCESS).all())
    # Implicit Euler gives r <- r / (1 + dt) and SER dt <- dt (1 + dt): dt = 3, 12, 156,
    # 24492, so residuals 1/4, 1/52, 1/8164 (1.2e-4), ~5e-9 after 4 steps, at t ~ 24663.
    assert implicit.stats["n_steps"].tolist() == [4, 4]
    torch.testing.assert_close(implicit.stats["t"], torch.full((2,), 3.0 + 12 + 156 + 24492,
                               dtype=torch.float64))


def test_newton_krylov_counts_jvps_in_nfe():
    calls = []

    def f(z):
        calls.append(z.shape[0])
        return 0.5 * torch.sin(z) + 1

    z0 = torch.zeros(3, 4, dtype=torch.float64)
    # With autograd recording, JVPs are forward-mode calls of f: every call (value or JVP)
    # was on all 3 rows and is counted once per sample.
    sol = eq.fixed_point(f, z0, solver=eq.NewtonKrylov(), atol=1e-12, rtol=1e-12)
    assert bool((sol.status == Status.SUCCESS).all())
    assert int(sol.stats["nfe"][0]) == len(calls)
    assert int(sol.stats["nfe"][0]) > int(sol.stats["n_steps"][0]) + 1
    # Under no_grad the double-VJP trick makes the same products (same iterates) with a
    # setup of one forward + one VJP per step, counted as 2.
    with torch.no_grad():
        cheap = eq.fixed_point(f, z0, solver=eq.NewtonKrylov(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(cheap.value, sol.value, atol=1e-14, rtol=0)
    assert torch.equal(cheap.stats["n_steps"], sol.stats["n_steps"])
    assert torch.equal(cheap.stats["nfe"], sol.stats["nfe"] + 2 * sol.stats["n_steps"])


def test_jvp_products_match_forward_mode():
    from equilibria.equilibrium._newton_krylov import jvp_of

    w = torch.randn(5, 5, dtype=torch.float64)
    fn = lambda z: torch.tanh(z @ w.T) * z  # noqa: E731
    z, v = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    expected = torch.func.jvp(fn, (z,), (v,))[1]
    with torch.no_grad():
        product, setup = jvp_of(fn, z)
        torch.testing.assert_close(product(v), expected)
        assert setup == 2
        constant, _ = jvp_of(lambda z: torch.ones_like(z), z)
        assert bool((constant(v) == 0).all())


@pytest.mark.parametrize("solver", SOLVERS)
def test_device_path_without_host_syncs_gives_the_same_answer(solver, monkeypatch):
    # On CUDA the loop never takes the CPU fast path and checks "all done?" every 4 steps
    # only. Run that path here on CPU: per-sample results must be identical (a sample is
    # frozen exactly when it passes, whatever the check cadence).
    from equilibria.equilibrium import _book

    rates = torch.tensor([0.0, 0.1, 0.3, 0.6, 0.95], dtype=torch.float64)
    z0 = torch.ones(5, 3, dtype=torch.float64)

    def f(z, rate):
        return rate[:, None] * torch.sin(z) + 1

    kwargs = dict(atol=1e-10, rtol=1e-10, max_steps=1000, trace=True)
    reference = eq.fixed_point(f, z0, rates, solver=solver, **kwargs)
    monkeypatch.setattr(_book, "_cheap_sync", lambda device: False)
    for compact in (False, True):
        sol = eq.fixed_point(f, z0, rates, solver=solver, compact=compact, **kwargs)
        torch.testing.assert_close(sol.value, reference.value, atol=1e-13, rtol=0)
        assert torch.equal(sol.status, reference.status)
        assert torch.equal(sol.stats["n_steps"], reference.stats["n_steps"])
        torch.testing.assert_close(sol.stats["residual"], reference.stats["residual"])


# --- CUDA (skipped without a GPU) ----------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("solver", SOLVERS)
def test_cuda_float32_matches_cpu(solver):
    problem = contractive_linear(batch=6, n=16)
    a = problem.f(torch.eye(16, dtype=torch.float64), torch.zeros(16, 16, dtype=torch.float64))
    a = a.T.float()  # f(e_i) = A e_i: recover A
    b = problem.x.float()

    def f(z, x):
        return z @ a.to(z.device).T + x

    kwargs = dict(atol=1e-5, rtol=1e-5, max_steps=2000)
    cpu = eq.fixed_point(f, torch.zeros(6, 16), b, solver=solver, **kwargs)
    gpu = eq.fixed_point(f, torch.zeros(6, 16, device="cuda"), b.cuda(), solver=solver,
                         compact=True, trace=True, **kwargs)
    assert gpu.value.device.type == "cuda" and gpu.status.device.type == "cuda"
    assert bool((gpu.status == Status.SUCCESS).all())
    torch.testing.assert_close(gpu.value.cpu(), cpu.value, atol=1e-4, rtol=0)
    torch.testing.assert_close(gpu.value.cpu().double(), problem.solution, atol=1e-3, rtol=0)


@pytest.mark.cuda
def test_cuda_divergence_is_per_sample():
    problem = divergent_problem()
    sol = eq.fixed_point(problem.f, problem.z0.cuda(), problem.x.cuda(), solver=eq.Picard(),
                         max_steps=200)
    flags = problem.x.cuda()
    assert bool((sol.status[flags] == Status.DIVERGED).all())
    assert bool((sol.status[~flags] == Status.SUCCESS).all())


@pytest.mark.parametrize("solver", [eq.Anderson(), eq.Anderson(m=3, damping=0.7)],
                         ids=["anderson", "anderson-damped"])
def test_anderson_in_place_and_recorded_histories_take_the_same_steps(solver):
    # Without autograd the history is updated in place; with it, out of place so the
    # iterations can be differentiated (Unrolled). Same arithmetic, same iterates.
    generator = torch.Generator().manual_seed(4)
    w = 0.8 * torch.randn(6, 6, dtype=torch.float64, generator=generator) / 6**0.5
    x = torch.randn(5, 6, dtype=torch.float64, generator=generator)

    def f(z, x):
        return torch.tanh(z @ w.T + x)

    z0 = torch.zeros(5, 6, dtype=torch.float64)
    kwargs = dict(solver=solver, atol=1e-11, rtol=1e-11, max_steps=60, trace=True)
    with torch.no_grad():
        in_place = eq.fixed_point(f, z0, x, **kwargs)
    recorded = eq.fixed_point(f, z0, x.clone().requires_grad_(True), **kwargs)
    assert recorded.value.requires_grad and bool((in_place.status == Status.SUCCESS).all())
    assert in_place.stats["n_steps"].tolist() == recorded.stats["n_steps"].tolist()
    torch.testing.assert_close(recorded.value.detach(), in_place.value, atol=1e-13, rtol=0)
    for a, b in zip(in_place.trace, recorded.trace):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-10)


@pytest.mark.parametrize("solver", [eq.Anderson(m=1), eq.Anderson(m=2), eq.Picard()],
                         ids=["anderson-m1", "anderson-m2", "picard"])
def test_best_iterate_has_the_smallest_residual_of_the_trace(solver):
    # Anderson(m=1) keeps no previous residual in its norms: the fused test must compare
    # each step against the best stored so far, or a worse iterate replaces the best one
    # (measured before the fix: 6 of 40 of these problems returned a worse iterate)
    generator = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = 16
        w = torch.randn(n, n, dtype=torch.float64, generator=generator)
        w = w * (0.5 + 0.05 * trial) / n**0.5
        b = torch.randn(4, n, dtype=torch.float64, generator=generator)

        def f(z, w=w, b=b):
            return torch.tanh(z @ w.T + b)

        solution = eq.fixed_point(f, torch.zeros(4, n, dtype=torch.float64), solver=solver,
                                  max_steps=15, atol=1e-14, rtol=1e-14, trace=True)
        smallest = torch.stack(solution.trace).min(0).values
        assert (solution.stats["residual"] <= smallest * (1 + 1e-12)).all(), trial
        z = solution.value
        true = (f(z) - z).norm(dim=1) / n**0.5
        torch.testing.assert_close(solution.stats["residual"], true, rtol=1e-9, atol=0)
