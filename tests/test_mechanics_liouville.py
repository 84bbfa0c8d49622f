"""Liouville: the phase-volume change of a flow, by the trace integral, the variational
equation and the adjoint, against closed forms and float64 finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from equilibria import mechanics
from equilibria.ode import Tsit5, odeint

F64 = torch.float64


def test_linear_field_scales_volume_by_exp_t_trace_and_the_adjoint_agrees():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, dtype=F64, generator=generator)
    x0 = torch.randn(4, 3, dtype=F64, generator=generator)
    pv = mechanics.liouville(lambda t, x: x @ a.T, x0, (0.0, 1.5))
    expected = pv.t[:, None] * torch.trace(a)  # log det exp(tA) = t tr A, at every grid time
    torch.testing.assert_close(pv.log_volume, expected.expand_as(pv.log_volume), atol=1e-9, rtol=0)
    torch.testing.assert_close(pv.log_det_flow, expected[-1].expand(4), atol=1e-8, rtol=0)
    torch.testing.assert_close(pv.log_det_adjoint, expected[-1].expand(4), atol=1e-8, rtol=0)
    assert float(pv.gap.max()) < 1e-8


def test_damped_pendulum_loses_volume_at_rate_gamma_and_the_undamped_one_keeps_it():
    # dq = p, dp = -sin q - gamma p: tr(dF/dx) = -gamma everywhere, although F is nonlinear
    x0 = torch.tensor([[0.3, 0.0], [2.0, 1.0], [-1.0, 0.5]], dtype=F64)
    for gamma in (0.0, 0.7):
        def pendulum(t, x, gamma=gamma):
            q, p = x[:, :1], x[:, 1:]
            return torch.cat([p, -torch.sin(q) - gamma * p], dim=1)

        pv = mechanics.liouville(pendulum, x0, (0.0, 3.0))
        for value in (pv.log_volume[-1], pv.log_det_flow, pv.log_det_adjoint):
            torch.testing.assert_close(value, torch.full((3,), -3.0 * gamma, dtype=F64),
                                       atol=1e-8, rtol=0)


class _Field(torch.nn.Module):
    """A time-dependent tanh MLP field on R^2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)
        ).double()

    def forward(self, t, x):
        return self.net(torch.cat([x, t.to(x)], dim=1))


def test_nonlinear_field_three_ways_and_float64_finite_differences_agree():
    field = _Field()
    x0 = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    t_span = (0.0, 2.0)
    pv = mechanics.liouville(field, x0, t_span)
    assert float(pv.gap.max()) < 1e-7
    assert float(pv.log_det_flow.abs().min()) > 0.01  # the flow does change volume here
    # central differences of the flow map x(T) w.r.t. x0
    h, columns = 1e-5, []
    with torch.no_grad():
        for i in range(2):
            step = torch.zeros_like(x0)
            step[:, i] = h
            plus = odeint(field, x0 + step, t_span, solver=Tsit5(), rtol=1e-11, atol=1e-13)
            minus = odeint(field, x0 - step, t_span, solver=Tsit5(), rtol=1e-11, atol=1e-13)
            columns.append((plus.value - minus.value) / (2 * h))
    jacobian = torch.stack(columns, dim=2)
    torch.testing.assert_close(
        pv.log_det_flow, torch.linalg.slogdet(jacobian).logabsdet, atol=1e-6, rtol=0
    )


def test_per_sample_a_sample_alone_equals_itself_in_a_batch():
    field = _Field()
    x0 = torch.tensor([[0.1, -0.2], [3.0, 2.0], [-1.5, 0.4]], dtype=F64)
    both = mechanics.liouville(field, x0, (0.0, 1.0), adjoint=False)
    alone = mechanics.liouville(field, x0[1:2], (0.0, 1.0), adjoint=False)
    assert both.log_det_adjoint is None
    assert math.isclose(float(both.log_det_flow[1]), float(alone.log_det_flow[0]), abs_tol=1e-10)


def test_bad_input_names_the_argument():
    field = _Field()
    x0 = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="at most 64"):
        mechanics.liouville(lambda t, x: x, torch.zeros(1, 65), (0.0, 1.0))
    with pytest.raises(ValueError, match="t0 != T"):
        mechanics.liouville(field, x0, (1.0, 1.0))
    with pytest.raises(TypeError, match="adjoint must be a bool"):
        mechanics.liouville(field, x0, (0.0, 1.0), adjoint="yes")
    with pytest.raises(TypeError, match="x0 must be a floating tensor"):
        mechanics.liouville(field, torch.zeros(2, 2, dtype=torch.int64), (0.0, 1.0))
    with pytest.raises(ValueError, match="x0"):
        mechanics.liouville(field, torch.full((2, 2), float("nan"), dtype=F64), (0.0, 1.0))
