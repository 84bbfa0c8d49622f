"""Structured (multi-scale) states: a tuple of tensors through fixed_point, DEQ and diagnostics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import equilibria as eq
from deq_problems import one_thread  # noqa: F401  (autouse fixture: active here)

C1, C2, SIDE = 3, 4, 6
Z_SHAPE = ((C1, SIDE, SIDE), (C2, SIDE // 2, SIDE // 2))
SOLVERS = [eq.Picard(), eq.Anderson(), eq.Broyden(), eq.NewtonKrylov(), eq.SteadyState(),
           eq.SteadyState(eq.Tsit5())]
SOLVER_IDS = ["picard", "anderson", "broyden", "newton-krylov", "steady-implicit",
              "steady-tsit5"]
BACKWARDS = [eq.Implicit(), eq.Implicit(linear_solver=eq.Anderson()), eq.Unrolled(),
             eq.OneStep(), eq.Phantom()]
BACKWARD_IDS = ["implicit-gmres", "implicit-anderson", "unrolled", "one-step", "phantom"]


class TwoScaleCell(nn.Module):
    """MDEQ-like: a fine and a coarse feature map, each updated from itself and the other."""

    def __init__(self, dtype: torch.dtype = torch.float64, gain: float = 0.4) -> None:
        super().__init__()
        self.fine = nn.Conv2d(C1, C1, 3, padding=1, dtype=dtype)
        self.coarse = nn.Conv2d(C2, C2, 3, padding=1, dtype=dtype)
        self.down = nn.Conv2d(C1, C2, 3, stride=2, padding=1, dtype=dtype)
        self.up = nn.Conv2d(C2, C1, 1, dtype=dtype)
        with torch.no_grad():
            for conv in (self.fine, self.coarse, self.down, self.up):
                conv.weight.mul_(gain / conv.weight.abs().sum(dim=(1, 2, 3), keepdim=True))

    def forward(self, z: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor):
        fine, coarse = z
        upsampled = F.interpolate(self.up(coarse), scale_factor=2, mode="nearest")
        return (torch.tanh(self.fine(fine) + upsampled + x),
                torch.tanh(self.coarse(coarse) + self.down(fine)))


class FlatCell(nn.Module):
    """The same cell on a hand-flattened (batch, n) state: what users wrote before."""

    def __init__(self, cell: TwoScaleCell) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        n1 = C1 * SIDE * SIDE
        fine = z[:, :n1].reshape(-1, *Z_SHAPE[0])
        coarse = z[:, n1:].reshape(-1, *Z_SHAPE[1])
        a, b = self.cell((fine, coarse), x)
        return torch.cat([a.flatten(1), b.flatten(1)], dim=1)


def _x(batch: int = 3, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(batch, C1, SIDE, SIDE, dtype=dtype)


@pytest.mark.parametrize("backward", BACKWARDS, ids=BACKWARD_IDS)
@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
def test_two_scale_deq_with_every_solver_and_backward(solver, backward):
    torch.manual_seed(0)
    cell = TwoScaleCell()
    deq = eq.DEQ(cell, solver=solver, backward=backward, z_shape=Z_SHAPE, atol=1e-9, rtol=1e-7,
                 max_steps=200)
    x = _x()
    fine, coarse = deq(x)
    assert fine.shape == (3, *Z_SHAPE[0]) and coarse.shape == (3, *Z_SHAPE[1])
    assert deq.last_solution.success.all()
    value = deq.last_solution.value
    assert isinstance(value, tuple) and len(value) == 2
    with torch.no_grad():  # a SUCCESS sample passes its test when checked again
        residual = [a - b for a, b in zip(cell(value, x), value)]
    rms = torch.cat([r.flatten(1) for r in residual], 1).pow(2).mean(1).sqrt()
    size = torch.cat([v.flatten(1) for v in value], 1).pow(2).mean(1).sqrt()
    assert bool((rms <= (1e-9 + 1e-7 * size) * (1 + 1e-6)).all())
    (fine.sum() + coarse.square().sum()).backward()
    grads = [p.grad for p in cell.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_tuple_state_gradient_matches_central_differences():
    torch.manual_seed(1)
    cell = TwoScaleCell()
    x = _x(2)
    tight = {"atol": 1e-13, "rtol": 1e-13, "max_steps": 300}
    deq = eq.DEQ(cell, z_shape=Z_SHAPE, backward=eq.Implicit(
        linear_solver=eq.GMRES(rtol=1e-12, atol=1e-14)), **tight)
    weights = (torch.randn(2, *Z_SHAPE[0], dtype=torch.float64),
               torch.randn(2, *Z_SHAPE[1], dtype=torch.float64))

    def loss() -> torch.Tensor:
        fine, coarse = deq(x)
        return (weights[0] * fine).sum() + (weights[1] * coarse).sum()

    parameter = cell.down.weight
    loss().backward()
    analytic = parameter.grad.clone()
    numeric = torch.zeros_like(parameter)
    step = 1e-6
    with torch.no_grad():
        for index in range(parameter.numel()):
            flat = parameter.view(-1)
            flat[index] += step
            up = float(loss())
            flat[index] -= 2 * step
            down = float(loss())
            flat[index] += step
            numeric.view(-1)[index] = (up - down) / (2 * step)
    error = float((analytic - numeric).norm() / numeric.norm())
    assert error < 1e-6, error


def test_tuple_state_equals_hand_flattened_state():
    torch.manual_seed(2)
    cell = TwoScaleCell()
    x = _x(4)
    structured = eq.DEQ(cell, z_shape=Z_SHAPE, rtol=1e-8)
    flat = eq.DEQ(FlatCell(cell), z_shape=(C1 * SIDE * SIDE + C2 * (SIDE // 2) ** 2,), rtol=1e-8)
    fine, coarse = structured(x)
    packed = flat(x)
    torch.testing.assert_close(torch.cat([fine.flatten(1), coarse.flatten(1)], 1), packed)
    assert torch.equal(structured.last_solution.stats["nfe"], flat.last_solution.stats["nfe"])


@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
def test_tuple_state_samples_are_independent(solver):
    torch.manual_seed(3)
    cell = TwoScaleCell()
    x = _x(5)
    z0 = tuple(torch.zeros(5, *shape, dtype=torch.float64) for shape in Z_SHAPE)
    batch = eq.fixed_point(cell, z0, x, solver=solver, atol=1e-10, rtol=1e-10, max_steps=200)
    alone = eq.fixed_point(cell, tuple(slot[2:3] for slot in z0), x[2:3], solver=solver,
                           atol=1e-10, rtol=1e-10, max_steps=200)
    for together, single in zip(batch.value, alone.value):
        torch.testing.assert_close(together[2:3], single, rtol=1e-9, atol=1e-10)
    assert int(batch.stats["n_steps"][2]) == int(alone.stats["n_steps"][0])


def test_one_tolerance_test_over_all_slots():
    # Slot 0 converges at once, slot 1 slowly: the sample's test is one RMS over both.
    def f(z):
        a, b = z
        return (torch.ones_like(a), 0.9 * b + 0.1)

    z0 = (torch.zeros(2, 3), torch.zeros(2, 1))
    solution = eq.fixed_point(f, z0, solver=eq.Picard(), atol=1e-6, rtol=1e-12, max_steps=500)
    a, b = solution.value
    flat = torch.cat([a, b], 1)
    residual = torch.cat([torch.ones_like(a), 0.9 * b + 0.1], 1) - flat
    torch.testing.assert_close(solution.stats["residual"], residual.pow(2).mean(1).sqrt())
    assert solution.success.all() and float(solution.stats["residual"].max()) <= 1e-6


def test_warm_start_and_reuse_with_a_tuple_state():
    torch.manual_seed(4)
    deq = eq.DEQ(TwoScaleCell(), z_shape=Z_SHAPE, rtol=1e-8)
    x = _x(3)
    with torch.no_grad():
        deq(x)
        cold = deq.last_solution.stats["nfe"].clone()
        deq(x, z0=deq.last_solution.value)
    assert int(deq.last_solution.stats["nfe"].max()) < int(cold.min())


def test_skip_deq_with_a_tuple_prediction():
    class Init(nn.Module):
        def forward(self, x):
            return (0.1 * x, x.new_zeros(x.shape[0], *Z_SHAPE[1]))

    deq = eq.DEQ(TwoScaleCell(), init=Init(), z_shape=Z_SHAPE)
    fine, coarse = deq(_x(2))
    (fine.sum() + coarse.sum() + deq.skip_loss()).backward()
    assert deq.last_solution.success.all()


def test_diagnostics_take_a_tuple_state():
    torch.manual_seed(5)
    cell = TwoScaleCell()
    x = _x(2)
    deq = eq.DEQ(cell, z_shape=Z_SHAPE, spectral_radius_iters=10)
    with torch.no_grad():
        deq(x)
    value = deq.last_solution.value
    flat_value = torch.cat([value[0].flatten(1), value[1].flatten(1)], 1)
    radius = eq.spectral_radius(cell, value, x, n_iters=10,
                                generator=torch.Generator().manual_seed(0))
    flat_radius = eq.spectral_radius(FlatCell(cell), flat_value, x, n_iters=10,
                                     generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(radius, flat_radius)
    assert deq.last_solution.stats["spectral_radius"].shape == (2,)
    penalty = eq.jacobian_penalty(cell, value, x, generator=torch.Generator().manual_seed(0))
    flat_penalty = eq.jacobian_penalty(FlatCell(cell), flat_value, x,
                                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(penalty, flat_penalty)


def test_structure_mismatches_name_the_slot():
    x = _x(2)
    z0 = tuple(torch.zeros(2, *shape, dtype=torch.float64) for shape in Z_SHAPE)
    three = (*z0, torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="returned 2 tensors for a state of 3"):
        eq.fixed_point(lambda z, x: z[:2], three, x)
    with pytest.raises(ValueError, match="slot 1"):
        eq.fixed_point(lambda z, x: (z[0], z[1][:, :1]), z0, x)
    with pytest.raises(ValueError, match=r"z0\[1\] has batch 3"):
        eq.fixed_point(lambda z, x: z, (z0[0], torch.zeros(3, 1, dtype=torch.float64)), x)
    with pytest.raises(TypeError, match=r"z0\[1\] has dtype torch.float32"):
        eq.fixed_point(lambda z, x: z, (z0[0], torch.zeros(2, 1)), x)
    with pytest.raises(ValueError, match="slot 0"):
        eq.DEQ(lambda_cell(lambda z, x: (z[0].float(), z[1])), z_shape=Z_SHAPE)(x)
    with pytest.raises(ValueError, match="z_shape must be"):
        eq.DEQ(TwoScaleCell(), z_shape=((3, 6, 6), (4, -1)))
    with pytest.raises(ValueError, match=r"z0 must have shape"):
        eq.DEQ(TwoScaleCell(), z_shape=Z_SHAPE)(x, z0=(z0[0], z0[0]))


def lambda_cell(function):
    class Cell(nn.Module):
        def forward(self, z, x):
            return function(z, x)

    return Cell()


def test_forgotten_z_shape_is_explained():
    deq = eq.DEQ(TwoScaleCell())  # z defaults to x's shape: the cell unpacks two slots
    with pytest.raises(ValueError, match=r"shaped like x .*pass z_shape=") as caught:
        deq(_x(2))
    assert caught.value.__cause__ is not None  # the user's own error stays visible
