"""The one place where command-line names become solver and backward objects.

The library passes solvers as objects (small frozen dataclasses); only the command line
speaks in names. Adding a solver to the CLI is one line in each table below.
"""

from __future__ import annotations

__all__ = [
    "BACKWARD_CHOICES",
    "SOLVER_CHOICES",
    "check_pairing",
    "make_backward",
    "make_deq",
    "make_solver",
]


def _solvers() -> dict:
    import equilibria as eq  # late import: the solvers live in lower layers of the package

    return {
        "picard": lambda: eq.Picard(),
        "anderson": lambda: eq.Anderson(),
        "broyden": lambda: eq.Broyden(),
        "newton-krylov": lambda: eq.NewtonKrylov(),
        "steady-state-tsit5": lambda: eq.SteadyState(eq.Tsit5()),
        "steady-state-implicit": lambda: eq.SteadyState(eq.ImplicitEuler()),
        "reversible": lambda: eq.Reversible(),  # a solver/backward pair (see make_deq)
    }


def _backwards() -> dict:
    import equilibria as eq

    return {
        "implicit": lambda: eq.Implicit(),
        "unrolled": lambda: eq.Unrolled(),
        "one-step": lambda: eq.OneStep(),
        "phantom": lambda: eq.Phantom(),
        "reversible": lambda: eq.Reversible(),
    }


SOLVER_CHOICES = (
    "picard",
    "anderson",
    "broyden",
    "newton-krylov",
    "steady-state-tsit5",
    "steady-state-implicit",
    "reversible",
)
BACKWARD_CHOICES = ("implicit", "unrolled", "one-step", "phantom", "reversible")


def check_pairing(solver: str, backward: str) -> None:
    """Reversible is a solver/backward pair: both names 'reversible', or neither."""
    if (solver == "reversible") != (backward == "reversible"):
        raise ValueError(
            f"solver {solver!r} with backward {backward!r}: the reversible DEQ iterates itself "
            "and differentiates that iteration, so it is chosen as a pair: pass --solver "
            "reversible --backward reversible (or neither)."
        )


def make_solver(name: str):
    """The solver object for a command-line name; ValueError listing the choices otherwise."""
    if name not in SOLVER_CHOICES:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVER_CHOICES)}.")
    return _solvers()[name]()


def make_backward(name: str, rtol: float | None = None):
    """The backward-strategy object for a command-line name; `rtol` sets the tolerance of
    the implicit strategy's GMRES solve (ValueError for strategies that solve nothing)."""
    if name not in BACKWARD_CHOICES:
        raise ValueError(f"unknown backward {name!r}; choose one of {', '.join(BACKWARD_CHOICES)}.")
    if rtol is None:
        return _backwards()[name]()
    if name != "implicit":
        raise ValueError(f"a backward rtol applies to 'implicit' only, not {name!r}.")
    import equilibria as eq

    return eq.Implicit(eq.GMRES(rtol=rtol))


def make_deq(
    solver: str,
    backward: str,
    atol: float,
    rtol: float,
    max_steps: int,
    backward_rtol: float | None = None,
    compact: bool = False,
):
    """A factory (cell, z_shape=None) -> eq.DEQ(cell, solver, backward, atol, rtol,
    max_steps, z_shape) for the models."""
    import equilibria as eq

    check_pairing(solver, backward)
    # Reversible iterates itself: the DEQ gets it as its backward and no solver.
    solver_object = None if solver == "reversible" else make_solver(solver)
    backward_object = make_backward(backward, backward_rtol)

    def factory(cell, z_shape=None):
        return eq.DEQ(
            cell,
            z_shape=z_shape,
            solver=solver_object,
            backward=backward_object,
            atol=atol,
            rtol=rtol,
            max_steps=max_steps,
            compact=compact,
        )

    return factory
