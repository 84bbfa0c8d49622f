"""Limited-memory "good" Broyden on g(z) = f(z) - z, batched and safeguarded per sample."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import check_positive, check_positive_int, deliberate_sync, rms_norm
from ._linesearch import backtrack
from ._solver import FixedPointSolver, Fn, NormLayout, State, mutable

__all__ = ["Broyden"]


@dataclass(frozen=True)
class Broyden(FixedPointSolver):
    """Limited-memory Broyden's "good" method for the root of g(z) = f(z) - z.

    Keeps, per sample, an approximation H of the inverse Jacobian (dg/dz)^{-1}, starting from
    H = -I (exact when df/dz = 0) and stored as H = -I + sum_i u_i v_i^T (at most `memory`
    pairs; when full, H restarts from -I). A step is z <- z + alpha p with p = -H g(z); after a step
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
        memory: number of stored update pairs (>= 1); each step costs O(memory n) per
            sample. Default 10: on the benchmark's hard case memory 5 / 8 / 10 / 20 took
            30 / 28 / 27 / 30 evaluations.
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

    memory: int = 10
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

    # One set of formulas for every step, so that a sample's arithmetic does not depend on
    # its batch-mates or on whether autograd records the iterations. The state carries the
    # direction d = -H g. From the trial z + alpha d (s = alpha d) and its residual g':
    # -H g' by two bmm over the memory, H y = H g' - H g = d - (-H g'), H^T s by two more,
    # the pair u = s - H y, v = H^T s / (s . H y) (the textbook's product u v^T, scaled on
    # the v side), and the next direction -H' g' = -H g' - u (v . g'). When every sample
    # accepts its first trial and its update is usable (the common step: one host read
    # says so), that is all, the memory written in place; otherwise masks pick, per
    # sample, backtracking (rejected trials stay: their direction is -H' g), skipped
    # updates (u = v = 0), forgotten memory (a non-finite trial: H = -I).
    #
    # "norms" (batch, 3) are plain 2-norms for the loop's fused test, as Picard's: the
    # residual of even and odd steps in columns 0 and 1, ||z|| in column 2.

    def init(self, fn: Fn, z: torch.Tensor, fz: torch.Tensor) -> State:
        batch = z.shape[0]
        memory = z.new_zeros(batch, self.memory, z[0].numel())
        wide = z.dtype == torch.float32 and z.device.type != "cpu"
        norms = z.new_zeros(3, batch, dtype=torch.float64 if wide else z.dtype).T
        z_flat = _flat(z)
        g = _flat(fz) - z_flat
        _write_norms(norms, 1, g, z_flat)
        # H = -I: the first direction is g itself.
        return {"z": z, "fz": fz, "g": g, "direction": g, "us": memory, "vs": memory.clone(),
                "norms": norms,
                "nonfinite_trial": torch.zeros(batch, dtype=torch.bool, device=z.device)}

    def norm_layout(self, step_index: int) -> NormLayout:
        return _LAYOUTS[step_index % 2]

    def step(self, fn: Fn, state: State, step_index: int) -> tuple[State, int | torch.Tensor]:
        z, fz, us, vs = state["z"], state["fz"], state["us"], state["vs"]
        g, direction, norms = state["g"], state["direction"], state["norms"]
        alpha = self.alphas[0]
        s = direction if alpha == 1.0 else alpha * direction
        z_try = z + s.reshape(z.shape)
        fz_try = fn(z_try)
        in_place = mutable(z_try, fz_try, us, vs, direction)
        column = step_index % 2
        z_flat = _flat(z_try)
        g_try = _flat(fz_try) - z_flat
        _write_norms(norms, column, g_try, z_flat)
        # The first trial's test, from the norms (backtrack's test: a finite residual at
        # most 1 + (growth - 1) alpha times the previous; NaN compares False).
        factor = 1.0 - (1.0 - self.growth) * alpha
        accepted = lengths = nonfinite_trial = None
        nfe: int | torch.Tensor = 1
        if not _host_all(norms, lambda r: r[column] <= factor * r[1 - column],
                         lambda: (norms[:, column] <= factor * norms[:, 1 - column]).all()):
            first = norms[:, column] <= factor * norms[:, 1 - column]
            z_try, fz_try, residual_try, accepted, nfe, lengths = backtrack(
                fn, z, direction.reshape(z.shape), rms_norm(g).detach(), self.alphas,
                sufficient=1.0 - self.growth, first=(z_try, fz_try, first))
            nonfinite_trial = ~torch.isfinite(residual_try)
            if len(self.alphas) > 1:
                z_flat = _flat(z_try)
                g_try = _flat(fz_try) - z_flat
                s = lengths.unsqueeze(1) * direction
        slot = step_index % self.memory
        forget = None if accepted is None else ~torch.isfinite(g_try).all(dim=1)
        if slot == 0 and step_index > 0:
            # Memory full. Overwriting the oldest pair leaves a product that is no Broyden
            # matrix at all (measured: stagnation on the benchmark's hard case for every
            # memory the iteration outlived); restarting from H = -I does not. The pair of
            # this step is dropped too (measured: keeping it as the first pair of the new
            # memory took 62 evaluations instead of 27 on that case).
            if in_place:
                us.zero_()
                vs.zero_()
            else:
                us, vs = torch.zeros_like(us), torch.zeros_like(vs)
            new_direction, stay_direction = g_try, g  # -H g with H = -I
        else:
            row = g_try.unsqueeze(1)
            neg_h_g = torch.baddbmm(row, torch.bmm(row, vs.mT), us, alpha=-1).squeeze(1)
            h_y = direction - neg_h_g
            s_row = s.unsqueeze(1)
            h_t_s = torch.baddbmm(s_row, torch.bmm(s_row, us.mT), vs, beta=-1).squeeze(1)
            denominator = torch.linalg.vecdot(s, h_y)
            scale = torch.stack((torch.linalg.vector_norm(s, dim=1),
                                 torch.linalg.vector_norm(h_y, dim=1), denominator)).detach()
            eps = 1e3 * torch.finfo(scale.dtype).eps
            usable = None
            if not _host_all(scale.T, lambda r: math.isfinite(r[2])
                             and abs(r[2]) > eps * r[0] * r[1],
                             lambda: _usable(scale, eps).all()):
                usable = _usable(scale, eps).unsqueeze(1)
            if in_place and usable is None:
                u = torch.sub(s, h_y, out=us[:, slot])
                v = torch.div(h_t_s, denominator.unsqueeze(1), out=vs[:, slot])
            else:
                u = s - h_y
                # (a safe denominator: 1 / 0 = inf would reach autograd as 0 * inf = NaN)
                v = h_t_s / (denominator if usable is None else torch.where(
                    usable.squeeze(1), denominator, 1)).unsqueeze(1)
                if usable is not None:  # an unusable update keeps H as it is
                    u, v = torch.where(usable, u, 0), torch.where(usable, v, 0)
                if in_place:
                    us[:, slot] = u
                    vs[:, slot] = v
                else:
                    index = torch.tensor([slot], device=us.device)
                    us = us.index_copy(1, index, u.unsqueeze(1))
                    vs = vs.index_copy(1, index, v.unsqueeze(1))
            new_direction = torch.addcmul(neg_h_g, u, torch.linalg.vecdot(v, g_try).unsqueeze(1),
                                          value=-1)
            stay_direction = None
            if accepted is not None:  # a sample that stays at z steps next along -H' g
                stay_direction = torch.addcmul(direction, u, torch.linalg.vecdot(
                    v, g).unsqueeze(1), value=-1)
        if accepted is None:
            return {"z": z_try, "fz": fz_try, "g": g_try, "direction": new_direction,
                    "us": us, "vs": vs, "norms": norms}, 1
        # Non-finite trials carry no information: forget and restart from H = -I.
        if in_place:
            us[forget] = 0
            vs[forget] = 0
        else:
            us = torch.where(forget[:, None, None], 0, us)
            vs = torch.where(forget[:, None, None], 0, vs)
        keep = accepted.unsqueeze(1)
        stay_direction = torch.where(forget.unsqueeze(1), g, stay_direction)
        new_direction = torch.where(keep, new_direction, stay_direction)
        g_new = torch.where(keep, g_try, g)
        keep = accepted.reshape(z.shape[0], *([1] * (z.dim() - 1)))
        z_new, fz_new = torch.where(keep, z_try, z), torch.where(keep, fz_try, fz)
        _write_norms(norms, column, g_new, _flat(z_new))
        # backtrack hands back a non-finite trial only when every trial was: the loop counts
        # those steps (an f that returns NaN is NONFINITE, not MAX_STEPS).
        return {"z": z_new, "fz": fz_new, "g": g_new, "direction": new_direction, "us": us,
                "vs": vs, "norms": norms, "nonfinite_trial": nonfinite_trial}, nfe


def _usable(scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Per sample, whether the update's denominator s . H y is finite and above
    eps ||s|| ||H y|| (`scale` = (||s||, ||H y||, s . H y))."""
    size, h_size, denominator = scale
    return torch.isfinite(denominator) & (denominator.abs() > eps * size * h_size)


def _host_all(values: torch.Tensor, test, device_test) -> bool:
    """Whether `test` holds for every row of `values` (a few rows on CPU: read and tested on
    the host) or `device_test()` is True (elsewhere: one reduction and its read)."""
    if values.device.type == "cpu" and values.shape[0] <= _HOST_ROWS:
        return all(test(r) for r in values.tolist())
    with deliberate_sync(values.device):
        return bool(device_test())


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 2 else x.reshape(x.shape[0], -1)


def _write_norms(norms: torch.Tensor, column: int, g: torch.Tensor, z: torch.Tensor) -> None:
    """The loop's norms (detached): ||g|| into `column`, ||z|| into column 2."""
    if g.requires_grad:
        g = g.detach()
    if z.requires_grad:
        z = z.detach()
    torch.linalg.vector_norm(g, dim=1, dtype=norms.dtype, out=norms[:, column])
    torch.linalg.vector_norm(z, dim=1, dtype=norms.dtype, out=norms[:, 2])


# Up to this many rows `_host_all` reads the values and tests on the host.
_HOST_ROWS = 8
_LAYOUTS = (NormLayout(residual=0, z=2, previous=1), NormLayout(residual=1, z=2, previous=0))
