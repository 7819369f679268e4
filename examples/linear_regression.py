"""The seed's first model: learn y = 0.7 x + 0.3 with one weight and one bias (L1 loss, SGD).

    python examples/linear_regression.py
"""

import torch
from torch import nn

import etappe
from etappe.data import load_dataset
from etappe.models import build


def main(epochs: int = 300) -> tuple[float, float]:
    torch.manual_seed(42)
    data = load_dataset("linear")
    model = build("linear", data.spec.input_shape, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    history = etappe.fit(model, data.train, epochs=epochs, optimizer=optimizer, loss_fn=nn.L1Loss(),
                         val_data=data.test, batch_size=32, progress=False, quiet=True)
    weight, bias = model.linear.weight.item(), model.linear.bias.item()
    print(f"learned weight {weight:.4f} (true 0.7), bias {bias:.4f} (true 0.3), test L1 {history[-1]['val_loss']:.4f}")
    return weight, bias


if __name__ == "__main__":
    main()
