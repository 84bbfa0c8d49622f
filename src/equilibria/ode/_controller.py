"""Per-sample step-size control: the PI controller and Hairer's automatic initial step.

The local error of a step is measured per sample as the RMS norm

    err_b = sqrt(mean_i (e_i / (atol + rtol * max(|y_i|, |y_new,i|)))^2)

over the sample's elements; the step is accepted when err_b <= 1. The next step size is

    dt_new = dt * clip(safety * err^(-alpha/k) * err_prev^(beta/k), min_factor, max_factor)

with k = error_order + 1 and err_prev the error of the last accepted step (the "I" part
damps oscillations of dt). After a rejection the factor is capped at 1.

References:
    Hairer, Nørsett, Wanner, *Solving ODEs I*, II.4 (initial step, algorithm of p. 169) and
    the DOPRI5 code (PI stabilisation with beta = 0.04 for k = 5); Söderlind, "Automatic
    control and adaptive time-stepping", Numer. Algorithms 31 (2002).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._checks import rms_norm
from ._rk import time_like

__all__ = ["PIController", "initial_step", "scaled_error"]


@dataclass(frozen=True)
class PIController:
    """Proportional–integral step-size controller (per sample).

    Arguments:
        safety: factor < 1 applied to every proposal, so steps rarely fail.
        min_factor: smallest shrink per step (also used after a non-finite step).
        max_factor: largest growth per step.
        alpha: proportional exponent times k (the error exponent is -alpha/k).
        beta: integral exponent times k (err_prev^(beta/k)); 0 gives the classical
            I-controller dt * err^(-1/k) when alpha = 1. Defaults reproduce DOPRI5's
            0.17 / 0.04 for k = 5.

    Raises:
        ValueError: when a coefficient is out of range.
    """

    safety: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 10.0
    alpha: float = 0.85
    beta: float = 0.2

    def __post_init__(self) -> None:
        if not 0 < self.safety <= 1:
            raise ValueError(f"PIController: safety must be in (0, 1], got {self.safety}.")
        if not 0 < self.min_factor < 1 < self.max_factor:
            raise ValueError(
                "PIController: need 0 < min_factor < 1 < max_factor, got "
                f"min_factor={self.min_factor}, max_factor={self.max_factor}."
            )
        if self.alpha <= 0 or self.beta < 0:
            raise ValueError(
                f"PIController: need alpha > 0 and beta >= 0, got {self.alpha}, {self.beta}."
            )

    def factor(
        self, err: torch.Tensor, err_prev: torch.Tensor, accepted: torch.Tensor, k: int
    ) -> torch.Tensor:
        """Per-sample step multiplier from this step's error and the last accepted one's.

        Arguments:
            err: (batch,) scaled error norm of this step (may be 0).
            err_prev: (batch,) scaled error of the last accepted step (>= 1e-4).
            accepted: (batch,) bool.
            k: error_order + 1.

        Returns:
            (batch,) factor in [min_factor, max_factor], <= 1 where not accepted.
        """
        safe_err = err.clamp_min(1e-10)
        proposal = self.safety * safe_err.pow(-self.alpha / k) * err_prev.pow(self.beta / k)
        proposal = proposal.clamp(self.min_factor, self.max_factor)
        return torch.where(accepted, proposal, proposal.clamp_max(1.0))


def scaled_error(
    y_err: torch.Tensor,
    y: torch.Tensor,
    y_new: torch.Tensor,
    rtol: float,
    atol: float,
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(batch,) norm (default RMS) of y_err / (atol + rtol * max(|y|, |y_new|)) per sample."""
    scale = torch.maximum(y.abs(), y_new.abs()).mul_(rtol).add_(atol)
    if norm is None:
        return rms_norm(y_err / scale)
    value = norm(y_err / scale)
    if not isinstance(value, torch.Tensor) or value.shape != y.shape[:1]:
        raise ValueError(
            f"error_norm must return one norm per row, shape ({y.shape[0]},); got "
            f"{getattr(value, 'shape', type(value).__name__)}. Reduce over every dim but 0."
        )
    return value


def initial_step(
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    t0: torch.Tensor,
    y0: torch.Tensor,
    f0: torch.Tensor,
    direction: float,
    order: int,
    rtol: float,
    atol: float,
    max_dt: float,
) -> torch.Tensor:
    """Hairer's automatic initial step, per sample (one extra evaluation of f).

    d0 = ||y0||, d1 = ||f0||, h0 = 0.01 d0/d1 (1e-6 when either is tiny); an Euler step of
    h0 gives d2 = ||f(t0 + h0, y0 + h0 f0) - f0|| / h0; then
    h1 = (0.01 / max(d1, d2))^(1/(order+1)) and dt = min(100 h0, h1, max_dt), all norms
    scaled by atol + rtol |y0|.

    Arguments:
        f: the vector field (t of shape (batch, 1, ..., 1) in y's dtype).
        t0: (batch,) float64 start times.
        y0, f0: (batch, ...) state and f(t0, y0).
        direction: +1.0 or -1.0 (sign of t1 - t0).
        order: the method's order.
        rtol, atol: tolerances.
        max_dt: |t1 - t0| (no first step longer than the interval).

    Returns:
        (batch,) float64 signed step sizes.
    """
    with torch.no_grad():
        scale = y0.abs() * rtol + atol
        d0 = rms_norm(y0 / scale).double()
        d1 = rms_norm(f0 / scale).double()
        tiny = (d0 < 1e-5) | (d1 < 1e-5)
        h0 = torch.where(tiny, torch.full_like(d0, 1e-6), 0.01 * d0 / d1.clamp_min(1e-300))
        h0 = h0.clamp_max(max_dt)
        y1 = y0 + (direction * h0).to(y0.dtype).reshape((-1,) + (1,) * (y0.dim() - 1)) * f0
        f1 = f(time_like(t0 + direction * h0, y0), y1)
        d2 = rms_norm((f1 - f0) / scale).double() / h0
        d_max = torch.maximum(d1, d2)
        h1 = torch.where(
            d_max <= 1e-15,
            torch.clamp_min(h0 * 1e-3, 1e-6),
            (0.01 / d_max.clamp_min(1e-300)).pow(1.0 / (order + 1)),
        )
        h = torch.minimum(100 * h0, h1).clamp_max(max_dt)
        # a non-finite f1 (f blows up right away) must not poison dt: fall back to h0
        h = torch.where(torch.isfinite(h) & (h > 0), h, h0)
        return direction * h
