"""equilibria.equilibrium."""
