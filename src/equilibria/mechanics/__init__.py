"""equilibria.mechanics."""
