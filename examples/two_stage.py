"""The seeds' two-stage training: stage one trains and checkpoints; stage two loads the checkpoint and its
loss continues to fall from where stage one ended. With etappe, stage two is the same call with more epochs
on the same run folder, and it equals an uninterrupted run bit for bit.

    python examples/two_stage.py
"""

import tempfile

import torch
from torch import nn

import etappe
from etappe.data import load_dataset
from etappe.models import build


def stage(run_dir: str, epochs: int) -> list[float]:
    torch.manual_seed(0)
    data = load_dataset("digits")
    model = build("cnn", data.spec.input_shape, data.spec.num_outputs)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = etappe.fit(model, data.train, epochs=epochs, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(),
                         val_data=data.test, batch_size=64, run_dir=run_dir, progress=False, quiet=True)
    return [row["train_loss"] for row in history]


def main(first: int = 3, second: int = 6) -> tuple[list[float], list[float]]:
    run_dir = tempfile.mkdtemp(prefix="etappe-two-stage-")
    losses_one = stage(run_dir, first)
    losses_two = stage(run_dir, second)  # resumes the run folder and trains epochs first+1 .. second
    print("stage 1 train loss:", " ".join(f"{v:.4f}" for v in losses_one))
    print("stage 2 train loss:", " ".join(f"{v:.4f}" for v in losses_two[first:]))
    return losses_one, losses_two


if __name__ == "__main__":
    main()
