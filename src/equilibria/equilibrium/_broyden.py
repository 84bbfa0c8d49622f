"""Limited-memory "good" Broyden on g(z) = f(z) - z, batched and safeguarded per sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_positive, check_positive_int, rms_norm
from ._linesearch import backtrack
from ._solver import FixedPointSolver, Fn, State, batch_dot

__all__ = ["Broyden"]


def _apply(us: torch.Tensor, vs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """H y with H = -I + sum_i u_i v_i^T; us, vs (batch, memory, n), y (batch, n)."""
    return -y + torch.bmm((torch.bmm(vs, y.unsqueeze(2))).transpose(1, 2), us).squeeze(1)


def _apply_transposed(us: torch.Tensor, vs: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """H^T s = -s + sum_i v_i (u_i . s)."""
    return -s + torch.bmm((torch.bmm(us, s.unsqueeze(2))).transpose(1, 2), vs).squeeze(1)


@dataclass(frozen=True)
class Broyden(FixedPointSolver):
    """Limited-memory Broyden's "good" method for the root of g(z) = f(z) - z.

    Keeps, per sample, an approximation H of the inverse Jacobian (dg/dz)^{-1}, starting from
    H = -I (exact when df/dz = 0) and stored as H = -I + sum_i u_i v_i^T (at most `memory`
    pairs, the oldest overwritten). A step is z <- z + alpha p with p = -H g(z); after a step
    s with residual change y, the good-Broyden (Sherman–Morrison) update

        H <- H + (s - H y) (s^T H) / (s^T H y)

    makes H y = s. Safeguards, per sample: a step is accepted when the residual norm grows
    at most `growth`-fold (Broyden is not monotone; demanding a decrease cost 50% more
    evaluations on the benchmark's hard case); otherwise alpha backtracks over the rest of
    `alphas` (each retry evaluates f on the failing samples only); if none passes,
    the sample stays where it is, but H is still updated with the last trial's secant pair
    (it is valid information about dg/dz: this is what turns an ascent direction around); an
    update with |s^T H y| ~ 0 is skipped, and a non-finite trial resets H to -I.

    Arguments:
        memory: number of stored update pairs (>= 1).
        alphas: decreasing step lengths tried per step (first usually 1.0, each in (0, 1]);
            the default (1.0,) never retries: a failing sample stays and learns from the
            trial (measured: fewest evaluations on the benchmark).
        growth: largest accepted factor of residual growth in one step (>= 1).

    Raises:
        ValueError / TypeError: memory < 1, alphas empty or not decreasing in (0, 1],
            growth < 1.

    One evaluation of f per step, plus one per retry on the retried samples. Reference:
    Broyden, "A class of methods for solving nonlinear simultaneous equations", Math. Comp. 19
    (1965); Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019 (limited memory).
    """

    memory: int = 20
    alphas: tuple[float, ...] = (1.0,)
    growth: float = 2.0

    def __post_init__(self) -> None:
        check_positive_int("memory", self.memory)
        alphas = self.alphas
        if not isinstance(alphas, tuple) or not alphas:
            raise TypeError(f"alphas must be a non-empty tuple of floats, got {alphas!r}.")
        if any(isinstance(a, bool) or not isinstance(a, (int, float)) for a in alphas) or any(
            not 0 < a <= 1 for a in alphas
        ) or list(alphas) != sorted(alphas, reverse=True):
            raise ValueError(
                f"alphas must be decreasing numbers in (0, 1], got {alphas!r}; e.g. (1.0, 0.25)."
            )
        if check_positive("growth", self.growth) < 1:
            raise ValueError(f"growth must be >= 1, got {self.growth}; e.g. growth=2.0.")

    def init(self, fn: Fn, z: torch.Tensor, fz: torch.Tensor) -> State:
        batch = z.shape[0]
        memory = z.new_zeros(batch, self.memory, z[0].numel())
        return {"z": z, "fz": fz, "us": memory, "vs": memory.clone()}

    def step(self, fn: Fn, state: State, step_index: int) -> tuple[State, torch.Tensor]:
        z, fz, us, vs = state["z"], state["fz"], state["us"], state["vs"]
        batch = z.shape[0]
        g = (fz - z).reshape(batch, -1)
        direction = -_apply(us, vs, g).reshape(z.shape)
        residual = rms_norm(g).detach()
        z_try, fz_try, _, accepted, nfe = backtrack(
            fn, z, direction, residual, self.alphas, sufficient=1.0 - self.growth
        )
        # The secant pair of the last trial is information about dg/dz whether or not the
        # trial was accepted (a rejected ascent step is exactly what teaches H the sign).
        s = (z_try - z).reshape(batch, -1)
        y = (fz_try - z_try).reshape(batch, -1) - g
        h_y = _apply(us, vs, y)
        denominator = batch_dot(s, h_y)
        scale = s.norm(dim=1) * h_y.norm(dim=1)
        finite = torch.isfinite(y).all(dim=1)
        usable = finite & torch.isfinite(denominator) & (
            denominator.abs() > 1e3 * torch.finfo(z.dtype).eps * scale
        )
        safe = torch.where(usable, denominator, torch.ones_like(denominator))
        u = torch.where(usable[:, None], (s - h_y) / safe[:, None], 0)
        v = torch.where(usable[:, None], _apply_transposed(us, vs, s), 0)
        slot = torch.tensor([step_index % self.memory], device=z.device)
        us = us.index_copy(1, slot, u.unsqueeze(1))
        vs = vs.index_copy(1, slot, v.unsqueeze(1))
        # Non-finite trials carry no information: forget and restart from H = -I.
        forget = ~finite[:, None, None]
        us = torch.where(forget, 0, us)
        vs = torch.where(forget, 0, vs)
        keep = accepted.reshape(batch, *([1] * (z.dim() - 1)))
        z_new = torch.where(keep, z_try, z)
        fz_new = torch.where(keep, fz_try, fz)
        return {"z": z_new, "fz": fz_new, "us": us, "vs": vs}, nfe
