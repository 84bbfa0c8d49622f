"""The adjoint as momentum: costate, Hamiltonian and the conservation laws as gradient checks."""

import pytest
import torch

from equilibria.mechanics import (
    costate,
    discrete_pairing,
    hamiltonian,
    hamiltonian_balance,
    hamiltonian_drift,
    noether_charge,
    tangent_pairing,
)
from equilibria.ode import RK4, odeint

DTYPE = torch.float64
RTOL, ATOL = 1e-8, 1e-10


class MLPField(torch.nn.Module):
    """F(t, x) = W2 act(W1 x + b1) + b2, optionally times (1 + sin(3t)/2)."""

    def __init__(self, dim=3, hidden=16, act=torch.tanh, bias=True, time_dependent=False):
        super().__init__()
        self.l1 = torch.nn.Linear(dim, hidden, bias=bias)
        self.l2 = torch.nn.Linear(hidden, dim, bias=bias)
        self.act, self.time_dependent = act, time_dependent

    def forward(self, t, x):
        out = self.l2(self.act(self.l1(x)))
        if self.time_dependent:
            out = out * (1 + 0.5 * torch.sin(3 * t))
        return out


def squared(x):
    return (x**2).sum(dim=1)


def field(**kwargs):
    return MLPField(**kwargs).to(DTYPE)


def x0(batch=4):
    return torch.randn(batch, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(11))


def autograd_gradients(f, x_init, loss_fn=squared):
    """dL/dx0 and dL/dθ by autograd through a very tight odeint (Backprop)."""
    x_leaf = x_init.clone().requires_grad_(True)
    x_T = odeint(f, x_leaf, (0.0, 1.0), rtol=1e-12, atol=1e-14).value
    params = list(f.parameters())
    grads = torch.autograd.grad(loss_fn(x_T).sum(), [x_leaf, *params])
    return grads[0], dict(zip([n for n, _ in f.named_parameters()], grads[1:]))


def relative(a, b):
    return float((a - b).norm() / b.norm())


def test_autonomous_hamiltonian_conserved_and_p0_is_the_gradient():
    f = field()
    start = x0()
    cs = costate(
        f, start, (0.0, 1.0), loss_fn=squared, rtol=RTOL, atol=ATOL, param_grads=True, n_points=17
    )
    assert bool(cs.success.all())
    assert cs.x.shape == (17, 4, 3) and cs.p.shape == (17, 4, 3) and cs.t.shape == (17,)
    drift = hamiltonian_drift(f, cs)
    assert float(drift.relative_drift.max()) <= 10 * RTOL, drift.relative_drift
    # The drift is not trivially zero: H itself is of order one.
    assert float(drift.values[0].abs().max()) > 0.1
    grad_x0, grad_params = autograd_gradients(f, start)
    for sample in range(4):
        assert relative(cs.p[0, sample], grad_x0[sample]) < 1e-6
    for name, grad in grad_params.items():
        assert relative(cs.param_grads[name].sum(dim=0), grad) < 1e-6, name
    # p(T) is the terminal condition ∂L/∂x(T) = 2 x(T).
    assert torch.allclose(cs.p[-1], 2 * cs.x[-1], rtol=1e-12, atol=0)


def test_per_sample_param_gradient_is_that_sample_alone():
    f = field()
    start = x0()
    options = dict(loss_fn=squared, rtol=RTOL, atol=ATOL, param_grads=True, n_points=9)
    batch = costate(f, start, (0.0, 1.0), **options)
    alone = costate(f, start[2:3], (0.0, 1.0), **options)
    assert torch.allclose(batch.p[:, 2], alone.p[:, 0], rtol=1e-12, atol=1e-14)
    for name in alone.param_grads:
        assert torch.allclose(batch.param_grads[name][2], alone.param_grads[name][0], rtol=1e-12)


def test_one_backward_solve_agrees_with_the_restarted_one():
    f = field()
    options = dict(loss_fn=squared, rtol=RTOL, atol=ATOL, n_points=9)
    restarted = costate(f, x0(), (0.0, 1.0), **options)
    single = costate(f, x0(), (0.0, 1.0), restart_from_forward=False, **options)
    assert torch.allclose(single.p, restarted.p, rtol=1e-6, atol=1e-9)
    assert float(hamiltonian_drift(f, single).relative_drift.max()) <= 10 * RTOL
    # One solve: per-sample stats and statuses of the same shape as the restarted ones.
    assert single.backward.status.shape == restarted.backward.status.shape == (4,)
    assert bool((restarted.backward.stats["nfe"] > single.backward.stats["nfe"]).all())


def test_grad_xT_terminal_condition_matches_loss_fn():
    f = field()
    start = x0()
    by_loss = costate(f, start, (0.0, 1.0), loss_fn=squared, rtol=RTOL, atol=ATOL)
    by_grad = costate(f, start, (0.0, 1.0), grad_xT=2 * by_loss.x[-1], rtol=RTOL, atol=ATOL)
    assert torch.equal(by_loss.p, by_grad.p)


def test_time_dependent_hamiltonian_drifts_and_balance_holds():
    f = field(time_dependent=True)
    cs = costate(f, x0(), (0.0, 1.0), loss_fn=squared, rtol=RTOL, atol=ATOL)
    balance = hamiltonian_balance(f, cs)
    assert float(balance.hamiltonian.relative_drift.min()) > 1e4 * RTOL
    assert float(balance.balanced.relative_drift.max()) <= 10 * RTOL, balance.balanced
    # W(T) = 0 and H(T) − H(0) = W(0).
    assert torch.equal(balance.work[-1], torch.zeros_like(balance.work[-1]))
    change = balance.hamiltonian.values[-1] - balance.hamiltonian.values[0]
    assert torch.allclose(change, balance.work[0], rtol=1e-6, atol=1e-9)
    # For an autonomous field the work vanishes identically.
    autonomous = costate(field(), x0(), (0.0, 1.0), loss_fn=squared, rtol=RTOL, atol=ATOL)
    assert float(autonomous.work.abs().max()) == 0.0


def test_continuous_tangent_pairing_conserved_and_equals_directional_derivative():
    f = field()
    start = x0()
    cs = costate(f, start, (0.0, 1.0), loss_fn=squared, rtol=RTOL, atol=ATOL)
    v0 = torch.randn(4, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    pairing = tangent_pairing(f, cs, v0, rtol=RTOL, atol=ATOL)
    assert float(pairing.relative_drift.max()) <= 10 * RTOL, pairing.relative_drift
    # p(0)·v0 is the derivative of L along v0: central differences in float64.
    eps = 1e-5

    def loss_at(x):
        return squared(odeint(f, x, (0.0, 1.0), rtol=1e-12, atol=1e-14).value)

    central = (loss_at(start + eps * v0) - loss_at(start - eps * v0)) / (2 * eps)
    assert torch.allclose(pairing.values[0], central, rtol=1e-6, atol=1e-8)


def test_discrete_pairing_through_fixed_step_solver_is_exact():
    f = field()
    h = 0.1

    def step(k, x):
        return odeint(f, x, (k * h, (k + 1) * h), solver=RK4(), dt0=h).value

    v0 = torch.randn(4, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(6))
    pairing = discrete_pairing(step, x0(), v0, squared, n_steps=10)
    assert pairing.values.shape == (11, 4)
    assert float(pairing.relative_drift.max()) <= 1e-12, pairing.relative_drift


class _SloppyTanh(torch.autograd.Function):
    """tanh with a right forward-mode derivative and a backward 0.1% off: a typical bug."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y**2) * 1.001

    @staticmethod
    def jvp(ctx, tangent):
        (y,) = ctx.saved_tensors
        return tangent * (1 - y**2)


def test_discrete_pairing_detects_a_wrong_backward():
    weight = torch.randn(3, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(7))

    def sloppy(k, x):
        return x + 0.1 * _SloppyTanh.apply(x @ weight.T)

    def right(k, x):
        return x + 0.1 * torch.tanh(x @ weight.T)

    v0 = torch.randn(4, 3, dtype=DTYPE)
    good = discrete_pairing(right, x0(), v0, squared, n_steps=20)
    bad = discrete_pairing(sloppy, x0(), v0, squared, n_steps=20)
    assert float(good.relative_drift.max()) <= 1e-12
    # Same forward values, but the VJP is not the transpose of the JVP: the pairing drifts.
    assert torch.allclose(good.values[-1], bad.values[-1], rtol=1e-12)
    assert float(bad.relative_drift.max()) > 1e-5


def test_noether_charge_conserved_for_homogeneous_relu_field_only():
    relu = field(act=torch.relu, bias=False)
    cs = costate(relu, x0(), (0.0, 1.0), loss_fn=squared, rtol=RTOL, atol=ATOL)
    charge = noether_charge(cs)
    assert float(charge.relative_drift.max()) <= 100 * RTOL, charge.relative_drift
    tanh = field(act=torch.tanh, bias=True)
    cs = costate(tanh, x0(), (0.0, 1.0), loss_fn=squared, rtol=RTOL, atol=ATOL)
    assert float(noether_charge(cs).relative_drift.min()) > 1e-3


def test_hamiltonian_is_p_dot_f_per_sample():
    f = field(time_dependent=True)
    x, p = x0(), torch.randn(4, 3, dtype=DTYPE)
    t = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=DTYPE)
    expected = (p * f(t[:, None], x)).sum(dim=1)  # f sees t shaped (batch, 1), as in odeint
    assert torch.equal(hamiltonian(f, x, p, t), expected)
    assert torch.equal(hamiltonian(f, x, p, t[:, None]), expected)
    scalar = hamiltonian(f, x, p, 0.5)
    assert torch.equal(scalar, (p * f(torch.full((4, 1), 0.5, dtype=DTYPE), x)).sum(dim=1))


def test_costate_bad_input():
    f = field()
    start = x0()
    with pytest.raises(ValueError, match="exactly one"):
        costate(f, start, (0.0, 1.0))
    with pytest.raises(ValueError, match="exactly one"):
        costate(f, start, (0.0, 1.0), loss_fn=squared, grad_xT=start)
    with pytest.raises(ValueError, match="grad_xT"):
        costate(f, start, (0.0, 1.0), grad_xT=start[:2])
    with pytest.raises(TypeError, match="param_grads"):
        costate(lambda t, x: -x, start, (0.0, 1.0), loss_fn=squared, param_grads=True)
    with pytest.raises(ValueError, match="n_points"):
        costate(f, start, (0.0, 1.0), loss_fn=squared, n_points=1)
    with pytest.raises(ValueError, match="rtol"):
        costate(f, start, (0.0, 1.0), loss_fn=squared, rtol=0.0)
    with pytest.raises(ValueError, match="t_span"):
        costate(f, start, (1.0, 1.0), loss_fn=squared)
    with pytest.raises(ValueError, match="inf or NaN"):
        costate(f, start * float("nan"), (0.0, 1.0), loss_fn=squared)
    with pytest.raises(ValueError, match="same shape"):
        hamiltonian(f, start, start[:, :2], 0.0)
    cs = costate(f, start, (0.0, 1.0), loss_fn=squared, n_points=3)
    with pytest.raises(ValueError, match="v0"):
        tangent_pairing(f, cs, start[:2])
    with pytest.raises(TypeError, match="Costate"):
        noether_charge(cs.p)


@pytest.mark.cuda
def test_costate_on_cuda_matches_cpu():
    f = field()
    start = x0()
    cpu = costate(f, start, (0.0, 1.0), loss_fn=squared, rtol=RTOL, atol=ATOL)
    gpu = costate(f.cuda(), start.cuda(), (0.0, 1.0), loss_fn=squared, rtol=RTOL, atol=ATOL)
    assert gpu.p.device.type == "cuda"
    assert torch.allclose(gpu.p.cpu(), cpu.p, rtol=1e-6, atol=1e-9)
    assert float(hamiltonian_drift(f, gpu).relative_drift.max()) <= 10 * RTOL


@pytest.mark.cuda
def test_discrete_pairing_on_cuda_float32():
    f = MLPField().cuda()
    start = x0().float().cuda()
    v0 = torch.randn_like(start)

    def step(k, x):
        return odeint(f, x, (k * 0.1, (k + 1) * 0.1), solver=RK4(), dt0=0.1).value

    pairing = discrete_pairing(step, start, v0, squared, n_steps=10)
    assert pairing.values.device.type == "cuda"
    assert float(pairing.relative_drift.max()) <= 1e-5


def test_costate_agrees_with_the_ode_core_adjoint_trajectory():
    """Peer check: the per-sample costate vs equilibria.ode.adjoint_trajectory (whole batch)."""
    from equilibria.ode import adjoint_trajectory

    f = field()
    start = x0()
    cs = costate(f, start, (0.0, 1.0), loss_fn=squared, rtol=RTOL, atol=ATOL, n_points=9)
    grid = cs.t.flip(0).tolist()
    peer = adjoint_trajectory(
        f, cs.x[-1], cs.p[-1], (1.0, 0.0), t_record=grid, rtol=RTOL, atol=ATOL
    )
    assert torch.allclose(peer.a.flip(0), cs.p, rtol=1e-6, atol=1e-8)
