"""The DEQ module: modes, dtypes, warm starts, per-sample independence, Skip DEQ, bad input."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import equilibria as eq
from deq_problems import (
    GainCell,
    TanhCell,
    one_thread,  # noqa: F401  (autouse fixture: active here)
)
from equilibria.nn import DEQ, Implicit, OneStep, Phantom, Reversible, Unrolled

STRATEGIES = [Implicit(), Implicit(eq.Anderson()), Unrolled(), OneStep(), Phantom(), Reversible()]


@pytest.mark.parametrize("backward", STRATEGIES, ids=lambda s: type(s).__name__)
def test_output_is_the_fixed_point_and_gradients_reach_parameters(backward):
    cell = TanhCell(8, in_width=4, dtype=torch.float32)
    deq = DEQ(cell, backward=backward, z_shape=(8,))
    x = torch.randn(6, 4)  # does not require grad: gradients must still reach θ
    z = deq(x)
    assert z.shape == (6, 8) and z.dtype == torch.float32
    assert torch.allclose(cell(z, x), z, atol=1e-3)
    sol = deq.last_solution
    assert bool(sol.success.all()) and sol.value.shape == (6, 8) and not sol.value.requires_grad
    for key in ("residual", "n_steps", "nfe"):
        assert sol.stats[key].shape == (6,)
    z.square().sum().backward()
    for p in cell.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert deq.last_backward_stats["status"].shape == (6,)


def test_no_grad_and_eval_mode_solve_without_recording():
    cell = TanhCell(8)
    deq = DEQ(cell).eval()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        z = deq(x)
    assert not z.requires_grad
    assert torch.equal(z, deq.last_solution.value)  # the solver's z*, no extra step
    z_train = deq.train()(x)
    assert z_train.requires_grad
    assert torch.allclose(z_train, z, atol=1e-4)


def test_float32_and_float64_agree():
    cell64 = TanhCell(8)
    cell32 = copy.deepcopy(cell64).float()
    x = torch.randn(4, 8, dtype=torch.float64)
    z64 = DEQ(cell64, atol=1e-10, rtol=1e-10)(x)
    z32 = DEQ(cell32, atol=1e-6, rtol=1e-6)(x.float())
    assert z32.dtype == torch.float32
    assert torch.allclose(z32.double(), z64, atol=1e-5)


def test_warm_start_from_the_fixed_point_takes_no_steps():
    cell = TanhCell(8)
    deq = DEQ(cell, atol=1e-10, rtol=1e-10)
    x = torch.randn(4, 8, dtype=torch.float64)
    deq(x)
    cold_nfe = deq.last_solution.stats["nfe"]
    z_star = deq.last_solution.value
    deq(x, z0=z_star)
    assert bool((deq.last_solution.stats["n_steps"] == 0).all())
    assert bool((deq.last_solution.stats["nfe"] < cold_nfe).all())
    with pytest.raises(ValueError, match="z0 must have shape"):
        deq(x, z0=z_star[:2])


@pytest.mark.parametrize(
    "backward", [Implicit(), Implicit(eq.Picard(), atol=1e-13, rtol=1e-13, max_steps=3000)],
    ids=["gmres", "picard"],
)
def test_per_sample_result_and_gradient_do_not_depend_on_batch_mates(backward):
    cell = GainCell(12)
    inputs = torch.randn(3, 12, dtype=torch.float64)
    gain = torch.tensor([0.3, 0.999, 0.5], dtype=torch.float64)  # sample 1 is hard
    deq = DEQ(cell, backward=backward, solver=eq.Picard(), atol=1e-12, rtol=1e-12,
              max_steps=5000)

    def run(rows):
        x = inputs[rows].clone().requires_grad_(True)
        z = deq((x, gain[rows]))
        z.square().sum().backward()
        return z.detach(), x.grad, deq.last_solution.stats["n_steps"]

    z_batch, grad_batch, steps_batch = run([0, 1, 2])
    assert int(steps_batch[1]) > 5 * int(steps_batch[0])  # really a hard batch-mate
    for i in (0, 2):
        z_alone, grad_alone, steps_alone = run([i])
        assert int(steps_alone[0]) == int(steps_batch[i])
        torch.testing.assert_close(z_alone[0], z_batch[i], atol=1e-14, rtol=0)
        torch.testing.assert_close(grad_alone[0], grad_batch[i], atol=1e-12, rtol=0)


def test_tuple_input_and_x_none_with_z0():
    class Autonomous(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

        def forward(self, z, x):
            assert x is None
            return self.scale * torch.cos(z)

    deq = DEQ(Autonomous(), atol=1e-12, rtol=1e-12)
    z = deq(None, z0=torch.zeros(2, 1, dtype=torch.float64))
    assert torch.allclose(z, 0.5 * torch.cos(z), atol=1e-10)
    z.sum().backward()
    # d z*/d s with z* = s cos z*:  cos z* / (1 + s sin z*)
    z_star = deq.last_solution.value[0, 0]
    expected = 2 * torch.cos(z_star) / (1 + 0.5 * torch.sin(z_star))
    torch.testing.assert_close(deq.f_module.scale.grad, expected, atol=1e-8, rtol=0)
    with pytest.raises(ValueError, match="z0"):
        deq(None)


def test_skip_deq_fits_its_initialiser_and_saves_forward_evaluations():
    torch.manual_seed(1)
    cell = TanhCell(16, contraction=0.95, dtype=torch.float32)
    init = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16))
    deq = DEQ(cell, init=init, solver=eq.Picard(), atol=1e-6, rtol=1e-6, max_steps=300)
    x = torch.randn(64, 16)
    deq(x)
    nfe_before = deq.last_solution.stats["nfe"].float().mean()
    loss_before = float(deq.skip_loss().detach())
    optimizer = torch.optim.Adam(init.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        deq(x)
        deq.skip_loss().backward()
        optimizer.step()
    # f itself receives no gradient from the skip loss: z* is a constant there.
    assert all(p.grad is None for p in cell.parameters())
    deq(x)
    nfe_after = deq.last_solution.stats["nfe"].float().mean()
    assert float(deq.skip_loss().detach()) < 0.01 * loss_before
    # z0 = g(x) starts ~20x closer (RMS): a fixed number of contraction steps saved.
    assert nfe_after < 0.8 * nfe_before
    with pytest.raises(ValueError, match="init"):
        DEQ(cell).skip_loss()
    with pytest.raises(ValueError, match="forward"):
        DEQ(cell, init=init).skip_loss()


def test_unrolled_skip_deq_backpropagates_into_the_initialiser():
    cell = TanhCell(6, dtype=torch.float32)
    init = nn.Linear(6, 6)
    deq = DEQ(cell, init=init, backward=Unrolled(), solver=eq.Picard(), max_steps=3,
              atol=1e-12, rtol=1e-12)
    deq(torch.randn(4, 6)).sum().backward()
    assert init.weight.grad is not None and init.weight.grad.abs().sum() > 0


def test_spectral_radius_option_records_it_per_sample():
    cell = TanhCell(6, contraction=0.7)
    deq = DEQ(cell, spectral_radius_iters=6)
    x = torch.randn(3, 6, dtype=torch.float64)
    deq(x)
    rho = deq.last_solution.stats["spectral_radius"]
    assert rho.shape == (3,)
    assert bool((rho > 0).all()) and bool((rho <= 0.7 + 1e-9).all())


def test_deepcopy_and_pickle_drop_the_per_call_results():
    cell = TanhCell(4, dtype=torch.float32)
    deq = DEQ(cell, init=nn.Linear(4, 4))
    deq(torch.randn(2, 4))  # leaves a skip prediction with a graph behind
    clone = copy.deepcopy(deq)
    assert clone.last_solution is None and clone._skip_pair is None
    restored = pickle.loads(pickle.dumps(deq))
    assert torch.equal(restored(torch.ones(1, 4)), deq(torch.ones(1, 4)))


def test_forward_failure_is_a_status_unless_throw():
    class Expanding(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.ones(1, dtype=torch.float64))

        def forward(self, z, x):  # f = 2z + 1 on sample 0, contraction on sample 1
            return torch.where(x > 0, 2 * z + self.bias, 0.5 * z + self.bias)

    x = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    deq = DEQ(Expanding(), solver=eq.Picard())
    z = deq(x)
    status = deq.last_solution.status.tolist()
    assert status[0] == eq.Status.DIVERGED and status[1] == eq.Status.SUCCESS
    assert torch.isfinite(z).all()
    with pytest.raises(eq.EquilibriaError, match="DIVERGED"):
        DEQ(Expanding(), solver=eq.Picard(), throw=True)(x)


def test_bad_input_gets_clear_errors():
    cell = TanhCell(4)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="nn.Module"):
        DEQ(lambda z, x: z)
    with pytest.raises(TypeError, match="backward strategy"):
        DEQ(cell, backward="implicit")
    with pytest.raises(TypeError, match="backward strategy"):
        DEQ(cell, backward=Implicit)  # the class, not an object
    with pytest.raises(TypeError, match="solver"):
        DEQ(cell, solver="anderson")
    with pytest.raises(TypeError, match="init"):
        DEQ(cell, init=lambda x: x)
    with pytest.raises(TypeError):
        DEQ(cell, tol=1e-3)  # unknown keyword
    with pytest.raises(TypeError):
        DEQ(cell)(x, warm_start=x)  # unknown keyword at call time
    with pytest.raises(ValueError, match="atol"):
        DEQ(cell, atol=0.0)
    with pytest.raises(ValueError, match="max_steps"):
        DEQ(cell, max_steps=0)
    with pytest.raises(ValueError, match="z_shape"):
        DEQ(cell, z_shape=(0,))
    with pytest.raises(TypeError, match="x must be"):
        DEQ(cell)([1.0, 2.0])
    with pytest.raises(ValueError, match="inf or NaN"):
        DEQ(cell)(torch.full((2, 4), float("nan"), dtype=torch.float64))

    class WrongShape(nn.Module):
        def forward(self, z, x):
            return z[:, :2]

    for backward in STRATEGIES:
        with pytest.raises(ValueError, match="shape"):
            DEQ(WrongShape(), backward=backward)(x)

    class WrongDtype(nn.Module):
        def forward(self, z, x):
            return z.float()

    with pytest.raises(ValueError, match="dtype"):
        DEQ(WrongDtype())(x)


@pytest.mark.cuda
@pytest.mark.parametrize("backward", STRATEGIES, ids=lambda s: type(s).__name__)
def test_cuda_forward_backward(backward):
    cell = TanhCell(32, dtype=torch.float32).cuda()
    deq = DEQ(cell, backward=backward, spectral_radius_iters=4)
    x = torch.randn(16, 32, device="cuda")
    z = deq(x)
    assert z.device.type == "cuda" and deq.last_solution.status.device.type == "cuda"
    z.square().sum().backward()
    assert cell.W.weight.grad.device.type == "cuda" and torch.isfinite(cell.W.weight.grad).all()
    cpu = DEQ(copy.deepcopy(cell).cpu(), backward=backward)
    torch.testing.assert_close(cpu(x.cpu()), z.cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backward", [Implicit(), Unrolled()], ids=["implicit", "unrolled"])
def test_compact_gives_the_same_result_and_gradient(backward):
    cell = GainCell(10)
    inputs = torch.randn(6, 10, dtype=torch.float64)
    gain = torch.tensor([0.2, 0.95, 0.3, 0.9, 0.1, 0.5], dtype=torch.float64)
    results = []
    for compact in (False, True):
        deq = DEQ(cell, backward=backward, solver=eq.Picard(), atol=1e-11, rtol=1e-11,
                  max_steps=2000, compact=compact)
        x = inputs.clone().requires_grad_(True)
        z = deq((x, gain))
        z.square().sum().backward()
        results.append((z.detach(), x.grad, deq.last_solution.stats["nfe"]))
    (z_full, grad_full, nfe_full), (z_compact, grad_compact, nfe_compact) = results
    assert torch.equal(nfe_full, nfe_compact)
    torch.testing.assert_close(z_compact, z_full, atol=1e-13, rtol=0)
    torch.testing.assert_close(grad_compact, grad_full, atol=1e-11, rtol=0)
