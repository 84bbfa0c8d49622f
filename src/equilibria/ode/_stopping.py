"""Why an odeint sample stops: the per-step status rules and the bounds they use.

After every step attempt each running sample is checked, in this order of precedence:
reached t1 (SUCCESS), a terminal event or the terminate hook (EVENT), repeated non-finite
attempts (NONFINITE), repeated Newton failures of an implicit method (NEWTON_FAILED), a step
below the floor of 10 ulps of t (STEP_SIZE_TOO_SMALL, or the failure that drove dt there),
and the attempt budget (MAX_STEPS). Every rule is a bound, so no sample runs forever.
"""

from __future__ import annotations

import torch

from .._solution import Status

__all__ = ["RUNNING", "stop_statuses"]

RUNNING = -1
# Consecutive non-finite step attempts (each shrinking dt by min_factor) before a sample is
# declared NONFINITE: 0.2^10 ~ 1e-7, so a blow-up that smaller steps cannot avoid is reported
# instead of grinding down to the dt floor.
_MAX_NONFINITE_TRIES = 10
# Consecutive Newton failures (each shrinking dt by 0.3, with a fresh Jacobian) before a sample
# is declared NEWTON_FAILED: 0.3^15 ~ 1e-8 of the step that first failed.
_MAX_NEWTON_TRIES = 15

_EPS_T = torch.finfo(torch.float64).eps
_TINY_T = torch.finfo(torch.float64).tiny


def stop_statuses(status, *, accept, last, stop, hit, t, dt, n_bad, bad_recent, n_newton_bad,
                  newton_recent, n_attempts, max_steps, adaptive, implicit):
    """The rows' statuses after one step attempt (RUNNING where none of the rules applies).

    Arguments (all (rows,) tensors unless said): status: before the step; accept: the step
    was accepted; last: it was the step to t1; stop: a terminal event inside it (or None);
    hit: the terminate hook's answer (or None); t, dt: float64 time and next step size;
    n_bad / n_newton_bad: consecutive non-finite / Newton-failed attempts; bad_recent /
    newton_recent: whether the latest rejection was non-finite / a Newton failure;
    n_attempts: accepted + rejected; max_steps: int; adaptive, implicit: bools of the method.
    """
    status = torch.where(accept & last, int(Status.SUCCESS), status)
    if stop is not None:  # an event inside the last step is an event too
        status = torch.where(stop, int(Status.EVENT), status)
    if hit is not None:
        status = torch.where(accept & hit & (status == RUNNING), int(Status.EVENT), status)
    running = status == RUNNING
    bad = running & (n_bad >= (_MAX_NONFINITE_TRIES if adaptive else 1))
    status = torch.where(bad, int(Status.NONFINITE), status)
    if implicit:
        # fixed steps cannot shrink: a Newton failure ends the sample at once
        tries = _MAX_NEWTON_TRIES if adaptive else 1
        stuck = (status == RUNNING) & (n_newton_bad >= tries)
        status = torch.where(stuck, int(Status.NEWTON_FAILED), status)
    if adaptive:
        # As scipy's solve_ivp: 10 ulps of t, which is float64 here. (10 eps of the state's
        # dtype times the span stopped float32 solves over long spans at their first, small
        # step: y' = cos t on [0, 1000] from y0 = 0.)
        floor = 10 * _EPS_T * torch.clamp_min(t.abs(), _TINY_T)
        small = (status == RUNNING) & (dt.abs() < floor)
        why = torch.where(bad_recent, int(Status.NONFINITE), int(Status.STEP_SIZE_TOO_SMALL))
        if implicit:
            why = torch.where(newton_recent, int(Status.NEWTON_FAILED), why)
        status = torch.where(small, why, status)
    out_of_steps = (status == RUNNING) & (n_attempts >= max_steps)
    return torch.where(out_of_steps, int(Status.MAX_STEPS), status)
