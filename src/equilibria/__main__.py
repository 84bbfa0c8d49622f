"""`python -m equilibria ...` (what torchrun launches) is the `equilibria` command."""

from .cli import entry

if __name__ == "__main__":
    entry()
