"""equilibria.models."""
