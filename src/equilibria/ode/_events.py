"""Events: the time at which g(t, y(t)) crosses zero, located per sample inside a step.

After every accepted step, odeint evaluates the event function at the step's end; a sample
whose g changed sign (in the requested direction) has its event inside that step. The event
time is found by root-finding on the step's dense output, y(t + theta dt) for theta in
[0, 1] (the same interpolant t_eval uses), with the Illinois variant of regula falsi on the
bracket [0, 1], to a bracket width of a few ulps of t. Between two accepted steps no
evaluation of f is needed: the interpolant is built from the step's stages.

Gradients (odeint's Backprop): at a terminal event, g(t*, y(t*; theta); theta) = 0 defines
the event time t* implicitly, so by the implicit function theorem

    dt*/dtheta = -(dg/dy . dy(t*)/dtheta + dg/dtheta) / (dg/dt + dg/dy . f(t*, y(t*))),

and the state at the event, y(t*(theta); theta), changes by dy(t*)/dtheta + f(t*, y*)
dt*/dtheta. Both are attached to the returned tensors without changing their values
(t* + (g - g.detach()) / (-D), with D the detached denominator), so autograd through the
solver's steps gives the gradient of the event time and state with respect to y0, the
parameters of f and of g, and args.

Reference: Chen, Amos & Nickel, "Learning Neural Event Functions for Ordinary Differential
Equations", ICLR 2021 (§3, the implicit function theorem at the event); Hairer, Nørsett &
Wanner, *Solving ODEs I*, II.6 (dense output) and the Illinois method of Dowell & Jarratt
(1971).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._interp import dense_value
from ._rk import _batch_view, time_like

__all__ = ["Event", "event_records"]

# Illinois converges superlinearly; 200 iterations of a bracket that at worst halves every
# other iteration reach any float64 width, so the bound never stops a converging search.
_MAX_ROOT_ITERS = 200


@dataclass(frozen=True)
class Event:
    """An event g(t, y) = 0 for odeint, located per sample.

    Arguments:
        fn: g(t, y, *args) -> (batch,) tensor, t of shape (batch, 1, ..., 1) as f receives
            it, y (batch, ...), args as passed to odeint (sliced like y). Row-wise.
        direction: 0 for any crossing, +1 only where g goes from negative to >= 0, -1 only
            where it goes from positive to <= 0.
        terminal: True stops the sample at the event (Status.EVENT, value the state there);
            False records the event times and integrates on.

    Raises:
        TypeError: fn not callable, terminal not a bool, direction not an int.
        ValueError: direction not in {-1, 0, 1}.
    """

    fn: Callable[..., torch.Tensor]
    direction: int = 0
    terminal: bool = True

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(
                f"Event(fn=...) must be callable g(t, y, *args) -> (batch,), got "
                f"{type(self.fn).__name__}."
            )
        if isinstance(self.direction, bool) or not isinstance(self.direction, int):
            raise TypeError(
                f"Event(direction=...) must be the int -1, 0 or 1, got {self.direction!r}."
            )
        if self.direction not in (-1, 0, 1):
            raise ValueError(
                f"Event(direction=...) must be -1 (downward crossings), 0 (any) or 1 "
                f"(upward), got {self.direction}."
            )
        if not isinstance(self.terminal, bool):
            raise TypeError(f"Event(terminal=...) must be a bool, got {self.terminal!r}.")

    def value(self, t: torch.Tensor, y: torch.Tensor, args: tuple) -> torch.Tensor:
        """g at (t, y) for every row: (rows,) in y's dtype (t: (rows,) or broadcast shape)."""
        out = self.fn(time_like(t, y), y, *args)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or (
            tuple(out.shape) != (y.shape[0],)
        ):
            got = (f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor)
                   else type(out).__name__)
            raise ValueError(
                f"the event function must return one floating value per sample, a tensor of "
                f"shape ({y.shape[0]},), got {got}; reduce over every dim but 0 (e.g. "
                "y[:, 0] - 1)."
            )
        return out.to(y.dtype)

    def crosses(self, g_old: torch.Tensor, g_new: torch.Tensor) -> torch.Tensor:
        """(rows,) bool: g changed sign over the step in the requested direction."""
        up = (g_old < 0) & (g_new >= 0)
        down = (g_old > 0) & (g_new <= 0)
        if self.direction > 0:
            return up
        if self.direction < 0:
            return down
        return up | down


def locate(event, args, tab, hit, t, dt, y, y_new, stages, k_next, g_old, g_new):
    """theta in [0, 1] of the crossing inside the step, per row (rows without one: 1).

    Illinois regula falsi on the dense output; stops per row when the bracket is a few ulps
    of t wide or g is exactly 0. No graph."""
    with torch.no_grad():
        lo = torch.zeros_like(t)
        hi = torch.ones_like(t)
        g_lo, g_hi = g_old.double(), g_new.double()
        side = torch.zeros_like(t, dtype=torch.int64)  # last end moved: -1 lo, +1 hi
        eps = torch.finfo(y.dtype).eps
        width = 4 * eps * torch.maximum(t.abs(), (t + dt).abs()).clamp_min(1e-300)
        done = ~hit | (g_hi == 0)
        for _ in range(_MAX_ROOT_ITERS):
            done |= (hi - lo) * dt.abs() <= width
            if bool(done.all()):
                break
            secant = lo - g_lo * (hi - lo) / torch.where(g_hi != g_lo, g_hi - g_lo,
                                                         torch.ones_like(g_hi))
            inside = (secant > lo) & (secant < hi) & (g_hi != g_lo)
            theta = torch.where(inside, secant, 0.5 * (lo + hi))
            theta = torch.where(done, hi, theta)
            value = dense_value(tab, theta, dt, y, y_new, stages, k_next)
            g_mid = event.value(t + theta * dt, value, args).double()
            same = torch.sign(g_mid) == torch.sign(g_lo)
            zero = g_mid == 0
            move_lo = ~done & same & ~zero
            move_hi = ~done & ~same & ~zero
            # Illinois: the end that stayed put twice in a row has its value halved
            g_hi = torch.where(move_lo & (side == -1), 0.5 * g_hi, g_hi)
            g_lo = torch.where(move_hi & (side == 1), 0.5 * g_lo, g_lo)
            lo = torch.where(move_lo | (zero & ~done), theta, lo)
            g_lo = torch.where(move_lo, g_mid, g_lo)
            hi = torch.where(move_hi | (zero & ~done), theta, hi)
            g_hi = torch.where(move_hi, g_mid, g_hi)
            side = torch.where(move_lo, -1, torch.where(move_hi, 1, side))
            done |= zero
        return torch.where(hit, hi, torch.ones_like(hi))


def state_at(event, field, tab, theta, t_event, dt, y, y_new, stages, k_next):
    """(y*, t*, n) at the located event, with the implicit-function-theorem derivative
    attached when autograd records (see the module docstring); t* in y's dtype, (rows,); n
    the evaluations of f made (1 for the derivative's denominator, else 0)."""
    y_star = dense_value(tab, theta, dt, y, y_new, stages, k_next)
    t_star = t_event.to(y.dtype)
    if not torch.is_grad_enabled():
        return y_star, t_star, 0
    g_star = event.value(t_event, y_star, field.args)
    if not g_star.requires_grad and not y_star.requires_grad:
        return y_star, t_star, 0
    with torch.no_grad():
        rate = field(time_like(t_event, y), y_star.detach())
    with torch.enable_grad():
        t_var = time_like(t_event, y).detach().requires_grad_(True)
        y_var = y_star.detach().requires_grad_(True)
        g_var = event.value(t_var, y_var, tuple(a.detach() for a in field.args))
        dg_dt, dg_dy = torch.autograd.grad(g_var.sum(), (t_var, y_var), allow_unused=True)
    dg_dt = torch.zeros_like(t_star) if dg_dt is None else dg_dt.reshape(-1)
    dg_dy = torch.zeros_like(y_star) if dg_dy is None else dg_dy
    slope = dg_dt + (dg_dy * rate).reshape(rate.shape[0], -1).sum(dim=1)
    # a tangential crossing (slope 0) has no derivative: leave those rows' times constant
    safe = torch.where(slope != 0, slope, torch.ones_like(slope))
    shift = torch.where(slope != 0, -(g_star - g_star.detach()) / safe, torch.zeros_like(slope))
    t_out = t_star + shift
    y_out = y_star + rate * _batch_view(shift, y_star)
    return y_out, t_out, 1


def event_records(records, batch, device) -> dict[str, torch.Tensor]:
    """Non-terminal events, from odeint's (sample ids, times) records of each step:
    n_events (batch,) int64 and event_times (batch, max count) float64, each row's times in
    the order found, NaN-padded."""
    counts = torch.zeros(batch, dtype=torch.int64, device=device)
    rows = [r for r, _ in records]
    times = [t for _, t in records]
    for r in rows:
        counts.index_add_(0, r, torch.ones_like(r))
    width = int(counts.max()) if batch else 0
    table = torch.full((batch, width), float("nan"), dtype=torch.float64, device=device)
    filled = torch.zeros(batch, dtype=torch.int64, device=device)
    for r, t in zip(rows, times):  # one record per sample per step, in time order
        table[r, filled[r]] = t
        filled[r] += 1
    return {"n_events": counts, "event_times": table}
