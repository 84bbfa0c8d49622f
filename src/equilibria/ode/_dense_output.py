"""odeint(..., dense=True): the solution queryable anywhere in each sample's solved span.

scipy's ``solve_ivp(dense_output=True).sol(t)`` and diffrax's ``SaveAt(dense=True)`` /
``sol.evaluate(t)`` let a user choose the output times after the solve. Here each sample
keeps its own accepted steps, and `DenseOutput.evaluate` interpolates every query on the step
of its own sample that holds it, with the solver's own continuous extension (`dense_value`:
Dopri5's / Tsit5's 4th-order interpolants, Dopri8's 7th-order one, cubic Hermite otherwise)
— the interpolant `t_eval` uses, so a query returns what a `t_eval` solve at that time returns,
to rounding.

What is kept, per accepted step and per sample (`DenseRecorder.record`): the step's start
time, end time and signed size (3 float64), its start state y and end state y_end (the event
state where a terminal event stopped it), and the stage derivatives the interpolant reads:
all s stages for a tableau with its own dense weights (plus Dopri8's five extra dense stages,
evaluated on every accepted step of a dense solve: +5 f evaluations a step, counted in
stats["nfe"]), or f at both ends and the full step's end state for Hermite. That is (s + 2)
states a step for Dopri5/Tsit5 (9 / 9), 21 for Dopri8, 5 for Hermite methods. The
alternative, keeping only each step's start (as the checkpointed adjoint's tape does) and
recomputing the stages per query, would cost s evaluations of f per queried step and need f
to outlive the solve; keeping the stages makes a query pure arithmetic, and under autograd
(the Backprop gradient) the values are differentiable w.r.t. y0 and the parameters of f
through the kept stages, whose graph the backward of the solve holds anyway.
"""

from __future__ import annotations

import torch

from .._solution import Status
from ._interp import dense_value

__all__ = ["DenseOutput", "DenseRecorder"]


class DenseRecorder:
    """Collects the accepted steps of one odeint solve (rows in global sample ids)."""

    def __init__(self, tableau) -> None:
        self.tableau = tableau
        self.hermite = tableau.dense is None
        self.steps: list[tuple] = []

    def record(self, accept, idx, t, t_end, dt, y, y_new, y_end, stages, k_next) -> None:
        """Keep the accepted rows of one iteration: times (rows,) float64, states and stage
        derivatives (rows, ...) with their graph (nothing when no row was accepted)."""
        with torch.no_grad():
            rows = accept.nonzero().flatten()
        if rows.numel() == 0:
            return
        if self.hermite:
            derivs = [stages[0], k_next, y_new]
        else:
            derivs = list(stages)

        def pick(x):
            return x.index_select(0, rows)

        self.steps.append((pick(idx), pick(t), pick(t_end), pick(dt), pick(y), pick(y_end),
                           [pick(k) for k in derivs]))

    def finish(self, y0, t0, t1, t_final, status) -> DenseOutput:
        """The `DenseOutput` of the solve: y0 (batch, ...), the shared t0 and t1, each
        sample's final time t_final (batch,) float64 and status (batch,) int64."""
        return DenseOutput(self.tableau, self.steps, y0, t0, t1, t_final, status)


class DenseOutput:
    """The solution of an odeint solve between each sample's t0 and its final time.

    Attributes:
        t0: the start time (shared by the samples).
        t_final: (batch,) float64, each sample's last solved time: t1, its terminal event's
            time, or where it stopped (MAX_STEPS, NONFINITE, ...; see `status`).
        status: (batch,) int64, the solve's per-sample `Status`.
        n_steps: (batch,) int64, the accepted steps kept per sample.
    """

    def __init__(self, tableau, steps, y0, t0, t1, t_final, status) -> None:
        self.tableau = tableau
        self.t0 = float(t0)
        self.direction = 1.0 if t1 >= t0 else -1.0
        self.t_final = t_final
        self.status = status
        self.y0 = y0
        batch, device = y0.shape[0], y0.device
        if steps:
            sample = torch.cat([s[0] for s in steps])
            # records are chronological; a stable sort by sample keeps each sample's steps
            # in time order, contiguous
            order = torch.sort(sample, stable=True).indices
            sample = sample[order]

            def gather(i):
                return torch.cat([s[i] for s in steps]).index_select(0, order)

            self.t_start, self.t_end, self.dt = gather(1), gather(2), gather(3)
            self.y, self.y_end = gather(4), gather(5)
            self.derivs = [torch.cat([s[6][k] for s in steps]).index_select(0, order)
                           for k in range(len(steps[0][6]))]
            counts = torch.bincount(sample, minlength=batch)
        else:
            sample = torch.zeros(0, dtype=torch.int64, device=device)
            counts = torch.zeros(batch, dtype=torch.int64, device=device)
        self.n_steps = counts
        self.offsets = torch.cumsum(counts, 0) - counts
        width = max(int(counts.max()) if batch else 0, 1)
        # each sample's step ends, direction-signed so that they increase; +inf padding
        ends = torch.full((batch, width), float("inf"), dtype=torch.float64, device=device)
        if sample.numel():
            position = torch.arange(sample.numel(), device=device) - self.offsets[sample]
            ends[sample, position] = self.t_end * self.direction
        self.ends = ends

    def _times(self, t) -> tuple[torch.Tensor, bool]:
        """(batch, n) float64 query times, and whether the caller gave one time per sample."""
        batch = self.y0.shape[0]
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(
                "evaluate: t requires grad, but the dense output is not differentiated w.r.t. "
                "the query time: pass t.detach() (dy/dt at a time is f(t, y) there)."
            )
        try:
            times = torch.as_tensor(t, dtype=torch.float64, device=self.y0.device)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"evaluate: t must be a float or a tensor of times, got {type(t).__name__}."
            ) from error
        if times.dim() == 0:
            return times.expand(batch, 1), True
        if times.dim() == 1 and times.shape[0] == batch:
            return times[:, None], True
        if times.dim() == 2 and times.shape[0] == batch:
            return times, False
        raise ValueError(
            f"evaluate: t must be a float, a (batch,) tensor (one time per sample) or a "
            f"(batch, n) tensor (each sample its own n times), with batch = {batch}; got shape "
            f"{tuple(times.shape)}. For times shared by all samples pass "
            f"t.expand({batch}, n)."
        )

    def _check_span(self, times: torch.Tensor) -> None:
        if not bool(torch.isfinite(times).all()):
            raise ValueError("evaluate: t holds NaN or inf; pass finite times.")
        signed = times * self.direction
        low = self.t0 * self.direction
        high = (self.t_final * self.direction)[:, None]
        outside = (signed < low) | (signed > high)
        if bool(outside.any()):
            sample, column = (int(i) for i in outside.nonzero()[0])
            code = Status(int(self.status[sample]))
            raise ValueError(
                f"evaluate: t = {float(times[sample, column])!r} lies outside sample {sample}'s "
                f"solved span [{self.t0!r}, {float(self.t_final[sample])!r}] (its status is "
                f"{code.name}; {int(outside.sum())} queries are outside). Query each sample "
                f"only between t0 and dense.t_final[sample]: a sample that stopped at an event "
                f"or failed has no solution past where it stopped."
            )

    def evaluate(self, t) -> torch.Tensor:
        """The solution at t, each sample interpolated on its own accepted steps.

        Arguments:
            t: a float (every sample at that time), a (batch,) tensor (sample b at t[b]) or a
                (batch, n) tensor (sample b at its own times t[b, :], any order).

        Returns:
            (batch, ...) for a float or a (batch,) t; (n, batch, ...) for a (batch, n) t, the
            layout of odeint's t_eval output (value[i, b] at t[b, i]). Differentiable w.r.t.
            y0 and the parameters of f when the solve ran under autograd (Backprop).

        Raises:
            ValueError: a time outside its sample's solved span [t0, t_final[b]] (past an
                event, or past where a failed sample stopped), non-finite times, a wrong
                shape, or a t that requires grad.
            TypeError: t not a number or tensor.
        """
        times, single = self._times(t)
        self._check_span(times)
        batch, n = times.shape
        shape = (-1,) + (1,) * (self.y0.dim() - 1)
        if self.ends.shape[1] == 0 or not bool((self.n_steps > 0).any()):
            value = self.y0.unsqueeze(1).expand(batch, n, *self.y0.shape[1:])
        else:
            signed = (times * self.direction).contiguous()
            position = torch.searchsorted(self.ends, signed, side="left")
            position = torch.minimum(position, (self.n_steps - 1).clamp_min(0)[:, None])
            index = (self.offsets[:, None] + position).clamp_max(self.t_end.numel() - 1)
            flat, query = index.reshape(-1), times.reshape(-1)

            def pick(x):
                return x.index_select(0, flat)

            t_start, t_end, dt = pick(self.t_start), pick(self.t_end), pick(self.dt)
            safe_dt = torch.where(dt == 0, torch.ones_like(dt), dt)
            theta = ((query - t_start) / safe_dt).clamp(0.0, 1.0)
            derivs = [pick(k) for k in self.derivs]
            y_end = pick(self.y_end)
            if self.tableau.dense is None:
                stages, f_new, y_new = [derivs[0]], derivs[1], derivs[2]
            else:
                stages, f_new, y_new = derivs, None, y_end
            value = dense_value(self.tableau, theta, dt, pick(self.y), y_new, stages, f_new)
            value = torch.where((query == t_end).reshape(shape), y_end, value)
            y0 = self.y0.repeat_interleave(n, dim=0)
            # a sample with no accepted step is solved only at t0, where it is y0; the t_eval
            # path also writes y0 itself at t0
            start = (query == self.t0) | (self.n_steps.repeat_interleave(n) == 0)
            value = torch.where(start.reshape(shape), y0, value)
            value = value.reshape(batch, n, *self.y0.shape[1:])
        return value[:, 0] if single else value.transpose(0, 1)
