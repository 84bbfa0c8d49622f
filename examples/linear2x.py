"""The seed's first DEQ: learn y = 2x as the steady state of dz/dt = f(z + x) - z.

    .venv/bin/python examples/linear2x.py      # same as `equilibria train linear2x`

f = Linear(1, 5) then Linear(5, 1) on z + x (no activation), Tsit5 steady state, x = 1..10,
y = 2x, Adam(0.05), 1000 full-batch epochs; then deq(-5) is -10 (extrapolation).
"""

from equilibria.train.linear2x import train_linear2x

result = train_linear2x("runs/linear2x", epochs=1000, lr=0.05)
print(
    f"deq(-5) = {result['deq_at_minus_5']:.4f}; figures: {result['fit_png']}, "
    f"{result['trajectory_png']}"
)
