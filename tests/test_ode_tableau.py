"""Tableaus are checked data: bad ones are refused, the shipped ones satisfy order conditions."""

import math

import numpy as np
import pytest
import torch

import equilibria as eq
from equilibria.ode import ButcherTableau, rk_step
from equilibria.ode._rk import rk_stages
from equilibria.ode._trees import density, elementary_weights, size, trees

ALL = [eq.Euler(), eq.Midpoint(), eq.Heun(), eq.RK4(), eq.Bosh3(), eq.Dopri5(), eq.Tsit5()]


def _matrix(tab):
    s = tab.n_stages
    a = np.zeros((s, s))
    for i, row in enumerate(tab.a):
        a[i, :i] = row
    return a


def _order_conditions(b, a, c, order):
    """Residuals of the Butcher order conditions for all rooted trees of order <= 5."""
    conds = [b.sum() - 1]
    if order >= 2:
        conds += [b @ c - 1 / 2]
    if order >= 3:
        conds += [b @ c**2 - 1 / 3, b @ (a @ c) - 1 / 6]
    if order >= 4:
        conds += [
            b @ c**3 - 1 / 4,
            b @ (c * (a @ c)) - 1 / 8,
            b @ (a @ c**2) - 1 / 12,
            b @ (a @ a @ c) - 1 / 24,
        ]
    if order >= 5:
        ac = a @ c
        conds += [
            b @ c**4 - 1 / 5,
            b @ (c**2 * ac) - 1 / 10,
            b @ (c * (a @ c**2)) - 1 / 15,
            b @ (c * (a @ ac)) - 1 / 30,
            b @ ac**2 - 1 / 20,
            b @ (a @ c**3) - 1 / 20,
            b @ (a @ (c * ac)) - 1 / 40,
            b @ (a @ a @ c**2) - 1 / 60,
            b @ (a @ a @ ac) - 1 / 120,
        ]
    return np.abs(conds)


@pytest.mark.parametrize("solver", ALL, ids=lambda s: type(s).__name__)
def test_shipped_tableaus_satisfy_order_conditions(solver):
    tab = solver.tableau
    a, c, b = _matrix(tab), np.array(tab.c), np.array(tab.b)
    assert _order_conditions(b, a, c, tab.order).max() < 1e-14
    if tab.order < 5:  # and the order is not higher than claimed
        assert _order_conditions(b, a, c, tab.order + 1).max() > 1e-6
    if tab.adaptive:
        b_hat = b - np.array(tab.b_err)
        assert _order_conditions(b_hat, a, c, tab.error_order).max() < 1e-14
        # the embedded solution must fail the next order (else it estimates nothing)
        assert _order_conditions(b_hat, a, c, tab.error_order + 1).max() > 1e-6
    if tab.dense is not None:
        for theta in (0.25, 0.5, 0.9):
            weights = np.array(tab.dense) @ np.array([theta**p for p in range(1, 5)])
            # 1e-13: Tsit5's interpolant is published as 17-digit decimals (a typo is >> 1e-10)
            scaled = _order_conditions(weights / theta, a, c, 1)
            assert scaled.max() < 1e-13
            # b(theta) reproduces y(t + theta dt) to 4th order: sum b_i(theta) c_i^(q-1)
            # = theta^q / q.
            for q in range(1, 5):
                assert abs(weights @ c ** (q - 1) - theta**q / q) < 1e-13


def test_bad_tableaus_are_refused():
    with pytest.raises(ValueError, match="sum_j a_ij = c_i"):
        ButcherTableau("bad", c=(0.0, 0.5), a=((), (0.4,)), b=(0.0, 1.0), order=2)
    with pytest.raises(ValueError, match="must sum to 1"):
        ButcherTableau("bad", c=(0.0, 0.5), a=((), (0.5,)), b=(0.1, 1.0), order=2)
    with pytest.raises(ValueError, match="lower triangular"):
        ButcherTableau("bad", c=(0.0, 0.5), a=((), (0.25, 0.25)), b=(0.0, 1.0), order=2)
    with pytest.raises(ValueError, match="must sum to 0"):
        ButcherTableau(
            "bad", c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), order=2, b_err=(0.5, 0.0),
            error_order=1,
        )
    with pytest.raises(ValueError, match="error_order"):
        ButcherTableau(
            "bad", c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), order=2, b_err=(-0.5, 0.5)
        )
    with pytest.raises(ValueError, match="fsal"):
        ButcherTableau("bad", c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), order=2, fsal=True)
    with pytest.raises(ValueError, match="c\\[0\\]"):
        ButcherTableau("bad", c=(0.5,), a=((),), b=(1.0,), order=1)
    with pytest.raises(TypeError, match="ButcherTableau"):
        eq.ExplicitRK("tsit5")


def test_user_tableau_runs_through_explicit_rk():
    heun_euler = ButcherTableau(
        "HeunEuler", c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), order=2,
        b_err=(-0.5, 0.5), error_order=1,
    )
    solver = eq.ExplicitRK(heun_euler)
    assert solver.adaptive and solver.order == 2
    y = torch.ones(2, 3, dtype=torch.float64)
    t = torch.zeros(2, dtype=torch.float64)
    dt = torch.tensor([0.1, 0.2], dtype=torch.float64)
    y_new, y_err, k_last, nfe = rk_step(lambda t, y: -y, t, y, dt, heun_euler)
    assert nfe == 2 and k_last is None
    expected = 1 - dt + dt**2 / 2
    assert torch.allclose(y_new, expected[:, None].expand(2, 3), atol=1e-15)
    # Heun minus Euler = dt^2/2 (y'' = y here)
    assert torch.allclose(y_err, (dt**2 / 2)[:, None].expand(2, 3), atol=1e-15)


def test_rk_step_fsal_and_per_sample_dt():
    tab = eq.Tsit5().tableau
    y = torch.randn(3, 4, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    dt = torch.tensor([0.1, -0.05, 0.0], dtype=torch.float64)
    calls = []

    def f(t_, y_):
        calls.append(t_.clone())
        return torch.sin(t_) - y_

    y_new, y_err, k_last, nfe = rk_step(f, t, y, dt, tab)
    assert nfe == tab.n_stages == len(calls)
    assert torch.equal(calls[-1], (t + dt)[:, None])  # last stage at t + dt (c[-1] = 1)
    assert torch.allclose(k_last, f((t + dt)[:, None], y_new), rtol=0, atol=1e-15)
    assert torch.equal(y_new[2], y[2]) and torch.all(y_err[2] == 0)  # dt = 0 -> unchanged
    # each row equals the same step taken alone
    for b in range(3):
        alone, _, _, _ = rk_step(f, t[b : b + 1], y[b : b + 1], dt[b : b + 1], tab)
        assert torch.allclose(alone[0], y_new[b], rtol=0, atol=1e-15)
    # FSAL reuse: passing k1 saves one evaluation
    _, _, _, nfe2 = rk_step(f, t + dt, y_new, dt, tab, k1=k_last)
    assert nfe2 == tab.n_stages - 1


def test_rk_step_is_differentiable():
    tab = eq.Dopri5().tableau
    y = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.zeros(2, dtype=torch.float64)
    dt = torch.full((2,), 0.1, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda y_: rk_step(lambda t, z: torch.tanh(z), t, y_, dt,
                                                       tab)[0], (y,))


def test_rk_step_rejects_bad_shapes():
    y = torch.ones(3, 2)
    with pytest.raises(ValueError, match="dt must be a tensor of shape"):
        rk_step(lambda t, y: y, torch.zeros(3), y, 0.1, eq.RK4().tableau)
    with pytest.raises(ValueError, match="t must be a tensor of shape"):
        rk_step(lambda t, y: y, torch.zeros(()), y, torch.ones(3), eq.RK4().tableau)


def test_float32_tensors_are_cached():
    tab = eq.Tsit5().tableau
    first = tab.tensors(torch.float32, torch.device("cpu"))
    assert first is tab.tensors(torch.float32, torch.device("cpu"))
    assert math.isclose(float(first["b"].sum()), 1.0, rel_tol=1e-6)


def _tree_residuals(b, a, order):
    """max |b . Phi(t) - 1/gamma(t)| over the rooted trees t with exactly k nodes, k <= order
    (Butcher's order conditions, generated rather than listed)."""
    worst = {}
    for tree in trees(order):
        k = size(tree)
        residual = abs(b @ elementary_weights(tree, a) - 1 / density(tree))
        worst[k] = max(worst.get(k, 0.0), residual)
    return worst


def test_tree_count_and_dopri8_order_conditions():
    """Dopri8: all 200 conditions of order <= 8 hold (to the rounding of its 10-digit
    rationals), some of order 9 fail; its embedded solution has order 7 exactly."""
    assert len(trees(9)) == 486
    tab = eq.Dopri8().tableau
    a, b = _matrix(tab), np.array(tab.b)
    worst = _tree_residuals(b, a, 9)
    assert max(worst[k] for k in range(1, 9)) < 1e-14
    assert worst[9] > 1e-7
    b_hat = b - np.array(tab.b_err)
    worst_hat = _tree_residuals(b_hat, a, 8)
    assert max(worst_hat[k] for k in range(1, 8)) < 1e-14
    assert worst_hat[8] > 1e-6
    # the explicit pairs already shipped pass the same generated conditions at their order
    # (1e-13: Tsit5 is published as 16-digit decimals)
    for solver in (eq.Dopri5(), eq.Tsit5(), eq.Bosh3()):
        worst = _tree_residuals(np.array(solver.tableau.b), _matrix(solver.tableau),
                                solver.order)
        assert max(worst.values()) < 1e-13


def _textbook_stages(f, t, y, dt, tab):
    """One step written out weight by weight: k_i = f(t + c_i dt, y + dt sum_j a_ij k_j)."""
    dt_b = dt.to(y.dtype).reshape((-1,) + (1,) * (y.dim() - 1))
    t_f = t.to(y.dtype).reshape(dt_b.shape)

    def weighted(ks, weights):
        out = None
        for k, w in zip(ks, weights):
            if w != 0.0:
                out = k * w if out is None else out.add(k, alpha=w)
        return out

    ks = [f(t_f, y)]
    for i in range(1, tab.n_stages):
        incr = weighted(ks, tab.a[i])
        y_i = y if incr is None else torch.addcmul(y, dt_b, incr)
        ks.append(f(torch.add(t_f, dt_b, alpha=tab.c[i]), y_i))
    y_new = y_i if tab.fsal else torch.addcmul(y, dt_b, weighted(ks, tab.b))
    y_err = None if tab.b_err is None else dt_b * weighted(ks, tab.b_err)
    return y_new, y_err, ks


# a user tableau whose second stage has no weight anywhere after it (an all-zero column)
_ZERO_COLUMN = ButcherTableau(
    "ZeroColumn", c=(0.0, 0.5, 1.0), a=((), (0.5,), (1.0, 0.0)), b=(0.5, 0.0, 0.5), order=2,
    b_err=(0.5, 0.0, -0.5), error_order=1,
)


@pytest.mark.parametrize("tab", [s.tableau for s in ALL] + [eq.Dopri8().tableau, _ZERO_COLUMN],
                         ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stacked_stage_sums_equal_the_textbook_step_bit_for_bit(tab, dtype):
    # rk_stages advances every open weighted sum of stages with one addcmul per stage; each
    # sum must still round exactly as the weight-by-weight chain (what keeps a sample's bits
    # independent of its batch-mates), on a (batch, c, n) state with per-sample t and dt
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(4, 4, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.rand(5, generator=gen, dtype=torch.float64)
    dt = 0.2 * torch.rand(5, generator=gen, dtype=torch.float64) - 0.05

    def f(t_, y_):
        return torch.tanh(y_ @ weight) * torch.cos(t_)

    y_new, y_err, ks, nfe = rk_stages(f, t, y, dt, tab)
    ref_new, ref_err, ref_ks = _textbook_stages(f, t, y, dt, tab)
    assert nfe == tab.n_stages and len(ks) == len(ref_ks)
    assert torch.equal(y_new, ref_new)
    assert all(torch.equal(a, b) for a, b in zip(ks, ref_ks))
    assert (y_err is None) == (ref_err is None)
    if y_err is not None:
        assert torch.equal(y_err, ref_err)
