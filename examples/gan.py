"""Two models and two optimizers in one run (the seeds' GAN case): a custom step function, while etappe
does modes, history, progress and checkpoints that hold G, D, opt_G and opt_D by name.

A tiny GAN learns to draw samples of N(3, 0.5) from noise.

    python examples/gan.py
"""

import tempfile

import torch
from torch import nn

import etappe
from etappe.data import TensorData


def main(epochs: int = 30, run_dir: str | None = None) -> float:
    torch.manual_seed(0)
    real = TensorData(3 + 0.5 * torch.randn(2048, 1), torch.zeros(2048))
    G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    D = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1))
    opt_G = torch.optim.Adam(G.parameters(), lr=2e-3)
    opt_D = torch.optim.Adam(D.parameters(), lr=2e-3)
    bce = nn.BCEWithLogitsLoss()

    def step(batch):
        x, _ = batch
        fake = G(torch.randn(len(x), 4))
        loss_D = bce(D(x), torch.ones(len(x), 1)) + bce(D(fake.detach()), torch.zeros(len(x), 1))
        opt_D.zero_grad()
        loss_D.backward()
        opt_D.step()
        loss_G = bce(D(fake), torch.ones(len(x), 1))
        opt_G.zero_grad()
        loss_G.backward()
        opt_G.step()
        return {"loss": loss_G, "loss_D": loss_D}

    run_dir = run_dir or tempfile.mkdtemp(prefix="etappe-gan-")
    trainer = etappe.Trainer({"G": G, "D": D}, {"opt_G": opt_G, "opt_D": opt_D}, step_fn=step,
                             train_data=real, batch_size=64, run_dir=run_dir, progress=False, quiet=True)
    trainer.fit(epochs)
    with torch.no_grad():
        mean = G(torch.randn(4096, 4)).mean().item()
    print(f"generated mean {mean:.3f} (target 3.0); checkpoints in {run_dir}/checkpoints")
    return mean


if __name__ == "__main__":
    main()
