"""equilibria.train."""
