"""Built-in models, sized from the data's shape, and the registry that names them.

A model is named on the command line by a registry name (``cnn``) or, for a
user's own model, by ``module:factory``; the factory is called with the same
keyword arguments as the built-ins (``input_shape``, ``num_outputs``).
"""

from __future__ import annotations

import importlib
import math
from typing import Callable

import torch
from torch import nn

from etappe.errors import UsageError


class Linear(nn.Module):
    """The seeds' linear regression: one weight and one bias per output."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int) -> None:
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def sine_mlp(input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """The seed's 1-10-Tanh-1 network for fitting sin(x)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 10), nn.Tanh(), nn.Linear(10, num_outputs))


def mlp(input_shape: tuple[int, ...], num_outputs: int, hidden: int = 512, dropout: float = 0.0) -> nn.Module:
    """The quickstart MLP: Flatten, 512, 512, outputs (optional dropout after each hidden layer)."""
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, num_outputs))
    return nn.Sequential(*layers)


class CNN(nn.Module):
    """The seed's CNN: conv 8 and conv 16 (3x3, padding 1), each followed by ReLU and 2x2 max pooling,
    then one linear layer. Sized from the input's (channels, height, width)."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise UsageError(
                f"model 'cnn' needs image data shaped (channels, height, width), got input shape {tuple(input_shape)}; "
                "use --model mlp for flat features"
            )
        channels, height, width = input_shape
        self.conv1 = nn.Conv2d(channels, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(16 * (height // 4) * (width // 4), num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc1(x.flatten(1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "linear": Linear,
    "sine-mlp": sine_mlp,
    "mlp": mlp,
    "cnn": CNN,
}


def resolve(name: str) -> Callable[..., nn.Module]:
    """The factory for a registry name or a ``module:factory`` reference."""
    if name in MODELS:
        return MODELS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UsageError(f"cannot import module {module_name!r} for model {name!r}: {exc}") from None
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise UsageError(f"module {module_name!r} has no callable {attr!r} (model {name!r})")
        return factory
    raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, or give module:factory")


def build(name: str, input_shape: tuple[int, ...], num_outputs: int, **kwargs: object) -> nn.Module:
    """Build a model by name, sized for ``input_shape`` (one sample, no batch) and ``num_outputs``."""
    return resolve(name)(input_shape=tuple(input_shape), num_outputs=num_outputs, **kwargs)
