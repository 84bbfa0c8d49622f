"""Reversible (RevDEQ): exact gradient of the computed iterate, memory flat in the steps,
per-sample semantics, rounding drift, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import equilibria as eq
from deq_problems import (
    GainCell,
    TanhCell,
    flat_grad,
    one_thread,  # noqa: F401  (autouse fixture: active here)
    saved_bytes,
)
from equilibria.nn import DEQ, Implicit, Reversible, Unrolled

WIDTH = 5


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(t.shape[0], -1).pow(2).mean(dim=1).sqrt()


def _reference(cell, z0, x, beta, n_steps, status):
    """Autograd through the same coupled iteration, one sample at a time (plain loops): each
    sample runs its own number of steps and returns its best iterate (lowest residual, the
    converged one for SUCCESS)."""
    rows = []
    for i in range(z0.shape[0]):
        xi = tuple(t[i: i + 1] for t in x) if isinstance(x, tuple) else x[i: i + 1]
        y = z = z0[i: i + 1]
        best, best_residual = z, float(_rms(cell(z, xi) - z))
        for _ in range(int(n_steps[i])):
            y = (1 - beta) * y + beta * cell(z, xi)
            z = (1 - beta) * z + beta * cell(y, xi)
            residual = float(_rms(cell(z, xi) - z))
            if residual < best_residual:
                best, best_residual = z, residual
        if int(status[i]) == eq.Status.SUCCESS:
            best = z  # the step that passed the test
        rows.append(best)
    return torch.cat(rows)


class Grid(nn.Module):
    """A (batch, 2, 3, 4) state: TanhCell on the flattened sample, reshaped back."""

    def __init__(self, contraction: float = 0.8) -> None:
        super().__init__()
        self.cell = TanhCell(24, contraction=contraction)

    def forward(self, z, x):
        return self.cell(z.flatten(1), x.flatten(1)).reshape(z.shape)


class SlowMode(nn.Module):
    """f(z, x) = A z + x, A symmetric with eigenvalues 0.5 and one of 1.05: the residual falls
    (the 0.5 modes) and then grows (the 1.05 mode): the best iterate is not the last."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64))
        spectrum = torch.full((width,), 0.5, dtype=torch.float64)
        spectrum[0] = 1.05
        self.A = nn.Parameter(q @ torch.diag(spectrum) @ q.T)
        self.register_buffer("slow", q[:, 0].clone())

    def forward(self, z, x):
        return z @ self.A.T + x


CASES = {
    # name: (cell factory, x factory, Reversible, DEQ options)
    "beta0.5-no-checkpoints": (
        lambda: TanhCell(WIDTH, contraction=0.5),
        lambda: torch.randn(3, WIDTH, dtype=torch.float64),
        Reversible(0.5, checkpoint_every=None), {"rtol": 1e-4, "atol": 1e-6},
    ),
    "beta0.5-auto": (
        lambda: TanhCell(WIDTH, contraction=0.8),
        lambda: torch.randn(3, WIDTH, dtype=torch.float64),
        Reversible(0.5), {"rtol": 1e-10, "atol": 1e-12},
    ),
    "beta0.8-every3": (
        lambda: TanhCell(WIDTH, contraction=0.8),
        lambda: torch.randn(3, WIDTH, dtype=torch.float64),
        Reversible(0.8, checkpoint_every=3), {"rtol": 1e-10, "atol": 1e-12},
    ),
    "per-sample-steps": (
        lambda: GainCell(WIDTH),
        lambda: (torch.randn(3, WIDTH, dtype=torch.float64),
                 torch.tensor([0.2, 0.9, 0.97], dtype=torch.float64)),
        Reversible(0.4), {"rtol": 1e-9, "atol": 1e-11, "max_steps": 400},
    ),
    "recompute-every-segment": (
        lambda: GainCell(WIDTH),
        lambda: (torch.randn(3, WIDTH, dtype=torch.float64),
                 torch.tensor([0.2, 0.9, 0.97], dtype=torch.float64)),
        Reversible(0.5, checkpoint_every=4, rebuild_tolerance=1e-300),
        {"rtol": 1e-9, "atol": 1e-11, "max_steps": 400},
    ),
    "grid-state": (
        lambda: Grid(),
        lambda: torch.randn(2, 2, 3, 4, dtype=torch.float64),
        Reversible(0.6, checkpoint_every=4), {"rtol": 1e-9, "atol": 1e-11},
    ),
    "best-not-last": (
        lambda: SlowMode(),
        None,  # built from the cell: mostly fast modes, a little of the slow one
        Reversible(0.5, checkpoint_every=5), {"rtol": 1e-14, "atol": 1e-14, "max_steps": 40},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_equals_autograd_through_the_same_iteration(name):
    make_cell, make_x, strategy, options = CASES[name]
    cell = make_cell()
    if make_x is None:
        x = torch.randn(3, 4, dtype=torch.float64) + 1e-3 * cell.slow
    else:
        x = make_x()
    x_leaf = tuple(t.clone().requires_grad_(True) for t in x) if isinstance(x, tuple) \
        else x.clone().requires_grad_(True)
    x_grad_inputs = [x_leaf[0]] if isinstance(x_leaf, tuple) else [x_leaf]
    like = x_grad_inputs[0]
    z0 = (0.1 * torch.randn_like(like)).requires_grad_(True)
    weights = torch.randn_like(like)
    params = list(cell.parameters())

    deq = DEQ(cell, backward=strategy, **options)
    z = deq(x_leaf, z0=z0)
    solution = deq.last_solution
    grad = flat_grad((weights * z).sum(), [*params, *x_grad_inputs, z0])

    reference_z = _reference(cell, z0, x_leaf, strategy.beta, solution.stats["n_steps"],
                             solution.status)
    torch.testing.assert_close(z, reference_z, rtol=0, atol=1e-12)
    expected = flat_grad((weights * reference_z).sum(), [*params, *x_grad_inputs, z0])
    assert _relative_error(grad, expected) <= 1e-10

    stats = deq.last_backward_stats
    assert stats["strategy"] == "Reversible"
    assert bool((stats["status"] == eq.Status.SUCCESS).all())
    n_steps = solution.stats["n_steps"]
    if name == "recompute-every-segment":
        assert stats["recomputed_steps"].tolist() == n_steps.tolist()
    else:
        assert stats["nfe"].tolist() == (2 * n_steps).tolist()
        assert int(stats["recomputed_steps"].max()) == 0
    assert float(stats["reconstruction_error"].max()) < 1e-9
    if name == "per-sample-steps":
        assert len(set(solution.stats["n_steps"].tolist())) == 3  # each its own stop step
    if name == "best-not-last":
        assert bool((solution.status == eq.Status.MAX_STEPS).all())
        last = _reference(cell, z0, x_leaf, strategy.beta, solution.stats["n_steps"],
                          torch.zeros_like(solution.status))  # as if SUCCESS: the last
        assert float((last - z).detach().abs().min()) > 1e-3  # the best iterate is an earlier one


def test_converged_gradient_matches_the_implicit_gradient():
    cell = TanhCell(WIDTH, contraction=0.8)
    x = torch.randn(3, WIDTH, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, WIDTH, dtype=torch.float64)
    params = list(cell.parameters())
    tight = {"atol": 1e-13, "rtol": 1e-13, "max_steps": 300}
    reversible = flat_grad((weights * DEQ(cell, backward=Reversible(), **tight)(x)).sum(),
                           [*params, x])
    implicit = DEQ(cell, backward=Implicit(eq.GMRES(atol=1e-15, rtol=1e-13)), **tight)
    exact = flat_grad((weights * implicit(x)).sum(), [*params, x])
    assert _relative_error(reversible, exact) < 1e-9


def test_memory_saved_for_backward_is_flat_in_the_number_of_steps():
    cell = TanhCell(16, contraction=0.95)
    x = torch.randn(8, 16, dtype=torch.float64)
    forced = {"atol": 1e-300, "rtol": 1e-300}  # nobody converges: exactly max_steps steps

    def saved(backward, max_steps):
        deq = DEQ(cell, backward=backward, max_steps=max_steps, **forced)
        return saved_bytes(deq, x), deq

    # beta 0.2: 50 steps drift by (1/0.8^2)^50 * 1e-16 ~ 1e-6, no checkpoint needed
    short, _ = saved(Reversible(0.2, checkpoint_every=None), 10)
    long, deq = saved(Reversible(0.2, checkpoint_every=None), 50)
    assert short == long > 0
    assert deq.last_backward_stats["n_steps"].tolist() == [50] * 8
    # auto checkpoints at beta 0.5 (every 13 steps): 3 pairs more for 50 steps than for 10
    short_auto, _ = saved(Reversible(0.5), 10)
    long_auto, _ = saved(Reversible(0.5), 50)
    assert long_auto - short_auto == 3 * 2 * x.numel() * 8
    unrolled_short, _ = saved(Unrolled(), 10)
    unrolled_long, _ = saved(Unrolled(), 50)
    assert unrolled_long > 4 * unrolled_short > 4 * short


def test_a_samples_result_and_gradient_do_not_depend_on_its_batch_mates():
    cell = GainCell(WIDTH)
    inputs = torch.randn(4, WIDTH, dtype=torch.float64)
    gains = torch.tensor([0.3, 0.95, 0.6, 0.99], dtype=torch.float64)
    params = list(cell.parameters())
    options = {"backward": Reversible(0.5), "atol": 1e-10, "rtol": 1e-8, "max_steps": 300}

    def run(rows):
        x = inputs[rows].clone().requires_grad_(True)
        deq = DEQ(cell, **options)
        z = deq((x, gains[rows]))
        weights = torch.zeros_like(z)
        weights[0] = 1.0  # the loss of the first listed sample only
        grads = flat_grad((weights * z).sum(), [*params, x])
        return z[0], grads[: -x.numel()], grads[-x.numel():][:WIDTH], deq

    batched = run([1, 0, 2, 3])
    alone = run([1])
    n_steps = batched[3].last_solution.stats["n_steps"]
    assert len(set(n_steps.tolist())) == 4  # different stop steps in the batch
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-13, atol=1e-14)
    # gradients: equal up to the batch's matmul rounding, amplified by the reversal (the
    # drift the float64 pair and checkpoints keep below ~1e-8)
    torch.testing.assert_close(batched[1], alone[1], rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(batched[2], alone[2], rtol=1e-9, atol=1e-14)
    assert int(n_steps[0]) == int(alone[3].last_solution.stats["n_steps"][0])


class Mixed(nn.Module):
    """f(z, x) = a z + x, a per sample (x = (input, a, cap)); NaN once |z| > cap."""

    def forward(self, z, x):
        inputs, a, cap = x
        out = a.unsqueeze(1) * z + inputs
        return torch.where(z.abs() > cap.unsqueeze(1), float("nan"), out)


def test_statuses_are_per_sample_and_failed_samples_get_a_finite_gradient():
    inputs = torch.tensor([[0.5], [0.2], [0.1], [1.0]], dtype=torch.float64)
    a = torch.tensor([0.5, -3.0, 0.999, 1.6], dtype=torch.float64)
    cap = torch.tensor([1e9, 1e9, 1e9, 2.0], dtype=torch.float64)
    x = inputs.clone().requires_grad_(True)
    deq = DEQ(Mixed(), backward=Reversible(0.5), atol=1e-12, rtol=1e-12, max_steps=120)
    z = deq((x, a, cap))
    status = deq.last_solution.status.tolist()
    assert status == [eq.Status.SUCCESS, eq.Status.DIVERGED, eq.Status.MAX_STEPS,
                      eq.Status.NONFINITE]
    z.sum().backward()
    assert torch.isfinite(x.grad).all()
    # sample 0 converged to z* = x / (1 - a): dz*/dx = 1 / (1 - a) = 2
    assert abs(float(x.grad[0]) - 2.0) < 1e-9
    assert deq.last_backward_stats["status"].tolist() == [eq.Status.SUCCESS] * 4
    with pytest.raises(eq.EquilibriaError, match="MAX_STEPS"):
        DEQ(Mixed(), backward=Reversible(), max_steps=30, throw=True)((x, a, cap))


def test_without_grad_the_same_iteration_runs_and_nothing_is_recorded():
    cell = TanhCell(WIDTH, contraction=0.8)
    x = torch.randn(3, WIDTH, dtype=torch.float64)
    deq = DEQ(cell, backward=Reversible(0.5), rtol=1e-6)
    with_grad = deq(x)
    stats = deq.last_solution.stats
    with torch.no_grad():
        without = deq(x)
    assert deq.last_backward_stats is None
    assert torch.equal(with_grad.detach(), without)
    assert deq.last_solution.stats["nfe"].tolist() == stats["nfe"].tolist()
    assert deq.last_solution.stats["nfe"].tolist() == (1 + 2 * stats["n_steps"]).tolist()


def test_float32_drift_is_measured_and_never_reaches_the_gradient():
    """float32, 40 steps at beta 0.8: the plain rebuild drifts by orders of magnitude; the
    float64 pair and checkpoints keep it small, and drifted segments are recomputed, so the
    gradient matches the one with every pair stored in every configuration but the paper's
    plain scheme (rebuild_tolerance=inf)."""
    torch.manual_seed(1)
    cell = TanhCell(32, contraction=0.9, dtype=torch.float32)
    x = torch.randn(8, 32)
    weights = torch.randn(8, 32)
    forced = {"atol": 1e-30, "rtol": 1e-30, "max_steps": 40}
    params = list(cell.parameters())

    def run(**options):
        deq = DEQ(cell, backward=Reversible(0.8, **options), **forced)
        grad = flat_grad((weights * deq(x)).sum(), params)
        stats = deq.last_backward_stats
        return grad, float(stats["reconstruction_error"].max()), stats

    stored, _, _ = run(pair_dtype=None, checkpoint_every=1)
    plain, plain_drift, _ = run(pair_dtype=None, checkpoint_every=None,
                                rebuild_tolerance=float("inf"))
    assert plain_drift > 1.0 and _relative_error(plain, stored) > 1e-3
    fixed, drift, stats = run(pair_dtype=None, checkpoint_every=None)  # recomputed instead
    assert int(stats["recomputed_steps"].min()) == 40
    # the rebuild (2 a step), the forward recompute (1 + 2 a step below the top), the redo
    assert int(stats["nfe"].min()) > 2 * 40 + 1 + 2 * 39
    assert _relative_error(fixed, stored) < 1e-5
    default, drift, stats = run()  # float64 pair, auto checkpoints: nothing to recompute
    assert drift < 1e-9 and int(stats["recomputed_steps"].max()) == 0
    assert _relative_error(default, stored) < 1e-5


def test_a_rebuild_that_overflows_is_recomputed_not_propagated():
    torch.manual_seed(2)
    cell = TanhCell(16, contraction=0.9, dtype=torch.float32)
    x = torch.randn(4, 16)
    params = list(cell.parameters())
    forced = {"atol": 1e-30, "rtol": 1e-30, "max_steps": 60}

    def run(**options):
        deq = DEQ(cell, backward=Reversible(0.9, pair_dtype=None, **options), **forced)
        return flat_grad(deq(x).sum(), params), deq.last_backward_stats

    stored, _ = run(checkpoint_every=1)
    grad, stats = run(checkpoint_every=None)
    assert not torch.isfinite(stats["reconstruction_error"]).all()  # inf / NaN rebuilt
    assert bool((stats["status"] == eq.Status.SUCCESS).all())
    assert _relative_error(grad, stored) < 1e-5


def test_bad_arguments_raise_clear_errors():
    for beta in (0.0, 1.0, 1.5, -0.2, float("nan")):
        with pytest.raises(ValueError, match=r"beta.*\(0, 1\)"):
            Reversible(beta=beta)
    for beta in ("0.5", True, None):
        with pytest.raises(TypeError, match="beta"):
            Reversible(beta=beta)
    with pytest.raises(ValueError, match="checkpoint_every"):
        Reversible(checkpoint_every=0)
    with pytest.raises(ValueError, match="checkpoint_every"):
        Reversible(checkpoint_every="often")
    with pytest.raises(TypeError, match="checkpoint_every"):
        Reversible(checkpoint_every=2.5)
    with pytest.raises(TypeError, match="pair_dtype"):
        Reversible(pair_dtype=torch.int64)
    for tolerance in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="rebuild_tolerance"):
            Reversible(rebuild_tolerance=tolerance)
    with pytest.raises(TypeError):
        Reversible(beta=0.5, damping=0.5)  # unknown keyword
    cell = TanhCell(WIDTH)
    x = torch.randn(2, WIDTH, dtype=torch.float64)
    with pytest.raises(ValueError, match="solver"):
        DEQ(cell, solver=eq.Anderson(), backward=Reversible())
    with pytest.raises(ValueError, match="compact"):
        DEQ(cell, backward=Reversible(), compact=True)(x)
    with pytest.raises(ValueError, match="pair_dtype"):
        DEQ(cell, backward=Reversible(pair_dtype=torch.float32))(x)
    with pytest.raises(TypeError, match="eq.DEQ"):
        Reversible().attach(cell, torch.zeros_like(x), x, lambda z0: None, lambda stats: None)
    with pytest.raises(RuntimeError, match="double backward"):
        x_grad = x.clone().requires_grad_(True)
        torch.autograd.grad(DEQ(cell, backward=Reversible())(x_grad).sum(), x_grad,
                            create_graph=True)


def test_the_command_line_names_build_the_reversible_pair():
    from equilibria.train.config import TrainConfig
    from equilibria.train.solvers import make_deq

    deq = make_deq("reversible", "reversible", atol=1e-3, rtol=1e-3, max_steps=30)(TanhCell(4))
    assert isinstance(deq.backward, Reversible) and deq.max_steps == 30
    for solver, backward in (("anderson", "reversible"), ("reversible", "implicit")):
        with pytest.raises(ValueError, match="--solver reversible --backward reversible"):
            make_deq(solver, backward, atol=1e-3, rtol=1e-3, max_steps=30)
        with pytest.raises(ValueError, match="--solver reversible --backward reversible"):
            TrainConfig(solver=solver, backward=backward).validate()


def test_reversible_with_a_tuple_state_and_variational_dropout():
    """The packed multi-scale state and one dropout mask per call reach its backward too."""
    from torch import nn

    import equilibria as eq_

    class TwoSlot(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3, dtype=torch.float64)
            self.b = nn.Linear(2, 2, dtype=torch.float64)
            self.drop = eq_.VariationalDropout(0.3)
            with torch.no_grad():
                self.a.weight.mul_(0.3)
                self.b.weight.mul_(0.3)

        def forward(self, z, x):
            return (torch.tanh(self.drop(self.a(z[0])) + x), torch.tanh(self.b(z[1]) + 0.1))

    torch.manual_seed(0)
    cell = TwoSlot()
    x = torch.randn(4, 3, dtype=torch.float64)
    deq = eq_.DEQ(cell, backward=eq_.Reversible(), z_shape=((3,), (2,)), atol=1e-12,
                  rtol=1e-12, max_steps=200)
    a, b = deq(x)
    (a.sum() + b.square().sum()).backward()
    reversible = cell.a.weight.grad.clone()
    mask = cell.drop._mask.clone()

    class Fixed(nn.Module):
        def forward(self, values):
            return values * mask

    cell.drop = Fixed()
    cell.a.weight.grad = None
    implicit = eq_.DEQ(cell, z_shape=((3,), (2,)), atol=1e-13, rtol=1e-13, max_steps=300,
                       backward=eq_.Implicit(linear_solver=eq_.GMRES(rtol=1e-12, atol=1e-14)))
    a, b = implicit(x)
    (a.sum() + b.square().sum()).backward()
    torch.testing.assert_close(reversible, cell.a.weight.grad, rtol=1e-8, atol=1e-10)
