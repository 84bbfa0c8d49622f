"""Rooted trees and elementary weights: Butcher's order conditions, generated, not listed.

A Runge–Kutta method (A, b) has order p when sum_i b_i Phi_i(tree) = 1 / gamma(tree) for
every rooted tree with at most p nodes (a continuous extension of order p: sum_i b_i(theta)
Phi_i(tree) = theta^|tree| / gamma(tree)). The tests check every tableau's claimed order with
these, and ``tools/derive_dopri8_dense.py`` solves for Dopri8's dense output with them; the
integrator itself never needs them.

Reference: Hairer, Nørsett, Wanner, *Solving ODEs I* (2nd ed.), II.2 (Theorem 2.13).
"""

from __future__ import annotations

import numpy as np

__all__ = ["density", "elementary_weights", "size", "trees"]


def _grow(tree):
    """The rooted trees with one more node than `tree` (a tree: sorted tuple of subtrees)."""
    out = {tuple(sorted(tree + ((),)))}
    for i, child in enumerate(tree):
        for grown in _grow(child):
            out.add(tuple(sorted(tree[:i] + (grown,) + tree[i + 1 :])))
    return out


def trees(order: int) -> list:
    """All rooted trees with at most `order` nodes (1, 1, 2, 4, 9, 20, 48, 115, 286, ...)."""
    level, every = {()}, [()]
    for _ in range(order - 1):
        level = set().union(*(_grow(t) for t in level))
        every += sorted(level)
    return every


def size(tree) -> int:
    """|tree|, its number of nodes."""
    return 1 + sum(size(u) for u in tree)


def density(tree) -> int:
    """gamma(tree): |tree| times the densities of its subtrees."""
    value = size(tree)
    for u in tree:
        value *= density(u)
    return value


def elementary_weights(tree, a: np.ndarray) -> np.ndarray:
    """Phi_i(tree) for every stage i of the (s, s) matrix a: the product over the root's
    subtrees u of (a Phi(u))_i."""
    w = np.ones(a.shape[0])
    for u in tree:
        w = w * (a @ elementary_weights(u, a))
    return w
