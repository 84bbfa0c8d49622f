"""The adjoint's backward solve per sample, each on its own steps (Adjoint(per_sample=True)).

The shared backward (`adjoint_trajectory`) integrates the whole batch as one system because
the parameter gradient a_theta is a sum over samples. Here each sample carries its own share,

    d/dt [y_b, a_b, g_b] = [f_b, -a_b^T df_b/dy_b, -a_b^T df_b/dtheta],

one row per sample (the per-sample parameter VJP by torch.func.vmap over the rows, as in
equilibria.mechanics' costate), so odeint steps, accepts and stops each row on its own, and
the parameter gradient is sum_b g_b at the end. A sample's gradient then does not depend on
its batch-mates. The cost: every row carries a copy of the parameter gradient (memory
batch x n_params) and the VJP is vmapped.

Reference: Chen et al. 2018 (the adjoint system); Kidger, Chen & Lyons 2021 (seminorm).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._checks import rms_norm
from ._integrate import odeint
from ._rk import time_like

__all__ = ["module_parameter_names", "per_sample_trajectory"]


def module_parameter_names(f: Callable, params: Sequence[torch.Tensor]) -> list[str]:
    """The names of `params` among f's parameters (per-sample VJPs call f functionally).

    Raises:
        ValueError: when f is not an nn.Module or a param is not one of its parameters.
    """
    if not params:
        return []
    if not isinstance(f, torch.nn.Module):
        raise ValueError(
            "Adjoint(per_sample=True) with params needs f to be an nn.Module whose parameters "
            "they are (the per-sample VJP calls it with torch.func.functional_call); wrap f "
            "in a Module or use Adjoint(per_sample=False)."
        )
    names = {id(p): name for name, p in f.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(
            f"Adjoint(per_sample=True): params {missing} are not parameters of f; pass only "
            "f's own parameters (the default) or use Adjoint(per_sample=False)."
        )
    return [names[id(p)] for p in params]


class _RowField:
    """d/dt [y, a, g_theta, g_args] on (rows, total) states; see the module docstring."""

    def __init__(self, f, sample_shape, params, names, wants):
        self.f, self.sample_shape, self.params, self.names, self.wants = (
            f, sample_shape, params, names, wants
        )
        self.n = sample_shape.numel()

    def __call__(self, t: torch.Tensor, state: torch.Tensor, *args: torch.Tensor):
        rows, n = state.shape[0], self.n
        shape = (rows, *self.sample_shape)
        y = state[:, :n].reshape(shape)
        a = state[:, n : 2 * n].reshape(shape)
        t = time_like(t, y)
        with torch.enable_grad():
            y_var = y.detach().requires_grad_(True)
            arg_vars = [x.detach().requires_grad_(w) for x, w in zip(args, self.wants)]
            dydt = self.f(t, y_var, *arg_vars)
            wrt = [y_var] + [x for x in arg_vars if x.requires_grad]
            grads = torch.autograd.grad(dydt, wrt, grad_outputs=a, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, wrt)]
        parts = [dydt.detach().reshape(rows, -1), -grads[0].reshape(rows, -1)]
        if self.params:
            parts.append(-self._param_vjp(t.detach(), y.detach(), a, [x.detach() for x in args]))
        parts += [-g.reshape(rows, -1) for g in grads[1:]]
        return torch.cat(parts, dim=1)

    def _param_vjp(self, t, y, a, args):
        """(rows, n_params): a_b^T df(t_b, y_b, args_b)/dtheta per row, vmapped."""
        module = self.f
        values = {name: p.detach() for name, p in zip(self.names, self.params)}

        def one(t_i, y_i, a_i, *args_i):
            def field(prm):
                inputs = (t_i[None], y_i[None], *(x[None] for x in args_i))
                return torch.func.functional_call(module, prm, inputs)[0]

            _, pullback = torch.func.vjp(field, values)
            (grads,) = pullback(a_i)
            return torch.cat([grads[name].reshape(-1) for name in self.names])

        return torch.func.vmap(one)(t, y, a, *args)


def per_sample_trajectory(f, y_end, a_end, t_span, params, args, wants, solver, rtol, atol,
                          max_steps, seminorm):
    """One backward segment per sample. Returns (a at t_span[1] (batch, ...), gradients of
    params (summed over samples) then of the args that want one (per sample), Solution)."""
    batch, sample_shape = y_end.shape[0], y_end.shape[1:]
    n = sample_shape.numel()
    names = module_parameter_names(f, params)
    field = _RowField(f, sample_shape, params, names, wants)
    sizes = [p.numel() for p in params]
    arg_sizes = [x[0].numel() for x, w in zip(args, wants) if w]
    state0 = torch.cat(
        [y_end.detach().reshape(batch, -1), a_end.detach().to(y_end.dtype).reshape(batch, -1),
         y_end.new_zeros(batch, sum(sizes) + sum(arg_sizes))], dim=1
    )
    error_norm = None
    if seminorm and (sizes or arg_sizes):
        def error_norm(scaled: torch.Tensor) -> torch.Tensor:
            return rms_norm(scaled[:, : 2 * n])

    sol = odeint(field, state0, t_span, solver=solver, rtol=rtol, atol=atol,
                 max_steps=max_steps, args=tuple(x.detach() for x in args),
                 error_norm=error_norm)
    end = sol.value
    a_start = end[:, n : 2 * n].reshape(y_end.shape)
    grads, offset = [], 2 * n
    for p, size in zip(params, sizes):
        grads.append(end[:, offset : offset + size].sum(dim=0).reshape(p.shape).to(p.dtype))
        offset += size
    for x, size in zip((x for x, w in zip(args, wants) if w), arg_sizes):
        grads.append(end[:, offset : offset + size].reshape(x.shape).to(x.dtype))
        offset += size
    return a_start, grads, sol
