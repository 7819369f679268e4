"""Built-in models, sized from the data's shape, and the registry that names them.

A model is named on the command line by a registry name (``cnn``) or, for a
user's own model, by ``module:factory``; the factory is called with the same
keyword arguments as the built-ins (``input_shape``, ``num_outputs``).

A name read from a file (a checkpoint's config, a run's config.json, an export
sidecar) goes through ``from_file`` first: importing a module the file names
runs that module's code, so only built-in names pass unless the user trusts the
file or names the same factory themselves.
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from etappe.errors import EtappeError, UsageError, check_flag


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


def from_file(name: Any, where: str, *, trusted: bool = False, named: str | None = None, python: bool = True) -> str:
    """``name`` as read from ``where``'s config, if it may be built: one of etappe's built-in models, or a
    ``module:factory`` only when ``trusted`` or when the user ``named`` the same factory."""
    if not isinstance(name, str) or not name:
        raise UsageError(f"{where}: expected a model name in its config, found {name!r}; pass --model NAME")
    if name in MODELS or check_flag("trusted", trusted) or name == named:
        return name
    hint = f" (Python: trusted=True, or model={name!r})" if python else ""
    raise UsageError(
        f"{where} names model {name!r} from its config; etappe imports a module named in a file only with --trust, "
        f"or pass --model {name}{hint}"
    )


def check_arguments(name: str, factory: Callable[..., nn.Module], kwargs: Mapping[str, Any]) -> None:
    """Refuse keyword arguments the factory does not take, and a factory that cannot take the ones etappe passes."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: its call will say what is wrong
        return
    bad = [k for k in kwargs if not isinstance(k, str) or k in ("input_shape", "num_outputs")]
    if bad:
        raise UsageError(f"model {name!r}: keyword argument {bad[0]!r} cannot be given; etappe passes input_shape "
                         "and num_outputs from the data")
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    takes = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [k for k in ("input_shape", "num_outputs") if k not in takes]
    if missing:
        raise UsageError(f"model {name!r} cannot be built: its factory takes no {' or '.join(missing)} keyword "
                         "argument; etappe calls it as factory(input_shape=..., num_outputs=..., **model_args)")
    extra = [p for p in takes if p not in ("input_shape", "num_outputs")]
    unknown = [k for k in kwargs if k not in extra]
    if unknown:
        it_takes = f"it takes: {', '.join(extra)}" if extra else "it takes none"
        raise UsageError(f"model {name!r} takes no keyword argument {unknown[0]!r}; {it_takes}")
    required = [p.name for p in params if p.name in extra and p.default is p.empty and p.name not in kwargs]
    if required:
        raise UsageError(f"model {name!r} needs keyword argument {required[0]!r}; pass --model-arg {required[0]}=VALUE")


def build(name: str, input_shape: tuple[int, ...], num_outputs: int, /, **kwargs: object) -> nn.Module:
    """Build a model by name, sized for ``input_shape`` (one sample, no batch) and ``num_outputs``. Keyword
    arguments must be ones the factory takes; a factory that fails on them (a TypeError, ValueError or
    RuntimeError while building) is a UsageError naming the model and its arguments."""
    factory = resolve(name)
    check_arguments(name, factory, kwargs)
    try:
        return factory(input_shape=tuple(input_shape), num_outputs=num_outputs, **kwargs)
    except EtappeError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        shown = repr(kwargs) if len(repr(kwargs)) <= 200 else repr(kwargs)[:200] + "..."
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UsageError(f"model {name!r} could not be built with model_kwargs {shown}: {first}") from None
