"""equilibria.linear."""
