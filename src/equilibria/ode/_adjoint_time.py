"""Gradients with respect to the time span, shared by both adjoint backwards."""

from __future__ import annotations

import torch

__all__ = ["time_span_gradient"]


def time_span_gradient(f, value, y0, grad_value, a0, t0: float, t1: float,
                        has_grid: bool, args=()) -> tuple[torch.Tensor, int]:
    """(dL/dt0, dL/dt1) as a (2,) float64 tensor, and the evaluations of f it took.

    Moving t1 moves the returned state y(t1) along the flow: dL/dt1 = g . f(t1, y(t1)). With
    t_eval the returned states sit at fixed times that t1 only bounds, so dL/dt1 = 0. Moving
    t0 with y0 fixed shifts the whole trajectory: dy(t)/dt0 = -Phi(t, t0) f(t0, y0), so
    dL/dt0 = -a(t0) . f(t0, y0) with a(t0) = dL/dy0.
    """
    batch = y0.shape[0]
    with torch.no_grad():
        def rate(t: float, y: torch.Tensor) -> torch.Tensor:
            return f(torch.full((batch,) + (1,) * (y.dim() - 1), t, dtype=y.dtype,
                                device=y.device), y, *(x.detach() for x in args))

        grad_t0 = -(a0 * rate(t0, y0)).sum()
        grad_t1 = torch.zeros_like(grad_t0) if has_grid else (grad_value * rate(t1, value)).sum()
    grad = torch.stack([grad_t0, grad_t1]).to(torch.float64)
    return grad, 1 if has_grid else 2
