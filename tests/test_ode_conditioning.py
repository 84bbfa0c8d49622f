"""Per-sample conditioning (args=) through odeint, odeint_adjoint and NeuralODE; refusals of
bad settings at construction."""

import math

import pytest
import torch

import equilibria as eq
from equilibria.nn import NeuralODE
from equilibria.ode import Adjoint, Backprop, odeint, odeint_adjoint
from problems import central_difference

TIGHT = {"rtol": 1e-10, "atol": 1e-12}


class ConditionedField(torch.nn.Module):
    """f(t, y, x) = W2 tanh(W1 y + U x + b sin t): a field conditioned per sample on x."""

    def __init__(self, dim: int = 3, cond: int = 2, hidden: int = 8) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        kw = dict(generator=gen, dtype=torch.float64)
        self.w1 = torch.nn.Parameter(torch.randn(hidden, dim, **kw) / dim**0.5)
        self.u = torch.nn.Parameter(torch.randn(hidden, cond, **kw) / cond**0.5)
        self.b = torch.nn.Parameter(0.3 * torch.randn(hidden, **kw))
        self.w2 = torch.nn.Parameter(torch.randn(dim, hidden, **kw) / hidden**0.5)

    def forward(self, t, y, x):
        return torch.tanh(y @ self.w1.T + x @ self.u.T + self.b * torch.sin(t)) @ self.w2.T


def _loss(field, y0, x, weights):
    """The loss by a fine fixed-step Tsit5 (error ~1e-13): smooth in its inputs, so central
    differences of it are accurate."""
    sol = odeint(field, y0, (0.0, 1.0), solver=eq.Tsit5(), n_steps=200, args=(x,))
    return float((sol.value * weights).sum())


def test_conditioned_neural_ode_gradients_match_central_differences():
    field = ConditionedField()
    gen = torch.Generator().manual_seed(1)
    y0 = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    params = list(field.parameters())
    directions = [torch.randn(v.shape, generator=gen, dtype=torch.float64)
                  for v in (y0, x, *params)]
    fd = central_difference(lambda: _loss(field, y0, x, weights), [y0, x, *params], directions)
    for gradient in (Adjoint(), Backprop()):
        node = NeuralODE(field, (0.0, 1.0), gradient=gradient, **TIGHT)
        out = node(y0, args=(x,))
        grads = torch.autograd.grad((out * weights).sum(), [y0, x, *params])
        analytic = sum(float((g * d).sum()) for g, d in zip(grads, directions))
        assert abs(analytic - fd) <= 1e-6 * abs(fd), (type(gradient).__name__, analytic, fd)
        # the conditioning gradient alone, against its own central difference
        fd_x = central_difference(lambda: _loss(field, y0, x, weights), [x], directions[1:2])
        analytic_x = float((grads[1] * directions[1]).sum())
        assert abs(analytic_x - fd_x) <= 1e-6 * abs(fd_x), (type(gradient).__name__,)


def test_args_travel_with_compaction_and_the_adjoint():
    """Samples finish at different times (rows dropped): a conditioned sample's result equals
    that of the same sample solved alone, and so does its gradient, to the backward solve's
    accuracy (the adjoint's backward integrates the batch as one system with shared steps)."""
    field = ConditionedField()
    gen = torch.Generator().manual_seed(2)
    y0 = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    x[-1] *= 6.0  # a stiffer, slower sample: the others finish first and are dropped
    x.requires_grad_(True)
    sol = odeint_adjoint(field, y0, (0.0, 2.0), args=(x,), rtol=1e-8, atol=1e-10)
    (grad_x,) = torch.autograd.grad(sol.value.pow(2).sum(), [x])
    alone = odeint_adjoint(field, y0[-1:], (0.0, 2.0), args=(x[-1:],), rtol=1e-8, atol=1e-10)
    (grad_alone,) = torch.autograd.grad(alone.value.pow(2).sum(), [x])
    assert torch.allclose(sol.value[-1], alone.value[0], rtol=0, atol=1e-12)
    assert float((grad_x[-1] - grad_alone[-1]).abs().max()) < 1e-7 * float(grad_alone.abs().max())
    assert torch.all(grad_alone[:-1] == 0)


@pytest.mark.parametrize("api", ["odeint", "odeint_adjoint", "NeuralODE"])
def test_error_texts_suggest_only_what_each_api_accepts(api):
    field = ConditionedField()
    x = torch.zeros(4, 2, dtype=torch.float64)
    x[-1] = 30.0
    y0 = torch.ones(4, 3, dtype=torch.float64)

    class Closed(torch.nn.Module):  # closes over the batch-shaped x: breaks once rows drop
        def __init__(self):
            super().__init__()
            self.inner = field

        def forward(self, t, y):
            return self.inner(t, y, x)

    closed = Closed()
    with pytest.raises(ValueError, match="args=") as info:
        if api == "odeint":
            odeint(closed, y0, (0.0, 3.0), rtol=1e-6)
        elif api == "odeint_adjoint":
            odeint_adjoint(closed, y0, (0.0, 3.0), rtol=1e-6)
        else:
            NeuralODE(closed, (0.0, 3.0), rtol=1e-6)(y0)
    message = str(info.value)
    assert api in message
    assert ("compact=False" in message) == (api == "odeint")


@pytest.mark.parametrize("api", ["odeint", "odeint_adjoint", "NeuralODE"])
def test_args_of_another_batch_are_refused(api):
    field = ConditionedField()
    y0 = torch.ones(4, 3, dtype=torch.float64)
    bad = torch.ones(3, 2, dtype=torch.float64)
    run = {
        "odeint": lambda a: odeint(field, y0, args=a),
        "odeint_adjoint": lambda a: odeint_adjoint(field, y0, args=a),
        "NeuralODE": lambda a: NeuralODE(field)(y0, args=a),
    }[api]
    with pytest.raises(ValueError, match=r"args\[0\] has batch 3 .* y0 has batch 4"):
        run((bad,))
    with pytest.raises(ValueError, match="0-dim"):
        run((torch.tensor(1.0),))
    with pytest.raises(TypeError, match=r"args\[0\] must be a tensor"):
        run(([1.0, 2.0],))
    with pytest.raises(TypeError, match="tuple of tensors"):
        run("x")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rtol": -1.0}, ValueError, "rtol must be finite and > 0"),
        ({"atol": 0.0}, ValueError, "atol must be finite and > 0"),
        ({"rtol": float("nan")}, ValueError, "rtol"),
        ({"t_span": (0.0, math.nan)}, ValueError, "t_span must be finite"),
        ({"t_span": (0.0, math.inf)}, ValueError, "t_span must be finite"),
        ({"t_span": (0.0,)}, ValueError, "pair"),
        ({"t_span": (0.0, "one")}, TypeError, "number"),
        ({"max_steps": 0}, ValueError, "max_steps must be >= 1"),
        ({"max_steps": 2.5}, TypeError, "max_steps must be an int"),
        ({"t_eval": [0.5, 2.0]}, ValueError, "inside t_span"),
    ],
)
def test_neural_ode_refuses_bad_settings_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        NeuralODE(ConditionedField(), **kwargs)


def test_neural_ode_t_span_tensor_with_nan_is_refused():
    with pytest.raises(ValueError, match="t_span must be finite"):
        NeuralODE(ConditionedField(), t_span=(0.0, torch.tensor(float("nan"))))
