"""Terminal events through odeint_adjoint / NeuralODE (the checkpointed backward): event
times and states against closed forms and float64 central differences, and against odeint's
Backprop; per-sample t_eval through the adjoint."""

import math

import pytest
import torch

import equilibria as eq
from equilibria.ode import Adjoint, Event, odeint, odeint_adjoint
from problems import MLPField, central_difference


class Gravity(torch.nn.Module):
    """A ball in free fall: y = (height, velocity), dy/dt = (v, -g), g a parameter."""

    def __init__(self, g=9.81):
        super().__init__()
        self.g = torch.nn.Parameter(torch.tensor(g, dtype=torch.float64))

    def forward(self, t, y):
        return torch.stack([y[:, 1], -self.g.expand(y.shape[0])], dim=1)


class Threshold(torch.nn.Module):
    """g(t, y) = y[:, 0] - c, c a parameter (the event function is trained too)."""

    def __init__(self, c):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(c, dtype=torch.float64))

    def forward(self, t, y):
        return y[:, 0] - self.c


def _ball_closed_form(h, v, g):
    """Impact time t* = (v + sqrt(v^2 + 2 g h)) / g and impact velocity v - g t*."""
    t_star = (v + torch.sqrt(v * v + 2 * g * h)) / g
    return t_star, v - g * t_star


def test_bouncing_ball_event_gradients_match_the_closed_form_and_differences():
    """Free fall to the floor (Tsit5 is exact on this quadratic flow, so the located time is
    exact to rounding): d(t*, v*)/d(h, v, g) from the adjoint equal the closed form's
    autograd derivatives and central differences of the adjoint's own forward to 1e-8."""
    field = Gravity()
    y0 = torch.tensor([[10.0, 0.0], [2.0, 3.0], [5.0, -1.0]], dtype=torch.float64,
                      requires_grad=True)
    w_t = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    w_v = torch.tensor([0.3, 1.0, -0.7], dtype=torch.float64)
    event = Event(lambda t, y: y[:, 0], direction=-1)

    def loss(sol):
        return (sol.stats["event_t"] * w_t).sum() + (sol.value[:, 1] * w_v).sum()

    sol = odeint_adjoint(field, y0, (0.0, 10.0), rtol=1e-10, atol=1e-12, event=event)
    assert sol.status.tolist() == [eq.Status.EVENT] * 3
    grads = torch.autograd.grad(loss(sol), [y0, field.g])
    assert sol.stats["adjoint_status"] == eq.Status.SUCCESS
    t_star, v_star = _ball_closed_form(y0[:, 0], y0[:, 1], field.g)
    assert torch.allclose(sol.stats["event_t"], t_star, rtol=1e-12, atol=0)
    exact = torch.autograd.grad((t_star * w_t).sum() + (v_star * w_v).sum(), [y0, field.g])
    for g, e in zip(grads, exact):
        assert float((g - e).norm() / e.norm()) < 1e-8, (g, e)
    gen = torch.Generator().manual_seed(0)
    directions = [torch.randn(x.shape, generator=gen, dtype=torch.float64)
                  for x in (y0, field.g)]
    fd = central_difference(
        lambda: loss(odeint_adjoint(field, y0, (0.0, 10.0), rtol=1e-10, atol=1e-12,
                                    event=event)),
        [y0, field.g], directions, h=1e-6)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, directions))
    assert abs(analytic - fd) <= 1e-8 * abs(fd), (analytic, fd)


def test_exponential_decay_crossing_a_learned_threshold():
    """y' = -k y stops where y = c (a parameter of the event function): t* = ln(y0/c)/k.
    dt*/dy0 = 1/(k y0), dt*/dk = -t*/k, dt*/dc = -1/(k c): relative 1e-6 at rtol 1e-10
    (the discrete gradient's error is the integration error). Each sample stops at its own
    time and its backward starts there; one sample never crosses (NaN event time, its
    gradient that of y(t1))."""

    class Decay(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

        def forward(self, t, y):
            return -self.k * y

    field, threshold = Decay(), Threshold(0.2)
    y0 = torch.tensor([[1.0], [3.0], [0.1]], dtype=torch.float64, requires_grad=True)
    sol = odeint_adjoint(field, y0, (0.0, 5.0), rtol=1e-10, atol=1e-12,
                         event=Event(threshold, direction=-1))
    assert sol.status.tolist() == [eq.Status.EVENT, eq.Status.EVENT, eq.Status.SUCCESS]
    event_t = sol.stats["event_t"]
    assert bool(torch.isnan(event_t[2]))
    loss = event_t[:2].sum() + sol.value[2, 0]
    g_y0, g_k, g_c = torch.autograd.grad(loss, [y0, field.k, threshold.c])
    k, c = 1.5, 0.2
    y = y0.detach()[:, 0]
    t_star = torch.log(y[:2] / c) / k
    expected_y0 = torch.tensor([1 / (k * float(y[0])), 1 / (k * float(y[1])),
                                math.exp(-k * 5.0)], dtype=torch.float64)
    expected_k = float((-t_star / k).sum()) - 5.0 * float(y[2]) * math.exp(-k * 5.0)
    expected_c = -2 / (k * c)
    assert torch.allclose(g_y0[:, 0], expected_y0, rtol=1e-6, atol=0), (g_y0, expected_y0)
    assert abs(float(g_k) - expected_k) <= 1e-6 * abs(expected_k)
    assert abs(float(g_c) - expected_c) <= 1e-6 * abs(expected_c)


@pytest.mark.parametrize("solver", [eq.Dopri5(), eq.Dopri8(), eq.Kvaerno5()],
                         ids=["Dopri5", "Dopri8", "Kvaerno5"])
def test_event_gradients_agree_with_odeint_backprop(solver):
    """A nonlinear field, a terminal event on a combination of the state, args that require
    grad: the adjoint's gradients of the event time, the state there and t_eval values equal
    odeint's Backprop gradients (the same steps; implicit: to Newton's tolerance; Dopri8: through
    its extra dense-output stages, replayed on the steps that hold an event or t_eval point)."""
    field = MLPField(dim=3, hidden=8)
    gen = torch.Generator().manual_seed(2)
    y0 = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    shift = (0.3 * torch.randn(4, 1, generator=gen, dtype=torch.float64)).requires_grad_(True)
    event = Event(lambda t, y, s: y[:, 0] + y[:, 1] - s[:, 0] - 0.4 * t.reshape(-1) - 0.5)
    t_eval = torch.tensor([0.0, 0.2, 0.5, 1.0, 2.0], dtype=torch.float64)

    def fwd(y, s):
        return lambda t, z, s_: field(t, z) + 0.1 * s_

    w = torch.randn(5, 4, 3, generator=gen, dtype=torch.float64)
    options = dict(solver=solver, rtol=1e-8, atol=1e-10, t_eval=t_eval, args=(shift,),
                   event=event)
    f = fwd(y0, shift)
    params = list(field.parameters())
    adj = odeint_adjoint(f, y0, (0.0, 2.0), params=params, **options)
    ref = odeint(f, y0, (0.0, 2.0), **options)
    assert torch.equal(adj.status, ref.status)
    assert int((adj.status == eq.Status.EVENT).sum()) >= 2

    def loss(sol):
        hit = torch.isfinite(sol.stats["event_t"])
        return ((sol.value * w).sum() + sol.stats["event_t"][hit].sum()
                + sol.stats["event_y"][hit].sum())

    g_adj = torch.autograd.grad(loss(adj), [y0, shift, *params])
    g_ref = torch.autograd.grad(loss(ref), [y0, shift, *params])
    bound = 1e-7 if isinstance(solver, eq.Kvaerno5) else 1e-12
    for a, r in zip(g_adj, g_ref):
        assert float((a - r).norm() / r.norm()) < bound


def test_neural_ode_event_and_per_sample_t_eval():
    """NeuralODE(event=...) with Adjoint() trains the event function's parameters (they are
    registered) and matches Backprop; odeint_adjoint takes a per-sample (batch, n) t_eval."""
    field, threshold = MLPField(dim=2, hidden=6), Threshold(0.53)
    y0 = torch.tensor([[0.5, 0.1], [1.0, -0.2]], dtype=torch.float64, requires_grad=True)
    grads = {}
    for name, gradient in (("adjoint", Adjoint()), ("backprop", eq.Backprop())):
        node = eq.NeuralODE(field, (0.0, 3.0), gradient=gradient, rtol=1e-9, atol=1e-11,
                            event=Event(threshold))
        assert threshold.c in set(node.parameters())
        out = node(y0)
        assert node.last_solution.status.tolist() == [eq.Status.EVENT, eq.Status.SUCCESS]
        event_t = node.last_solution.stats["event_t"]
        loss = out.pow(2).sum() + event_t.nan_to_num().sum()
        grads[name] = torch.autograd.grad(loss, [y0, threshold.c, *field.parameters()])
    for a, b in zip(grads["adjoint"], grads["backprop"]):
        assert float((a - b).norm() / b.norm().clamp_min(1e-300)) < 1e-12
    with pytest.raises(TypeError, match="event must be an equilibria.ode.Event"):
        eq.NeuralODE(field, event=threshold)

    t_eval = torch.tensor([[0.1, 0.5, 1.0], [0.3, 0.4, 0.9]], dtype=torch.float64)
    w = torch.randn(3, 2, 2, dtype=torch.float64)
    adj = odeint_adjoint(field, y0, (0.0, 1.0), t_eval=t_eval, rtol=1e-9, atol=1e-11)
    ref = odeint(field, y0, (0.0, 1.0), t_eval=t_eval, rtol=1e-9, atol=1e-11)
    params = list(field.parameters())
    g_adj = torch.autograd.grad((adj.value * w).sum(), [y0, *params])
    g_ref = torch.autograd.grad((ref.value * w).sum(), [y0, *params])
    for a, r in zip(g_adj, g_ref):
        assert float((a - r).norm() / r.norm()) < 1e-12
    with pytest.raises(ValueError, match="checkpoints=False.*per-sample"):
        odeint_adjoint(field, y0, (0.0, 1.0), t_eval=t_eval,
                       gradient=Adjoint(checkpoints=False))


@pytest.mark.parametrize("gradient", [Adjoint(), eq.Backprop()], ids=["adjoint", "backprop"])
def test_neural_ode_per_sample_t_eval_matches_single_sample_runs(gradient):
    """NeuralODE with a (batch, n) t_eval (at the call or at construction): sample b's values
    and its gradients (to y0 and, summed, to the parameters) are those of a run of sample b
    alone on its own (n,) grid (the adjoint's: the checkpointed backward both times, which a
    per-sample grid selects and a shared one runs when asked)."""
    field = MLPField(dim=2, hidden=6)
    gen = torch.Generator().manual_seed(5)
    y0 = torch.randn(3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    t_eval = torch.tensor([[0.0, 0.3, 0.7, 1.5], [0.1, 0.2, 1.0, 2.0], [0.5, 0.9, 1.2, 1.9]],
                          dtype=torch.float64)
    w = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64)
    options = dict(t_span=(0.0, 2.0), gradient=gradient, rtol=1e-9, atol=1e-11)
    params = list(field.parameters())
    node = eq.NeuralODE(field, **options)
    out = node(y0, t_eval=t_eval)
    assert out.shape == (4, 3, 2)
    assert torch.equal(eq.NeuralODE(field, t_eval=t_eval, **options)(y0), out)
    grads = torch.autograd.grad((out * w).sum(), [y0, *params])
    single_params = [torch.zeros_like(p) for p in params]
    single = eq.NeuralODE(field, **{**options, "gradient": (
        Adjoint(checkpoints=True) if isinstance(gradient, Adjoint) else gradient)})
    for b in range(3):
        y0_b = y0.detach()[b : b + 1].clone().requires_grad_(True)
        out_b = single(y0_b, t_eval=t_eval[b])
        assert torch.allclose(out_b[:, 0], out[:, b], rtol=1e-12, atol=1e-13)
        g_b = torch.autograd.grad((out_b[:, 0] * w[:, b]).sum(), [y0_b, *params])
        assert torch.allclose(g_b[0][0], grads[0][b], rtol=1e-9, atol=1e-12)
        for total, g in zip(single_params, g_b[1:]):
            total += g
    for total, g in zip(single_params, grads[1:]):
        assert float((total - g).norm() / g.norm()) < 1e-9
    with pytest.raises(ValueError, match=r"per-sample t_eval must have shape \(batch, n\)"):
        node(y0[:2], t_eval=t_eval)
