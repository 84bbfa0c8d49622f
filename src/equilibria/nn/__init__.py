"""equilibria.nn."""
