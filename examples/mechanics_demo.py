"""Mechanics of neural ODEs: rings through 2-D and augmented flows, H(t) along the adjoint.

    python examples/mechanics_demo.py                  # quick: about a minute on 2 CPU cores
    python examples/mechanics_demo.py --full --out-dir runs/mechanics-full

Writes rings_features.png, rings_decision.png, hamiltonian.png, feedforward_gap.png and
mechanics.json into the output folder and prints the metrics. Same as `equilibria mechanics`.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from equilibria.mechanics._demo import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("runs/mechanics"))
    parser.add_argument("--full", action="store_true", help="larger data set, longer training")
    args = parser.parse_args()
    result = run(args.out_dir, quick=not args.full)
    print(json.dumps({k: v for k, v in result.items() if k != "feedforward"}, indent=2))
    feedforward = result["feedforward"]
    print(f"feedforward -> ODE: gap falls at order {feedforward['order']:.3f} in 1/L "
          f"(L = {feedforward['depths']})")


if __name__ == "__main__":
    main()
