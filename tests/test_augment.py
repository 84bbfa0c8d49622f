"""Training-time augmentation (train/augment.py): shifts and flips against a plain reference,
a plan that depends only on (seed, epoch) and the sample, and the refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from equilibria.cli import main
from equilibria.train.augment import MAX_SHIFT, AugmentPlan, augment_plan
from equilibria.train.config import TrainConfig


def _reference(image: torch.Tensor, dy: int, dx: int, flip: bool, fill: float) -> torch.Tensor:
    """One (1, H, W) image shifted so that out[i, j] = image[i + dy, j + dx] (fill outside),
    then mirrored left-right."""
    _, height, width = image.shape
    out = torch.full_like(image, fill)
    for i in range(height):
        for j in range(width):
            if 0 <= i + dy < height and 0 <= j + dx < width:
                out[0, i, j] = image[0, i + dy, j + dx]
    return out.flip(-1) if flip else out


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(-MAX_SHIFT, MAX_SHIFT), st.integers(-MAX_SHIFT, MAX_SHIFT),
                  st.booleans()),
        min_size=1, max_size=5,
    ),
    st.integers(0, 2**31 - 1),
)
def test_apply_matches_the_pixel_by_pixel_reference(draws, seed):
    images = torch.randn(len(draws), 1, 7, 9, generator=torch.Generator().manual_seed(seed))
    shifts = torch.tensor([[dy, dx] for dy, dx, _ in draws])
    flips = torch.tensor([flip for _, _, flip in draws])
    plan = AugmentPlan(shifts, flips, background=-0.5)
    out = plan.apply(images, torch.arange(len(draws)))
    for k, (dy, dx, flip) in enumerate(draws):
        torch.testing.assert_close(out[k], _reference(images[k], dy, dx, flip, -0.5),
                                   rtol=0, atol=0)


def test_plan_depends_on_seed_epoch_and_sample_only():
    a = augment_plan("shift-flip", seed=3, epoch=1, n_train=1000, background=0.0)
    b = augment_plan("shift-flip", seed=3, epoch=1, n_train=1000, background=0.0)
    assert torch.equal(a.shifts, b.shifts) and torch.equal(a.flips, b.flips)
    other_epoch = augment_plan("shift-flip", seed=3, epoch=2, n_train=1000, background=0.0)
    assert not torch.equal(a.shifts, other_epoch.shifts)
    # every shift in range is drawn, about half the samples are mirrored
    assert set(a.shifts.flatten().tolist()) == set(range(-MAX_SHIFT, MAX_SHIFT + 1))
    assert 400 < int(a.flips.sum()) < 600
    # a sample's augmentation does not depend on the batch it is in
    images = torch.randn(1000, 1, 6, 6)
    index = torch.tensor([7, 500, 3])
    whole = a.apply(images, torch.arange(1000))
    torch.testing.assert_close(a.apply(images[index], index), whole[index], rtol=0, atol=0)
    assert augment_plan("off", 3, 1, 1000, 0.0) is None
    assert not augment_plan("shift", 3, 1, 1000, 0.0).flips.any()


def test_background_fills_the_shifted_in_border():
    plan = AugmentPlan(torch.tensor([[MAX_SHIFT, -MAX_SHIFT]]), torch.tensor([False]), -1.25)
    out = plan.apply(torch.zeros(1, 1, 8, 8), torch.tensor([0]))
    assert (out[0, 0, -MAX_SHIFT:, :] == -1.25).all()  # rows shifted in at the bottom
    assert (out[0, 0, :, :MAX_SHIFT] == -1.25).all()  # columns shifted in at the left
    assert (out[0, 0, : 8 - MAX_SHIFT, MAX_SHIFT:] == 0).all()


def test_bad_augment_settings_are_refused(capsys):
    with pytest.raises(ValueError, match="choose one of"):
        TrainConfig(augment="rotate").validate()
    with pytest.raises(ValueError, match="--augment shift on mnist"):
        TrainConfig(dataset="mnist", augment="shift-flip").validate()
    TrainConfig(dataset="fashion-mnist", augment="shift-flip").validate()
    assert main(["train", "mnist", "--augment", "shift-flip", "--epochs", "1"]) != 0
    assert "--augment shift on mnist" in capsys.readouterr().err


def test_zero_shift_without_flip_is_the_identity():
    images = torch.randn(3, 1, 5, 5)
    plan = AugmentPlan(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.bool), 9.0)
    torch.testing.assert_close(plan.apply(images, torch.arange(3)), images, rtol=0, atol=0)


@pytest.mark.cuda
def test_a_plan_on_cuda_augments_as_on_cpu_without_syncs():
    cpu = augment_plan("shift-flip", seed=1, epoch=0, n_train=100, background=-0.4)
    gpu = augment_plan("shift-flip", seed=1, epoch=0, n_train=100, background=-0.4,
                       device="cuda")
    images, index = torch.randn(100, 1, 28, 28), torch.randperm(100)[:32]
    expected = cpu.apply(images[index], index)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = gpu.apply(images.cuda()[index.cuda()], index.cuda())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)
