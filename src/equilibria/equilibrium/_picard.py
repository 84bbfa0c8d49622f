"""Picard (fixed-point) iteration, optionally damped."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .._checks import check_unit_interval
from ._solver import FixedPointSolver, Fn, NormLayout, State, write_into

__all__ = ["Picard"]


@dataclass(frozen=True)
class Picard(FixedPointSolver):
    """Damped Picard iteration: z <- (1 - beta) z + beta f(z).

    With beta = 1 this is z <- f(z), i.e. explicit Euler with dt = 1 on dz/dt = f(z) - z; it
    converges when f is a contraction (spectral radius of df/dz < 1 at z*). Damping
    (0 < beta < 1) is explicit Euler with dt = beta: it converges whenever the eigenvalues
    mu of df/dz satisfy |1 + beta (mu - 1)| < 1.

    Arguments:
        damping: beta in (0, 1].

    Raises:
        ValueError / TypeError: damping outside (0, 1] or not a number.

    One evaluation of f per step. Reference: Kelley, "Iterative Methods for Linear and
    Nonlinear Equations", SIAM 1995, ch. 4.
    """

    damping: float = 1.0
    uses_tolerance = False
    period = 2  # the norms' even/odd rows

    def __post_init__(self) -> None:
        check_unit_interval("damping", self.damping)

    # Per step, beside f: f(z) - z and two norms for the loop's test, written into a
    # (3, batch) buffer allocated once (held as its batch-first view "norms"): the residual
    # norms of even and odd steps in rows 0 and 1 (so the previous step's stays readable:
    # the loop's best residual while every step improves), ||z|| in row 2. Off the CPU the
    # norms accumulate in float64 (overflow-safe without a host read, as `row_norm`).

    def init(self, fn: Fn, z: torch.Tensor, fz: torch.Tensor) -> State:
        wide = z.dtype == torch.float32 and z.device.type != "cpu"
        norms = z.new_zeros(3, z.shape[0], dtype=torch.float64 if wide else z.dtype).T
        self._norms(z, fz, norms, column=1)
        return {"z": z, "fz": fz, "norms": norms}

    def norm_layout(self, step_index: int) -> NormLayout:
        return _LAYOUTS[step_index % 2]

    @staticmethod
    def _norms(z: torch.Tensor, fz: torch.Tensor, norms: torch.Tensor, column: int) -> None:
        if not torch.compiler.is_compiling():
            # The columns' views are made once (1-2 us each, a fair share of a batch-1
            # step) and kept on the buffer; compaction makes a new buffer, and new views.
            columns = getattr(norms, "_equilibria_columns", None)
            if columns is None:
                # views of a detached alias: views of `norms` itself kept in its __dict__
                # would keep it alive from C++ (a cycle the collector cannot see)
                columns = norms.detach().unbind(1)
                norms._equilibria_columns = columns  # type: ignore[attr-defined]
            flat = z if z.dim() == 2 else z.reshape(z.shape[0], -1)
            f_flat = fz if fz.dim() == 2 else fz.reshape(flat.shape)
            # Detached inputs: nothing here is recorded, without a no_grad context per step.
            if flat.requires_grad:
                flat = flat.detach()
            if f_flat.requires_grad:
                f_flat = f_flat.detach()
            dtype = norms.dtype
            torch.linalg.vector_norm(f_flat - flat, dim=1, dtype=dtype, out=columns[column])
            torch.linalg.vector_norm(flat, dim=1, dtype=dtype, out=columns[2])
            return
        flat = z.detach().reshape(z.shape[0], -1)
        g = fz.detach().reshape(flat.shape) - flat
        norm = functools.partial(torch.linalg.vector_norm, dim=1, dtype=norms.dtype)
        write_into(norms[:, column], norm, g)
        write_into(norms[:, 2], norm, flat)

    def step(self, fn: Fn, state: State, step_index: int) -> tuple[State, int]:
        if self.damping == 1.0:
            z = state["fz"]
        else:
            z = torch.lerp(state["z"], state["fz"], self.damping)
        fz = fn(z)
        self._norms(z, fz, state["norms"], column=step_index % 2)
        return {"z": z, "fz": fz, "norms": state["norms"]}, 1


_LAYOUTS = (NormLayout(residual=0, z=2, previous=1), NormLayout(residual=1, z=2, previous=0))
