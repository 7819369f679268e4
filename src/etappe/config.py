"""The run's configuration: one frozen dataclass, turned into CLI flags and TOML, saved in every checkpoint.

This module does not import torch, so ``etappe --help`` starts fast.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from etappe.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OPTIMIZERS = ("sgd", "adam", "adamw")
LOSSES = ("cross-entropy", "mse", "l1", "bce")
SCHEDULERS = ("none", "step", "cosine", "exponential")
STRATEGIES = ("ddp", "fsdp")
PRECISIONS = ("32", "bf16-mixed", "16-mixed")
# What --monitor may name: the metrics an `etappe train` run records every epoch (val_accuracy for class labels).
METRICS = ("val_loss", "val_accuracy", "train_loss")


def monitor_mode(monitor: str) -> str:
    """Whether a higher (``max``: an accuracy) or lower (``min``: a loss) value of a metric is better."""
    return "max" if "acc" in monitor else "min"


def _validated(options: Any, checks: Mapping[str, Callable[[str, Any], Any]], keywords: bool = False) -> None:
    """Check every field of a frozen dataclass by its rule (``_CHECKS``), storing normalized values. A bad value
    raises ConfigValueError, naming the flag (``--lr``) or, with ``keywords``, the keyword (``lr=``)."""
    for f in fields(options):
        if f.name in checks:
            try:
                value = checks[f.name](f.name, getattr(options, f.name))
            except ConfigValueError as exc:
                if not keywords:
                    raise
                raise UsageError(exc.describe(keyword=True)) from None
            if value is not getattr(options, f.name):  # normalized: an int where a float belongs, a path, a tuple
                object.__setattr__(options, f.name, value)


# The Trainer's options, in three groups. Each default lives here, once: TrainConfig's fields of the same names take
# theirs from these classes, and ``TrainConfig.options(cls)`` hands a run's values to the Trainer.

@dataclass(frozen=True)
class LoopOptions:
    """What the loop does: batches, the order of samples, the step, where it runs, when it stops early."""

    batch_size: int = 16
    shuffle: bool = True
    seed: int = 0
    num_workers: int = 0
    clip_grad_norm: float | None = None
    precision: str = "32"  # "bf16-mixed": bf16 autocast; "16-mixed": fp16 autocast and a gradient scaler (CUDA)
    accumulate: int = 1  # micro-batches of batch_size per optimizer step
    compile: bool = False  # torch.compile the model's forward for training
    ema: float | None = None  # decay of an exponential moving average of the weights, kept and validated with
    warmup_steps: int = 0  # optimizer steps of linear learning-rate warm-up (its factor multiplies a scheduler's)
    scheduler_interval: str = "epoch"  # step the schedulers after every epoch, or after every optimizer step
    device: str = "auto"  # CUDA when present, else CPU
    deterministic: bool | None = None  # None: on for CPU, off for CUDA
    monitor: str = "val_loss"  # the metric of the best checkpoint and of early stopping
    patience: int | None = None  # early stopping, in epochs without improvement of `monitor`

    def __post_init__(self) -> None:
        _validated(self, _OPTION_CHECKS, keywords=True)


@dataclass(frozen=True)
class SaveOptions:
    """Where and how often checkpoints are written, and which are kept. No ``run_dir``: nothing is saved."""

    run_dir: str | None = None
    save_every: int | None = None  # optimizer steps; a checkpoint ends every epoch in any case
    save_every_seconds: float | None = None
    keep_last: int = 2
    keep_best: int = 1  # by `monitor`
    async_save: bool = False  # write in a background thread while training goes on

    def __post_init__(self) -> None:
        _validated(self, _OPTION_CHECKS, keywords=True)


@dataclass(frozen=True)
class ShowOptions:
    """What the run prints and logs."""

    progress: bool = True  # a progress bar per epoch (on a terminal, or in a notebook)
    plot: bool = True  # in a notebook, the loss and accuracy curves as one figure updated each epoch
    quiet: bool = False  # no epoch lines, no progress bar, no curves shown
    tensorboard: bool = False  # also log the epoch metrics to run_dir/tensorboard

    def __post_init__(self) -> None:
        _validated(self, _OPTION_CHECKS, keywords=True)


OPTION_CLASSES = (LoopOptions, SaveOptions, ShowOptions)


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``etappe train`` needs. The defaults train the seed CNN on the embedded ``digits`` set."""

    data: str = "digits"
    model: str = "cnn"
    model_kwargs: dict = field(default_factory=dict)
    epochs: int = 20
    batch_size: int = LoopOptions.batch_size
    lr: float = 5e-3
    optimizer: str = "adam"
    momentum: float = 0.0
    weight_decay: float | None = None  # None: the optimizer's own default (0.01 for AdamW, 0 for SGD and Adam)
    loss: str = "auto"  # cross-entropy for classification, mse for regression
    scheduler: str = "none"
    scheduler_interval: str = LoopOptions.scheduler_interval
    clip_grad_norm: float | None = LoopOptions.clip_grad_norm
    precision: str = LoopOptions.precision
    accumulate: int = LoopOptions.accumulate
    step_size: int = 1  # StepLR
    gamma: float = 0.9  # StepLR, ExponentialLR
    compile: bool = LoopOptions.compile
    ema: float | None = LoopOptions.ema
    warmup_steps: int = LoopOptions.warmup_steps
    seed: int = LoopOptions.seed
    device: str = LoopOptions.device
    channels_last: bool | None = None  # conv models in channels-last memory format; None: etappe's own models only
    deterministic: bool | None = LoopOptions.deterministic
    num_workers: int = LoopOptions.num_workers
    data_dir: str | None = None
    run_dir: str | None = SaveOptions.run_dir  # None: runs/<data>-<model>
    save_every: int | None = SaveOptions.save_every
    save_every_seconds: float | None = SaveOptions.save_every_seconds
    async_save: bool = SaveOptions.async_save
    keep_last: int = SaveOptions.keep_last
    strategy: str = "ddp"  # under torchrun: replicate (DDP) or shard (FSDP2) the model
    keep_best: int = SaveOptions.keep_best
    monitor: str = LoopOptions.monitor
    patience: int | None = LoopOptions.patience
    quiet: bool = ShowOptions.quiet
    tensorboard: bool = ShowOptions.tensorboard

    def __post_init__(self) -> None:
        _validated(self, _CHECKS)
        if self.momentum and self.optimizer != "sgd":
            raise UsageError(f"--momentum applies to --optimizer sgd; {self.optimizer} keeps its own moving averages "
                             "(betas): drop --momentum, or use --optimizer sgd")
        if self.run_dir:  # a URL etappe cannot honour is refused here, never made a local folder of that name
            from etappe import rundir

            rundir.location(self.run_dir)
        if self.strategy == "fsdp" and self.async_save:
            raise UsageError("--async-save does not apply to --strategy fsdp (sharded state is saved by every rank "
                             "together); drop one of them")

    @property
    def run_name(self) -> str:
        return f"{self.data.replace(':', '_').replace('/', '_')}-{self.model.replace(':', '_')}"

    def resolved_run_dir(self) -> Path | str:
        """The run folder: a Path, or an s3:// URL as its string (etappe.rundir)."""
        from etappe import rundir

        return rundir.location(self.run_dir) if self.run_dir else Path("runs") / self.run_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | os.PathLike | None = None) -> "TrainConfig":
        """A config from a dict of field values (TOML's, JSON's); a bad value raises UsageError naming the key,
        and ``source``, the file it came from, when given."""
        where = f"{source}: " if source is not None else ""
        if not isinstance(d, Mapping):
            raise UsageError(f"{where}expected a table of config keys, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise UsageError(f"{where}unknown config keys {', '.join(map(str, unknown))}; "
                             f"known keys: {', '.join(sorted(known))}")
        try:
            return cls(**d)
        except ConfigValueError as exc:
            if source is None:
                raise
            raise UsageError(exc.describe(source)) from None

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def options(self, cls: type) -> Any:
        """This config's values of the option class ``cls``'s fields (LoopOptions, SaveOptions, ShowOptions); the
        fields a config does not hold keep their defaults."""
        mine = {f.name for f in fields(self)}
        return cls(**{f.name: getattr(self, f.name) for f in fields(cls) if f.name in mine})


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
    "precision",
    "accumulate",
    "compile",  # compiled kernels round differently: a run resumed in the other mode is not exact
    "ema",
    "warmup_steps",
    "seed",
    "channels_last",  # the memory layout changes float rounding: a run resumed in the other one is not exact
    # what a Trainer made in Python without a config derives from the objects it was given (Trainer.run_config)
    "shuffle",
    "models",
    "optimizers",
    "schedulers",
    "loss_fn",
    "train_data",  # its type, length and, for tensors, a checksum of their bytes (Trainer._derived_config)
)

# What a key missing from a config saved by an older etappe meant: runs before channels-last trained in NCHW.
SAVED_BEFORE = {"channels_last": False, "precision": "32", "accumulate": 1, "compile": False, "ema": None,
                "warmup_steps": 0}
# Saved with every config from version 2 on (``Run.saved_config``). Version 1 (no key) saved weight_decay 0.0 for
# the default and AdamW then trained with 0.01; from version 2 the config holds the weight decay trained with.
CONFIG_VERSION = 2


def as_trained(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config as the run was trained: the keys an older etappe did not save filled in (``SAVED_BEFORE``),
    and a version-1 AdamW weight_decay of 0.0 read as the 0.01 it trained with. The version key itself dropped."""
    config = {**SAVED_BEFORE, **saved}
    version = config.pop("config_version", 1)
    if version == 1 and config.get("optimizer") == "adamw" and config.get("weight_decay") == 0.0:
        config["weight_decay"] = 0.01
    return config


def config_differences(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable differences in run-defining keys, e.g. ``batch_size: 32 -> 64`` or, inside the config a
    Trainer derives from its objects, ``optimizers.optimizer.param_groups[0].lr: 0.1 -> 0.2``."""
    saved, new = as_trained(saved), {**SAVED_BEFORE, **new}
    out: list[str] = []
    for key in RUN_DEFINING:
        if key == "train_data" and key not in saved:  # saved before the data was recorded: nothing to compare
            continue
        _differences(key, saved.get(key), new.get(key), out)
    return out


def _differences(where: str, old: Any, new: Any, out: list[str]) -> None:
    if isinstance(old, Mapping) and isinstance(new, Mapping) and old and set(old) == set(new):
        for k in old:
            _differences(f"{where}.{k}", old[k], new[k], out)
    elif isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and old and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            _differences(f"{where}[{i}]", a, b, out)
    elif old != new:
        out.append(f"{where}: {old!r} -> {new!r}")


def check_resume(where: str | os.PathLike, saved: Mapping[str, Any], new: Mapping[str, Any], allow: bool) -> list[str]:
    """The one check every resume passes, the CLI's and the Trainer's: a run-defining difference between the saved
    config and the new one is refused (UsageError) unless ``allow``. Returns the differences (allowed ones)."""
    differences = config_differences(saved, new)
    changed = _optimizer_type_changes(saved, new)
    if changed:  # not even when allowed: the saved optimizer state (Adam's moments) does not fit another type's
        raise UsageError(
            f"{where} was trained with another type of optimizer ({'; '.join(changed)}); its saved state cannot be "
            "loaded into that one, even with --allow-config-change (allow_config_change=True). Use a new run folder"
        )
    fixed = [d for d in differences if d.startswith("warmup_steps:")]
    if fixed:  # the saved warm-up scheduler has its length built in; another length would be recorded, not run
        raise UsageError(
            f"{where} was trained with another warm-up ({fixed[0]}); it cannot change once the run started, even "
            "with --allow-config-change (allow_config_change=True). Use a new run folder"
        )
    if differences and not allow:
        raise UsageError(
            f"{where} was trained with a different config ({'; '.join(differences)}); resuming would make it a "
            "different run. Use a new run folder, or allow the change: --allow-config-change "
            "(allow_config_change=True in Python)"
        )
    return differences


def _optimizer_type_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``optimizer: 'adam' -> 'sgd'`` (the CLI's config) or ``optimizers.optimizer.type: 'Adam' -> 'SGD'`` (a
    Trainer's derived one), for each optimizer whose type differs."""
    out = []
    if isinstance(saved.get("optimizer"), str) and isinstance(new.get("optimizer"), str) \
            and saved["optimizer"] != new["optimizer"]:
        out.append(f"optimizer: {saved['optimizer']!r} -> {new['optimizer']!r}")
    old_opts, new_opts = saved.get("optimizers"), new.get("optimizers")
    if isinstance(old_opts, Mapping) and isinstance(new_opts, Mapping):
        for name in old_opts.keys() & new_opts.keys():
            a, b = old_opts[name], new_opts[name]
            if isinstance(a, Mapping) and isinstance(b, Mapping) and a.get("type") != b.get("type"):
                out.append(f"optimizers.{name}.type: {a.get('type')!r} -> {b.get('type')!r}")
    return out


def read_toml(path: str | Path) -> dict:
    """Read a TOML config file whose keys are TrainConfig fields (dashes or underscores)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    data = {k.replace("-", "_"): v for k, v in raw.items()}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"{path}: unknown keys {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    return data


# ------------------------------------------------------------------------------------------- validation
# Each field's rule, checked in TrainConfig.__post_init__ before anything is built or written. A value from TOML
# or JSON arrives with any type: a string where a number belongs, a float where an integer does, a bool (which
# Python counts as an int) where a count does.

class ConfigValueError(UsageError):
    """A config field with a value of the wrong type or out of range. Its message names the flag (``--lr``);
    ``describe(source)`` names the key as a file writes it (``run.toml: lr = '0.01' ...``)."""

    def __init__(self, name: str, value: Any, expected: str, choices: Sequence[str] | None = None) -> None:
        self.name, self.value, self.expected, self.choices = name, value, expected, choices
        super().__init__(self.describe())

    def describe(self, source: str | os.PathLike | None = None, keyword: bool = False) -> str:
        if self.choices is not None and isinstance(self.value, str):
            what = f"unknown {self.name.replace('_', ' ')} {self.value!r}; choose one of: {', '.join(self.choices)}"
            return f"{source}: {what}" if source is not None else what
        shown = _shown(self.value)
        if keyword:
            return f"{self.name}={shown} is not valid; expected {self.expected}"
        if source is None:
            return f"--{self.name.replace('_', '-')} {shown} is not valid; expected {self.expected}"
        return f"{source}: {self.name} = {shown} is not valid; expected {self.expected}"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


INT_MAX = 2**63 - 1  # what torch takes as a count


def _is_number_text(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def _integer(low: int, expected: str, optional: bool = False, high: int = INT_MAX) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if value is None and optional:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            hint = " (a number, not a string: write it without quotes)" if _is_number_text(value) else ""
            raise ConfigValueError(name, value, expected + hint)
        return value
    return check


def _number(low: float, strict: bool, expected: str, optional: bool = False) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if value is None and optional:
            return value
        try:
            number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        except OverflowError:  # an int beyond any float
            number = math.nan
        if not math.isfinite(number) or not (number > low if strict else number >= low):
            hint = " (a number, not a string: write it without quotes)" if _is_number_text(value) else ""
            raise ConfigValueError(name, value, expected + hint)
        return number
    return check


def _flag(optional: bool = False) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if not (isinstance(value, bool) or (value is None and optional)):
            raise ConfigValueError(name, value, "true or false" + (" (or unset for the default)" if optional else ""))
        return value
    return check


def _text(optional: bool = False, path: bool = False) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if value is None and optional:
            return value
        if path and isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value or "\0" in value:
            raise ConfigValueError(name, value, "a non-empty string" + (" (a path)" if path else ""))
        return value
    return check


def _choice(choices: Sequence[str], shown: Sequence[str] | None = None) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if not isinstance(value, str) or value not in choices:
            listed = shown or choices
            raise ConfigValueError(name, value, f"one of: {', '.join(listed)}", choices=listed)
        return value
    return check


def _json_value(value: Any) -> Any:
    """``value`` as JSON holds it (tuples become lists), or TypeError/ValueError: a config is saved as JSON."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(value)
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _json_value(v) for k, v in value.items()}
    raise TypeError(value)


def _model_kwargs(name: str, value: Any) -> Any:
    try:
        if not isinstance(value, Mapping):
            raise TypeError(value)
        return _json_value(value)
    except (TypeError, ValueError):
        raise ConfigValueError(
            name, value, "a table of keyword arguments with plain values (strings, numbers, booleans, lists, tables)"
        ) from None


def _precision(name: str, value: Any) -> Any:
    """One of PRECISIONS; the number 32 (TOML's ``precision = 32``) is "32"."""
    if isinstance(value, int) and not isinstance(value, bool) and value == 32:
        value = "32"
    return _choice(PRECISIONS)(name, value)


def _fraction(name: str, value: Any) -> Any:
    """An EMA decay: a number strictly between 0 and 1 (0.999 is typical), or unset."""
    if value is None:
        return value
    number = _number(0, True, "a number between 0 and 1, such as 0.999")(name, value)
    if number >= 1:
        raise ConfigValueError(name, value, "a number between 0 and 1, such as 0.999")
    return number


_POSITIVE = "a positive integer"
_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "data": _text(),
    "model": _text(),
    "model_kwargs": _model_kwargs,
    "epochs": _integer(1, _POSITIVE),
    "batch_size": _integer(1, _POSITIVE),
    "lr": _number(0, True, "a positive number"),
    "optimizer": _choice(OPTIMIZERS),
    "momentum": _number(0, False, "a number, 0 or more"),
    "weight_decay": _number(0, False, "a number, 0 or more", optional=True),
    "loss": _choice(LOSSES + ("auto",), shown=LOSSES),
    "scheduler": _choice(SCHEDULERS),
    "scheduler_interval": _choice(("epoch", "step")),
    "step_size": _integer(1, _POSITIVE),
    "gamma": _number(0, True, "a positive number"),
    "clip_grad_norm": _number(0, True, "a positive number", optional=True),
    "precision": _precision,
    "accumulate": _integer(1, _POSITIVE),
    "compile": _flag(),
    "ema": _fraction,
    "warmup_steps": _integer(0, "an integer, 0 or more"),
    "seed": _integer(0, "an integer from 0 to 2**32 - 1", high=2**32 - 1),  # numpy's range; the loop derives more
    "device": _text(),
    "deterministic": _flag(optional=True),
    "channels_last": _flag(optional=True),
    "data_dir": _text(optional=True, path=True),
    "num_workers": _integer(0, "an integer, 0 or more"),
    "run_dir": _text(optional=True, path=True),
    "save_every": _integer(1, _POSITIVE, optional=True),
    "save_every_seconds": _number(0, True, "a positive number", optional=True),
    "async_save": _flag(),
    "strategy": _choice(STRATEGIES),
    "keep_last": _integer(0, "an integer, 0 or more"),
    "keep_best": _integer(0, "an integer, 0 or more"),
    "monitor": _choice(METRICS),
    "patience": _integer(1, _POSITIVE, optional=True),
    "quiet": _flag(),
    "tensorboard": _flag(),
}
# A Trainer's options hold what a config cannot: any metric to monitor (a metrics_fn's), the order unshuffled.
_OPTION_CHECKS = {**_CHECKS, "monitor": _text(), "shuffle": _flag(), "progress": _flag(), "plot": _flag()}
