"""The MNIST tutorials' MLP and CNN with cross-entropy and Adam, on any image set etappe knows
(the embedded digits by default; --data fashion-mnist or mnist for the 28x28 sets).

    python examples/classify_images.py --model mlp
    python examples/classify_images.py --model cnn --data fashion-mnist --epochs 3 --batch-size 64
"""

import argparse

import torch
from torch import nn

import etappe
from etappe.data import load_dataset
from etappe.models import build


def main(model_name: str = "cnn", data_name: str = "digits", epochs: int = 10, batch_size: int = 32,
         lr: float = 2e-3, run_dir: str | None = None) -> float:
    torch.manual_seed(0)
    data = load_dataset(data_name)
    model = build(model_name, data.spec.input_shape, data.spec.num_outputs)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    etappe.fit(model, data.train, epochs=epochs, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(),
               val_data=data.test, batch_size=batch_size, run_dir=run_dir)
    result = etappe.evaluate(model, data.test, nn.CrossEntropyLoss())
    print(f"{model_name} on {data_name}: test accuracy {100 * result['accuracy']:.1f}%")
    return result["accuracy"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="cnn", choices=["mlp", "cnn"])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    main(args.model, args.data, args.epochs, args.batch_size)
