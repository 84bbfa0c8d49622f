"""Ctrl-C and SIGTERM during training: held until the batch has finished, agreed over ranks."""

from __future__ import annotations

import torch

from .distributed import DistContext, all_reduce_sum

__all__ = ["AgreedStop", "DeferredInterrupt"]


class AgreedStop(KeyboardInterrupt):
    """An interrupt every rank saw at the same batch boundary (safe to checkpoint)."""


_STOP_SIGNALS = ("SIGINT", "SIGTERM")


class DeferredInterrupt:
    """Ctrl-C (SIGINT) or SIGTERM during a batch (or an epoch's evaluation) is held until it
    has finished.

    The first signal sets a flag that the loop turns into a stop at the next batch boundary,
    where model, optimizer, RNG and counters agree, so the checkpoint written then resumes
    exactly. Under torchrun a Ctrl-C reaches torchrun, which forwards it to every worker
    (then kills them after 30 s): `agreed()` all-reduces the flags so that all ranks stop at
    the same boundary. The first signal also restores the previous handlers: a second one
    interrupts at once (and the last checkpoint is kept). Outside the main thread it does
    nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def __enter__(self) -> DeferredInterrupt:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in _STOP_SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.getsignal(number)
                signal.signal(number, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self._restore()
        self.requested = True

    def agreed(self, context: DistContext) -> bool:
        """Whether any rank was asked to stop (a collective under DDP: all ranks call it)."""
        if not context.distributed:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], dtype=torch.float64)
        return bool(all_reduce_sum(context, flag).item() > 0)

    def _restore(self) -> None:
        import signal

        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
