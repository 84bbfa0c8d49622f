"""Variational dropout: one mask per sample per DEQ call, the same at every iteration.

A fresh `nn.Dropout` mask at every evaluation of f changes the map between iterations: the
solve chases a moving fixed point and every sample ends at its step bound. Variational
dropout (Gal & Ghahramani 2016; used in DEQs by Bai, Kolter & Koltun 2019) draws the mask
once per DEQ call and applies it at every iteration, in the implicit backward's graph, and on
whichever subset of rows the solver evaluates (compaction, line searches), so the DEQ solves
one fixed-point problem per call. Identity in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn

from .._context import current_call, current_rows

__all__ = ["VariationalDropout", "VariationalDropout2d", "stochastic_modules"]


def _check_p(p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"p must be a dropout probability in [0, 1), got {p!r}; e.g. p=0.1.")
    return float(p)


class VariationalDropout(nn.Module):
    """Dropout whose mask is drawn once per sample per DEQ call.

    Inside a DEQ's f_module, the first evaluation of a call draws a Bernoulli(1 − p) mask of
    the input's shape (scaled by 1 / (1 − p)); every later evaluation in the same call — the
    solver's iterations, the backward's graph, evaluations on a subset of the rows — multiplies
    by that mask's rows. Outside a DEQ call it behaves like `nn.Dropout` (a new mask per
    call). Identity in eval mode or with p = 0.

    Arguments:
        p: probability of an element being zeroed, in [0, 1).

    Shape: any (batch, ...) input; the mask is (batch, ...) over every element
    (`VariationalDropout2d` masks whole channels of (batch, C, ...) inputs).

    Raises:
        ValueError: p outside [0, 1); an input whose shape differs from the mask's within
            one DEQ call (the state's shape must not change during a solve).
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = _check_p(p)
        self._mask: torch.Tensor | None = None
        self._call: object | None = None

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def _mask_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return tuple(x.shape)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_mask"], state["_call"] = None, None  # per-call, not part of the model
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        call, rows = current_call(), current_rows()
        mask = self._mask
        if call is None or call is not self._call or mask is None:
            if rows is not None:
                raise ValueError(
                    "VariationalDropout met a subset of the batch before its first full "
                    "evaluation in this call; evaluate f on the whole batch first."
                )
            keep = torch.full(self._mask_shape(x), 1.0 - self.p, dtype=x.dtype, device=x.device)
            mask = torch.bernoulli(keep).div_(1.0 - self.p)
            self._mask, self._call = mask, call
        if rows is not None:
            mask = mask.index_select(0, rows)
        if mask.dim() != x.dim() or mask.shape[0] != x.shape[0] or any(
            m != 1 and m != n for m, n in zip(mask.shape[1:], x.shape[1:])
        ):
            raise ValueError(
                f"{type(self).__name__} got input shape {tuple(x.shape)} within a DEQ call whose "
                f"mask has shape {tuple(mask.shape)}: the input's shape must stay the same "
                "during one call."
            )
        return x * mask.to(x.dtype)


class VariationalDropout2d(VariationalDropout):
    """`VariationalDropout` over whole channels: the mask of a (batch, C, ...) input is
    (batch, C, 1, ..., 1), as `nn.Dropout2d` for convolutional cells."""

    def _mask_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        if x.dim() < 2:
            raise ValueError(
                f"VariationalDropout2d needs a (batch, C, ...) input, got shape {tuple(x.shape)};"
                " use VariationalDropout for flat features."
            )
        return (x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))


def stochastic_modules(module: nn.Module) -> list[str]:
    """Names of submodules that draw a new random mask at every call in train mode (torch's
    dropout layers with p > 0): inside a DEQ they change f between iterations."""
    found = []
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.training and sub.p > 0:
            found.append(f"{name or 'f_module'} ({type(sub).__name__}(p={sub.p}))")
    return found
