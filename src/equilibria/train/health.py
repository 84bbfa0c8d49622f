"""Signs that a run is going wrong: divergence stops it (exit 3), unconverged solves warn.

Divergence shows first in the weights, not the loss: one Adam step with a large learning rate
can leave inf/NaN weights while the loss it was computed from is finite, and the next batch
then fails deep in the solver ("x contains inf or NaN ... pass finite values"), blaming the
input. So the loop checks the weights after every optimizer step (`first_nonfinite_parameter`)
and turns a non-finite activation with finite inputs into the same diagnosis
(`blame_divergence`). When the solvers keep every value finite, the loss itself shows it:
a batch loss LOSS_GROWTH_LIMIT times the run's first one stops the run too (`loss_explosion`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = [
    "NOT_CONVERGED_WARNING_SHARE",
    "TrainingDiverged",
    "blame_divergence",
    "diverged_message",
    "first_nonfinite_parameter",
    "loss_explosion",
    "nonfinite_weights",
    "not_converged_warning",
]

# Above this share of samples stopped at max_steps the equilibria (and gradients) are poor.
NOT_CONVERGED_WARNING_SHARE = 0.10

# A batch loss this many times the run's first one (2.3 for ten classes at chance) means the
# weights have run away, even when the solver keeps everything finite.
LOSS_GROWTH_LIMIT = 1000.0

_FIX = "Lower --lr, add --jac-penalty (e.g. 1.0) to keep f contractive, or tighten --atol/--rtol."


class TrainingDiverged(RuntimeError):
    """The loss, the weights or the activations became inf/NaN; the last good checkpoint is
    kept (the command exits with 3)."""


def diverged_message(what: str, epoch: int, batch: int | None, run_dir: Path) -> str:
    """`what` happened at epoch/batch (1-based; batch None: the epoch's evaluation), what
    was kept, and the fix."""
    where = f"epoch {epoch}, batch {batch}" if batch is not None else f"epoch {epoch}'s test"
    if (run_dir / "checkpoint.pt").is_file():
        kept = f"The last good checkpoint is kept in {run_dir}."
    else:
        kept = f"No checkpoint was written yet in {run_dir} (it diverged in its first epoch)."
    return f"{what} at {where}: training diverged. {kept} {_FIX}"


def loss_explosion(loss: float, first_loss: float | None) -> str | None:
    """What went wrong when `loss` is inf/NaN or over LOSS_GROWTH_LIMIT times the run's
    first batch loss (`first_loss`, None before there is one); None when it is fine."""
    if not math.isfinite(loss):
        return f"the loss became {loss}"
    if first_loss is not None and loss > LOSS_GROWTH_LIMIT * max(first_loss, 1.0):
        return (
            f"the loss grew to {loss:.4g}, over {LOSS_GROWTH_LIMIT:g} times its first value "
            f"{first_loss:.4g}"
        )
    return None


def first_nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first parameter holding inf or NaN; None when all are finite.

    One host sync: the sum of all parameters is non-finite whenever an element is (inf - inf
    is NaN); only then are they inspected one by one (a sum that merely overflowed from huge
    finite weights finds none and returns None).
    """
    named = [(name, p.detach()) for name, p in model.named_parameters() if p.is_floating_point()]
    if not named:
        return None
    total = torch.stack([p.sum(dtype=torch.float32) for _, p in named]).sum()
    if bool(torch.isfinite(total)):
        return None
    return next((name for name, p in named if not bool(torch.isfinite(p).all())), None)


def nonfinite_weights(model: torch.nn.Module, name: str, loss: float) -> str:
    """What made parameter `name` non-finite, for `diverged_message`."""
    grad = dict(model.named_parameters())[name].grad
    cause = (
        "its gradient was inf or NaN"
        if grad is not None and not bool(torch.isfinite(grad).all())
        else "a finite gradient, but too large a step"
    )
    return (
        f"the weights of {name} became inf or NaN in the optimizer step ({cause}; the loss "
        f"was still {loss:.4g})"
    )


@contextmanager
def blame_divergence(epoch: int, batch: int | None, run_dir: Path) -> Iterator[None]:
    """Re-raise the solver's "contains inf or NaN" input check as TrainingDiverged.

    Inside training the inputs are finite images, so a non-finite value reaching the DEQ
    means the weights have grown until the activations overflowed.
    """
    try:
        yield
    except ValueError as error:
        if "inf or NaN" not in str(error):
            raise
        raise TrainingDiverged(
            diverged_message(
                f"the model's activations became inf or NaN from finite images ({error})",
                epoch,
                batch,
                run_dir,
            )
        ) from error


def not_converged_warning(shares: dict[str, float], max_steps: int) -> str | None:
    """A warning naming the fixes when more than NOT_CONVERGED_WARNING_SHARE of the solves
    of any set in `shares` ({"training": 0.4, "test": 0.3}) did not converge; else None."""
    if not any(share > NOT_CONVERGED_WARNING_SHARE for share in shares.values()):
        return None
    listed = " and ".join(f"{share:.0%} of the {name}" for name, share in shares.items())
    return (
        f"warning: {listed} solves did not converge (stopped at --max-steps {max_steps} or "
        "diverged): their equilibria and gradients are inaccurate. Raise --max-steps, loosen "
        "--rtol/--atol, or try another --solver (anderson needs fewer steps than picard)."
    )
