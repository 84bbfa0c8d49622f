"""`python -m equilibria ...` (what torchrun launches) is the `equilibria` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
