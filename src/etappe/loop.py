"""The training and test loops. The order of work in a training step lives here and only here.

    for epoch in range(start_epoch, epochs):
        model.train()
        for batch in this epoch's batches, from the resume position:
            forward, loss, zero_grad, backward, clip, optimizer.step()   (or the user's step_fn)
            scheduler.step() if stepped per batch
            count the step; save if a step or time cadence is due, or if preempted (then stop)
        model.eval(); with torch.inference_mode() (no_grad for a sharded model): evaluate on validation data
        scheduler.step() if stepped per epoch
        append the epoch to the history, write metrics, print the summary line
        save (end of every epoch); stop early if the monitored metric stopped improving
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from etappe import distributed, log, rundir
from etappe.checkpoint import sharded
from etappe.config import OPTION_CLASSES, LoopOptions, SaveOptions, ShowOptions, check_resume, monitor_mode
from etappe.data.sampler import EpochBatchSampler, ResumableBatches
from etappe.data.sets import TensorData
from etappe.errors import EtappeError, TrainingError, UsageError, first_line
from etappe.state import EMA, History, PerRank, Progress, derive_seed, eval_mode, seed_everything, unwrap

# The names of what a checkpoint holds besides the user's objects (Trainer.state_objects).
_RESERVED = {"ema", "scaler", "warmup", "progress", "history", "per_rank", "config"}
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the run stopped cleanly and can be resumed


class Preempted(EtappeError):
    """SIGTERM or SIGINT arrived; a checkpoint of the current step was written."""

    exit_code = PREEMPTED_EXIT_CODE


StepFn = Callable[[Any], "torch.Tensor | Mapping[str, torch.Tensor | float]"]


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``auto``/None: CUDA when present, else CPU; otherwise the device named."""
    if device is None or device == "auto":
        return torch.device("cuda", distributed.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
    return chosen


def set_deterministic(device: torch.device, deterministic: bool | None) -> bool:
    """Turn on torch's deterministic algorithms (default: on for CPU, off for CUDA). Returns the setting."""
    if deterministic is None:
        deterministic = device.type == "cpu"
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(deterministic, warn_only=device.type == "cuda")
    if deterministic:
        # Filling fresh memory with NaN is a debugging aid of deterministic mode, not needed for exactness (every
        # kernel writes what it allocates); it costs a fill per allocation.
        torch.utils.deterministic.fill_uninitialized_memory = False
    return deterministic


def to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def is_classification(output: torch.Tensor, target: torch.Tensor) -> bool:
    return output.ndim == 2 and output.shape[1] > 1 and not target.is_floating_point()


def evaluate(
    model: nn.Module,
    data: Any,
    loss_fn: Callable | None = None,
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Average loss (weighted by samples) and, for classification, accuracy of ``model`` on ``data``.

    ``data`` is a TensorData, any map-style Dataset of (input, target) pairs, or a DataLoader. The model is put
    in eval mode under ``torch.inference_mode()`` and returned to the mode it was in.
    """
    device = pick_device(device) if device is not None else next(model.parameters(), torch.empty(0)).device
    loss_sum, correct, count = 0.0, 0, 0
    classification = False
    with eval_mode(model), no_grad(model):
        for x, y in _eval_batches(data, batch_size):
            x, y = to_device(x, device), to_device(y, device)
            out = model(x)
            n = len(y)
            if loss_fn is not None:
                loss_sum += float(loss_fn(out, y)) * n
            if is_classification(out, y):
                classification = True
                correct += int((out.argmax(1) == y).sum())
            count += n
    result = {"samples": count}
    if loss_fn is not None:
        result["loss"] = loss_sum / max(count, 1)
    if classification:
        result["accuracy"] = correct / max(count, 1)
    return result


def _eval_batches(data: Any, batch_size: int) -> Iterator:
    if isinstance(data, TensorData):
        for start in range(0, len(data), batch_size):
            yield data.batch(torch.arange(start, min(start + batch_size, len(data))))
    elif isinstance(data, torch.utils.data.DataLoader):
        yield from data
    else:
        yield from torch.utils.data.DataLoader(data, batch_size=batch_size)


def no_grad(model: nn.Module):
    """``torch.inference_mode()``, or ``torch.no_grad()`` for a sharded (FSDP2) model: the parameters it gathers
    for the forward are reused by training, and inference tensors cannot be."""
    return torch.no_grad() if sharded.is_sharded_module(model) else torch.inference_mode()


def check_shapes(model: nn.Module, data: TensorData, num_outputs: int | None) -> None:
    """Run two samples through ``model`` in eval mode and say plainly when the shapes do not fit the data."""
    x, _ = data.batch(torch.arange(min(2, len(data))))
    x = x.to(next(model.parameters(), torch.empty(0)).device)
    try:
        with eval_mode(model), no_grad(model):
            out = model(x)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(
            f"the model does not accept the data's input shape {tuple(x.shape[1:])} (one sample): {first_line(exc)}"
        ) from None
    if num_outputs is not None and tuple(out.shape[1:]) not in ((num_outputs,),):
        raise UsageError(
            f"the model's output shape {tuple(out.shape[1:])} (one sample) does not fit the data, "
            f"which needs ({num_outputs},)"
        )


@contextmanager
def preemption_guard() -> Iterator[dict]:
    """While training, SIGTERM and the first Ctrl-C only set a flag (the loop saves and stops at the end of the
    step); a second Ctrl-C stops at once. Outside the main thread nothing is installed."""
    flag = {"signal": None}
    if sys.platform == "win32" or not _in_main_thread():
        yield flag
        return

    def handler(signum: int, _frame: Any) -> None:
        if flag["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["signal"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class MicroBatches(list):
    """The micro-batches of one optimizer step, when gradients are accumulated (``accumulate`` > 1)."""


class SupervisedStep:
    """The seeds' training step, and the Trainer's ``step_fn`` unless it is given another: forward, loss,
    zero_grad, backward, clip, optimizer.step(). Returns the loss as a float; a non-finite loss steps nothing (the
    loop stops on it). ``model`` is the module that computes (under DDP its wrapper, which averages the gradients;
    compiled, the compiled one).

    Given ``MicroBatches`` it accumulates: each micro-batch's loss, weighted by its share of the samples (1/N for
    N equal ones), is backpropagated in turn (under DDP without the all-reduce but for the last), then one step.
    ``precision`` "bf16-mixed" or "16-mixed" runs the forward and loss under autocast; with fp16 a ``scaler``
    (torch.amp.GradScaler) scales the loss, unscales before clipping, and skips a step whose gradients are not
    finite (``skipped`` says so; the loop counts it)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                 clip_grad_norm: float | None = None, precision: str = "32", scaler: Any = None) -> None:
        self.model, self.optimizer, self.loss_fn, self.clip_grad_norm = model, optimizer, loss_fn, clip_grad_norm
        self.precision, self.scaler, self.skipped = precision, scaler, False

    def __call__(self, batch: Any) -> dict[str, float]:
        parts = batch if isinstance(batch, MicroBatches) else [batch]
        sizes = [_batch_len(part) for part in parts]
        total, loss_sum = sum(sizes), 0.0
        for i, (part, n) in enumerate(zip(parts, sizes)):
            x, y = _pair(part)
            last = i == len(parts) - 1
            with self._no_sync(last), autocast(x.device, self.precision):
                loss = self.loss_fn(self.model(x), y)
            value = loss.item()
            if not math.isfinite(value):
                return {"loss": value}
            if i == 0:
                self.optimizer.zero_grad(set_to_none=True)
            if len(parts) > 1:
                loss, loss_sum = loss * (n / total), loss_sum + value * n
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.clip_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.skipped = self.scaler.get_scale() < scale  # the scale drops exactly when the step was skipped
        else:
            self.optimizer.step()
        return {"loss": value if len(parts) == 1 else loss_sum / total}

    def _no_sync(self, last: bool) -> Any:
        """Under DDP, no gradient all-reduce for a micro-batch but the last of a step."""
        if not last and isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return nullcontext()


def _pair(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    shown = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (list, tuple)) else f"a {type(batch).__name__}"
    raise UsageError(f"the built-in step takes (input, target) batches; a batch of this data is {shown}: give a data "
                     "set of (input, target) pairs, or a step_fn that takes these batches")


def autocast(device: torch.device, precision: str) -> Any:
    """The autocast context of a precision: none for "32", bf16 or fp16 on ``device``'s type otherwise."""
    if precision == "32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16-mixed" else torch.float16)


class Trainer:
    """Runs the seeds' loop for one model and loss, or the user's ``step_fn`` for anything else (a GAN).

    ``model``, ``optimizer`` and ``scheduler`` are each one object or a ``{name: object}`` dict (a checkpoint holds
    them by these names; one object is named ``model``, ``optimizer``, ``scheduler``). The options come in three
    groups, ``loop=LoopOptions(...)``, ``saving=SaveOptions(...)``, ``show=ShowOptions(...)`` (etappe.config, where
    each default is), or as keywords of their field names: ``Trainer(model, opt, loss, train_data=d, batch_size=64,
    run_dir="runs/a")``. Given a ``run_dir`` it saves checkpoints there and, when the folder already holds some,
    resumes from the newest valid one, exactly where it stopped.

    Constructing a Trainer checks its arguments and changes nothing; ``fit`` (or ``resume``) starts the run: the
    device, the process group under torchrun, the run folder. Under torchrun the model is wrapped in
    DistributedDataParallel, unless it is already sharded with FSDP2 (``etappe.distributed.shard`` or
    ``fully_shard``, before its optimizer was made): then every rank saves and loads its own shards through
    torch.distributed.checkpoint.
    """

    def __init__(
        self,
        model: nn.Module | Mapping[str, nn.Module],
        optimizer: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer] | None = None,
        loss_fn: Callable | None = None,
        *,
        train_data: Any,
        val_data: Any = None,
        scheduler: Any = None,
        step_fn: StepFn | None = None,
        metrics_fn: Callable[["Trainer"], Mapping[str, float]] | None = None,
        loop: LoopOptions | None = None,
        saving: SaveOptions | None = None,
        show: ShowOptions | None = None,
        config: Mapping[str, Any] | None = None,
        allow_config_change: bool = False,
        num_outputs: int | None = None,
        **options: Any,
    ) -> None:
        self.models: dict[str, nn.Module] = _named(model, "model")
        self.optimizers: dict[str, Any] = _named(optimizer, "optimizer")
        self.schedulers: dict[str, Any] = _named(scheduler, "scheduler")
        self.loop, self.saving, self.show = _options(loop, saving, show, options)
        self.loss_fn, self.step_fn, self.metrics_fn = loss_fn, step_fn, metrics_fn
        self.val_data, self.allow_config_change, self.num_outputs = val_data, allow_config_change, num_outputs
        self._given_config = dict(config) if config else None
        _check_types(self.models, self.optimizers, self.schedulers, train_data, (loop, saving, show))
        if not self.models:
            raise UsageError("Trainer needs a model (or {name: module, ...} with a step_fn)")
        if step_fn is None and (len(self.models) != 1 or len(self.optimizers) != 1 or loss_fn is None):
            raise UsageError("Trainer needs model, optimizer and loss_fn, or a step_fn that does the step")
        # FSDP2: a model already sharded (fully_shard, before its optimizer was made) is saved shard by shard
        self.sharded = any(sharded.is_sharded_module(m) for m in self.models.values())
        if self.sharded and (step_fn is not None or len(self.models) != 1 or len(self.optimizers) > 1):
            raise UsageError("a sharded (FSDP) model trains here as one model with one optimizer and no step_fn")
        if step_fn is not None and (self.loop.accumulate > 1 or self.loop.precision != "32" or self.loop.compile):
            raise UsageError("accumulate, precision and compile apply to the built-in step; a step_fn does its own "
                             "(torch.autocast, several backward calls before its optimizer step, torch.compile)")
        names = [*self.models, *self.optimizers, *self.schedulers]
        taken = sorted({n for n in names if names.count(n) > 1} | (set(names) & _RESERVED))
        if taken:
            raise UsageError(f"Trainer's models, optimizers and schedulers need names of their own, each unlike "
                             f"{', '.join(sorted(_RESERVED))}: {', '.join(map(repr, taken))} is taken; a checkpoint "
                             "holds them by these names")
        if self.loop.ema is not None and len(self.models) > 1:
            raise UsageError("ema averages one model's weights; with several models, keep an average in your step_fn "
                             "(torch.optim.swa_utils.AveragedModel) and save it as a model of its own")
        if self.sharded and self.loop.ema is not None:
            raise UsageError("ema does not apply to a sharded (FSDP) model: each rank holds only its shards")
        if self.sharded and self.saving.async_save:
            raise UsageError("async_save does not apply to a sharded (FSDP) model; every rank saves its shards together")
        self.train_data, self._collate = self._dataset_of(train_data)
        if len(self.train_data) == 0:
            raise UsageError("train_data is empty: there is nothing to train on")
        if isinstance(self.train_data, TensorData) and step_fn is None:
            check_shapes(unwrap(next(iter(self.models.values()))), self.train_data, num_outputs)
        if step_fn is None:
            _check_optimizer_fits(next(iter(self.models.values())), next(iter(self.optimizers.values())))
        self._check_monitor()
        self.progress, self.history = Progress(), History()
        # a local folder, or an s3:// URL (a URL etappe cannot honour is refused here, in one line)
        self.run_dir = rundir.location(self.saving.run_dir) if self.saving.run_dir is not None else None
        if self.show.tensorboard:
            log.refuse_tensorboard_on(self.run_dir)
        self.store = None
        self.resumed_from: Path | str | None = None
        self._looked = False  # resume() has looked at the run folder: what it holds, this Trainer continues
        # The newest step this Trainer has seen in its run folder or written there: taking the folder (again), a
        # newer one means another Trainer moved the run on meanwhile.
        self._newest_seen: int | None = None
        self._resumed_at: float | None = None  # where the run was resumed, in epochs done (History.resumed)
        self._started = False

    def _dataset_of(self, data: Any) -> tuple[Any, Callable]:
        """The data set to train on and its collate function. A DataLoader's own sampler cannot start mid-epoch:
        its dataset, batch size, collate function, workers and shuffling are kept, its sampler replaced."""
        if not isinstance(data, torch.utils.data.DataLoader):
            return data, torch.utils.data.default_collate
        if isinstance(data.dataset, torch.utils.data.IterableDataset):
            raise UsageError("an IterableDataset cannot be resumed exactly; give a map-style Dataset")
        self.loop = dataclasses.replace(
            self.loop, batch_size=data.batch_size or self.loop.batch_size, num_workers=data.num_workers,
            shuffle=isinstance(data.sampler, torch.utils.data.RandomSampler),
        )
        warnings.warn(
            "etappe replaces the DataLoader's sampler with its resumable one (same dataset, batch size, "
            "collate_fn, workers; shuffled if the loader was) so a run can resume mid-epoch exactly",
            stacklevel=3,
        )
        return data.dataset, data.collate_fn

    def _start(self) -> None:
        """Everything with side effects, once, when the run starts (``fit`` or ``resume``): the device and
        determinism, the process group, the models on the device, the batches of this rank, the step, the run
        folder and its checkpoint store."""
        if self._started:
            return
        loop = self.loop
        self.device = pick_device(loop.device)
        self.deterministic = set_deterministic(self.device, loop.deterministic)
        distributed.init_from_env(self.device)
        self.rank, self.world_size, self.main = distributed.rank(), distributed.world_size(), distributed.is_main()
        self.quiet = self.show.quiet or not self.main
        self.show_progress = self.show.progress and not self.quiet
        # What makes this run this run, saved in every checkpoint and compared on resume: the CLI's config, or
        # what the objects given here say of themselves.
        self.config = self._given_config or self._derived_config()
        for m in self.models.values():
            m.to(self.device)
        if isinstance(self.train_data, TensorData) and self.device.type == "cuda":
            self.train_data = self.train_data.to(self.device)
        self.batches = ResumableBatches(len(self.train_data), loop.batch_size, seed=loop.seed, shuffle=loop.shuffle,
                                        rank=self.rank, world_size=self.world_size)
        self.per_rank = PerRank(self.progress, self.rank, self.world_size)
        if loop.precision == "16-mixed" and self.device.type != "cuda":
            raise UsageError(f"precision 16-mixed (fp16 with a gradient scaler) needs CUDA; this run is on "
                             f"{self.device.type}: use bf16-mixed there (--precision bf16-mixed)")
        self.scaler = torch.amp.GradScaler("cuda") if loop.precision == "16-mixed" else None
        self.ema = EMA(unwrap(next(iter(self.models.values()))), loop.ema) if loop.ema is not None else None
        if loop.warmup_steps:  # per optimizer step, before (and chained with) any scheduler of the run
            self.schedulers["warmup"] = torch.optim.lr_scheduler.LinearLR(
                next(iter(self.optimizers.values())), start_factor=1 / (loop.warmup_steps + 1),
                total_iters=loop.warmup_steps)
        if self.step_fn is None:
            (model,), (optimizer,) = self.models.values(), self.optimizers.values()
            if self.world_size > 1 and not self.sharded:
                model = nn.parallel.DistributedDataParallel(
                    model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if loop.compile:
                model = torch.compile(model)
            self.step_fn = SupervisedStep(model, optimizer, self.loss_fn, loop.clip_grad_norm, loop.precision,
                                          self.scaler)
        if self.run_dir is not None:
            log.ensure_writable(self.run_dir)
            self.store = rundir.open_store(  # RUN/checkpoints, on a local disk or an object store
                self.run_dir, keep_last=self.saving.keep_last, keep_best=self.saving.keep_best,
                monitor=loop.monitor, mode=monitor_mode(loop.monitor), async_save=self.saving.async_save,
            )
        if not self.deterministic and not self.quiet:
            log.warn("deterministic algorithms are off (the default on CUDA): a resumed run will be close to, not "
                     "bit-identical with, an uninterrupted one; pass --deterministic for exactness")
        self._started = True

    def _step_batches(self, epoch: int, start: int) -> Iterator[Any]:
        """The batches of ``epoch`` from batch ``start``, one per optimizer step: with ``accumulate`` N, N micro-
        batches at a time (fewer at the end of the epoch). Checkpoints fall between steps, so never inside a
        window: a signal waits for the window's step, and a resumed run starts at a window's first batch."""
        if self.loop.accumulate == 1:
            yield from self._epoch_batches(epoch, start)
            return
        window = MicroBatches()
        for batch in self._epoch_batches(epoch, start):
            window.append(batch)
            if len(window) == self.loop.accumulate:
                yield window
                window = MicroBatches()
        if window:
            yield window

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[Any]:
        if isinstance(self.train_data, TensorData) and self.loop.num_workers == 0:
            for idx in self.batches.batches(epoch, start):
                yield self.train_data.take(idx.to(self.train_data.x.device))
            return
        loader = torch.utils.data.DataLoader(
            _SeededBatches(self.train_data, self.loop.seed, epoch),
            batch_sampler=_NumberedBatchSampler(EpochBatchSampler(self.batches, epoch, start), start),
            collate_fn=self._collate,
            num_workers=self.loop.num_workers,
            pin_memory=self.device.type == "cuda",
            # Its own generator: creating the iterator would otherwise draw from torch's global RNG, and a
            # resumed run would draw at a different moment than an uninterrupted one.
            generator=torch.Generator().manual_seed(derive_seed(self.loop.seed, epoch)),
        )
        for batch in loader:
            yield to_device(batch, self.device)

    # ------------------------------------------------------------ the loop

    def fit(self, epochs: int) -> History:
        """Train until ``epochs`` epochs are done in all (a resumed run continues; a finished one is extended).
        A run with more epochs done than ``epochs`` is refused (UsageError), before anything is restored."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise UsageError(f"epochs={epochs!r} is not valid; expected a positive integer")
        if not self._looked:
            self.resume(epochs=epochs)  # starts the run first
        p = self.progress
        if p.stopped_early or p.epoch > epochs or (p.epoch == epochs and p.batches_done_in_epoch > 0):
            self._let_go()  # nothing to train: the run folder is free for the next Trainer (a notebook's next cell)
            self._refuse_fewer_epochs(p.epoch, epochs, p.batches_done_in_epoch)
            if not self.quiet:
                log.info(f"{self.run_dir} stopped early after epoch {p.epoch} ({self.loop.monitor} no longer improved)")
            return self.history
        if self._resumed_at is not None and p.epoch < epochs:  # the curves mark it once training goes on from it
            self.history.mark_resumed(self._resumed_at)
            self._resumed_at = None
        curves = log.live_curves(self.show.plot and not self.quiet, self.history)  # in a notebook: one figure
        with self._writing() as tensorboard, preemption_guard() as preempt:
            last_save = time.monotonic()
            while p.epoch < epochs:
                for m in self.models.values():
                    m.train()
                bar = log.progress_bar(len(self.batches), p.batches_done_in_epoch, p.epoch, epochs, self.show_progress)
                epoch_start = time.perf_counter() - p.seconds_in_epoch
                for batch in self._step_batches(p.epoch, p.batches_done_in_epoch):
                    losses = _as_floats(self.step_fn(batch))
                    bad = next((k for k, v in losses.items() if not math.isfinite(v)), None)
                    if bad is not None:
                        raise self._non_finite(bad, losses[bad])
                    p.skipped_steps += bool(getattr(self.step_fn, "skipped", False))
                    if self.ema is not None:
                        self.ema.update(unwrap(next(iter(self.models.values()))))
                    for name, s in self.schedulers.items():
                        if name == "warmup" or self.loop.scheduler_interval == "step":
                            s.step()
                    parts = batch if isinstance(batch, MicroBatches) else [batch]
                    p.add_batch(sum(_batch_len(part) for part in parts), losses, len(parts))
                    p.seconds_in_epoch = time.perf_counter() - epoch_start
                    bar.update(p, self.world_size)
                    stop, due = self._stop_or_save_due(preempt["signal"] is not None, last_save)
                    if stop:
                        bar.close()
                        path = self.save(wait=True)
                        raise Preempted(self._stopped(preempt["signal"] or "a signal on another rank", path))
                    if due:
                        self.save()
                        last_save = time.monotonic()
                bar.close()
                row = self._end_epoch(epochs)
                curves.update(self.history)
                if tensorboard is not None:
                    log.tensorboard_row(tensorboard, row)
                p.stopped_early = self._should_stop_early(row)  # before the save, so the checkpoint holds it
                self.save({k: v for k, v in row.items() if isinstance(v, (int, float))})
                last_save = time.monotonic()
                if p.stopped_early:
                    if not self.quiet:
                        log.info(f"Stopping early: {self.loop.monitor} has not improved for {self.loop.patience} epochs")
                    break
            # still guarded: an interrupt while the last files are written or the figure is drawn lets them finish
            if self.run_dir is not None and self.main:
                log.write_history(self.run_dir, self.history)
                log.plot_curves(self.run_dir, self.history)
            curves.close(self.history)
        if preempt["signal"] is not None and not self.quiet:
            log.info(f"{preempt['signal']} arrived after the last step: the run is complete, with its last checkpoint")
        return self.history

    def _stopped(self, signal_name: str, path: Path | None) -> str:
        """What the run says when a signal stopped it: what was saved, and the one way to resume it that works."""
        p, run = self.progress, self.run_dir
        from etappe.notebook import in_notebook

        if in_notebook():  # the kernel's interrupt button: the cell is what the user runs, not a command
            if run is None:
                return (f"interrupted ({signal_name}) at step {p.step} (epoch {p.epoch + 1}); nothing was saved, as "
                        "no run_dir was given: pass run_dir= to checkpoint, and to continue by running the cell again")
            return (f"interrupted ({signal_name}): saved step {p.step} to {path or rundir.join(run, 'checkpoints')}; run this cell "
                    "again to continue from there (the same call, with the same run_dir)")
        if run is None:
            return (f"{signal_name} received: stopped at step {p.step} (epoch {p.epoch + 1}); nothing was saved, as "
                    "this Trainer has no run_dir: give it run_dir= to checkpoint, resume and stop safely")
        said = f"{signal_name} received: saved step {p.step} to {path or rundir.join(run, 'checkpoints')}"  # rank 0 knows the path
        if rundir.is_file(rundir.join(run, "config.json")):  # what etappe resume reads: the CLI can rebuild it
            from etappe.models import MODELS

            model = self.config.get("model")  # a module:factory read from the file needs naming (or --trust)
            named = f" --model {shlex.quote(model)}" if isinstance(model, str) and model not in MODELS else ""
            return f"{said}; resume with: etappe resume {shlex.quote(str(run))}{named}"  # a command to paste
        return (f"{said}; resume in Python: call the same etappe.fit(..., run_dir={str(run)!r}) (or Trainer.fit) "
                f"again; evaluate with: etappe eval {shlex.quote(str(run))} --model module:factory --input-shape C,H,W --data NAME")

    @contextmanager
    def _writing(self) -> Iterator[Any]:
        """The run folder while ``fit`` writes to it: this Trainer its one writer (a second one stops here), and
        its tensorboard log open. At the end every checkpoint written in the background is committed; after a
        failure one in flight is still committed (it holds a good state from before the failure), and the next
        ``fit`` resumes from the newest checkpoint first: the objects may hold a step half done (a second Ctrl-C)."""
        tensorboard = None
        if self.store is not None:
            self._take_folder()  # held until close(), below
        try:
            # in the try: a refused tensorboard folder (a link out of the run) lets go of the run folder too
            tensorboard = log.tensorboard_writer(self.run_dir, self.progress.epoch) if self.show.tensorboard and self.main else None
            yield tensorboard
        except BaseException:
            self._looked = False
            self._close_store(after_failure=True)
            raise
        if tensorboard is not None:
            tensorboard.close()
        self._close_store(after_failure=False)  # its buffers freed

    def close(self) -> None:
        """Let go of the run folder: wait for a checkpoint written in the background, then release the writer lock
        that ``resume()`` or ``save()`` took, so another Trainer (a notebook's next cell) may write the run. ``fit``
        releases it itself when it returns; a later ``fit``, ``save`` or ``resume`` takes it again (``fit`` and
        ``save`` are refused if another Trainer moved the run on meanwhile). ``with Trainer(...) as t:`` closes at
        the end of the block. A background save that failed is raised here once; the next save writes afresh."""
        self._close_store(after_failure=False)

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self._close_store(after_failure=kind is not None)

    def _close_store(self, *, after_failure: bool) -> None:
        """``_let_go``, saying how a checkpoint being written in the background failed: the TrainingError, or,
        after a failure (the error to see), a warning."""
        try:
            self._let_go()
        except EtappeError as exc:
            if not after_failure:
                raise TrainingError(f"the last checkpoint could not be written: {exc}") from None
            log.warn(f"the checkpoint being written in the background failed as well: {exc}")

    def _let_go(self) -> None:
        """Let go of the run folder that ``resume`` made this Trainer the writer of (``fit`` takes it again)."""
        if self.store is not None and self.main:
            self.store.close()

    def _take_folder(self) -> None:
        """Become the run folder's one writer, if this Trainer is not already (its first save, ``fit`` after
        ``fit``, ``save`` after ``close``), unless another Trainer has moved the run on past what this one has
        seen: writing from this Trainer's older state would overwrite that Trainer's newer checkpoints (a
        notebook's earlier cell run again). On every rank."""
        newest = None
        if self.main and not self.store.writing:
            self.store.lock()
            steps = [c.step for c in self.store.checkpoints()]
            newest = steps[-1] if steps else None
        newest = distributed.broadcast_object(newest)
        if newest is not None and newest > (self._newest_seen if self._newest_seen is not None else -1):
            if self.main:
                self.store.close()
            raise UsageError(
                f"{self.run_dir} moved on to step {newest}, past this Trainer's step {self.progress.step} (another "
                f"Trainer continued the run): training or saving from here would overwrite those checkpoints. Call "
                f"resume() to continue from step {newest}, or use a new run folder"
            )

    def _stop_or_save_due(self, signalled: bool, last_save: float) -> tuple[bool, bool]:
        """Whether to save and stop (a signal arrived), and whether a save by step or time cadence is due: agreed
        by every rank, as saves are collective."""
        s, step = self.saving, self.progress.step
        due = bool(s.save_every and step % s.save_every == 0) or bool(
            s.save_every_seconds and time.monotonic() - last_save >= s.save_every_seconds)
        if self.world_size > 1:
            signalled, due = distributed.any_rank(signalled, due)
        return signalled, due

    def _non_finite(self, name: str, value: float) -> TrainingError:
        p = self.progress
        what = "the loss" if name == "loss" else f"the step's {name!r}"
        return TrainingError(
            f"{what} became {value} at epoch {p.epoch + 1}, step {p.step + 1}; training stopped and nothing "
            "from this step on was saved (try a lower --lr or --clip-grad-norm)"
        )

    def _end_epoch(self, epochs: int) -> dict[str, Any]:
        p = self.progress
        totals = distributed.all_reduce_sum([p.loss_sum_in_epoch, float(p.samples_in_epoch)])
        samples = totals[1]
        row: dict[str, Any] = {"epoch": p.epoch + 1, "step": p.step, "train_loss": totals[0] / max(samples, 1)}
        for k, v in sorted(p.extra_sums_in_epoch.items()):
            row[f"train_{k}"] = v / max(p.samples_in_epoch, 1)
        if self.val_data is not None and self.loss_fn is not None:
            model = self.ema.module if self.ema is not None else unwrap(next(iter(self.models.values())))
            result = evaluate(model, self.val_data, self.loss_fn)
            row["val_loss"] = result["loss"]
            if "accuracy" in result:
                row["val_accuracy"] = result["accuracy"]
            if self.ema is not None:
                row["val_weights"] = "ema"
        if self.scaler is not None:
            row["skipped_steps"] = p.skipped_steps
        if self.metrics_fn is not None:
            row.update(self.metrics_fn(self))
        if self.optimizers:
            row["lr"] = next(iter(self.optimizers.values())).param_groups[0]["lr"]
        if self.loop.scheduler_interval == "epoch":
            for name, s in self.schedulers.items():
                if name != "warmup":
                    s.step()
        row["seconds"] = p.seconds_in_epoch
        row["samples_per_s"] = samples / p.seconds_in_epoch if p.seconds_in_epoch > 0 else 0.0
        self.history.append(row)
        if self.run_dir is not None and self.main:
            log.write_history(self.run_dir, self.history)
        if not self.quiet:
            log.info(log.epoch_line(row, epochs))
        p.epoch += 1
        p.start_epoch()
        return row

    def _should_stop_early(self, row: Mapping[str, Any]) -> bool:
        p, monitor, patience = self.progress, self.loop.monitor, self.loop.patience
        value = row.get(monitor)
        if value is None:
            if patience is not None and not self._monitor_missing_told and not self.quiet:
                self._monitor_missing_told = True
                log.warn(f"monitor {monitor!r} is not among this run's metrics ({', '.join(row)}): "
                         f"patience={patience} does nothing")
            return False
        higher = monitor_mode(monitor) == "max"
        if p.best_metric is None or (value > p.best_metric if higher else value < p.best_metric):
            p.best_metric, p.epochs_without_improvement = value, 0
        else:
            p.epochs_without_improvement += 1
        return patience is not None and p.epochs_without_improvement >= patience

    def _check_monitor(self) -> None:
        """A ``monitor`` this Trainer can never record is refused now, not found out after the run (when patience
        would never have stopped it). A step_fn's or metrics_fn's metrics are known once an epoch ends."""
        self._monitor_missing_told = False
        monitor, patience = self.loop.monitor, self.loop.patience
        if self.step_fn is not None or self.metrics_fn is not None:
            return
        validating = self.val_data is not None and self.loss_fn is not None
        recorded = ["train_loss", "lr", *(["val_loss", "val_accuracy"] if validating else [])]
        if monitor in recorded:
            return
        if monitor in ("val_loss", "val_accuracy"):
            if patience is not None:
                raise UsageError(f"monitor {monitor!r} needs val_data; without it patience={patience} never stops the "
                                 "run: give val_data, or monitor='train_loss'")
            return  # the best checkpoint falls back to the latest
        raise UsageError(f"monitor {monitor!r} is not a metric this Trainer records ({', '.join(recorded)}); "
                         "name one of those, or add yours with metrics_fn")

    # ------------------------------------------------------------ state

    def state_objects(self) -> dict[str, Any]:
        """Everything a checkpoint holds, by name. The per-rank part (random state) last: restored last."""
        objects: dict[str, Any] = {name: unwrap(m) for name, m in self.models.items()}
        if self.ema is not None:
            objects["ema"] = self.ema.module  # the averaged weights, saved as a model
        objects.update(self.optimizers)
        objects.update(self.schedulers)
        if self.scaler is not None:
            objects["scaler"] = self.scaler
        objects["progress"] = self.progress
        objects["history"] = self.history
        objects["per_rank"] = self.per_rank
        return objects

    def save(self, metrics: Mapping[str, float] | None = None, *, wait: bool = False) -> Path | None:
        """Checkpoint the run now (with ``async_save``, written in the background unless ``wait``)."""
        self._start()
        if self.store is None:
            return None
        if not self._looked:
            self._refuse_saving_over_a_run()
        self._take_folder()
        # Every rank's part (random state, epoch sums) is gathered into the one checkpoint that rank 0 commits,
        # after all ranks reached this point, so a committed checkpoint holds every rank's part.
        self.per_rank.capture(distributed.all_gather_object(self.per_rank.mine()))
        self._newest_seen = max(self.progress.step, self._newest_seen or 0)
        path = None
        if self.sharded:  # every rank writes its shards; rank 0 writes the rest and commits
            objects = {**self.state_objects(), "config": self.config}
            shards = {name: objects.pop(name) for name in [*self.models, *self.optimizers]}
            error = None
            try:
                path = self.store.save(self.progress.step, objects, metrics, sharded=shards)
            except EtappeError as exc:
                error = str(exc)
            failed = [e for e in distributed.all_gather_object(error) if e]  # every rank stops, with one reason
            if failed:
                raise TrainingError(f"saving the checkpoint at step {self.progress.step} failed, training stops: {failed[0]}")
            return path
        if self.main:
            try:
                path = self.store.save(self.progress.step, {**self.state_objects(), "config": self.config}, metrics)
                if wait:
                    self.store.wait()
            except EtappeError as exc:
                raise TrainingError(f"saving the checkpoint at step {self.progress.step} failed, training stops: {exc}") from None
        if self.world_size > 1:
            distributed.barrier()
        return path

    def _refuse_saving_over_a_run(self) -> None:
        """A Trainer that has not resumed the run folder must not add its state to the run there: it has not been
        compared with the run's config, nor does it continue the run's steps."""
        held = distributed.broadcast_object([c.step for c in self.store.checkpoints()] if self.main else None)
        if held:
            raise UsageError(
                f"{self.run_dir} holds a run (checkpoints up to step {held[-1]}); save() would add this Trainer's "
                "state to it without resuming it: call resume() or fit() first to continue that run, or use a new "
                "run folder"
            )
        self._looked = True  # this Trainer starts the run: its next saves continue it

    def resume(self, path: str | Path | None = None, *, epochs: int | None = None) -> Path | str | None:
        """Restore the newest valid checkpoint of the run folder (or ``path``). Returns what was loaded.

        Before anything is restored into the objects, the checkpoint's config is compared with this Trainer's
        (a run-defining difference is refused unless ``allow_config_change``), and, given ``epochs``, a run that
        has more epochs done than that is refused: it cannot be the run asked for."""
        self._start()
        if self.store is None and path is None:
            return None
        if path is None and self.main:
            # resuming the run folder makes this Trainer its one writer: a second one stops here, before it
            # restores or writes anything (config.json included)
            self.store.lock()
        try:
            found = self._resume(path, epochs)
        except BaseException:
            if self.store is not None:
                self.store.close()  # a refused resume lets go of the folder: a corrected call may take it again
            raise
        self._looked = True
        return found

    def _resume(self, path: str | Path | None, epochs: int | None) -> Path | str | None:
        if path is None:
            if self.main:
                try:
                    self.store.wait(clear=True)  # a background save in flight is the newest once committed
                except EtappeError as exc:
                    log.warn(f"the last background save failed, resuming from the checkpoint before it: {exc}")
        if self.store is not None:
            self._newest_seen = max(self._held_steps(path), default=None)  # a bad newest one counts as seen
        if path is None:
            # rank 0 picks, so every rank loads the same one even if a check fails on one rank alone
            path = distributed.broadcast_object(self.store.latest() if self.main else None)
            if path is None:
                return None
        given = path
        with rundir.local_copy(path) as path:  # a checkpoint on an object store: fetched, then read as a local one
            self._restore(path, epochs)
        path = given if rundir.looks_like_url(given) else path
        if self.per_rank.world_size_changed and self.main:
            log.warn(
                f"{path} was written by another number of ranks than the {self.world_size} resuming it: training "
                "continues from it, but not bit-exact (the random states per rank differ)"
            )
        self.resumed_from = path
        p = self.progress
        self._newest_seen = max(self._newest_seen or 0, p.step)
        self._resumed_at = p.epoch + p.batches_done_in_epoch / max(len(self.batches), 1)
        if not self.quiet:
            p = self.progress
            where = self.run_dir if self.run_dir is not None else path
            log.info(f"Resuming {where} from step {p.step} (epoch {p.epoch + 1}, batch {p.batches_done_in_epoch})")
        return self.resumed_from

    def _held_steps(self, path: str | Path | None) -> list[int]:
        """The steps of the run folder's checkpoints, on every rank. A checkpoint from elsewhere (``path`` outside
        the run folder) is refused when the folder holds a run: it would continue another run's state into this
        one's, never compared with its config, over its steps."""
        held = distributed.broadcast_object([(str(c.path), c.step) for c in self.store.checkpoints()]
                                            if self.main else None)
        if held and path is not None and not any(_same_place(path, where) for where, _ in held):
            raise UsageError(
                f"{self.run_dir} holds a run (checkpoints up to step {held[-1][1]}); resume({str(path)!r}) would "
                "continue another run's checkpoint into it, over its steps: resume() that run (no path, or one of "
                "its own checkpoints), or give this Trainer a new run folder to continue the other checkpoint in"
            )
        return [step for _, step in held]

    def _restore(self, path: Path, epochs: int | None) -> None:
        from etappe.checkpoint import load
        from etappe.checkpoint.folder import read, restore

        if path.is_dir():  # an etappe checkpoint: read and verified once, checked, then restored
            entries = read(path)
            saved_config = entries.get("config") if isinstance(entries.get("config"), Mapping) else {}
            # A checkpoint from before configs were derived in Python holds {}: there is nothing to compare.
            differences = check_resume(self.run_dir or path, saved_config, self.config,
                                       allow=self.allow_config_change) if saved_config else []
            progress = entries.get("progress")
            done = progress.get("epoch") if isinstance(progress, Mapping) else None
            if epochs is not None and isinstance(done, int):
                into_next = progress.get("batches_done_in_epoch")
                self._refuse_fewer_epochs(done, epochs, into_next if isinstance(into_next, int) else 0)
            restore(path, entries, self.state_objects())
        else:  # a plain torch.save file: no config, no counters to check
            load(path, **self.state_objects())
            saved_config, differences = {}, []
        if differences:  # allowed: what changed applies from here
            self._apply_changed_hyperparameters(saved_config)

    def _refuse_fewer_epochs(self, done: int, epochs: int, into_next: int = 0) -> None:
        # Training on is what a repeated call asks for; a model of fewer epochs than the run has done cannot be
        # given back (its checkpoint may be pruned), and returning the longer-trained one instead would answer a
        # different question without a word. Batches of the next epoch done (a run stopped mid-epoch) count too.
        if done > epochs or (done == epochs and into_next > 0):
            where = self.run_dir if self.run_dir is not None else "this Trainer"
            so_far = f"{done} epochs" + (f" and {into_next} batches of epoch {done + 1}" if into_next else "")
            raise UsageError(
                f"{where} has {so_far} done; epochs={epochs} asks for fewer: nothing was trained. "
                f"Ask for {done + bool(into_next)} or more to continue it, load its checkpoint with etappe.load, or use a new run folder"
            )

    def _derived_config(self) -> dict[str, Any]:
        """The run-defining config of a Trainer made without one, from the objects it was given: what would make a
        resumed run a different run (the optimizers' hyperparameters, the batch size, the seed, ...)."""
        loss = self.loss_fn
        loss_name = type(loss).__qualname__ if isinstance(loss, nn.Module) or not hasattr(loss, "__qualname__") \
            else loss.__qualname__  # a module's class, or a plain function's name

        def optimizer(opt: Any) -> dict[str, Any]:
            groups = [{"params": len(g["params"]), **{k: _plain(v) for k, v in g.items() if k not in _NOT_HYPER}}
                      for g in getattr(opt, "param_groups", [])]
            return {"type": type(opt).__qualname__, "param_groups": groups}

        def scheduler(sched: Any) -> dict[str, Any]:
            state = sched.state_dict() if callable(getattr(sched, "state_dict", None)) else {}
            return {"type": type(sched).__qualname__,
                    **{k: _plain(v) for k, v in state.items() if not k.startswith("_") and k not in _SCHEDULER_STATE}}

        loop = self.loop
        return {
            "batch_size": loop.batch_size,
            "seed": loop.seed,
            "shuffle": loop.shuffle,
            "clip_grad_norm": loop.clip_grad_norm,
            "precision": loop.precision,
            "accumulate": loop.accumulate,
            "compile": loop.compile,
            "ema": loop.ema,
            "warmup_steps": loop.warmup_steps,
            "scheduler_interval": loop.scheduler_interval,
            "models": {k: type(unwrap(m)).__qualname__ for k, m in self.models.items()},
            "optimizers": {k: optimizer(o) for k, o in self.optimizers.items()},
            "schedulers": {k: scheduler(s) for k, s in self.schedulers.items()},
            "loss_fn": loss_name if loss is not None else None,
            "train_data": describe_data(self.train_data),
        }

    def _apply_changed_hyperparameters(self, saved: Mapping[str, Any]) -> None:
        """After an allowed change, the hyperparameters given to this Trainer replace the restored ones where they
        differ from the saved run's (the restored param groups carry the old ones); a changed lr is the
        schedulers' new base rate too."""
        for name, opt in self.optimizers.items():
            groups = len(opt.param_groups)
            old, new = _hyperparameters(saved, name, groups), _hyperparameters(self.config, name, groups)
            if not len(new) == len(old) == groups:
                continue  # another layout of groups: nothing to match
            for i, (group, was, now) in enumerate(zip(opt.param_groups, old, new)):
                for key, value in now.items():
                    if key == "params" or key not in group or was.get(key) == value:
                        continue
                    group[key] = tuple(value) if isinstance(group[key], tuple) else value
                    if key == "lr":
                        for sched in self.schedulers.values():
                            if hasattr(sched, "base_lrs") and i < len(sched.base_lrs):
                                sched.base_lrs[i] = value


def _same_place(given: str | Path, held: str) -> bool:
    """Whether a path or URL given names the checkpoint a store lists as ``held``."""
    if rundir.looks_like_url(given) or rundir.looks_like_url(held):
        return str(given).rstrip("/") == held.rstrip("/")
    return Path(given).resolve() == Path(held).resolve()


def _named(given: Any, name: str) -> dict[str, Any]:
    """A Trainer's models, optimizers or schedulers by name: a dict as given, one object under ``name``."""
    if given is None:
        return {}
    return dict(given) if isinstance(given, Mapping) else {name: given}


def _options(loop: LoopOptions | None, saving: SaveOptions | None, show: ShowOptions | None,
             keywords: Mapping[str, Any]) -> tuple[LoopOptions, SaveOptions, ShowOptions]:
    """The three option groups, each as given (or its defaults) with the keywords of its fields applied."""
    groups = [loop or LoopOptions(), saving or SaveOptions(), show or ShowOptions()]
    known = {f.name: i for i, cls in enumerate(OPTION_CLASSES) for f in dataclasses.fields(cls)}
    unknown = sorted(set(keywords) - set(known))
    if unknown:
        raise UsageError(f"Trainer got unknown options {', '.join(unknown)}; its options are: {', '.join(known)}")
    for i in range(len(groups)):
        mine = {k: v for k, v in keywords.items() if known[k] == i}
        if mine:
            if "device" in mine and isinstance(mine["device"], torch.device):
                mine["device"] = str(mine["device"])
            groups[i] = dataclasses.replace(groups[i], **mine)
    return groups[0], groups[1], groups[2]


def _hyperparameters(config: Mapping[str, Any], name: str, groups: int) -> list[Mapping[str, Any]]:
    """Optimizer ``name``'s hyperparameters per param group, as a run's config records them: each group's, in a
    config a Trainer derives from its objects; the CLI's one ``lr`` for every group."""
    recorded = ((config.get("optimizers") or {}).get(name) or {}).get("param_groups")
    if isinstance(recorded, list):
        return [g if isinstance(g, Mapping) else {} for g in recorded]
    return [{"lr": config["lr"]}] * groups if config.get("lr") is not None else []


def _as_floats(result: Any) -> dict[str, float]:
    """A step's result (a loss, or a dict of named losses and numbers: one-element tensors or numbers) as floats.
    A dict without ``loss`` has its first value reported as the loss too."""
    losses = {"loss": result} if not isinstance(result, Mapping) else dict(result)
    values = {}
    for k, v in losses.items():
        if (torch.is_tensor(v) and v.numel() == 1) or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            values[str(k)] = float(v.detach()) if torch.is_tensor(v) else float(v)
        else:
            shown = f"a tensor of shape {tuple(v.shape)}" if torch.is_tensor(v) else f"{type(v).__name__} {v!r:.40}"
            raise UsageError(f"step_fn returned {shown} as {k!r}; it should return the loss (a one-element tensor "
                             "or a number) or a dict of them, e.g. {'loss': loss, 'loss_d': loss_d}")
    values.setdefault("loss", next(iter(values.values()), 0.0))
    return values


def _check_types(models: Mapping[str, Any], optimizers: Mapping[str, Any], schedulers: Mapping[str, Any],
                 train_data: Any, options: tuple) -> None:
    """Arguments of the wrong kind are refused when the Trainer is made, in one line, not found out in fit."""
    def refuse(what: str, value: Any, expected: str) -> None:
        raise UsageError(f"Trainer's {what} is a {type(value).__name__} ({value!r:.40}); expected {expected}")

    for name, m in models.items():
        if not isinstance(m, nn.Module):
            refuse(f"model {name!r}", m, "a torch.nn.Module (or a dict of them)")
    for name, o in optimizers.items():
        if not isinstance(o, torch.optim.Optimizer):
            refuse(f"optimizer {name!r}", o, "a torch.optim.Optimizer (or a dict of them)")
    for name, sch in schedulers.items():
        if not (callable(getattr(sch, "step", None)) and callable(getattr(sch, "state_dict", None))):
            refuse(f"scheduler {name!r}", sch, "a torch.optim.lr_scheduler scheduler (or a dict of them)")
    for given, cls in zip(options, OPTION_CLASSES):
        if given is not None and not isinstance(given, cls):
            refuse(f"{cls.__name__} argument", given, f"etappe.{cls.__name__}(...), or its fields as keywords")
    if not isinstance(train_data, torch.utils.data.DataLoader) and not (
            hasattr(train_data, "__len__") and hasattr(train_data, "__getitem__") and not isinstance(train_data, (str, bytes))):
        refuse("train_data", train_data, "a TensorData, a map-style Dataset of (input, target) pairs or a DataLoader")


def _check_optimizer_fits(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The built-in step's optimizer must step this model's parameters: another model's trains nothing here."""
    own = {id(p) for p in model.parameters()}
    stepped = [p for group in optimizer.param_groups for p in group["params"]]
    if stepped and not any(id(p) in own for p in stepped):
        raise UsageError("the optimizer holds none of the model's parameters (was it made for another model?); "
                         "make it from this model: torch.optim.SGD(model.parameters(), ...)")


# Param-group keys that are not hyperparameters: how the step is computed, not what it computes.
_NOT_HYPER = {"params", "param_names", "initial_lr", "foreach", "fused", "capturable", "differentiable"}
# A scheduler's state_dict keys that are its position or copies of the optimizer's rates, not its settings.
_SCHEDULER_STATE = {"last_epoch", "base_lrs", "verbose", "best", "num_bad_epochs", "cooldown_counter", "lr_lambdas"}


def _plain(value: Any) -> Any:
    """A hyperparameter as JSON would hold it, so a saved one compares equal to a fresh one."""
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return type(value).__qualname__


def describe_data(data: Any) -> dict[str, Any]:
    """What identifies a training set in a run's config: its type and length, and for data held in tensors
    (TensorData, a TensorDataset, a tensor) an xxh3-128 checksum of their shapes, dtypes and bytes: a changed data
    set is then refused on resume as a changed lr is. Other datasets compute their samples: they cannot be hashed
    without reading every sample, so only their type and length are compared."""
    if isinstance(data, TensorData):
        tensors, extra = [data.x, data.y], repr(data.input_scale)
    elif isinstance(data, torch.utils.data.TensorDataset):
        tensors, extra = list(data.tensors), ""
    elif torch.is_tensor(data):
        tensors, extra = [data], ""
    else:
        tensors, extra = None, ""
    checksum = None
    if tensors is not None:
        import xxhash

        h = xxhash.xxh3_128()
        h.update(extra.encode())
        for t in tensors:
            t = t.detach()
            h.update(f"{tuple(t.shape)}{t.dtype};".encode())
            # in memory at ~20 GB/s: a fraction of a second for data sets that fit in it
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        checksum = h.hexdigest()
    try:
        length = len(data)
    except TypeError:
        length = None
    return {"type": type(data).__qualname__, "length": length, "checksum": checksum}


def _batch_len(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor ((x, y) pairs, dicts, or a bare tensor)."""
    first = batch
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if isinstance(first, Mapping):
        first = next(iter(first.values()))
    return len(first) if hasattr(first, "__len__") else 1


class _NumberedBatchSampler(torch.utils.data.Sampler):
    """Tags each batch's indices with the batch's number in the epoch, so the batch's random state can be
    seeded from (seed, epoch, batch) whichever worker fetches it."""

    def __init__(self, sampler: EpochBatchSampler, start: int) -> None:
        self.sampler, self.start = sampler, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for number, indices in enumerate(self.sampler, start=self.start):
            yield [(number, i) for i in indices]

    def __len__(self) -> int:
        return len(self.sampler)


class _SeededBatches(torch.utils.data.Dataset):
    """A user's map-style Dataset, fetched a batch at a time. In a worker process, the random generators are
    seeded from (seed, epoch, batch number) before a batch is read, so random augmentation is the same
    whichever worker reads it and wherever the epoch was resumed. In the main process (no workers) the run's
    own generators are used; they are saved in every checkpoint."""

    def __init__(self, dataset: Any, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, items: list[tuple[int, int]]) -> list[Any]:
        if items and torch.utils.data.get_worker_info() is not None:
            seed_everything(derive_seed(self.seed, self.epoch, items[0][0]))
        return [self.dataset[i] for _, i in items]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        return self.dataset[item[1]]


def fit(model: nn.Module, train_data: Any, *, epochs: int, model_name: str | None = None,
        model_kwargs: Mapping[str, Any] | None = None, **kwargs: Any) -> History:
    """Train ``model`` on ``train_data`` for ``epochs`` epochs; keyword arguments as for ``Trainer``.

    ``train_data`` may be a whole data set of ``etappe.data.load_dataset``: then its train split is trained on and
    its test split validates (unless ``val_data`` is given). With a ``run_dir``, the run is then also one the
    command line can use (``etappe eval``, ``export``, ``resume RUN``): fit writes its ``config.json`` when the CLI
    rebuilds the same run from it: the model is one of ``etappe.models`` (recognised by its layers) or the
    ``module:factory`` named by ``model_name`` (called with ``model_kwargs``), the optimizer SGD, Adam or AdamW over
    one param group, the loss and scheduler ones the CLI names, and the data the named set's train split. A run
    the CLI cannot rebuild is resumed by calling fit again with the same ``run_dir``; etappe says so when stopped.
    """
    from etappe.data.sets import Dataset

    data = train_data if isinstance(train_data, Dataset) else None
    if data is not None:
        kwargs.setdefault("val_data", data.test)
        train_data = data.train
    trainer = Trainer(model, train_data=train_data, **kwargs)
    config = _cli_config(trainer, data, model_name, model_kwargs, epochs)
    if config is None:
        return trainer.fit(epochs)
    trainer._given_config = config  # what the checkpoints hold and a resume compares, as in a CLI-made run
    trainer.resume(epochs=epochs)  # refuses another run's checkpoints before config.json is written
    if trainer.main:
        import json

        rundir.write_bytes(rundir.join(trainer.run_dir, "config.json"), (json.dumps(config, indent=2) + "\n").encode())
    return trainer.fit(epochs)


def _cli_config(trainer: Trainer, data: Any, model_name: str | None, model_kwargs: Mapping[str, Any] | None,
                epochs: int) -> dict[str, Any] | None:
    """The config.json of ``etappe train`` that rebuilds ``trainer``'s run, or None when the CLI cannot (then the
    run keeps the config a Trainer derives from its objects). A ``model_name`` that builds another model than
    the one given is refused."""
    from etappe.build import LOSSES, build_model
    from etappe.config import CONFIG_VERSION, TrainConfig
    from etappe.models import MODELS

    if model_kwargs and model_name is None:
        raise UsageError("model_kwargs are the keyword arguments of model_name's factory: give model_name too")
    if trainer.run_dir is None or data is None:
        return None
    if rundir.has_checkpoints(trainer.run_dir) and not rundir.is_file(rundir.join(trainer.run_dir, "config.json")):
        return None  # a run fit made before it wrote config.json: its checkpoints hold the derived config
    (model,) = trainer.models.values() if len(trainer.models) == 1 else (None,)
    optimizer = trainer.optimizers.get("optimizer")
    optimizers = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}
    scheduler = trainer.schedulers.get("scheduler")
    schedulers = {type(None): "none", torch.optim.lr_scheduler.StepLR: "step",
                  torch.optim.lr_scheduler.ExponentialLR: "exponential"}
    loss = next((name for name, cls in LOSSES.items() if type(trainer.loss_fn) is cls), None)
    if (model is None or trainer.step_fn is not None or trainer.metrics_fn is not None or not trainer.loop.shuffle
            or type(optimizer) not in optimizers or len(optimizer.param_groups) != 1 or loss is None
            or set(trainer.schedulers) - {"scheduler"} or type(scheduler) not in schedulers
            or trainer.val_data is not data.test or not _default_like(trainer.loss_fn)
            or not _rebuilt_alike(data, trainer.loop.seed)):
        return None
    spec, kwargs = data.spec, dict(model_kwargs or {})
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: the run's own draws stay as they were
        if model_name is not None:
            rebuilt = build_model(model_name, spec.input_shape, spec.num_outputs, kwargs)
            if not _same_layers(rebuilt, unwrap(model)):
                raise UsageError(f"model_name={model_name!r} (with model_kwargs {kwargs}) builds {type(rebuilt).__name__} "
                                 f"with other layers than the model given ({type(unwrap(model)).__name__}); name the "
                                 "factory that made it, with its arguments")
        else:
            model_name = next((name for name in MODELS if _builds(name, spec, unwrap(model))), None)
            if model_name is None:
                return None
    group = optimizer.param_groups[0]
    convolutions = [p for p in model.parameters() if p.dim() == 4]
    values = {
        **{f.name: getattr(options, f.name) for options in (trainer.loop, trainer.saving, trainer.show)
           for f in dataclasses.fields(options) if f.name in {g.name for g in dataclasses.fields(TrainConfig)}},
        "data": spec.name, "model": model_name, "model_kwargs": kwargs, "epochs": epochs,
        "run_dir": str(trainer.run_dir), "optimizer": optimizers[type(optimizer)],
        "lr": group.get("initial_lr", group["lr"]), "weight_decay": group["weight_decay"],
        "momentum": group.get("momentum", 0.0) if type(optimizer) is torch.optim.SGD else 0.0,
        "loss": loss, "scheduler": schedulers[type(scheduler)],
        "channels_last": bool(convolutions) and all(p.is_contiguous(memory_format=torch.channels_last)
                                                     and not p.is_contiguous() for p in convolutions),
    }
    if isinstance(scheduler, torch.optim.lr_scheduler.StepLR):
        values.update(step_size=scheduler.step_size, gamma=scheduler.gamma)
    elif isinstance(scheduler, torch.optim.lr_scheduler.ExponentialLR):
        values["gamma"] = scheduler.gamma
    try:
        config = TrainConfig.from_dict(values)
    except EtappeError:  # a value the CLI's flags cannot hold
        return None
    return {**config.to_dict(), "data_spec": spec.to_dict(), "config_version": CONFIG_VERSION}


def _rebuilt_alike(data: Any, seed: int) -> bool:
    """Whether the CLI, loading the data set by its name with the run's seed, gets the same train split (the
    synthetic sets follow the seed; a set read from another folder than the CLI looks in is not found)."""
    from etappe.data import load_dataset

    try:
        again = load_dataset(data.spec.name, seed=seed, allow_download=False)
    except EtappeError:
        return False
    return describe_data(again.train) == describe_data(data.train)


def _builds(name: str, spec: Any, model: nn.Module) -> bool:
    """Whether built-in model ``name``, with its default arguments, has the layers of ``model``."""
    from etappe.models import build

    try:
        return _same_layers(build(name, tuple(spec.input_shape), spec.num_outputs), model)
    except EtappeError:  # not sized for this data (a CNN for flat features)
        return False


def _same_layers(a: nn.Module, b: nn.Module) -> bool:
    """The same modules (their reprs name each layer and its sizes) and the same tensors' names and shapes."""
    shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in (a, b)]
    return type(a) is type(b) and repr(a) == repr(b) and shapes[0] == shapes[1]


def _default_like(loss: Any) -> bool:
    """A loss module with its default settings (the CLI makes it with none)."""
    settings = [{k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}
                for m in (loss, type(loss)())]
    return settings[0] == settings[1]
