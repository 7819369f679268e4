"""Fit sin(x) on [-2, 2] with the seed's 1-10-Tanh-1 network (MSE, Adam).

    python examples/sine_fit.py
"""

import torch
from torch import nn

import etappe
from etappe.data import load_dataset
from etappe.models import build


def main(epochs: int = 60) -> float:
    torch.manual_seed(0)
    data = load_dataset("sine")
    model = build("sine-mlp", data.spec.input_shape, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    etappe.fit(model, data.train, epochs=epochs, optimizer=optimizer, loss_fn=nn.MSELoss(), batch_size=32,
               progress=False, quiet=True)
    mse = etappe.evaluate(model, data.test, nn.MSELoss())["loss"]
    print(f"test MSE on [-2, 2]: {mse:.5f}")
    return mse


if __name__ == "__main__":
    main()
