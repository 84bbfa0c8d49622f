"""The typed result every solver returns: value, per-sample status, per-sample stats.

Status codes are per sample (dim 0 is the batch). Each code carries the fix a user should
try, so that `Solution.raise_if_failed()` (and `throw=True` in the solvers) can say what to
change instead of only what went wrong.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["EquilibriaError", "Solution", "Status"]


class Status(enum.IntEnum):
    """Why a sample's solve stopped. Stored as int64 tensors of shape (batch,)."""

    SUCCESS = 0
    MAX_STEPS = 1
    DIVERGED = 2
    NONFINITE = 3
    STEP_SIZE_TOO_SMALL = 4
    EVENT = 5
    LINEAR_SOLVE_FAILED = 6
    SINGULAR = 7
    NEWTON_FAILED = 8

    @property
    def fix(self) -> str:
        return _FIXES[self]

    def fix_in(self, kind: str) -> str:
        """The fix for this status in a solve of `kind`: "fixed_point", "ode" (odeint and
        the layers on it) or "linear" (GMRES, the implicit backward's adjoint solve)."""
        return _KIND_FIXES.get((kind, self), _FIXES[self])

    @property
    def is_success(self) -> bool:
        return self in (Status.SUCCESS, Status.EVENT)


_FIXES = {
    Status.SUCCESS: "nothing to fix.",
    Status.MAX_STEPS: (
        "the step bound was reached before the tolerance test passed: raise max_steps, "
        "loosen atol/rtol, or use a faster solver (Anderson, Broyden, NewtonKrylov, or "
        "SteadyState for the ODE path)."
    ),
    Status.DIVERGED: (
        "the residual grew by more than the divergence factor: the map is not a "
        "contraction here. Use damping (Picard(damping=0.5)), the ODE path "
        "(SteadyState), which converges when the eigenvalues of df/dz have real part "
        "< 1, or regularise the model (jacobian_penalty)."
    ),
    Status.NONFINITE: (
        "the function returned inf or NaN: check the inputs and parameters for "
        "overflow, lower the learning rate, or use a smaller step / damping."
    ),
    Status.STEP_SIZE_TOO_SMALL: (
        "the step size fell below the floor: the problem is stiff or has a "
        "singularity; loosen rtol/atol, or use an implicit method: odeint(..., "
        "solver=Kvaerno5()) for stiff ODEs, SteadyState's default ImplicitEuler for stiff "
        "steady states."
    ),
    Status.EVENT: "nothing to fix: the sample stopped at its terminate condition.",
    Status.NEWTON_FAILED: (
        "the implicit stages' Newton iterations kept failing as the step shrank: pass a "
        "smaller first step (dt0=...), loosen rtol/atol, or allow more iterations "
        "(Kvaerno3(newton=Newton(max_iters=20)))."
    ),
    Status.LINEAR_SOLVE_FAILED: (
        "the inner linear solve did not converge: raise the linear solver's max_iters "
        "or restart, or loosen its tolerance."
    ),
    Status.SINGULAR: (
        "the linear operator is singular on this sample (GMRES met a zero pivot): the value "
        "is the least-squares answer and stats['residual'] its true residual. In a DEQ's "
        "implicit backward I - df/dz is singular at z*: regularise the cell "
        "(jacobian_penalty, weight/spectral normalisation) or use OneStep()/Phantom()."
    ),
}

# Where the generic fix names the wrong knobs (a MAX_STEPS inside odeint is not cured by
# Anderson), the kind of solve picks its own.
_KIND_FIXES = {
    ("ode", Status.MAX_STEPS): (
        "the step bound was reached before t1: raise max_steps, loosen rtol/atol, or, for a "
        "stiff problem (many rejected or tiny steps), use an implicit solver."
    ),
    ("ode", Status.DIVERGED): "the solution blew up: check the field and the time span.",
    ("linear", Status.MAX_STEPS): (
        "the linear solve did not reach its tolerance within its iteration bound: raise "
        "GMRES(max_iters=..., restart=...) (or Implicit(max_steps=...) for a fixed-point "
        "adjoint solver), loosen its rtol, or regularise the cell (jacobian_penalty) so that "
        "I - df/dz is better conditioned."
    ),
    ("linear", Status.DIVERGED): (
        "the fixed-point iteration of the adjoint diverged (the spectral radius of df/dz at z* "
        "is >= 1): use Implicit(linear_solver=eq.GMRES()), or regularise the cell."
    ),
}

_KINDS = {"odeint": "ode", "odeint_adjoint": "ode", "NeuralODE": "ode", "GMRES": "linear"}


class EquilibriaError(RuntimeError):
    """Raised with throw=True (or by Solution.raise_if_failed) when samples failed."""


@dataclass
class Solution:
    """Result of a solve.

    Attributes:
        value: the answer, (batch, ...). For samples that failed, the best (or last good)
            iterate.
        status: (batch,) int64 tensor of `Status` codes.
        stats: dict of tensors; per-sample ones have shape (batch,). Which keys exist is
            documented by each solver (fixed_point: residual, n_steps, nfe; odeint: nfe,
            n_steps, n_rejected, t).
        trace: optional list of per-step tensors (e.g. residual history for plots).
        dense: odeint(..., dense=True)'s `DenseOutput` (``dense.evaluate(t)``: the solution
            at any time of each sample's solved span); None otherwise.
    """

    value: torch.Tensor
    status: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)
    trace: list[torch.Tensor] | None = None
    dense: Any = None

    @property
    def success(self) -> torch.Tensor:
        """(batch,) bool: which samples ended in SUCCESS or EVENT."""
        return (self.status == Status.SUCCESS) | (self.status == Status.EVENT)

    def failure_message(self, kind: str = "fixed_point") -> str | None:
        """A human message naming each failing status, how many samples, and the fix for a
        solve of `kind` ("fixed_point", "ode" or "linear", see `Status.fix_in`)."""
        status = self.status.detach().cpu()
        lines = []
        for code in Status:
            if code.is_success:
                continue
            count = int((status == code).sum())
            if count:
                lines.append(f"{count}/{status.numel()} samples {code.name}: {code.fix_in(kind)}")
        return "\n".join(lines) if lines else None

    def raise_if_failed(self, what: str = "solve") -> Solution:
        """Raise EquilibriaError when any sample failed; return self otherwise."""
        message = self.failure_message(_KINDS.get(what, "fixed_point"))
        if message is not None:
            raise EquilibriaError(f"{what} failed for some samples:\n{message}")
        return self
