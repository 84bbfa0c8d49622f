"""The loop's bookkeeping of a step as few tensor ops: the CPU fast path's fused test and
the masked update shared by the eager loop and `Captured` regions."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._solution import Status
from ._solver import NormLayout, expand_as_batch

__all__ = ["BestColumn", "FusedTest", "add_pending", "initial_status", "residual_from",
           "stop_or_improve"]


def _put(full: torch.Tensor, rows: torch.Tensor | None, local: torch.Tensor) -> torch.Tensor:
    return local if rows is None else full.index_copy(0, rows, local)


def _take(full: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return full if rows is None else full.index_select(0, rows)


# Up to this many rows (on CPU) the first statuses are decided on the host.
HOST_STATUS_ROWS = 64


def initial_status(residual: float, tolerance: float) -> int:
    """A row's status at z0 from its residual and tolerance, on the host: the rule of the
    Book's masked start (NaN and inf residuals NONFINITE; NaN compares False)."""
    if not residual < math.inf:
        return int(Status.NONFINITE)
    return int(Status.SUCCESS) if residual <= tolerance else int(Status.MAX_STEPS)


def stop_or_improve(running: torch.Tensor, ok: torch.Tensor | None, residual: torch.Tensor,
                    tolerance: torch.Tensor, limit: torch.Tensor, z: torch.Tensor,
                    best_value: torch.Tensor, best_residual: torch.Tensor,
                    status: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's per-sample decisions, by masks (no host read): a running row (`ok`: and
    finite; None when every running row is known finite) passes its test (SUCCESS),
    improves its best iterate, or is stopped as DIVERGED or NONFINITE. Returns the new best
    value, best residual and status."""
    valid = running if ok is None else ok
    converged = valid & (residual <= tolerance)
    improved = (valid & (residual < best_residual)) | converged
    diverged = valid & (residual > limit)
    best_value = torch.where(expand_as_batch(improved, z), z, best_value)
    best_residual = torch.where(improved, residual, best_residual)
    # SUCCESS is written last: a sample that passed the test is not also DIVERGED.
    status = status.masked_fill(diverged, int(Status.DIVERGED))
    if ok is not None:
        status = status.masked_fill_(running & ~ok, int(Status.NONFINITE))
    return best_value, best_residual, status.masked_fill_(converged, int(Status.SUCCESS))


class BestColumn(NamedTuple):
    """A column of a solver's norms holding the running rows' best residual."""

    index: int
    scale: float

    def read(self, norms: torch.Tensor, inverse_sqrt: float, dtype: torch.dtype
             ) -> torch.Tensor:
        residual = norms[:, self.index] * (self.scale * inverse_sqrt)
        return residual if residual.dtype == dtype else residual.to(dtype)


def residual_from(norms: torch.Tensor, layout: NormLayout, inverse_sqrt: float,
                  dtype: torch.dtype) -> torch.Tensor:
    residual = norms[:, layout.residual] * (layout.residual_scale * inverse_sqrt)
    return residual if residual.dtype == dtype else residual.to(dtype)


def add_pending(n_steps: torch.Tensor, nfe: torch.Tensor, rows: torch.Tensor | None,
                running: torch.Tensor | None, steps: int, evaluations: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the steps (and evaluations) taken by every running row since the last slow step."""
    if running is None:
        return (_put(n_steps, rows, _take(n_steps, rows) + steps),
                _put(nfe, rows, _take(nfe, rows) + evaluations))
    return (_put(n_steps, rows, _take(n_steps, rows) + running * steps),
            _put(nfe, rows, _take(nfe, rows) + running * evaluations))


# Up to this many rows the fused test runs on the host (see `FusedTest`).
_HOST_ROWS = 4


class FusedTest:
    """The CPU loop's test of a step, from a solver's norms, in one matrix product.

    With r = ||f(z) - z|| / sqrt(n) and t = atol + rtol ||z|| / sqrt(n) (the per-sample test)
    and b the best residual so far, the margins (rows, 2) = bias + norms @ W are r - t and
    b - r for a running row (b either the previous step's residual, a column of the norms,
    or a stored value in the bias), and +inf for a row that stopped. Their minimum is > 0
    exactly when no running sample passes its test this step and every one improved on its
    best (NaN and inf fail): then the step changes nothing but the best iterate. An improved
    residual is also below the divergence limit (the best is at most the initial residual).
    The margins must clear a few rounding errors (16 eps, relative): a step at the edge of
    either test goes to the exact, masked path, so both paths give the same result.

    With a few rows (batch 1-4) the margins are computed on the host, in float64, from the
    norms' values (`tolist`, one read): the matrix product, the reduction and their read
    cost more there. Only the columns with a weight enter (a NaN elsewhere, in a column
    the test does not use, does not fail it), and their rounding is below the slack's, so
    the test passes only where the exact test would agree, as the device's does.
    """

    def __init__(self, atol: float, rtol: float, inverse_sqrt: float) -> None:
        self.atol, self.rtol, self.inverse_sqrt = atol, rtol, inverse_sqrt
        self.weights: dict[tuple[int, bool, int], torch.Tensor] = {}
        self.columns: dict[int, BestColumn] = {}
        self.bias_previous = self.bias_best = self.base = None
        # The biases as host lists of (row's margin-0 bias, margin-1 bias), for few rows.
        self.host_previous: list[list[float]] | None = None
        self.host_best: list[list[float]] | None = None
        self.host_coefficients: dict[tuple[int, bool], tuple] = {}
        self.slack = math.nan
        # The minimum margin of the last test: finite exactly when every running row's
        # residual and tolerance were finite (then the slow path skips its overflow checks).
        self.minimum = math.nan

    def reset(self, running: torch.Tensor | None, best: torch.Tensor) -> None:
        """New running rows or best residuals (after a step on which something changed)."""
        rows = best.shape[0]
        if self.base is None or self.base.dtype != best.dtype:
            slack = self.slack = 1.0 + 16 * torch.finfo(best.dtype).eps
            self.base = best.new_tensor([[-self.atol * slack, 0.0]])
            self.host_coefficients = {}
        best = best.detach()
        if running is None:
            self.bias_previous = self.base.expand(rows, 2)
        else:
            self.bias_previous = torch.where(running.unsqueeze(1), self.base, math.inf)
            best = best.masked_fill(~running, math.inf)
        self.bias_best = torch.stack((self.bias_previous[:, 0], best), dim=1)
        if rows <= _HOST_ROWS and best.device.type == "cpu":
            self.host_previous = self.bias_previous.tolist()
            self.host_best = self.bias_best.tolist()
        else:
            self.host_previous = self.host_best = None

    def _weights(self, norms: torch.Tensor, layout: NormLayout, previous: bool) -> torch.Tensor:
        key = (id(layout), previous, norms.shape[1])  # solvers keep their layouts
        weights = self.weights.get(key)
        if weights is None or weights.dtype != norms.dtype:
            # Built on the host and sent as one tensor: element by element it was ~20 small
            # ops per layout, a tenth of a batch-1 solve's set-up. The same float64 values
            # rounded once to the norms' dtype, as the element writes did.
            slack = 1.0 + 16 * torch.finfo(norms.dtype).eps
            scale = layout.residual_scale * self.inverse_sqrt
            values = [[0.0, 0.0] for _ in range(norms.shape[1])]
            values[layout.residual][0] = scale
            values[layout.z][0] = -self.rtol * self.inverse_sqrt * slack
            values[layout.residual][1] = -scale * slack
            if previous:
                values[layout.previous][1] = scale
            weights = torch.tensor(values, dtype=norms.dtype, device=norms.device)
            self.weights[key] = weights
        return weights

    def best_column(self, layout: NormLayout) -> BestColumn:
        """The column of `layout` that holds the running rows' best residual (one object
        per layout: made once, not every step)."""
        column = self.columns.get(id(layout))
        if column is None:
            column = self.columns[id(layout)] = BestColumn(layout.residual,
                                                           layout.residual_scale)
        return column

    def passes(self, norms: torch.Tensor, layout: NormLayout, previous: bool) -> bool:
        host = self.host_previous if previous else self.host_best
        if host is not None:
            self.minimum = self._host_minimum(norms, layout, previous, host)
        else:
            bias = self.bias_previous if previous else self.bias_best
            margins = torch.addmm(bias, norms, self._weights(norms, layout, previous))
            self.minimum = float(margins.amin())
        return self.minimum > 0  # NaN compares False

    def _host_minimum(self, norms: torch.Tensor, layout: NormLayout, previous: bool,
                      bias: list[list[float]]) -> float:
        """The margins' minimum from the norms' values, in float64 on the host (NaN when
        a margin is NaN); the same weights as `_weights`, unrounded."""
        coefficients = self.host_coefficients.get((id(layout), previous))
        if coefficients is None:
            scale = layout.residual_scale * self.inverse_sqrt
            coefficients = self.host_coefficients[(id(layout), previous)] = (
                layout.residual, layout.z, layout.previous if previous else None, scale,
                -self.rtol * self.inverse_sqrt * self.slack, -scale * self.slack)
        residual, z, previous_column, scale, z_weight, residual_weight = coefficients
        low = math.inf
        for values, (bias_test, bias_best) in zip(norms.tolist(), bias):
            r = values[residual]
            test = bias_test + (scale * r + z_weight * values[z])
            best = bias_best + residual_weight * r
            if previous_column is not None:
                best = best + scale * values[previous_column]
            if test != test or best != best:
                return math.nan
            low = min(low, test, best)
        return low

    def finite(self) -> bool:
        """Whether the last test saw only finite residuals and tolerances on running rows: a
        row whose residual is +inf has margin b - r = -inf, whose tolerance is +inf has
        r - t = -inf, and NaN propagates; stopped rows' margins are +inf."""
        return math.isfinite(self.minimum)

    def residual(self, norms: torch.Tensor, layout: NormLayout) -> torch.Tensor:
        return norms[:, layout.residual] * (layout.residual_scale * self.inverse_sqrt)

    @staticmethod
    def merge(new: torch.Tensor, running: torch.Tensor | None,
              old: torch.Tensor) -> torch.Tensor:
        return new if running is None else torch.where(running, new, old)
