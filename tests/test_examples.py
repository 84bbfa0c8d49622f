"""The README's quick start runs as written and prints what it claims."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_runs_and_solves_cos():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for line in lines[:2]:  # SteadyState and Anderson on cos z = z
        value = float(line.split()[1])
        assert abs(value - 0.7390851332151607) < 1e-9, line
        assert "[0, 0, 0, 0]" in line  # every sample SUCCESS
    odeint_line = next(line for line in lines if line.startswith("odeint:"))
    ours, reference = float(odeint_line.split()[1]), float(odeint_line.split()[3])
    assert abs(ours - reference) < 1e-7
