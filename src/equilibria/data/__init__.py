"""equilibria.data."""
