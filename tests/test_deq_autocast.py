"""DEQ under torch.autocast: f computes in low precision, the solver keeps the state wide.

CPU autocast supports bfloat16 and float16, so these run everywhere; the same code path
serves CUDA autocast.
"""

import warnings

import pytest
import torch
from torch import nn

import equilibria as eq

LOW = [torch.bfloat16, torch.float16]
# Relative gradient error against the float32 implicit gradient that low-precision f may
# cost (bfloat16 keeps 8 bits, float16 11). Measured: 4e-3 to 1.1e-2 under bfloat16, 5e-4 to
# 2e-3 under float16; the Neumann terms OneStep drops are 0.25 here, so a lost term fails.
GRAD_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
RTOL = {torch.bfloat16: 4e-3, torch.float16: 5e-4}


class Cell(nn.Module):
    def __init__(self, width: int = 48, inputs: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.inj = nn.Linear(inputs, width)
        with torch.no_grad():
            self.lin.weight.mul_(0.6 / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + self.inj(x))


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    return Cell(), torch.randn(16, 8)


def _grads(deq: eq.DEQ, x: torch.Tensor, low: torch.dtype | None):
    deq.zero_grad()
    if low is None:
        z = deq(x)
    else:
        with torch.autocast("cpu", dtype=low):
            z = deq(x)
    z.float().pow(2).sum().backward()
    return z, torch.cat([p.grad.flatten() for p in deq.f_module.parameters()])


@pytest.mark.parametrize("low", LOW)
def test_forward_keeps_the_state_wide_and_finds_the_fixed_point(low):
    cell, x = _setup()
    reference = eq.DEQ(cell, z_shape=(48,), atol=1e-10, rtol=1e-8, max_steps=200)
    with torch.no_grad():
        z_ref = reference(x)
    deq = eq.DEQ(cell, z_shape=(48,), atol=1e-8, rtol=RTOL[low])
    with torch.no_grad(), torch.autocast("cpu", dtype=low):
        z = deq(x)
    solution = deq.last_solution
    assert z.dtype == torch.float32 and solution.value.dtype == torch.float32
    assert bool((solution.status == eq.Status.SUCCESS).all())
    # The fixed point of the rounded map differs from float32's by about its rounding.
    error = (z - z_ref).norm(dim=1) / z_ref.norm(dim=1)
    assert float(error.max()) < 20 * torch.finfo(low).eps


@pytest.mark.parametrize("low", LOW)
@pytest.mark.parametrize(
    "backward",
    ["implicit-gmres", "implicit-anderson", "unrolled"],
)
def test_gradients_match_float32_to_the_precision_of_f(low, backward):
    backward = {
        "implicit-gmres": eq.Implicit(),
        "implicit-anderson": eq.Implicit(linear_solver=eq.Anderson(), rtol=RTOL[low]),
        "unrolled": eq.Unrolled(),
    }[backward]
    cell, x = _setup()
    reference = eq.DEQ(cell, z_shape=(48,), atol=1e-10, rtol=1e-8, max_steps=200)
    _, g_ref = _grads(reference, x, None)
    deq = eq.DEQ(cell, backward=backward, z_shape=(48,), atol=1e-8, rtol=RTOL[low])
    z, g = _grads(deq, x, low)
    assert z.dtype == torch.float32
    assert bool(torch.isfinite(g).all())
    relative = float((g - g_ref).norm() / g_ref.norm())
    assert relative < GRAD_TOL[low], relative
    if isinstance(backward, eq.Implicit):
        assert bool((deq.last_backward_stats["status"] == eq.Status.SUCCESS).all())


@pytest.mark.parametrize("backward", [eq.OneStep(), eq.Phantom(k=3)], ids=["onestep", "phantom"])
def test_approximate_strategies_run_under_autocast(backward):
    cell, x = _setup()
    _, g_ref = _grads(eq.DEQ(cell, backward=backward, z_shape=(48,)), x, None)
    _, g = _grads(eq.DEQ(cell, backward=backward, z_shape=(48,), rtol=4e-3), x, torch.bfloat16)
    assert float((g - g_ref).norm() / g_ref.norm()) < GRAD_TOL[torch.bfloat16]


def test_skip_deq_prediction_is_widened_and_spectral_radius_works():
    cell, x = _setup()
    deq = eq.DEQ(cell, init=nn.Linear(8, 48), rtol=4e-3, spectral_radius_iters=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = deq(x)
        loss = z.float().pow(2).mean() + deq.skip_loss()
    loss.backward()
    assert deq.last_solution.value.dtype == torch.float32
    assert bool((deq.last_solution.status == eq.Status.SUCCESS).all())
    radius = deq.last_solution.stats["spectral_radius"]
    assert bool(((radius > 0) & (radius < 0.7)).all())  # ||W|| = 0.6 and |tanh'| <= 1
    assert deq.init.weight.grad is not None and bool(torch.isfinite(deq.init.weight.grad).all())


def _forward_bf16(deq: eq.DEQ, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return deq(x)


def test_warns_once_when_rtol_is_below_what_the_dtype_reaches():
    cell, x = _setup()
    deq = eq.DEQ(cell, z_shape=(48,), rtol=1e-4, max_steps=5)
    with pytest.warns(RuntimeWarning, match=r"DEQ\(rtol=0.0001\) -> DEQ\(..., rtol=4e-03\)"):
        _forward_bf16(deq, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _forward_bf16(deq, x)  # once per DEQ
        _forward_bf16(eq.DEQ(cell, z_shape=(48,), rtol=4e-3), x)  # reachable: no warning
    backward = eq.Implicit(linear_solver=eq.Anderson())  # its default rtol 1e-6
    expected = r"Implicit\(rtol=1e-06\) -> Implicit\(linear_solver=Anderson\(\), rtol=4e-03\)"
    with pytest.warns(RuntimeWarning, match=expected):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eq.DEQ(cell, backward=backward, z_shape=(48,), rtol=4e-3)(x)


def test_warns_about_an_explicit_steady_state_under_autocast():
    cell, x = _setup()
    deq = eq.DEQ(cell, solver=eq.SteadyState(eq.Tsit5()), z_shape=(48,), rtol=4e-3)
    with pytest.warns(RuntimeWarning, match=r"SteadyState\(solver=Tsit5.*-> SteadyState\(\)"):
        _forward_bf16(deq, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _forward_bf16(eq.DEQ(cell, solver=eq.SteadyState(), z_shape=(48,), rtol=4e-3), x)


def test_low_precision_output_without_autocast_is_still_refused():
    class Narrowing(nn.Module):
        def forward(self, z, x):
            return torch.tanh(z + x).to(torch.bfloat16)

    with pytest.raises(ValueError, match="dtype"):
        eq.DEQ(Narrowing())(torch.randn(4, 3))


@pytest.mark.parametrize("solver", [eq.Anderson(), eq.Broyden(), eq.NewtonKrylov()],
                         ids=["anderson", "broyden", "newton-krylov"])
def test_solver_arithmetic_runs_outside_autocast(solver):
    # cos has no autocast rule, so under autocast only the solver's own matmuls (Gram rows,
    # least squares, Krylov bases) could change: they must not.
    z0 = torch.linspace(-1.0, 1.0, 24).reshape(4, 6)
    plain = eq.fixed_point(torch.cos, z0, solver=solver, atol=1e-7, rtol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = eq.fixed_point(torch.cos, z0, solver=solver, atol=1e-7, rtol=1e-7)
    assert under.value.dtype == torch.float32
    assert torch.equal(under.stats["n_steps"], plain.stats["n_steps"])
    torch.testing.assert_close(under.value, plain.value, rtol=0, atol=0)


def test_gmres_arithmetic_runs_outside_autocast():
    generator = torch.Generator().manual_seed(0)
    diagonal = 1.0 + torch.rand(3, 10, generator=generator)
    b = torch.randn(3, 10, generator=generator)
    plain = eq.GMRES(rtol=1e-7).solve(lambda v: diagonal * v + 0.1 * v.roll(1, dims=1), b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = eq.GMRES(rtol=1e-7).solve(lambda v: diagonal * v + 0.1 * v.roll(1, dims=1), b)
    torch.testing.assert_close(under.value, plain.value, rtol=0, atol=0)


def test_fixed_point_casts_a_low_precision_map_back_to_the_state():
    torch.manual_seed(0)
    layer = nn.Linear(6, 6)
    with torch.no_grad():
        layer.weight.mul_(0.5 / torch.linalg.matrix_norm(layer.weight, ord=2))
    z0 = torch.zeros(5, 6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(z0).dtype == torch.bfloat16
        solution = eq.fixed_point(lambda z: torch.tanh(layer(z)), z0, atol=1e-6, rtol=4e-3)
    assert solution.value.dtype == torch.float32
    assert bool((solution.status == eq.Status.SUCCESS).all())


def test_odeint_under_autocast_keeps_the_state_and_its_own_arithmetic_wide():
    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    y0 = torch.randn(3, 4)
    t_eval = torch.linspace(0.0, 1.0, 5)
    with torch.no_grad():
        plain = eq.odeint(lambda t, y: field(y), y0, t_eval=t_eval, rtol=1e-4, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = eq.odeint(lambda t, y: field(y), y0, t_eval=t_eval, rtol=1e-4, atol=1e-6)
            # A field with no autocast rule: the solver's own steps and dense output (a
            # matmul) must be bit for bit those of a run without autocast.
            same = eq.odeint(lambda t, y: torch.sin(y), y0, t_eval=t_eval)
        reference = eq.odeint(lambda t, y: torch.sin(y), y0, t_eval=t_eval)
    assert under.value.dtype == torch.float32
    assert bool((under.status == eq.Status.SUCCESS).all())
    # bfloat16 rounding of the field's output: ~3e-3 relative per evaluation.
    torch.testing.assert_close(under.value, plain.value, rtol=0, atol=2e-2)
    assert torch.equal(same.value, reference.value)


@pytest.mark.parametrize("gradient", [eq.Adjoint(), eq.Backprop()], ids=["adjoint", "backprop"])
def test_neural_ode_gradients_under_autocast(gradient):
    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4))

        def forward(self, t, y):
            return self.net(y)

    torch.manual_seed(0)
    field = Field()
    y0 = torch.randn(5, 4)

    def grads(low):
        field.zero_grad()
        node = eq.NeuralODE(field, t_span=(0.0, 1.0), gradient=gradient, rtol=1e-5, atol=1e-7)
        if low is None:
            y1 = node(y0)
        else:
            with torch.autocast("cpu", dtype=low):
                y1 = node(y0)
        assert y1.dtype == torch.float32
        y1.pow(2).sum().backward()
        return torch.cat([p.grad.flatten() for p in field.parameters()])

    reference = grads(None)
    for low in LOW:
        g = grads(low)
        assert float((g - reference).norm() / reference.norm()) < GRAD_TOL[low]


@pytest.mark.cuda
@pytest.mark.parametrize("low", LOW)
def test_cuda_autocast_gradients_match_float32(low):
    cell, x = _setup()
    cell, x = cell.cuda(), x.cuda()
    reference = eq.DEQ(cell, z_shape=(48,), atol=1e-10, rtol=1e-8, max_steps=200)
    _, g_ref = _grads(reference, x, None)
    deq = eq.DEQ(cell, z_shape=(48,), atol=1e-8, rtol=RTOL[low])
    deq.zero_grad()
    with torch.autocast("cuda", dtype=low):
        z = deq(x)
    z.float().pow(2).sum().backward()
    g = torch.cat([p.grad.flatten() for p in cell.parameters()])
    assert z.dtype == torch.float32
    assert float((g - g_ref).norm() / g_ref.norm()) < GRAD_TOL[low]


def test_bad_arguments_under_autocast_get_the_solvers_own_errors():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # a list is a structured state: its slots must be tensors
        with pytest.raises(TypeError, match=r"z0\[0\] must be a torch.Tensor"):
            eq.fixed_point(torch.cos, [1.0, 2.0])
        with pytest.raises(TypeError, match="f must be callable"):
            eq.fixed_point("cos", torch.zeros(2, 1))
        with pytest.raises(TypeError, match="unexpected keyword argument 'tol'"):
            eq.fixed_point(torch.cos, torch.zeros(2, 1), tol=1e-3)
