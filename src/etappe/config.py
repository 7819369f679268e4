"""The run's configuration: one frozen dataclass, turned into CLI flags and TOML, saved in every checkpoint.

This module does not import torch, so ``etappe --help`` starts fast.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from etappe.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OPTIMIZERS = ("sgd", "adam", "adamw")
LOSSES = ("cross-entropy", "mse", "l1", "bce")
SCHEDULERS = ("none", "step", "cosine", "exponential")
STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``etappe train`` needs. The defaults train the seed CNN on the embedded ``digits`` set."""

    data: str = "digits"
    model: str = "cnn"
    model_kwargs: dict = field(default_factory=dict)
    epochs: int = 20
    batch_size: int = 16
    lr: float = 5e-3
    optimizer: str = "adam"
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss: str = "auto"  # cross-entropy for classification, mse for regression
    scheduler: str = "none"
    scheduler_interval: str = "epoch"
    step_size: int = 1  # StepLR
    gamma: float = 0.9  # StepLR, ExponentialLR
    clip_grad_norm: float | None = None
    seed: int = 0
    device: str = "auto"
    deterministic: bool | None = None  # None: on for CPU, off for CUDA
    channels_last: bool | None = None  # conv models in channels-last memory format; None: etappe's own models only
    data_dir: str | None = None
    num_workers: int = 0
    run_dir: str | None = None
    save_every: int | None = None  # optimizer steps
    save_every_seconds: float | None = None
    async_save: bool = False
    strategy: str = "ddp"  # under torchrun: replicate (DDP) or shard (FSDP2) the model
    keep_last: int = 2
    keep_best: int = 1
    monitor: str = "val_loss"
    patience: int | None = None  # early stopping, in epochs without improvement of `monitor`
    quiet: bool = False
    tensorboard: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, expected: str) -> UsageError:
            return UsageError(f"--{name.replace('_', '-')} {value!r} is not valid; expected {expected}")

        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.loss not in LOSSES + ("auto",):
            raise UsageError(f"unknown loss {self.loss!r}; choose one of: {', '.join(LOSSES)}")
        if self.scheduler not in SCHEDULERS:
            raise UsageError(f"unknown scheduler {self.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
        if self.strategy not in STRATEGIES:
            raise UsageError(f"unknown strategy {self.strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        if self.strategy == "fsdp" and self.async_save:
            raise UsageError("--async-save does not apply to --strategy fsdp (sharded state is saved by every rank "
                             "together); drop one of them")
        if self.scheduler_interval not in ("epoch", "step"):
            raise bad("scheduler_interval", self.scheduler_interval, "'epoch' or 'step'")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise bad(name, getattr(self, name), "a positive integer")
        if not self.lr > 0:
            raise bad("lr", self.lr, "a positive number")
        if self.num_workers < 0:
            raise bad("num_workers", self.num_workers, "0 or more")
        for name in ("save_every", "save_every_seconds", "patience", "clip_grad_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise bad(name, value, "a positive number")

    @property
    def run_name(self) -> str:
        return f"{self.data.replace(':', '_').replace('/', '_')}-{self.model.replace(':', '_')}"

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.run_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UsageError(f"unknown config keys {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# Keys that make a run a different run: changing one on resume is refused unless allowed.
RUN_DEFINING = (
    "data",
    "model",
    "model_kwargs",
    "batch_size",
    "lr",
    "optimizer",
    "momentum",
    "weight_decay",
    "loss",
    "scheduler",
    "scheduler_interval",
    "step_size",
    "gamma",
    "clip_grad_norm",
    "seed",
    "channels_last",  # the memory layout changes float rounding: a run resumed in the other one is not exact
)

# What a key missing from a config saved by an older etappe meant: runs before channels-last trained in NCHW.
SAVED_BEFORE = {"channels_last": False}


def config_differences(saved: dict, new: dict) -> list[str]:
    """Human-readable differences in run-defining keys, e.g. ``batch_size: 32 -> 64``."""
    def value(config: dict, key: str) -> Any:
        return config.get(key, SAVED_BEFORE.get(key))

    return [f"{k}: {value(saved, k)!r} -> {value(new, k)!r}" for k in RUN_DEFINING if value(saved, k) != value(new, k)]


def read_toml(path: str | Path) -> dict:
    """Read a TOML config file whose keys are TrainConfig fields (dashes or underscores)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    data = {k.replace("-", "_"): v for k, v in raw.items()}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"{path}: unknown keys {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    return data
