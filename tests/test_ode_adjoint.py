"""Gradients through odeint: Adjoint vs Backprop vs central finite differences (float64)."""

import pytest
import torch
from scipy.linalg import expm

import equilibria as eq
from equilibria.nn import NeuralODE
from equilibria.ode import Adjoint, Backprop, adjoint_trajectory, odeint, odeint_adjoint
from problems import MLPField

TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _loss_fixed_steps(field, y0, weights, t_eval=None):
    """The loss with a fine fixed-step Tsit5 (error ~1e-13): smooth in the inputs, so
    central differences of it are accurate (adaptive step selection would jump)."""
    sol = odeint(field, y0, (0.0, 1.0), solver=eq.Tsit5(), n_steps=200, t_eval=t_eval)
    return float((sol.value * weights).sum())


def _directional_fd(field, y0, weights, direction_params, direction_y0, t_eval=None,
                    h=1e-5):
    params = list(field.parameters())
    with torch.no_grad():
        def shifted(sign):
            for p, v in zip(params, direction_params):
                p.add_(sign * h * v)
            value = _loss_fixed_steps(field, y0 + sign * h * direction_y0, weights, t_eval)
            for p, v in zip(params, direction_params):
                p.sub_(sign * h * v)
            return value

        return (shifted(1.0) - shifted(-1.0)) / (2 * h)


@pytest.mark.parametrize("with_t_eval", [False, True], ids=["t1", "t_eval"])
def test_adjoint_backprop_and_finite_differences_agree(with_t_eval):
    torch.manual_seed(0)
    field = MLPField(dim=3, hidden=8)
    y0 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t_eval = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64) if with_t_eval else None
    shape = (4, 4, 3) if with_t_eval else (4, 3)
    weights = torch.randn(shape, dtype=torch.float64)
    params = list(field.parameters())

    backprop = odeint(field, y0, (0.0, 1.0), t_eval=t_eval, **TIGHT)
    g_backprop = torch.autograd.grad((backprop.value * weights).sum(), [y0, *params])
    adjoint = odeint_adjoint(field, y0, (0.0, 1.0), t_eval=t_eval, **TIGHT)
    g_adjoint = torch.autograd.grad((adjoint.value * weights).sum(), [y0, *params])
    assert torch.allclose(adjoint.value, backprop.value, rtol=0, atol=1e-14)
    assert adjoint.stats["adjoint_nfe"] > 0
    for ga, gb in zip(g_adjoint, g_backprop):
        assert _rel(ga, gb) < 1e-6

    # central differences along random directions (params and y0 together, then y0 alone)
    for seed in range(2):
        gen = torch.Generator().manual_seed(seed)
        d_params = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        d_y0 = torch.randn(y0.shape, generator=gen, dtype=y0.dtype)
        if seed == 1:
            d_params = [torch.zeros_like(p) for p in params]
        fd = _directional_fd(field, y0.detach(), weights, d_params, d_y0, t_eval)
        for grads in (g_adjoint, g_backprop):
            analytic = float((grads[0] * d_y0).sum()) + sum(
                float((g * v).sum()) for g, v in zip(grads[1:], d_params)
            )
            assert abs(analytic - fd) <= 1e-6 * abs(fd), (analytic, fd)


def test_adjoint_backwards_in_time_and_fixed_step():
    field = MLPField(dim=2, hidden=6)
    y0 = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    backwards_eval = torch.tensor([0.8, 0.1, -0.5], dtype=torch.float64)
    for kwargs in ({"t_span": (1.0, -0.5), **TIGHT},
                   {"t_span": (1.0, -0.5), "t_eval": backwards_eval, **TIGHT},
                   {"t_span": (0.0, 1.0), "solver": eq.RK4(), "dt0": 0.01}):
        back = odeint(field, y0, **kwargs)
        grads_b = torch.autograd.grad(back.value.pow(2).sum(), [y0, *field.parameters()])
        adj_kwargs = dict(kwargs)
        if "solver" in kwargs:
            # the backward solve of an RK4 forward: same fixed step
            adj_kwargs["gradient"] = Adjoint(solver=eq.Tsit5(), rtol=1e-10, atol=1e-12)
        adj = odeint_adjoint(field, y0, **adj_kwargs)
        grads_a = torch.autograd.grad(adj.value.pow(2).sum(), [y0, *field.parameters()])
        tol = 1e-6 if "solver" not in kwargs else 1e-5  # RK4 dt=0.01 vs exact adjoint: ~dt^4
        for ga, gb in zip(grads_a, grads_b):
            assert _rel(ga, gb) < tol


def _saved_bytes(fn):
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def test_adjoint_memory_does_not_grow_with_steps():
    field = MLPField(dim=4, hidden=16)
    y0 = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    saved = {}
    for gradient in (Adjoint(), Backprop()):
        for t1 in (1.0, 8.0):
            node = NeuralODE(field, t_span=(0.0, t1), gradient=gradient, rtol=1e-8, atol=1e-10)
            saved[type(gradient).__name__, t1], out = _saved_bytes(lambda: node(y0))  # noqa: B023
            out.sum().backward()
    assert saved["Adjoint", 1.0] == saved["Adjoint", 8.0]
    assert saved["Backprop", 8.0] > 3 * saved["Backprop", 1.0]
    assert saved["Adjoint", 8.0] < saved["Backprop", 1.0]


def test_neural_ode_module():
    field = MLPField(dim=3, hidden=8)
    y0 = torch.randn(5, 3, dtype=torch.float64)
    grads = {}
    for gradient in (Adjoint(), Backprop()):
        node = NeuralODE(field, t_span=(0.0, 1.0), gradient=gradient, **TIGHT)
        field.zero_grad()
        out = node(y0)
        assert out.shape == (5, 3)
        assert isinstance(node.last_solution, eq.Solution)
        assert bool(node.last_solution.success.all())
        out.pow(2).sum().backward()
        grads[type(gradient).__name__] = [p.grad.clone() for p in field.parameters()]
    for ga, gb in zip(grads["Adjoint"], grads["Backprop"]):
        assert _rel(ga, gb) < 1e-6
    node = NeuralODE(field, t_eval=[0.0, 0.5, 1.0])
    assert node(y0).shape == (3, 5, 3)


def test_adjoint_trajectory_closed_form_and_conservation():
    """Linear y' = A y: a(t) = expm(A^T (t1 - t)) a(t1); H = a . f is conserved."""
    a_mat = torch.tensor([[-0.2, 1.5], [-1.0, 0.1]], dtype=torch.float64)

    def field(t, y):
        return y @ a_mat.T

    y1 = torch.tensor([[1.0, -0.5], [0.3, 0.8]], dtype=torch.float64)
    a1 = torch.tensor([[0.7, 0.2], [-1.0, 0.4]], dtype=torch.float64)
    t_record = torch.tensor([2.0, 1.5, 1.0, 0.0], dtype=torch.float64)
    traj = adjoint_trajectory(field, y1, a1, (2.0, 0.0), t_record=t_record, **TIGHT)
    assert bool(traj.solution.success.all())
    for k, t in enumerate(t_record.tolist()):
        prop = torch.tensor(expm(a_mat.numpy().T * (2.0 - t)))
        assert torch.allclose(traj.a[k], a1 @ prop.T, rtol=0, atol=1e-8)
        hamiltonian = (traj.a[k] * field(None, traj.y[k])).sum(dim=1)
        assert torch.allclose(hamiltonian, (a1 * field(None, y1)).sum(dim=1), atol=1e-8)


def test_bad_gradient_input():
    field = MLPField()
    with pytest.raises(TypeError, match="Adjoint"):
        odeint_adjoint(field, torch.ones(2, 3, dtype=torch.float64), gradient=Backprop())
    with pytest.raises(ValueError, match="Adjoint.rtol"):
        Adjoint(rtol=0.0)
    with pytest.raises(TypeError, match="nn.Module"):
        NeuralODE(lambda t, y: y)
    with pytest.raises(TypeError, match="gradient"):
        NeuralODE(field, gradient="adjoint")
    with pytest.raises(ValueError, match="a_end"):
        adjoint_trajectory(field, torch.ones(2, 3), torch.ones(2, 2), (1.0, 0.0))
    with pytest.raises(ValueError, match="y0 contains inf"):
        odeint_adjoint(field, torch.full((2, 3), float("nan"), dtype=torch.float64))


@pytest.mark.cuda
def test_cuda_adjoint_matches_cpu():
    field = MLPField(dim=3, hidden=8)
    y0 = torch.randn(4, 3, dtype=torch.float64)
    grads = {}
    for device in ("cpu", "cuda"):
        f_dev = field.to(device)
        y = y0.to(device).requires_grad_(True)
        out = NeuralODE(f_dev, **TIGHT)(y)
        assert out.device.type == device
        grads[device] = torch.autograd.grad(out.sum(), y)[0].cpu()
    assert torch.allclose(grads["cpu"], grads["cuda"], rtol=1e-8, atol=1e-10)


def test_backprop_through_compaction_and_t_eval():
    """Dropping finished rows mid-solve keeps autograd intact (index_select/index_copy)."""

    def rotation(t, y, omega):
        return omega[:, None] * torch.stack([y[:, 1], -y[:, 0]], dim=1)

    omega = torch.tensor([1.0, 1.0, 1.0, 15.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    t_eval = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)
    grads = {}
    for compact in (True, False):
        sol = odeint(rotation, y0, (0.0, 1.0), t_eval=t_eval, args=(omega,), compact=compact,
                     **TIGHT)
        grads[compact] = torch.autograd.grad(sol.value.pow(2).sum() + sol.value.sum(),
                                             [y0, omega])
    for g_compact, g_full in zip(grads[True], grads[False]):
        assert torch.allclose(g_compact, g_full, rtol=1e-9, atol=1e-12)
    # closed form: y(t) = R(omega t) y0, so d/d y0 of sum(y(1)) is R(omega)^T 1
    c, s = torch.cos(omega.detach()), torch.sin(omega.detach())
    sol = odeint(rotation, y0, (0.0, 1.0), args=(omega,), **TIGHT)
    g_y0 = torch.autograd.grad(sol.value.sum(), y0)[0]
    expected = torch.stack([c - s, s + c], dim=1)
    assert torch.allclose(g_y0, expected, atol=1e-8)


def test_seminorm_takes_fewer_backward_steps_at_the_same_gradient_accuracy():
    # A field with many parameters: their integrals a_theta dominate the full error norm.
    torch.manual_seed(3)
    field = MLPField(dim=4, hidden=64)
    y0 = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(16, 4, dtype=torch.float64)
    params = list(field.parameters())
    exact = odeint(field, y0, (0.0, 2.0), **TIGHT)
    reference = torch.autograd.grad((exact.value * weights).sum(), [y0, *params])
    loose = {"rtol": 1e-6, "atol": 1e-8}
    results = {}
    for seminorm in (False, True):
        sol = odeint_adjoint(field, y0, (0.0, 2.0), gradient=Adjoint(seminorm=seminorm), **loose)
        grads = torch.autograd.grad((sol.value * weights).sum(), [y0, *params])
        error = max(_rel(g, r) for g, r in zip(grads, reference))
        results[seminorm] = (sol.stats["adjoint_nfe"], error)
    (nfe_full, error_full), (nfe_semi, error_semi) = results[False], results[True]
    assert nfe_semi < nfe_full, results
    # both within the tolerance's reach of the exact gradient, the seminorm no worse than 10x
    assert error_full < 1e-4 and error_semi < max(1e-4, 10 * error_full), results


def test_error_norm_is_checked():
    y0 = torch.ones(3, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="error_norm must be callable"):
        odeint(lambda t, y: -y, y0, error_norm="rms")
    with pytest.raises(ValueError, match="one norm per row"):
        odeint(lambda t, y: -y, y0, error_norm=lambda e: e.abs().max())
    with pytest.raises(TypeError, match="seminorm"):
        Adjoint(seminorm="yes")
    # a custom norm is used: with one fast and seven slow components the max norm is
    # stricter than RMS, so it takes more steps
    rates = torch.tensor([[5.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)
    y0 = torch.ones(1, 8, dtype=torch.float64)
    rms = odeint(lambda t, y: -rates * y, y0, rtol=1e-6, atol=1e-9)
    inf_norm = odeint(lambda t, y: -rates * y, y0, rtol=1e-6, atol=1e-9,
                      error_norm=lambda e: e.abs().amax(dim=1))
    assert bool(inf_norm.success.all())
    assert int(inf_norm.stats["n_steps"][0]) > int(rms.stats["n_steps"][0])


class _Forced(torch.nn.Module):
    """A non-autonomous field, so that dL/dt0 and dL/dt1 are not simply opposite."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(0.5 * torch.randn(3, 3, generator=generator,
                                                      dtype=torch.float64))

    def forward(self, t, y):
        return torch.tanh(y @ self.w.T) + torch.sin(2.0 * t) * y


@pytest.mark.parametrize("with_t_eval", [False, True])
def test_time_span_gradients_match_finite_differences(with_t_eval):
    field = _Forced()
    y0 = torch.tensor([[0.3, -0.2, 0.5], [1.0, 0.4, -0.7]], dtype=torch.float64)
    weights = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1]], dtype=torch.float64)
    t_eval = [0.2, 0.6, 0.9] if with_t_eval else None
    tight = dict(rtol=1e-11, atol=1e-13)

    def loss(t0, t1):
        value = odeint_adjoint(field, y0, (t0, t1), t_eval=t_eval, **tight).value
        return (weights * value).sum()

    t0 = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    t1 = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    loss(t0, t1).backward()
    h = 1e-5
    with torch.no_grad():
        fd_t0 = (loss(0.1 + h, 1.0) - loss(0.1 - h, 1.0)) / (2 * h)
        fd_t1 = (loss(0.1, 1.0 + h) - loss(0.1, 1.0 - h)) / (2 * h)
    torch.testing.assert_close(t0.grad, fd_t0, rtol=1e-6, atol=1e-9)
    if with_t_eval:
        # the outputs sit at fixed times inside the span: they do not depend on t1
        assert float(t1.grad) == 0.0 and abs(float(fd_t1)) < 1e-9
    else:
        torch.testing.assert_close(t1.grad, fd_t1, rtol=1e-6, atol=1e-9)
        assert abs(float(t0.grad + t1.grad)) > 1e-3  # non-autonomous: not just opposite


def test_a_learned_end_time_trains_and_backprop_refuses_it():
    field = _Forced()
    end = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float32))
    node = NeuralODE(field.float(), t_span=(0.0, end), rtol=1e-6, atol=1e-8)
    y0 = torch.ones(2, 3)
    node(y0).pow(2).sum().backward()
    assert end.grad is not None and float(end.grad) != 0.0
    assert node.last_solution.stats["adjoint_nfe"] > 0
    with pytest.raises(ValueError, match="t_span requires grad.*odeint_adjoint"):
        NeuralODE(field, t_span=(0.0, end), gradient=Backprop())(y0)
    with pytest.raises(ValueError, match="t_span requires grad"):
        odeint(lambda t, y: -y, y0, (0.0, end))
    with torch.no_grad():  # nothing to lose without autograd
        odeint(lambda t, y: -y, y0, (0.0, end))


def test_a_failed_backward_solve_is_reported():
    """The backward solve's status comes back in stats["adjoint_status"]: SUCCESS normally,
    MAX_STEPS when its step bound is too small for it."""
    field = MLPField(dim=3, hidden=8)
    y0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    good = odeint_adjoint(field, y0, (0.0, 1.0))
    good.value.sum().backward()
    assert good.stats["adjoint_status"] == eq.Status.SUCCESS
    bad = odeint_adjoint(field, y0, (0.0, 1.0), gradient=Adjoint(max_steps=2))
    bad.value.sum().backward()
    assert bad.stats["adjoint_status"] == eq.Status.MAX_STEPS


def test_per_sample_adjoint_matches_backprop_and_is_independent_of_batch_mates():
    """Adjoint(per_sample=True): each sample's backward solve takes its own steps. Gradients
    (y0, parameters, conditioning args) agree with Backprop; a sample's gradient equals the
    one it gets alone, far closer than the shared backward's (which depends on the batch)."""
    from test_ode_conditioning import ConditionedField

    field = ConditionedField()
    gen = torch.Generator().manual_seed(9)
    y0 = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    x[-1] *= 5.0  # a faster sample: the shared backward steps the whole batch at its pace
    x.requires_grad_(True)
    params = list(field.parameters())

    def grads(gradient, rows=slice(None)):
        if gradient is None:
            sol = odeint(field, y0[rows], (0.0, 1.0), args=(x[rows],), **TIGHT)
        else:
            sol = odeint_adjoint(field, y0[rows], (0.0, 1.0), args=(x[rows],), gradient=gradient,
                                 **TIGHT)
        out = torch.autograd.grad(sol.value.pow(2).sum(), [y0, x, *params])
        return out, sol

    backprop, _ = grads(None)
    per_sample, sol = grads(Adjoint(per_sample=True))
    assert sol.stats["adjoint_status"] == eq.Status.SUCCESS
    for g, ref in zip(per_sample, backprop):
        assert _rel(g, ref) < 1e-7
    alone, _ = grads(Adjoint(per_sample=True), slice(0, 1))
    shared, _ = grads(Adjoint())
    shared_alone, _ = grads(Adjoint(), slice(0, 1))
    diff_per_sample = float((alone[0][0] - per_sample[0][0]).abs().max())
    diff_shared = float((shared_alone[0][0] - shared[0][0]).abs().max())
    assert diff_per_sample < 1e-13 < diff_shared


def test_per_sample_adjoint_needs_module_parameters():
    y0 = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    sol = odeint_adjoint(lambda t, y: -w * y, y0, params=[w], gradient=Adjoint(per_sample=True))
    with pytest.raises(ValueError, match="nn.Module"):
        sol.value.sum().backward()
    with pytest.raises(TypeError, match="per_sample"):
        Adjoint(per_sample=1)
