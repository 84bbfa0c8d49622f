"""Feedforward <-> ODE converters, the ODE-likeness score, and the rings data set."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from equilibria.data.rings import Rings, make_rings
from equilibria.mechanics import (
    LayerODE,
    LayerStack,
    layers_to_ode,
    ode_likeness,
    ode_to_layers,
)

DTYPE = torch.float64


def smooth_ode(dim=3, gamma=0.5, seed=0):
    """dx/dt = (A + sin(2πt) B) x + cos(t) c − γ x³ on [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    a = 0.6 * torch.randn(dim, dim, generator=gen, dtype=DTYPE) / math.sqrt(dim)
    b = 0.6 * torch.randn(dim, dim, generator=gen, dtype=DTYPE) / math.sqrt(dim)
    c = torch.randn(dim, generator=gen, dtype=DTYPE)

    def w(t):
        return a + torch.sin(2 * math.pi * t).to(DTYPE)[:, None, None] * b

    def bias(t):
        return torch.cos(t).to(DTYPE)[:, None] * c

    return LayerODE(w=w, b=bias, g=lambda x: -gamma * x**3, T=1.0)


def reference_solution(ode, x0):
    """scipy DOP853 at rtol 1e-12, one sample at a time."""
    out = []
    for sample in x0:

        def rhs(t, y):
            x = torch.from_numpy(y)[None]
            return ode.vector_field(torch.tensor([t], dtype=DTYPE), x)[0].numpy()

        sol = solve_ivp(rhs, (0.0, ode.T), sample.numpy(), method="DOP853", rtol=1e-12, atol=1e-14)
        out.append(sol.y[:, -1])
    return torch.from_numpy(np.stack(out))


def test_network_converges_to_ode_at_first_order_in_one_over_depth():
    ode = smooth_ode()
    x0 = torch.randn(4, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    reference = reference_solution(ode, x0)
    depths = [40, 80, 160, 320, 640]
    gaps = [float((ode_to_layers(ode, n)(x0) - reference).abs().max()) for n in depths]
    slope = -np.polyfit(np.log(depths), np.log(gaps), 1)[0]
    assert 0.9 <= slope <= 1.5, (slope, gaps)
    assert gaps[-1] < gaps[0] / 10


def test_layers_to_ode_to_layers_is_bit_exact_for_power_of_two_steps():
    gen = torch.Generator().manual_seed(2)
    weights = torch.eye(5, dtype=DTYPE) + 0.1 * torch.randn(8, 5, 5, generator=gen, dtype=DTYPE)
    biases = torch.randn(8, 5, generator=gen, dtype=DTYPE)
    stack = LayerStack(weights, biases, torch.tanh)
    ode = layers_to_ode(stack, T=1.0)  # Δt = 1/8
    back = ode_to_layers(ode)
    assert torch.equal(back.weights, stack.weights)
    assert torch.equal(back.biases, stack.biases)
    assert back.h is stack.h
    # The ODE's rates are the finite differences of the layers.
    assert torch.allclose(ode.w[3], (weights[3] - torch.eye(5, dtype=DTYPE)) * 8, rtol=0, atol=0)
    z = torch.linspace(-2, 2, 11, dtype=DTYPE)[:, None].expand(11, 5)
    assert torch.allclose(ode.g(z), (torch.tanh(z) - z) * 8, rtol=1e-15, atol=0)


def test_layers_round_trip_within_ulps_for_any_step():
    gen = torch.Generator().manual_seed(3)
    weights = torch.eye(4, dtype=DTYPE) + 0.3 * torch.randn(7, 4, 4, generator=gen, dtype=DTYPE)
    stack = LayerStack(weights, torch.randn(7, 4, generator=gen, dtype=DTYPE), torch.relu)
    back = ode_to_layers(layers_to_ode(stack, T=0.3))
    eps = torch.finfo(DTYPE).eps
    assert (back.weights - weights).abs().max() <= 4 * eps * weights.abs().max()
    assert (back.biases - stack.biases).abs().max() <= 4 * eps * stack.biases.abs().max()


def test_ode_to_layers_to_ode_within_rounding_bound():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(6, 3, 3, generator=gen, dtype=DTYPE)
    b = torch.randn(6, 3, generator=gen, dtype=DTYPE)
    g = lambda x: -(x**3)  # noqa: E731
    ode = LayerODE(w=w, b=b, g=g, T=0.75)
    stack = ode_to_layers(ode)
    dt = 0.75 / 6
    assert torch.allclose(stack.weights, torch.eye(3, dtype=DTYPE) + dt * w, rtol=0, atol=0)
    back = layers_to_ode(stack, T=0.75)
    # I + Δt w rounds once (≤ eps/2 · |W|), dividing by Δt scales that error by 1/Δt.
    bound = torch.finfo(DTYPE).eps * (1 + dt * w.abs().max()) / dt
    assert (back.w - w).abs().max() <= bound
    assert (back.b - b).abs().max() <= 4 * torch.finfo(DTYPE).eps * b.abs().max()
    assert back.g is g


def test_piecewise_constant_ode_steps_each_piece_with_its_weights():
    w = torch.stack([torch.zeros(2, 2), torch.eye(2)]).to(DTYPE)
    b = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=DTYPE)
    ode = LayerODE(w=w, b=b, g=lambda x: torch.zeros_like(x), T=2.0)
    t = torch.tensor([0.5, 1.5, 2.0], dtype=DTYPE)
    x = torch.ones(3, 2, dtype=DTYPE)
    expected = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]], dtype=DTYPE)
    assert torch.equal(ode.vector_field(t, x), expected)
    stack = ode_to_layers(ode, n_layers=4)
    assert torch.equal(stack.weights[1], torch.eye(2, dtype=DTYPE))
    assert torch.equal(stack.weights[2], 1.5 * torch.eye(2, dtype=DTYPE))
    assert torch.equal(stack.biases[:2], 0.5 * b[:1].expand(2, 2))


def test_ode_likeness_bounded_for_ode_networks_and_linear_in_depth_otherwise():
    ode = smooth_ode(gamma=0.5)
    scores = [ode_likeness(ode_to_layers(ode, n)) for n in (50, 100, 200)]
    weight = [s.weight_score for s in scores]
    assert max(weight) / min(weight) < 1.1
    # L · sup |h(z) − z| = L · Δt · γ sup |z|³ = T γ on [-1, 1].
    for s in scores:
        assert s.nonlinearity_score == pytest.approx(0.5, rel=1e-12)
    gen = torch.Generator().manual_seed(5)
    generic = [
        ode_likeness(LayerStack(torch.randn(n, 3, 3, generator=gen), torch.zeros(n, 3), torch.tanh))
        for n in (50, 100, 200)
    ]
    assert generic[2].nonlinearity_score == pytest.approx(4 * generic[0].nonlinearity_score)
    assert generic[2].nonlinearity_score == pytest.approx(200 * (1 - math.tanh(1.0)), rel=1e-6)
    assert generic[2].weight_score > 3 * generic[0].weight_score


def test_from_linears_reads_weights_and_missing_bias_as_zero():
    lin_a, lin_b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3, bias=False)
    stack = LayerStack.from_linears([lin_a, lin_b], torch.relu)
    x = torch.randn(5, 3)
    assert torch.allclose(stack(x), torch.relu(lin_b(torch.relu(lin_a(x)))))
    assert stack(x, return_all=True).shape == (3, 5, 3)


def test_converter_bad_input():
    with pytest.raises(ValueError, match="weights"):
        LayerStack(torch.zeros(2, 3, 4), torch.zeros(2, 3), torch.tanh)
    with pytest.raises(ValueError, match="biases"):
        LayerStack(torch.zeros(2, 3, 3), torch.zeros(3, 3), torch.tanh)
    with pytest.raises(TypeError, match="h"):
        LayerStack(torch.zeros(2, 3, 3), torch.zeros(2, 3), "tanh")
    with pytest.raises(ValueError, match="T"):
        LayerODE(w=torch.zeros(1, 2, 2), b=torch.zeros(1, 2), g=torch.tanh, T=0.0)
    ode = LayerODE(w=torch.zeros(3, 2, 2), b=torch.zeros(3, 2), g=torch.tanh)
    with pytest.raises(ValueError, match="multiple"):
        ode_to_layers(ode, n_layers=4)
    with pytest.raises(ValueError, match="n_layers"):
        ode_to_layers(smooth_ode())
    stack = LayerStack(torch.zeros(2, 3, 3), torch.zeros(2, 3), torch.tanh)
    with pytest.raises(ValueError, match="x must"):
        stack(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="z_range"):
        ode_likeness(stack, z_range=(1.0, -1.0))


def test_rings_geometry_balance_and_seed():
    x, y = make_rings(1001, inner_radius=1.0, ring_radii=(2.0, 3.0), seed=7, dtype=DTYPE)
    assert x.shape == (1001, 2) and y.shape == (1001,) and x.dtype == DTYPE
    radius = x.norm(dim=1)
    assert int((y == 0).sum()) == 500 and int((y == 1).sum()) == 501
    assert radius[y == 0].max() <= 1.0 and radius[y == 1].min() >= 2.0
    assert radius[y == 1].max() <= 3.0
    # Uniform by area: half of the disc's points lie inside radius 1/sqrt(2).
    assert abs(float((radius[y == 0] < 2**-0.5).double().mean()) - 0.5) < 0.07
    x2, y2 = make_rings(1001, inner_radius=1.0, ring_radii=(2.0, 3.0), seed=7, dtype=DTYPE)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = make_rings(1001, inner_radius=1.0, ring_radii=(2.0, 3.0), seed=8, dtype=DTYPE)
    assert not torch.equal(x, x3)
    noisy, _ = make_rings(1001, ring_radii=(2.0, 3.0), noise=0.5, seed=7, dtype=DTYPE)
    assert not torch.equal(noisy, x)
    data = Rings(n_samples=10, seed=1)
    point, label = data[3]
    assert len(data) == 10 and point.shape == (2,) and label.dtype == torch.int64


def test_rings_bad_input():
    with pytest.raises(ValueError, match="ring_radii"):
        make_rings(10, inner_radius=2.0, ring_radii=(1.0, 3.0))
    with pytest.raises(ValueError, match="noise"):
        make_rings(10, noise=-1.0)
    with pytest.raises(TypeError, match="n_samples"):
        make_rings(10.5)
    with pytest.raises(TypeError, match="dtype"):
        make_rings(10, dtype=torch.int64)
