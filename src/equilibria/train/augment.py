"""Training-time data augmentation: random shifts (and horizontal flips) of 28x28 images.

An epoch's augmentation is drawn once, per sample, from a generator seeded with
(seed, epoch): which shift and flip an image gets depends on neither the batch it lands in
nor the number of DDP processes nor the global RNG, so a resumed run (which rebuilds the
epoch's plan from the epoch alone) sees exactly the augmented images the uninterrupted run
saw, and switching augmentation on changes no other random draw of the run.

- "shift": translate by up to MAX_SHIFT pixels in each direction, filling with the
  background (the normalised value of a black pixel), as the usual pad-and-random-crop does.
- "shift-flip": the same and a left-right mirror with probability 1/2. Refused on MNIST
  (`TrainConfig.validate`): a mirrored digit is another symbol, or none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AUGMENT_CHOICES", "MAX_SHIFT", "AugmentPlan", "augment_plan"]

AUGMENT_CHOICES = ("off", "shift", "shift-flip")
MAX_SHIFT = 2
_SALT = 0x5EED_A06  # keeps the plan's stream apart from other generators seeded with `seed`


@dataclass
class AugmentPlan:
    """Per-sample shifts (n, 2) in [-MAX_SHIFT, MAX_SHIFT] and flips (n,) for one epoch."""

    shifts: torch.Tensor
    flips: torch.Tensor
    background: float

    def apply(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Augment `images` (b, 1, H, W), the training samples `index` (b,) of the epoch
        (the plan, the images and the index on one device: no transfer per batch)."""
        count, _, height, width = images.shape
        pad = MAX_SHIFT
        padded = F.pad(images, (pad, pad, pad, pad), value=self.background)
        dy = pad + self.shifts[index, 0]
        dx = pad + self.shifts[index, 1]
        rows = dy.view(count, 1, 1) + torch.arange(height, device=images.device).view(1, -1, 1)
        cols = dx.view(count, 1, 1) + torch.arange(width, device=images.device).view(1, 1, -1)
        flip = self.flips[index].view(count, 1, 1)
        # a mirrored crop reads its columns right to left
        cols = torch.where(flip, cols.flip(-1), cols)
        batch = torch.arange(count, device=images.device).view(count, 1, 1)
        return padded[batch, 0, rows, cols].unsqueeze(1)


def augment_plan(
    mode: str, seed: int, epoch: int, n_train: int, background: float,
    device: torch.device | str = "cpu",
) -> AugmentPlan | None:
    """The epoch's plan for `mode` (None when "off"), drawn on the CPU (the same on every
    device) and moved to `device` once."""
    if mode not in AUGMENT_CHOICES:
        raise ValueError(f"unknown augment {mode!r}; choose one of {AUGMENT_CHOICES}.")
    if mode == "off":
        return None
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) ^ _SALT)
    shifts = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (n_train, 2), generator=generator)
    flips = torch.rand(n_train, generator=generator) < 0.5
    if mode == "shift":
        flips = torch.zeros_like(flips)
    return AugmentPlan(shifts.to(device), flips.to(device), background)
