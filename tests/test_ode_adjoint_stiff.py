"""The checkpointed adjoint (Adjoint(checkpoints=True), automatic for implicit solvers) on
stiff problems, against closed forms and float64 central differences of scipy's Radau."""

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.linalg import expm, expm_frechet

import equilibria as eq
from equilibria.ode import Adjoint, odeint, odeint_adjoint
from problems import MLPField


class StiffLinear(torch.nn.Module):
    """dy/dt = A y, A = [[-1, c], [k, -k]]: eigenvalues ~ -k (fast) and ~ c - 1 (slow)."""

    def __init__(self, c=0.5, k=1e4):
        super().__init__()
        self.ck = torch.nn.Parameter(torch.tensor([c, k], dtype=torch.float64))

    def matrix(self):
        c, k = self.ck.tolist()
        return np.array([[-1.0, c], [k, -k]])

    def forward(self, t, y):
        c, k = self.ck
        return torch.stack([-y[:, 0] + c * y[:, 1], k * (y[:, 0] - y[:, 1])], dim=1)


class Robertson(torch.nn.Module):
    """Robertson's chemical kinetics with the rate constants as parameters."""

    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor([0.04, 1e4, 3e7], dtype=torch.float64))

    def forward(self, t, y):
        k1, k2, k3 = self.k
        y1, y2, y3 = y[:, 0], y[:, 1], y[:, 2]
        return torch.stack([-k1 * y1 + k2 * y2 * y3, k1 * y1 - k2 * y2 * y3 - k3 * y2 * y2,
                            k3 * y2 * y2], dim=1)


def _robertson_loss(k, y0, t1, w):
    """w . y(t1) by scipy's Radau at rtol 1e-13 (its error ~1e-13: central differences with
    h ~ 1e-6 relative are then accurate to ~1e-7 relative)."""
    k1, k2, k3 = k

    def fun(t, y):
        return [-k1 * y[0] + k2 * y[1] * y[2], k1 * y[0] - k2 * y[1] * y[2] - k3 * y[1] ** 2,
                k3 * y[1] ** 2]

    def jac(t, y):
        return [[-k1, k2 * y[2], k2 * y[1]], [k1, -k2 * y[2] - 2 * k3 * y[1], -k2 * y[1]],
                [0.0, 2 * k3 * y[1], 0.0]]

    sol = solve_ivp(fun, (0.0, t1), y0, method="Radau", rtol=1e-13, atol=1e-16, jac=jac)
    assert sol.success
    return float(np.dot(w, sol.y[:, -1]))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_stiff_linear_gradients_match_the_closed_form():
    """y(1) = expm(A) y0: dL/dy0 = expm(A)^T w, dL/dA by the Frechet derivative of expm. The
    checkpointed adjoint at rtol 1e-9 is within 1e-7 of it (the discrete gradient's error is
    the integration error, ~rtol); the stiffness ratio is 2e4."""
    field = StiffLinear()
    y0 = torch.tensor([[1.0, 2.0], [-0.5, 1.0]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[1.0, 3.0], [2.0, -1.0]], dtype=torch.float64)
    sol = odeint_adjoint(field, y0, (0.0, 1.0), solver=eq.Kvaerno5(), rtol=1e-9, atol=1e-12)
    g_y0, g_ck = torch.autograd.grad((sol.value * w).sum(), [y0, field.ck])
    assert sol.stats["adjoint_status"] == eq.Status.SUCCESS
    assert sol.stats["adjoint_checkpoints"] == int(sol.stats["n_steps"].sum())
    a = field.matrix()
    expected_y0 = torch.tensor(w.numpy() @ expm(a))
    expected_ck = []
    for d in (np.array([[0.0, 1.0], [0.0, 0.0]]), np.array([[0.0, 0.0], [1.0, -1.0]])):
        _, frechet = expm_frechet(a, d)
        expected_ck.append(sum(w[b].numpy() @ frechet @ y0[b].detach().numpy()
                               for b in range(2)))
    assert _rel(g_y0, expected_y0) < 1e-7
    assert _rel(g_ck, torch.tensor(expected_ck)) < 1e-7


def test_robertson_gradients_match_central_differences_where_the_continuous_adjoint_fails():
    """Robertson on [0, 5] with Kvaerno5: the checkpointed adjoint's gradients w.r.t. y0 and
    the rate constants (spanning 9 orders of magnitude) match float64 central differences of
    scipy Radau at rtol 1e-13 to 1e-5 relative each (rtol 1e-8 forward: the gradient of the
    steps taken is within ~1e-7 of the exact one; the differences' own error is ~1e-7), and
    Backprop's to 1e-10. The continuous adjoint, integrating y backwards, fails."""
    field = Robertson()
    y0 = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.0, 0.1]], dtype=torch.float64,
                      requires_grad=True)
    w = torch.tensor([[1.0, 1e4, 2.0], [0.5, -3e3, 1.0]], dtype=torch.float64)
    options = dict(solver=eq.Kvaerno5(), rtol=1e-8, atol=1e-12)
    sol = odeint_adjoint(field, y0, (0.0, 5.0), **options)
    grads = torch.autograd.grad((sol.value * w).sum(), [y0, field.k])
    assert sol.stats["adjoint_status"] == eq.Status.SUCCESS
    backprop = odeint(field, y0, (0.0, 5.0), **options)
    reference = torch.autograd.grad((backprop.value * w).sum(), [y0, field.k])
    for g, r in zip(grads, reference):
        assert _rel(g, r) < 1e-10
    k = field.k.detach().numpy()
    for b in range(2):
        start = y0[b].detach().numpy()
        for i in (0, 2):  # y2 = 0 sits on a boundary of the chemistry (a one-sided kink)
            h = 1e-6
            e = np.eye(3)[i] * h
            fd = (_robertson_loss(k, start + e, 5.0, w[b].numpy())
                  - _robertson_loss(k, start - e, 5.0, w[b].numpy())) / (2 * h)
            assert abs(float(grads[0][b, i]) - fd) <= 1e-5 * abs(fd), (b, i, grads[0][b], fd)
    for i in range(3):
        e = np.eye(3)[i] * 1e-5 * k[i]
        fd = sum((_robertson_loss(k + e, y0[b].detach().numpy(), 5.0, w[b].numpy())
                  - _robertson_loss(k - e, y0[b].detach().numpy(), 5.0, w[b].numpy()))
                 / (2 * e[i]) for b in range(2))
        assert abs(float(grads[1][i]) - fd) <= 1e-5 * abs(fd), (i, grads[1], fd)

    continuous = odeint_adjoint(field, y0, (0.0, 5.0), **options,
                                gradient=Adjoint(checkpoints=False, max_steps=200))
    (continuous.value * w).sum().backward()
    assert continuous.stats["adjoint_status"] != eq.Status.SUCCESS


@pytest.mark.parametrize(("solver", "bound"), [(eq.Tsit5(), 1e-12), (eq.Kvaerno3(), 1e-8)],
                         ids=["Tsit5", "Kvaerno3"])
def test_checkpoints_equal_backprop_and_each_sample_is_alone(solver, bound):
    """The checkpointed backward is the gradient of the steps taken: Backprop's, to rounding
    for an explicit method, and for an implicit one to the agreement of the replayed stage
    solves with the forward's (both stop at Newton's tolerance, a fraction of rtol 1e-6);
    with t_eval too. A sample's gradient is the one it gets alone."""
    field = MLPField(dim=3, hidden=8)
    gen = torch.Generator().manual_seed(7)
    y0 = torch.randn(3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    t_eval = torch.tensor([0.0, 0.25, 0.6, 1.0], dtype=torch.float64)
    w = torch.randn(4, 3, 3, generator=gen, dtype=torch.float64)
    params = list(field.parameters())
    options = dict(solver=solver, rtol=1e-6, atol=1e-9, t_eval=t_eval)
    sol = odeint_adjoint(field, y0, (0.0, 1.0), gradient=Adjoint(checkpoints=True), **options)
    grads = torch.autograd.grad((sol.value * w).sum(), [y0, *params])
    backprop = odeint(field, y0, (0.0, 1.0), **options)
    reference = torch.autograd.grad((backprop.value * w).sum(), [y0, *params])
    for g, r in zip(grads, reference):
        assert _rel(g, r) < bound
    y_alone = y0[1:2].detach().requires_grad_(True)
    alone = odeint_adjoint(field, y_alone, (0.0, 1.0), gradient=Adjoint(checkpoints=True),
                           **options)
    (g_alone,) = torch.autograd.grad((alone.value * w[:, 1:2]).sum(), [y_alone])
    assert _rel(grads[0][1:2], g_alone) < bound


def test_the_explicit_default_keeps_the_continuous_adjoint():
    field = MLPField(dim=3, hidden=8)
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    sol = odeint_adjoint(field, y0, (0.0, 1.0))
    sol.value.sum().backward()
    assert "adjoint_checkpoints" not in sol.stats
    implicit = odeint_adjoint(field, y0, (0.0, 1.0), solver=eq.Kvaerno3())
    implicit.value.sum().backward()
    assert implicit.stats["adjoint_checkpoints"] > 0


def test_bad_checkpoint_options_are_refused():
    with pytest.raises(TypeError, match="Adjoint.checkpoints must be True, False or None"):
        Adjoint(checkpoints="yes")
    with pytest.raises(ValueError, match="checkpoints=True.*rtol.*checkpoints=False"):
        Adjoint(checkpoints=True, rtol=1e-3)
    y0 = torch.ones(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="implicit solver.*rtol.*checkpoints=False"):
        odeint_adjoint(lambda t, y: -y, y0, solver=eq.Kvaerno3(), gradient=Adjoint(rtol=1e-6))
    event = eq.Event(lambda t, y: y[:, 0] - 0.5)
    with pytest.raises(ValueError, match="checkpoints=False.*event="):
        odeint_adjoint(lambda t, y: -y, y0, event=event, gradient=Adjoint(checkpoints=False))
    with pytest.raises(TypeError, match="event must be an equilibria.ode.Event"):
        odeint_adjoint(lambda t, y: -y, y0, event=lambda t, y: y[:, 0])
