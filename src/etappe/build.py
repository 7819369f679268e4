"""From a TrainConfig to the objects of a run: data, model, loss, optimizer, scheduler, trainer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from etappe import models
from etappe.config import CONFIG_VERSION, TrainConfig
from etappe.data import Dataset, load_dataset
from etappe.errors import UsageError
from etappe.state import eval_mode, seed_everything

LOSSES: dict[str, Callable[[], nn.Module]] = {
    "cross-entropy": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "l1": nn.L1Loss,
    "bce": nn.BCEWithLogitsLoss,
}


def make_loss(name: str, data: Dataset) -> nn.Module:
    if name == "auto":
        name = "cross-entropy" if data.spec.num_classes is not None else "mse"
    if name not in LOSSES:
        raise UsageError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    if name == "cross-entropy" and data.spec.num_classes is None:
        raise UsageError(f"loss 'cross-entropy' needs a classification data set; {data.spec.name!r} is regression (use mse or l1)")
    if name in ("mse", "l1") and data.spec.num_classes is not None:
        raise UsageError(
            f"loss {name!r} needs real-valued targets; {data.spec.name!r} has class labels (use cross-entropy)"
        )
    if name == "bce" and data.spec.num_classes is not None:
        # BCEWithLogitsLoss needs float targets shaped like the outputs (multi-label 0/1), not one class index each
        raise UsageError(f"loss 'bce' needs 0/1 targets shaped like the model's outputs; {data.spec.name!r} has one "
                         "class label per sample (use cross-entropy)")
    return LOSSES[name]()


# Each optimizer's own default weight decay, used when the config leaves it unset (None); 0 is honoured as 0.
DEFAULT_WEIGHT_DECAY = {"sgd": 0.0, "adam": 0.0, "adamw": 0.01}


def weight_decay(config: TrainConfig) -> float:
    """The config's weight decay, or its optimizer's default when unset."""
    return DEFAULT_WEIGHT_DECAY[config.optimizer] if config.weight_decay is None else config.weight_decay


def make_optimizer(config: TrainConfig, params: Any) -> torch.optim.Optimizer:
    decay = weight_decay(config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=decay)


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    if config.scheduler == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.gamma)
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return None


@dataclass
class Run:
    config: TrainConfig
    data: Dataset
    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def saved_config(self) -> dict:
        """The config as saved in checkpoints: enough to rebuild the model from the checkpoint alone."""
        return {**self.config.to_dict(), "data_spec": self.data.spec.to_dict(), "config_version": CONFIG_VERSION}


def build_run(config: TrainConfig) -> Run:
    """Load the data and build model, loss, optimizer and scheduler, seeded from ``config.seed``."""
    data = load_dataset(config.data, data_dir=config.data_dir, seed=config.seed)
    if config.monitor == "val_accuracy" and data.spec.num_classes is None:
        raise UsageError(f"--monitor val_accuracy needs class labels; {data.spec.name!r} is regression "
                         "(monitor val_loss or train_loss)")
    # saved resolved, as channels_last is: the run keeps the decay it trained with if a default changes
    config = config.replace(weight_decay=weight_decay(config))
    seed_everything(config.seed)
    model = build_model(config.model, data.spec.input_shape, data.spec.num_outputs, config.model_kwargs)
    # oneDNN's convolutions (and cuDNN's) run faster on NHWC: 1.2-1.4x per step for the built-in CNN on 2 CPU cores.
    # Not by default for a user's model: a forward that .view()s a convolution's output fails on NHWC. The choice
    # is saved resolved (True/False) in the run's config, so resume and eval rebuild the same layout.
    own_model = config.model in models.MODELS
    if config.strategy == "fsdp":  # FSDP shards the parameters as they are laid out: kept NCHW
        config = config.replace(channels_last=False)
    elif config.channels_last is None:
        config = config.replace(channels_last=own_model)
    if config.channels_last:
        converted = to_channels_last(model)
        if converted and not own_model:
            _probe_channels_last(model, data.spec.input_shape)
    if config.strategy == "fsdp":
        from etappe import distributed
        from etappe.loop import pick_device

        device = pick_device(config.device)
        if distributed.init_from_env(device):
            distributed.shard(model, device)  # before the optimizer, which must hold the sharded parameters
    loss_fn = make_loss(config.loss, data)
    optimizer = make_optimizer(config, model.parameters())
    return Run(config, data, model, loss_fn, optimizer, make_scheduler(config, optimizer))


def build_model(name: str, input_shape: tuple[int, ...], num_outputs: int, kwargs: dict[str, Any]) -> nn.Module:
    """``models.build`` (which checks the factory's signature), and a check that what came back is a module."""
    model = models.build(name, tuple(input_shape), num_outputs, **kwargs)
    if not isinstance(model, nn.Module):
        raise UsageError(f"model {name!r} returned a {type(model).__name__}, expected a torch.nn.Module; etappe calls "
                         "a model factory as factory(input_shape=..., num_outputs=..., **model_args)")
    return model


def to_channels_last(model: nn.Module) -> bool:
    """Put a model with 2-d convolutions (4-d parameters) in channels-last memory format; False if it has none."""
    if not any(p.dim() == 4 for p in model.parameters()):
        return False
    model.to(memory_format=torch.channels_last)
    return True


def _probe_channels_last(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """One sample through a user's model in eval mode (nothing updated): a .view() of a channels-last activation
    fails, and the error should name the layout, not the data."""
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(1, *input_shape))
    except Exception as exc:  # noqa: BLE001 -- any other failure is check_shapes' to report, with its context
        if isinstance(exc, RuntimeError) and "view size is not compatible" in str(exc):
            raise UsageError("--channels-last: the model's forward calls .view() on a convolution's output, which "
                             "fails in channels-last memory format; use .reshape() or .flatten() there, or drop "
                             "--channels-last") from None


def make_trainer(run: Run, *, allow_config_change: bool = False) -> Any:
    """The run's Trainer: its objects, and the config's values of the Trainer's options."""
    from etappe.config import LoopOptions, SaveOptions, ShowOptions
    from etappe.loop import Trainer

    c = run.config
    return Trainer(
        run.model, run.optimizer, run.loss_fn,
        train_data=run.data.train, val_data=run.data.test, scheduler=run.scheduler,
        loop=c.options(LoopOptions),
        saving=dataclasses.replace(c.options(SaveOptions), run_dir=str(c.resolved_run_dir())),
        show=c.options(ShowOptions),
        config=run.saved_config(), allow_config_change=allow_config_change, num_outputs=run.data.spec.num_outputs,
    )
