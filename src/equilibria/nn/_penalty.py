"""Diagnostics of the Jacobian ∂f/∂z at a fixed point: a Hutchinson penalty and its spectral radius.

Both work per sample (dim 0 is the batch) from vector-Jacobian products only; the Jacobian is
never formed. ∂f/∂z of a per-sample map is block diagonal over the batch, so one VJP of the
batch gives every sample's product at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._autocast import outside_autocast
from .._checks import check_positive_int
from .._structure import Structure

__all__ = ["jacobian_penalty", "spectral_radius"]


def _packed(f: Callable, z_star: Any) -> tuple[Callable, Any]:
    """A structured z* (tuple of tensors) and its f, as one packed (batch, n) state."""
    structure = Structure.of("z_star", z_star)
    if structure is None:
        return f, z_star
    if not callable(f):
        raise TypeError(f"f must be callable as f(z, x), got {type(f).__name__}.")
    return structure.wrap(f), structure.flatten(z_star)


def _check_point(z_star: Any) -> torch.Tensor:
    if not isinstance(z_star, torch.Tensor):
        raise TypeError(f"z_star must be a torch.Tensor, got {type(z_star).__name__}.")
    if z_star.dim() < 1 or z_star.shape[0] == 0:
        raise ValueError(
            f"z_star must have a batch dimension (dim 0) with at least one sample, got shape "
            f"{tuple(z_star.shape)}; pass z_star with shape (batch, ...)."
        )
    if not z_star.is_floating_point():
        raise TypeError(f"z_star must be a floating-point tensor, got dtype {z_star.dtype}.")
    return z_star


def _apply_at(f: Callable, z_star: torch.Tensor, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluate f at a fresh leaf copy of z* (with grad), checking the output's shape."""
    if not callable(f):
        raise TypeError(f"f must be callable as f(z, x), got {type(f).__name__}.")
    z = z_star.detach().requires_grad_(True)
    fz = f(z, x)
    if not isinstance(fz, torch.Tensor) or fz.shape != z.shape:
        got = tuple(fz.shape) if isinstance(fz, torch.Tensor) else type(fz).__name__
        raise ValueError(
            f"f(z, x) must return a tensor shaped like z {tuple(z.shape)}, got {got}; "
            f"make f map the state to a state of the same shape."
        )
    return z, fz


def _vjp(fz: torch.Tensor, z: torch.Tensor, v: torch.Tensor, create_graph: bool) -> torch.Tensor:
    if not fz.requires_grad:  # f ignores z (and nothing else needs grad): ∂f/∂z = 0
        return torch.zeros_like(v)
    (out,) = torch.autograd.grad(fz, z, v, retain_graph=True, create_graph=create_graph,
                                 allow_unused=True)
    # f may ignore z altogether (∂f/∂z = 0): autograd then returns None.
    return torch.zeros_like(v) if out is None else out


def jacobian_penalty(
    f: Callable,
    z_star: torch.Tensor,
    x: Any = None,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Hutchinson estimate of ‖∂f/∂z‖_F² / dim at z*, per sample (Bai et al. 2021).

    For ε ~ N(0, I), E‖εᵀ J‖² = tr(J Jᵀ) = ‖J‖_F², so the mean of ‖εᵀ J‖² over `n_samples`
    draws, divided by the number of elements of one sample, is an unbiased estimate of
    ‖J‖_F² / dim. Penalising it keeps f contractive around its fixed points, which keeps the
    forward and backward solves short ("Stabilizing Equilibrium Models by Jacobian
    Regularization", Bai, Koltun & Kolter, ICML 2021).

    Differentiable: when grad mode is on, the estimate carries a graph to f's parameters and
    to x, so `loss = task_loss + gamma * jacobian_penalty(f, z_star, x).mean()` regularises
    the model. z* itself is treated as a constant (detached), as in Bai et al.: the penalty
    shapes f around the equilibrium it found, it does not move the equilibrium.

    Arguments:
        f: the DEQ's map, f(z, x) -> z (e.g. the `f_module` of an `equilibria.DEQ`).
        z_star: (batch, ...) the fixed point (e.g. `deq.last_solution.value`), or a tuple of
            such tensors (a multi-scale state; the estimate is over all of its elements).
        x: the input injection passed to f unchanged (tensor, tuple of tensors or None).
        n_samples: number of Gaussian probe vectors ε (the estimate's variance falls as
            1/n_samples).
        generator: optional torch.Generator for the probes (reproducible penalties).

    Returns:
        (batch,) tensor: the estimate of ‖∂f/∂z (z*_i)‖_F² / dim for each sample i.

    Raises:
        TypeError: z_star is not a floating tensor, f is not callable, n_samples not an int.
        ValueError: z_star has no batch dimension, f's output is not shaped like z, or
            n_samples < 1.
    """
    f, z_star = _packed(f, z_star)
    z_star = _check_point(z_star)
    n_samples = check_positive_int("n_samples", n_samples)
    differentiable = torch.is_grad_enabled()
    batch = z_star.shape[0]
    dim = z_star[0].numel()
    with torch.enable_grad():
        z, fz = _apply_at(f, z_star, x)
        total = z_star.new_zeros(batch)
        for _ in range(n_samples):
            probe = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)
            product = _vjp(fz, z, probe, create_graph=differentiable)
            total = total + product.reshape(batch, -1).pow(2).sum(dim=1)
    estimate = total / (n_samples * max(dim, 1))
    return estimate if differentiable else estimate.detach()


@outside_autocast(fn="f", state="z_star")
def spectral_radius(
    f: Callable,
    z_star: torch.Tensor,
    x: Any = None,
    n_iters: int = 20,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Spectral radius of ∂f/∂z at z*, per sample, from `n_iters` Jacobian products.

    Power iteration v ← Jᵀv/‖Jᵀv‖ builds the Krylov space span{v, Jᵀv, …, (Jᵀ)^{k−1} v}; plain
    power iteration keeps only its last vector, which oscillates instead of converging when
    the dominant eigenvalues are a complex pair or ± a real one (common for real, non-symmetric
    Jacobians). This function keeps the whole space (Arnoldi iteration: Gram–Schmidt twice
    per step) and returns the largest |Ritz value| of the small k×k Hessenberg matrix —
    the same number of products as k power steps, and exact once k reaches the dimension.
    Jᵀ and J have the same eigenvalues, so VJPs suffice. Saad, "Numerical Methods for Large
    Eigenvalue Problems", 2nd ed. (2011), §6.2.

    ρ(J) < 1 at z* means plain iteration (Picard) converges locally and the implicit backward
    system u = uJ + g is well posed; ρ near or above 1 signals a fragile equilibrium.

    Arguments:
        f: the map, f(z, x) -> z.
        z_star: (batch, ...) the point at which to linearise (a fixed point).
        x: passed to f unchanged.
        n_iters: Krylov dimension k (number of VJPs); capped at the per-sample dimension.
        generator: optional torch.Generator for the random start vector.

    Returns:
        (batch,) tensor (dtype of z_star, no graph): the estimate of max |λ(∂f/∂z (z*_i))|.
        For symmetric J it is a lower bound that increases with n_iters; for non-normal J the
        Ritz values lie in the field of values, so it may slightly over- or undershoot.

    Raises:
        TypeError / ValueError: as for `jacobian_penalty`, or n_iters < 1.
    """
    f, z_star = _packed(f, z_star)
    z_star = _check_point(z_star)
    n_iters = check_positive_int("n_iters", n_iters)
    batch = z_star.shape[0]
    dim = z_star[0].numel()
    steps = min(n_iters, dim)
    with torch.enable_grad():
        z, fz = _apply_at(f, z_star, x)
    eps = torch.finfo(z_star.dtype).eps
    basis = z_star.new_zeros(batch, steps + 1, dim)
    hessenberg = z_star.new_zeros(batch, steps + 1, steps)
    start = torch.randn(batch, dim, generator=generator, dtype=z_star.dtype,
                        device=z_star.device)
    basis[:, 0] = start / start.norm(dim=1, keepdim=True)
    for j in range(steps):
        w = _vjp(fz, z, basis[:, j].reshape(z.shape), create_graph=False)
        w = w.detach().reshape(batch, -1)
        w_norm = w.norm(dim=1)
        active = basis[:, : j + 1]
        # Classical Gram–Schmidt twice ("CGS2"): as stable as modified GS, but batched matmuls.
        coeffs = torch.bmm(active, w.unsqueeze(2)).squeeze(2)
        w = w - torch.bmm(coeffs.unsqueeze(1), active).squeeze(1)
        again = torch.bmm(active, w.unsqueeze(2)).squeeze(2)
        w = w - torch.bmm(again.unsqueeze(1), active).squeeze(1)
        hessenberg[:, : j + 1, j] = coeffs + again
        next_norm = w.norm(dim=1)
        # Breakdown: the Krylov space is invariant, the Ritz values so far are exact; zero the
        # rest so the remaining steps only add eigenvalues 0 (which cannot raise the max).
        breakdown = next_norm <= 100 * eps * torch.clamp(w_norm, min=torch.finfo(w.dtype).tiny)
        safe_norm = torch.where(breakdown, torch.ones_like(next_norm), next_norm)
        hessenberg[:, j + 1, j] = torch.where(breakdown, torch.zeros_like(next_norm), next_norm)
        basis[:, j + 1] = torch.where(breakdown.unsqueeze(1), torch.zeros_like(w),
                                      w / safe_norm.unsqueeze(1))
    ritz = torch.linalg.eigvals(hessenberg[:, :steps, :steps].double())
    return ritz.abs().amax(dim=1).to(z_star.dtype)
