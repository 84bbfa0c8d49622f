"""equilibria.ode."""
