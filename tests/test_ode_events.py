"""Events: located per sample on the dense output, against closed forms; the event time's
gradient by the implicit function theorem, against closed forms and central differences."""

import math

import pytest
import torch

import equilibria as eq
from equilibria.ode import Event, odeint
from problems import MLPField, central_difference

G = 9.81
TIGHT = {"rtol": 1e-10, "atol": 1e-12}
SOLVERS = [eq.Tsit5(), eq.Dopri5(), eq.Bosh3(), eq.Dopri8(), eq.Kvaerno5()]


def _name(solver):
    return type(solver).__name__


def free_fall(t, y):
    return torch.stack([y[:, 1], torch.full_like(y[:, 1], -G)], dim=1)


def height(t, y):
    return y[:, 0]


def _landing(h, v):
    """Closed form: h + v t - g t^2 / 2 = 0, the positive root."""
    return (v + torch.sqrt(v * v + 2 * G * h)) / G


@pytest.mark.parametrize("solver", SOLVERS, ids=_name)
def test_bouncing_ball_lands_at_sqrt_2h_over_g(solver):
    """Free fall from heights h (and one thrown up): the event time is sqrt(2h/g) (the
    positive root of the quadratic) to 1e-8, the state there is on the ground with the
    closed-form velocity."""
    y0 = torch.tensor([[10.0, 0.0], [2.0, 0.0], [25.0, 3.0]], dtype=torch.float64)
    sol = odeint(free_fall, y0, (0.0, 10.0), solver=solver,
                 event=Event(height, direction=-1), **TIGHT)
    assert sol.status.tolist() == [eq.Status.EVENT] * 3
    exact = _landing(y0[:, 0], y0[:, 1])
    assert torch.allclose(exact[:2], torch.sqrt(2 * y0[:2, 0] / G))
    assert float((sol.stats["event_t"] - exact).abs().max()) <= 1e-8
    assert torch.equal(sol.stats["t"], sol.stats["event_t"].double())
    assert float(sol.value[:, 0].abs().max()) <= 1e-8
    assert torch.allclose(sol.value[:, 1], y0[:, 1] - G * exact, rtol=0, atol=1e-8)
    assert torch.equal(sol.stats["event_y"], sol.value)


def test_linear_crossing_per_sample():
    """y' = -k y from y0 crosses c at t = ln(y0 / c) / k; each sample its own rate, and a
    sample that never crosses (c above y0) runs to t1 with SUCCESS and a NaN event time."""
    k = torch.tensor([[0.5], [2.0], [7.0], [1.0]], dtype=torch.float64)
    y0 = torch.tensor([[3.0], [1.0], [5.0], [0.2]], dtype=torch.float64)
    level = 0.3
    sol = odeint(lambda t, y, k: -k * y, y0, (0.0, 20.0), args=(k,),
                 event=Event(lambda t, y, k: y[:, 0] - level), **TIGHT)
    assert sol.status.tolist() == [eq.Status.EVENT] * 3 + [eq.Status.SUCCESS]
    exact = torch.log(y0[:3, 0] / level) / k[:3, 0]
    assert float((sol.stats["event_t"][:3] - exact).abs().max()) <= 1e-8
    assert bool(torch.isnan(sol.stats["event_t"][3])) and float(sol.stats["t"][3]) == 20.0
    assert torch.allclose(sol.value[:3, 0], torch.full((3,), level, dtype=torch.float64),
                          rtol=0, atol=1e-9)
    # a sample's event is its own: alone it gives the same time
    alone = odeint(lambda t, y, k: -k * y, y0[2:3], (0.0, 20.0), args=(k[2:3],),
                   event=Event(lambda t, y, k: y[:, 0] - level), **TIGHT)
    assert abs(float(alone.stats["event_t"][0] - sol.stats["event_t"][2])) <= 1e-13


def test_direction_filters_crossings():
    """y = cos t crosses 0 downwards at pi/2 and upwards at 3 pi/2."""
    def oscillator(t, y):
        return torch.stack([y[:, 1], -y[:, 0]], dim=1)

    y0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    for direction, expected in ((-1, math.pi / 2), (1, 3 * math.pi / 2), (0, math.pi / 2)):
        sol = odeint(oscillator, y0, (0.0, 6.0), event=Event(height, direction=direction),
                     **TIGHT)
        assert abs(float(sol.stats["event_t"][0]) - expected) <= 1e-8, direction


def test_non_terminal_events_record_their_times():
    """An oscillator with frequency w per sample: y = sin(w t) is zero at k pi / w; every
    crossing on [0, 10] is recorded (NaN-padded rows), and the solve runs to t1."""
    w = torch.tensor([[1.0], [2.5]], dtype=torch.float64)

    def oscillator(t, y, w):
        return torch.stack([w[:, 0] * y[:, 1], -w[:, 0] * y[:, 0]], dim=1)

    y0 = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    sol = odeint(oscillator, y0, (0.0, 10.0), args=(w,),
                 event=Event(lambda t, y, w: y[:, 0], terminal=False), **TIGHT)
    assert sol.status.tolist() == [eq.Status.SUCCESS] * 2
    for b, freq in enumerate((1.0, 2.5)):
        expected = torch.tensor([k * math.pi / freq for k in range(1, 20)
                                 if k * math.pi / freq <= 10.0], dtype=torch.float64)
        assert int(sol.stats["n_events"][b]) == len(expected)
        times = sol.stats["event_times"][b, : len(expected)]
        assert float((times - expected).abs().max()) <= 1e-8
        assert bool(torch.isnan(sol.stats["event_times"][b, len(expected):]).all())
    assert "event_t" not in sol.stats


def test_an_event_inside_the_last_step_is_an_event():
    """One fixed step over the whole span, the landing inside it: EVENT, not SUCCESS."""
    y0 = torch.tensor([[10.0, 0.0]], dtype=torch.float64)
    t_land = math.sqrt(2 * 10.0 / G)
    sol = odeint(free_fall, y0, (0.0, t_land + 1e-3), solver=eq.RK4(), n_steps=1,
                 event=Event(height))
    assert sol.status.tolist() == [eq.Status.EVENT]
    # RK4 and its Hermite interpolant are exact on this quadratic motion
    assert abs(float(sol.stats["event_t"][0]) - t_land) <= 1e-12


def test_t_eval_after_a_terminal_event_holds_the_event_state():
    y0 = torch.tensor([[10.0, 0.0]], dtype=torch.float64)
    t_land = math.sqrt(2 * 10.0 / G)
    grid = [0.0, 0.5, 1.0, 1.5, 2.0]
    sol = odeint(free_fall, y0, (0.0, 2.0), t_eval=grid, event=Event(height), **TIGHT)
    assert sol.status.tolist() == [eq.Status.EVENT]
    for i, time in enumerate(grid):
        if time < t_land:
            assert abs(float(sol.value[i, 0, 0]) - (10.0 - G * time**2 / 2)) <= 1e-9
        else:
            assert torch.equal(sol.value[i, 0], sol.stats["event_y"][0])


def test_event_time_gradient_closed_form():
    """dt*/dh = 1 / sqrt(v^2 + 2 g h), dt*/dv = (1 + v / sqrt(v^2 + 2 g h)) / g; the state
    at the event: d(velocity)/dh = -g dt*/dh."""
    y0 = torch.tensor([[10.0, 0.0], [3.0, 2.0]], dtype=torch.float64, requires_grad=True)
    sol = odeint(free_fall, y0, (0.0, 10.0), event=Event(height), **TIGHT)
    (grad,) = torch.autograd.grad(sol.stats["event_t"].sum(), [y0], retain_graph=True)
    h, v = y0.detach()[:, 0], y0.detach()[:, 1]
    root = torch.sqrt(v * v + 2 * G * h)
    expected = torch.stack([1 / root, (1 + v / root) / G], dim=1)
    assert torch.allclose(grad, expected, rtol=1e-9, atol=0)
    (grad_v,) = torch.autograd.grad(sol.value[:, 1].sum(), [y0])
    assert torch.allclose(grad_v[:, 0], -G / root, rtol=1e-9, atol=0)


def test_event_time_and_state_gradients_match_central_differences():
    """A learned field and a learned event level: dt*/d(y0, theta, level) and the event state's
    gradient, by the implicit function theorem through Backprop, against central differences
    of a fine fixed-step solve (smooth in its inputs): relative error < 1e-6."""
    field = MLPField(dim=2, hidden=8)
    with torch.no_grad():
        field.b2.copy_(torch.tensor([0.8, -0.3], dtype=torch.float64))  # y[:, 0] rises
    level = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(5)
    y0 = (0.1 * torch.randn(3, 2, generator=gen, dtype=torch.float64)).requires_grad_(True)
    event = Event(lambda t, y: y[:, 0] - level, direction=1)
    weights = torch.randn(3, 2, generator=gen, dtype=torch.float64)

    def losses(sol):
        return sol.stats["event_t"].sum(), (sol.value * weights).sum()

    sol = odeint(field, y0, (0.0, 10.0), event=event, **TIGHT)
    assert sol.status.tolist() == [eq.Status.EVENT] * 3
    params = list(field.parameters())
    inputs = [y0, level, *params]
    directions = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in inputs]
    fine = dict(solver=eq.Tsit5(), n_steps=2000, event=event)
    analytic = [sum(float((g * d).sum()) for g, d in zip(
        torch.autograd.grad(loss, inputs, retain_graph=True), directions)) for loss in losses(sol)]
    for which in range(2):
        fd = central_difference(lambda w=which: losses(odeint(field, y0, (0.0, 10.0), **fine))[w],
                                inputs, directions)
        assert abs(analytic[which] - fd) <= 1e-6 * abs(fd), (which, analytic[which], fd)


def test_terminate_hook_still_stops_after_the_step():
    """The older terminate= hook (checked after each accepted step, no location) works."""
    y0 = torch.tensor([[1.0]], dtype=torch.float64)
    sol = odeint(lambda t, y: -y, y0, (0.0, 50.0),
                 terminate=lambda t, y, dydt: dydt.abs()[:, 0] < 1e-3)
    assert sol.status.tolist() == [eq.Status.EVENT]
    assert float(sol.stats["t"][0]) < 50.0


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Event("y"), TypeError, "must be callable"),
        (lambda: Event(height, direction=2), ValueError, "-1 .* 0 .* or 1"),
        (lambda: Event(height, direction=True), TypeError, "int -1, 0 or 1"),
        (lambda: Event(height, direction=0.5), TypeError, "int -1, 0 or 1"),
        (lambda: Event(height, terminal="yes"), TypeError, "bool"),
    ],
)
def test_bad_event_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_event_function_of_the_wrong_shape_or_type_is_refused():
    y0 = torch.tensor([[10.0, 0.0]], dtype=torch.float64)
    for fn in (lambda t, y: y, lambda t, y: y[:, 0] > 0, lambda t, y: float(y[0, 0])):
        with pytest.raises(ValueError, match="one floating value per sample"):
            odeint(free_fall, y0, (0.0, 2.0), event=Event(fn))
    with pytest.raises(TypeError, match="Event"):
        odeint(free_fall, y0, (0.0, 2.0), event=height)


@pytest.mark.cuda
def test_cuda_event_matches_the_closed_form():
    y0 = torch.tensor([[10.0, 0.0], [2.0, 0.0]], dtype=torch.float64, device="cuda")
    sol = odeint(free_fall, y0, (0.0, 10.0), event=Event(height, direction=-1), **TIGHT)
    assert sol.stats["event_t"].device.type == "cuda"
    exact = torch.sqrt(2 * y0[:, 0] / G)
    assert float((sol.stats["event_t"] - exact).abs().max()) <= 1e-8
