"""Implicit (ESDIRK) solvers: checked tableaus, order, stiff references, Newton per sample,
gradients through the implicit stages."""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import equilibria as eq
from equilibria.ode import ESDIRKTableau, Newton, odeint
from problems import LINEAR, VAN_DER_POL, MLPField, central_difference
from test_ode_tableau import _order_conditions

IMPLICIT = [eq.Kvaerno3(), eq.Kvaerno5()]


def _name(solver):
    return type(solver).__name__


def _matrix(tab):
    s = tab.n_stages
    a = np.zeros((s, s))
    for i, row in enumerate(tab.a):
        a[i, : i + 1] = row
    return a


def _stability(tab, z):
    """R(z) = 1 + z b^T (I - z A)^{-1} 1 of the main method."""
    a, b = _matrix(tab), np.array(tab.b)
    s = len(b)
    return 1 + z * b @ np.linalg.solve(np.eye(s) - z * a, np.ones(s))


@pytest.mark.parametrize("solver", IMPLICIT, ids=_name)
def test_tableaus_satisfy_order_conditions_and_are_l_stable(solver):
    tab = solver.tableau
    a, c, b = _matrix(tab), np.array(tab.c), np.array(tab.b)
    assert np.allclose(a.sum(axis=1), c, rtol=0, atol=1e-15)
    assert _order_conditions(b, a, c, tab.order).max() < 1e-14
    if tab.order < 5:
        assert _order_conditions(b, a, c, tab.order + 1).max() > 1e-6
    b_hat = b - np.array(tab.b_err)
    assert _order_conditions(b_hat, a, c, tab.error_order).max() < 1e-14
    assert _order_conditions(b_hat, a, c, tab.error_order + 1).max() > 1e-6
    # L-stable: |R| <= 1 on the imaginary axis (A-stable, with |R| < 1 in the left half-plane
    # by the maximum principle) and R(z) -> 0 as z -> -inf
    for y in np.logspace(-3, 6, 60):
        assert abs(_stability(tab, 1j * y)) <= 1 + 1e-12
    assert abs(_stability(tab, -1e8)) < 1e-6


def test_bad_esdirk_tableaus_are_refused():
    g = 0.5
    good = {"name": "ok", "c": (0.0, 1.0), "a": ((0.0,), (0.5, g)), "b_err": (0.5, -0.5),
            "order": 1, "error_order": 1}
    ESDIRKTableau(**good)
    for change, match in (
        ({"a": ((0.0,), (0.4, g))}, "row 1 of a sums to"),
        ({"a": ((0.1,), (0.5, g))}, "explicit"),
        ({"a": ((0.0,), (0.5,))}, "length i \\+ 1"),
        ({"c": (0.0, 0.9), "a": ((0.0,), (0.4, g))}, "c\\[-1\\] = 1"),
        ({"b_err": (0.5, -0.4)}, "summing to 0"),
        ({"order": 0}, "order must be"),
    ):
        with pytest.raises(ValueError, match=match):
            ESDIRKTableau(**{**good, **change})
    with pytest.raises(ValueError, match="one gamma"):
        ESDIRKTableau(name="g", c=(0.0, 1.0, 1.0), a=((0.0,), (0.5, 0.5), (0.3, 0.3, 0.4)),
                      b_err=(0.0, 0.0, 0.0), order=1, error_order=1)


def test_bad_newton_options_are_refused():
    with pytest.raises(TypeError, match="Newton"):
        eq.Kvaerno3(newton="lu")
    with pytest.raises(ValueError, match="max_iters"):
        Newton(max_iters=0)
    with pytest.raises(ValueError, match="kappa"):
        Newton(kappa=-1.0)
    with pytest.raises(ValueError, match="refresh"):
        Newton(refresh=1.5)
    with pytest.raises(TypeError, match="GMRES"):
        Newton(linear_solver="gmres")


@pytest.mark.parametrize(
    ("solver", "problem", "t_span", "steps"),
    [
        (eq.Kvaerno3(), VAN_DER_POL, (0.0, 1.0), [32, 64, 128, 256]),
        # 5th order: the linear problem (as for the explicit 5th-order pairs)
        (eq.Kvaerno5(), LINEAR, LINEAR.t_span, [32, 64, 128, 256]),
    ],
    ids=["Kvaerno3", "Kvaerno5"],
)
def test_fitted_order_of_accuracy(solver, problem, t_span, steps):
    """Equal steps, Newton converged to rounding (rtol 1e-13 sets its test): the log-log
    slope of the global error against dt is the tableau's order."""
    ref = problem.reference([t_span[1]], t_span)[0]
    errors = []
    for n in steps:
        with torch.no_grad():
            sol = odeint(problem.f, problem.initial(), t_span, solver=solver, n_steps=n,
                         rtol=1e-13, atol=1e-15)
        assert bool((sol.status == eq.Status.SUCCESS).all())
        errors.append(float((sol.value - ref).abs().max()))
    slope = np.polyfit(np.log(1.0 / np.array(steps)), np.log(errors), 1)[0]
    assert abs(slope - solver.order) <= 0.3, (slope, errors)


def van_der_pol(t, y, mu):
    x, v = y[:, 0], y[:, 1]
    return torch.stack([v, mu[:, 0] * (1 - x * x) * v - x], dim=1)


def robertson(t, y):
    y1, y2, y3 = y[:, 0], y[:, 1], y[:, 2]
    return torch.stack([-0.04 * y1 + 1e4 * y2 * y3,
                        0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2 * y2,
                        3e7 * y2 * y2], dim=1)


def _vdp_numpy(mu):
    return (lambda t, y: [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]],
            lambda t, y: [[0.0, 1.0], [-2 * mu * y[0] * y[1] - 1, mu * (1 - y[0] ** 2)]])


def _robertson_numpy():
    return (lambda t, y: [-0.04 * y[0] + 1e4 * y[1] * y[2],
                          0.04 * y[0] - 1e4 * y[1] * y[2] - 3e7 * y[1] ** 2, 3e7 * y[1] ** 2],
            lambda t, y: [[-0.04, 1e4 * y[2], 1e4 * y[1]],
                          [0.04, -1e4 * y[2] - 6e7 * y[1], -1e4 * y[1]],
                          [0.0, 6e7 * y[1], 0.0]])


def _stiff_case(name, t1):
    rtol, atol = 1e-6, 1e-10
    if name == "van_der_pol":
        mu = 1000.0
        f = van_der_pol
        y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
        args = (torch.tensor([[mu]], dtype=torch.float64),)
        fun, jac = _vdp_numpy(mu)
    else:
        f, y0, args = robertson, torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64), ()
        fun, jac = _robertson_numpy()
    ref = solve_ivp(fun, (0.0, t1), y0[0].numpy(), method="Radau", rtol=1e-12, atol=1e-14,
                    jac=jac)
    assert ref.success
    return f, y0, args, torch.tensor(ref.y[:, -1]), rtol, atol


def _check_stiff(solver, name, t1):
    f, y0, args, ref, rtol, atol = _stiff_case(name, t1)
    with torch.no_grad():
        sol = odeint(f, y0, (0.0, t1), solver=solver, rtol=rtol, atol=atol, args=args,
                     max_steps=100_000)
    assert sol.status.tolist() == [eq.Status.SUCCESS]
    scaled = ((sol.value[0] - ref).abs() / (atol + rtol * ref.abs())).max()
    assert float(scaled) <= 10.0, (float(scaled), sol.value, ref)


@pytest.mark.parametrize("solver", IMPLICIT, ids=_name)
@pytest.mark.parametrize(("name", "t1"), [("van_der_pol", 300.0), ("robertson", 40.0)])
def test_stiff_problems_short_span(solver, name, t1):
    """Van der Pol mu = 1000 (its slow branch) and Robertson on the classic [0, 40]:
    the error at t1 (rtol 1e-6, atol 1e-10) is within 10x the tolerance of scipy's Radau at
    rtol 1e-12."""
    _check_stiff(solver, name, t1)


@pytest.mark.slow
@pytest.mark.parametrize("solver", IMPLICIT, ids=_name)
@pytest.mark.parametrize(("name", "t1"), [("van_der_pol", 3000.0), ("robertson", 1e5)])
def test_stiff_problems_full_span(solver, name, t1):
    """The full spans: Van der Pol mu = 1000 on [0, 3000] (two relaxation jumps) and
    Robertson on [0, 1e5]."""
    _check_stiff(solver, name, t1)


@pytest.mark.parametrize("solver", IMPLICIT, ids=_name)
def test_samples_are_independent_and_each_takes_its_own_steps(solver):
    """Van der Pol with mu = 1 and mu = 100 in one batch: each row equals the row solved
    alone (values and step counts), and the stiff one takes its own (different) steps."""
    mu = torch.tensor([[1.0], [100.0]], dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    tol = {"rtol": 1e-6, "atol": 1e-9}
    with torch.no_grad():
        both = odeint(van_der_pol, y0, (0.0, 3.0), solver=solver, args=(mu,), compact=False,
                      **tol)
        for b in range(2):
            alone = odeint(van_der_pol, y0[b : b + 1], (0.0, 3.0), solver=solver,
                           args=(mu[b : b + 1],), **tol)
            assert torch.allclose(alone.value[0], both.value[b], rtol=0, atol=1e-12)
            for key in ("nfe", "n_steps", "n_rejected"):
                assert alone.stats[key][0] == both.stats[key][b]
    assert bool(both.success.all())
    assert both.stats["n_steps"][0] != both.stats["n_steps"][1]


def test_matrix_free_newton_agrees_with_the_dense_path():
    """Newton(dense_max=0) solves the stages by GMRES on difference JVPs: same answer (to the
    tolerance) as the dense LU path on a stiff Van der Pol."""
    mu = torch.tensor([[50.0]], dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    fun, jac = _vdp_numpy(50.0)
    ref = solve_ivp(fun, (0.0, 20.0), [2.0, 0.0], method="Radau", rtol=1e-12, atol=1e-14,
                    jac=jac).y[:, -1]
    for newton in (Newton(), Newton(dense_max=0)):
        with torch.no_grad():
            sol = odeint(van_der_pol, y0, (0.0, 20.0), solver=eq.Kvaerno5(newton=newton),
                         rtol=1e-7, atol=1e-10, args=(mu,))
        assert sol.status.tolist() == [eq.Status.SUCCESS]
        scaled = ((sol.value[0] - torch.tensor(ref)).abs() / (1e-10 + 1e-7 * abs(ref))).max()
        assert float(scaled) < 10.0


def test_newton_failure_is_a_per_sample_status_with_the_fix():
    """With one Newton correction allowed and an impossible stopping test, the nonlinear
    sample's stages never converge: NEWTON_FAILED, with a finite last state; its batch-mate
    (f = 0, Newton trivially exact) succeeds."""
    def field(t, y, c):
        return -c * y**3

    c = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    y0 = torch.ones(2, 1, dtype=torch.float64)
    solver = eq.Kvaerno3(newton=Newton(max_iters=1, kappa=1e-300))
    sol = odeint(field, y0, (0.0, 1.0), solver=solver, args=(c,))
    assert sol.status.tolist() == [eq.Status.SUCCESS, eq.Status.NEWTON_FAILED]
    assert bool(torch.isfinite(sol.value).all())
    with pytest.raises(eq.EquilibriaError, match="smaller first step"):
        sol.raise_if_failed()
    # fixed steps cannot shrink: the failure is reported at once
    fixed = odeint(field, y0, (0.0, 1.0), solver=solver, args=(c,), n_steps=10)
    assert fixed.status.tolist() == [eq.Status.SUCCESS, eq.Status.NEWTON_FAILED]


def test_backprop_through_implicit_steps_is_the_derivative_of_the_discrete_map():
    """Equal steps (the map is smooth in its inputs): the Backprop gradient through the
    implicit stages (their implicit derivative, not Newton's iterations) equals central
    differences of the same discrete map."""
    field = MLPField(dim=3, hidden=8, scale=3.0)
    gen = torch.Generator().manual_seed(3)
    y0 = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    options = dict(solver=eq.Kvaerno3(), n_steps=8, rtol=1e-12, atol=1e-14)

    def loss(y):
        return (odeint(field, y, (0.0, 1.0), **options).value * weights).sum()

    params = list(field.parameters())
    grads = torch.autograd.grad(loss(y0), [y0, *params])
    directions = [torch.randn(v.shape, generator=gen, dtype=torch.float64)
                  for v in (y0, *params)]
    fd = central_difference(lambda: loss(y0), [y0, *params], directions, h=1e-6)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, directions))
    assert abs(analytic - fd) <= 1e-7 * abs(fd), (analytic, fd)


def _fine_loss(field, y0, weights):
    sol = odeint(field, y0, (0.0, 1.0), solver=eq.Tsit5(), n_steps=200)
    return float((sol.value * weights).sum())


@pytest.mark.parametrize("gradient", [eq.Backprop(), eq.Adjoint()], ids=["Backprop", "Adjoint"])
def test_neural_ode_with_an_implicit_solver_gradients(gradient):
    """NeuralODE(Kvaerno5()) at rtol 1e-10: both gradients match central differences of the
    exact flow (a fine fixed-step Tsit5) to 1e-6."""
    field = MLPField(dim=3, hidden=8)
    gen = torch.Generator().manual_seed(4)
    y0 = torch.randn(3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    params = list(field.parameters())
    node = eq.NeuralODE(field, (0.0, 1.0), solver=eq.Kvaerno5(), gradient=gradient,
                        rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad((node(y0) * weights).sum(), [y0, *params])
    assert bool(node.last_solution.success.all())
    directions = [torch.randn(v.shape, generator=gen, dtype=torch.float64)
                  for v in (y0, *params)]
    fd = central_difference(lambda: _fine_loss(field, y0, weights), [y0, *params], directions)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, directions))
    assert abs(analytic - fd) <= 1e-6 * abs(fd), (analytic, fd)


@pytest.mark.cuda
@pytest.mark.parametrize("newton", [Newton(), Newton(dense_max=0)], ids=["dense", "krylov"])
def test_cuda_implicit_matches_cpu(newton):
    mu = torch.tensor([[50.0], [5.0]], dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    options = dict(solver=eq.Kvaerno3(newton=newton), rtol=1e-7, atol=1e-10)
    cpu = odeint(van_der_pol, y0, (0.0, 5.0), args=(mu,), **options)
    gpu = odeint(van_der_pol, y0.cuda(), (0.0, 5.0), args=(mu.cuda(),), **options)
    assert gpu.value.device.type == "cuda" and bool(gpu.success.all())
    assert torch.allclose(gpu.value.cpu(), cpu.value, rtol=1e-6, atol=1e-9)
