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

import math
import os
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from etappe import distributed, log
from etappe.checkpoint import sharded
from etappe.config import check_resume
from etappe.data.sampler import EpochBatchSampler, ResumableBatches
from etappe.data.sets import TensorData
from etappe.errors import EtappeError, TrainingError, UsageError
from etappe.state import History, PerRank, Progress, unwrap

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
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    classification = False
    try:
        with no_grad(model):
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
    finally:
        model.train(was_training)
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
    was_training = model.training
    model.eval()
    try:
        with no_grad(model):
            out = model(x)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UsageError(
            f"the model does not accept the data's input shape {tuple(x.shape[1:])} (one sample): {first}"
        ) from None
    finally:
        model.train(was_training)
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


class Trainer:
    """Runs the seeds' loop for one model and loss, or the user's ``step_fn`` for anything else (a GAN).

    Given a ``run_dir`` it saves checkpoints there and, when the folder already holds some, resumes from the
    newest valid one, exactly where it stopped.

    Under torchrun the model is wrapped in DistributedDataParallel, unless it is already sharded with FSDP2
    (``etappe.distributed.shard`` or ``fully_shard``, before its optimizer was made): then every rank saves and
    loads its own shards through torch.distributed.checkpoint.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        loss_fn: Callable | None = None,
        *,
        train_data: Any,
        val_data: Any = None,
        batch_size: int = 32,
        scheduler: Any = None,
        scheduler_interval: str = "epoch",
        step_fn: StepFn | None = None,
        models: Mapping[str, nn.Module] | None = None,
        optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
        schedulers: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        clip_grad_norm: float | None = None,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        run_dir: str | Path | None = None,
        save_every: int | None = None,
        save_every_seconds: float | None = None,
        keep_last: int = 2,
        keep_best: int = 1,
        async_save: bool = False,
        monitor: str = "val_loss",
        patience: int | None = None,
        config: Mapping[str, Any] | None = None,
        allow_config_change: bool = False,
        num_outputs: int | None = None,
        deterministic: bool | None = None,
        progress: bool = True,
        quiet: bool = False,
        tensorboard: bool = False,
        metrics_fn: Callable[["Trainer"], Mapping[str, float]] | None = None,
    ) -> None:
        if model is None and not models:
            raise UsageError("Trainer needs a model (or models={name: module, ...} with a step_fn)")
        if step_fn is None and (model is None or optimizer is None or loss_fn is None):
            raise UsageError("Trainer needs model, optimizer and loss_fn, or a step_fn that does the step")
        if scheduler_interval not in ("epoch", "step"):
            raise UsageError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        self.device = pick_device(device)
        self.deterministic = set_deterministic(self.device, deterministic)
        distributed.init_from_env(self.device)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()

        self.models: dict[str, nn.Module] = dict(models) if models else {"model": model}
        for m in self.models.values():
            m.to(self.device)
        self.model = model if model is not None else next(iter(self.models.values()))
        # FSDP2: a model already sharded (fully_shard, before its optimizer was made) is saved shard by shard
        self.sharded = any(sharded.is_sharded_module(m) for m in self.models.values())
        if self.sharded and (step_fn is not None or len(self.models) != 1 or (optimizers and len(optimizers) != 1)):
            raise UsageError("a sharded (FSDP) model trains here as one model with one optimizer and no step_fn")
        if self.sharded and async_save:
            raise UsageError("async_save does not apply to a sharded (FSDP) model; every rank saves its shards together")
        if self.world_size > 1 and step_fn is None and not self.sharded:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizers: dict[str, Any] = dict(optimizers) if optimizers else ({"optimizer": optimizer} if optimizer else {})
        self.schedulers: dict[str, Any] = dict(schedulers) if schedulers else ({"scheduler": scheduler} if scheduler else {})
        self.optimizer, self.loss_fn, self.step_fn = optimizer, loss_fn, step_fn
        self.scheduler_interval, self.clip_grad_norm = scheduler_interval, clip_grad_norm

        self.train_data, self.val_data = train_data, val_data
        self.num_workers, self.seed = num_workers, seed
        self.batches = self._make_batches(train_data, batch_size, seed, shuffle)
        given_data = self.train_data  # a DataLoader's dataset; before a move to the device
        if isinstance(train_data, TensorData) and step_fn is None:
            self.train_data = train_data.to(self.device) if self.device.type == "cuda" else train_data
            check_shapes(unwrap(self.model), train_data, num_outputs)

        self.progress, self.history = Progress(), History()
        self.per_rank = PerRank(self.progress, self.rank, self.world_size)
        # What makes this run this run, saved in every checkpoint and compared on resume: the CLI's config, or
        # what the objects given here say of themselves.
        self.config = dict(config) if config else self._derived_config(given_data)
        self._check_monitor(monitor, patience, metrics_fn)
        self.allow_config_change = allow_config_change
        self.save_every, self.save_every_seconds = save_every, save_every_seconds
        self.monitor, self.patience = monitor, patience
        self.metrics_fn = metrics_fn
        self.main = distributed.is_main()
        self.show_progress = progress and not quiet and self.main
        self.quiet = quiet or not self.main
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.store = None
        if self.run_dir is not None:
            log.ensure_writable(self.run_dir)
            from etappe.checkpoint import CheckpointStore

            self.store = CheckpointStore(
                self.run_dir / "checkpoints", keep_last=keep_last, keep_best=keep_best, monitor=monitor,
                mode="max" if "acc" in monitor else "min", async_save=async_save,
            )
        self.tensorboard = tensorboard
        self.resumed_from: Path | None = None
        if not self.deterministic and self.main and not self.quiet:
            log.warn("deterministic algorithms are off (the default on CUDA): a resumed run will be close to, not "
                     "bit-identical with, an uninterrupted one; pass --deterministic for exactness")

    # ------------------------------------------------------------ data

    def _make_batches(self, data: Any, batch_size: int, seed: int, shuffle: bool) -> ResumableBatches:
        if isinstance(data, torch.utils.data.DataLoader):
            # A DataLoader's own sampler cannot start mid-epoch; keep its dataset, batch size and collate.
            loader = data
            if isinstance(loader.dataset, torch.utils.data.IterableDataset):
                raise UsageError("an IterableDataset cannot be resumed exactly; give a map-style Dataset")
            shuffle = isinstance(loader.sampler, torch.utils.data.RandomSampler)
            batch_size = loader.batch_size or batch_size
            self.train_data = loader.dataset
            self._collate = loader.collate_fn
            self.num_workers = loader.num_workers
            warnings.warn(
                "etappe replaces the DataLoader's sampler with its resumable one (same dataset, batch size, "
                "collate_fn, workers; shuffled if the loader was) so a run can resume mid-epoch exactly",
                stacklevel=3,
            )
        else:
            self._collate = torch.utils.data.default_collate
        return ResumableBatches(
            len(self.train_data), batch_size, seed=seed, shuffle=shuffle, rank=distributed.rank(),
            world_size=distributed.world_size(),
        )

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[Any]:
        if isinstance(self.train_data, TensorData) and self.num_workers == 0:
            for idx in self.batches.batches(epoch, start):
                yield self.train_data.take(idx.to(self.train_data.x.device))
            return
        loader = torch.utils.data.DataLoader(
            _SeededBatches(self.train_data, self.seed, epoch),
            batch_sampler=_NumberedBatchSampler(EpochBatchSampler(self.batches, epoch, start), start),
            collate_fn=self._collate,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            # Its own generator: creating the iterator would otherwise draw from torch's global RNG, and a
            # resumed run would draw at a different moment than an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch),
        )
        for batch in loader:
            yield to_device(batch, self.device)

    # ------------------------------------------------------------ state

    def state_objects(self) -> dict[str, Any]:
        """Everything a checkpoint holds, by name. The per-rank part (random state) last: restored last."""
        objects: dict[str, Any] = {}
        for name, m in self.models.items():
            objects[name] = unwrap(m)
        objects.update(self.optimizers)
        objects.update(self.schedulers)
        objects["progress"] = self.progress
        objects["history"] = self.history
        objects["per_rank"] = self.per_rank
        return objects

    def save(self, metrics: Mapping[str, float] | None = None, *, wait: bool = False) -> Path | None:
        """Checkpoint the run now (with ``async_save``, written in the background unless ``wait``)."""
        if self.store is None:
            return None
        # Every rank's part (random state, epoch sums) is gathered into the one checkpoint that rank 0 commits,
        # after all ranks reached this point, so a committed checkpoint holds every rank's part.
        self.per_rank.capture(distributed.all_gather_object(self.per_rank.mine()))
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

    def resume(self, path: str | Path | None = None, *, epochs: int | None = None) -> Path | None:
        """Restore the newest valid checkpoint of the run folder (or ``path``). Returns what was loaded.

        Before anything is restored into the objects, the checkpoint's config is compared with this Trainer's
        (a run-defining difference is refused unless ``allow_config_change``), and, given ``epochs``, a run that
        has more epochs done than that is refused: it cannot be the run asked for."""
        if self.store is None and path is None:
            return None
        if path is None and self.main:
            # resuming the run folder makes this Trainer its one writer: a second one stops here, before it
            # restores or writes anything (config.json included)
            self.store.lock()
        try:
            return self._resume(path, epochs)
        except BaseException:
            if self.store is not None:
                self.store.close()  # a refused resume lets go of the folder: a corrected call may take it again
            raise

    def _resume(self, path: str | Path | None, epochs: int | None) -> Path | None:
        if path is None:
            if self.main:
                try:
                    self.store.wait()  # a background save in flight is the newest checkpoint once committed
                except EtappeError as exc:
                    log.warn(f"the last background save failed, resuming from the checkpoint before it: {exc}")
            # rank 0 picks, so every rank loads the same one even if a check fails on one rank alone
            path = distributed.broadcast_object(self.store.latest() if self.main else None)
            if path is None:
                return None
        from etappe.checkpoint import load
        from etappe.checkpoint.folder import read, restore

        path = Path(path)
        if path.is_dir():  # an etappe checkpoint: read and verified once, checked, then restored
            entries = read(path)
            saved_config = entries.get("config") if isinstance(entries.get("config"), Mapping) else {}
            # A checkpoint from before configs were derived in Python holds {}: there is nothing to compare.
            differences = check_resume(self.run_dir or path, saved_config, self.config,
                                       allow=self.allow_config_change) if saved_config else []
            progress = entries.get("progress")
            done = progress.get("epoch") if isinstance(progress, Mapping) else None
            if epochs is not None and isinstance(done, int):
                self._refuse_fewer_epochs(done, epochs)
            restore(path, entries, self.state_objects())
        else:  # a plain torch.save file: no config, no counters to check
            load(path, **self.state_objects())
            saved_config, differences = {}, []
        if differences:  # allowed: what changed applies from here
            self._apply_changed_hyperparameters(saved_config)
        if differences and self.config.get("lr") is not None and saved_config.get("lr") != self.config["lr"]:
            # The optimizer's saved param groups carry the old rate; an allowed change of --lr applies from here.
            for opt in self.optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = self.config["lr"]
            for sched in self.schedulers.values():
                if hasattr(sched, "base_lrs"):
                    sched.base_lrs = [self.config["lr"]] * len(sched.base_lrs)
        if self.per_rank.world_size_changed and self.main:
            log.warn(
                f"{path} was written by another number of ranks than the {self.world_size} resuming it: training "
                "continues from it, but not bit-exact (the random states per rank differ)"
            )
        self.resumed_from = path
        if not self.quiet:
            p = self.progress
            where = self.run_dir if self.run_dir is not None else path
            log.info(f"Resuming {where} from step {p.step} (epoch {p.epoch + 1}, batch {p.batches_done_in_epoch})")
        return self.resumed_from

    def _refuse_fewer_epochs(self, done: int, epochs: int) -> None:
        # Training on is what a repeated call asks for; a model of fewer epochs than the run has done cannot be
        # given back (its checkpoint may be pruned), and returning the longer-trained one instead would answer a
        # different question without a word.
        if done > epochs:
            where = self.run_dir if self.run_dir is not None else "this Trainer"
            raise UsageError(
                f"{where} has {done} epochs done; epochs={epochs} asks for fewer: nothing was trained. "
                f"Ask for {done} or more to continue it, load its checkpoint with etappe.load, or use a new run folder"
            )

    def _derived_config(self, train_data: Any) -> dict[str, Any]:
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

        return {
            "batch_size": self.batches.batch_size,
            "seed": self.seed,
            "shuffle": self.batches.shuffle,
            "clip_grad_norm": self.clip_grad_norm,
            "scheduler_interval": self.scheduler_interval,
            "models": {k: type(unwrap(m)).__qualname__ for k, m in self.models.items()},
            "optimizers": {k: optimizer(o) for k, o in self.optimizers.items()},
            "schedulers": {k: scheduler(s) for k, s in self.schedulers.items()},
            "loss_fn": loss_name if loss is not None else None,
            "train_data": describe_data(train_data),
        }

    def _apply_changed_hyperparameters(self, saved: Mapping[str, Any]) -> None:
        """After an allowed change, the hyperparameters given to this Trainer's optimizers replace the restored
        ones where they differ from the saved run's (the restored param groups carry the old ones)."""
        for name, opt in self.optimizers.items():
            new = (self.config.get("optimizers") or {}).get(name, {}).get("param_groups")
            old = ((saved.get("optimizers") or {}).get(name) or {}).get("param_groups")
            if not (isinstance(new, list) and isinstance(old, list) and len(new) == len(old) == len(opt.param_groups)):
                continue  # another layout of groups: nothing to match
            for i, (group, was, now) in enumerate(zip(opt.param_groups, old, new)):
                for key, value in now.items():
                    if key == "params" or key not in group or (isinstance(was, Mapping) and was.get(key) == value):
                        continue
                    group[key] = tuple(value) if isinstance(group[key], tuple) else value
                    if key == "lr":
                        for sched in self.schedulers.values():
                            if hasattr(sched, "base_lrs") and i < len(sched.base_lrs):
                                sched.base_lrs[i] = value

    def _check_monitor(self, monitor: str, patience: int | None, metrics_fn: Any) -> None:
        """A ``monitor`` this Trainer can never record is refused now, not found out after the run (when patience
        would never have stopped it). A step_fn's or metrics_fn's metrics are known once an epoch ends."""
        self._monitor_missing_told = False
        if self.step_fn is not None or metrics_fn is not None:
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

    # ------------------------------------------------------------ the loop

    def fit(self, epochs: int) -> History:
        """Train until ``epochs`` epochs are done in all (a resumed run continues; a finished one is extended).
        A run with more epochs done than ``epochs`` is refused (UsageError), before anything is restored."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise UsageError(f"epochs={epochs!r} is not valid; expected a positive integer")
        if self.resumed_from is None:
            self.resume(epochs=epochs)
        self._refuse_fewer_epochs(self.progress.epoch, epochs)
        p = self.progress
        if p.finished:
            if not self.quiet:
                log.info(f"{self.run_dir} stopped early after epoch {p.epoch} ({self.monitor} no longer improved)")
            return self.history
        if self.store is not None and self.main:
            self.store.lock()  # one writer per run folder, from here until close(); a second trainer stops here
        last_save_time = time.monotonic()
        writer = None
        try:
            # in the try: a refused tensorboard folder (a link out of the run) lets go of the run folder too
            writer = log.tensorboard_writer(self.run_dir, p.epoch) if self.tensorboard and self.main else None
            with preemption_guard() as preempt:
                while p.epoch < epochs:
                    for m in self.models.values():
                        m.train()
                    bar = log.progress_bar(len(self.batches), p.batches_done_in_epoch, p.epoch, epochs, self.show_progress)
                    epoch_start = time.perf_counter() - p.seconds_in_epoch
                    for batch in self._epoch_batches(p.epoch, p.batches_done_in_epoch):
                        n, losses = self._train_step(batch)
                        p.step += 1
                        p.batches_done_in_epoch += 1
                        p.samples_in_epoch += n
                        p.loss_sum_in_epoch += losses.pop("loss") * n
                        for k, v in losses.items():
                            p.extra_sums_in_epoch[k] = p.extra_sums_in_epoch.get(k, 0.0) + v * n
                        p.seconds_in_epoch = time.perf_counter() - epoch_start
                        bar.update(p, self.world_size)
                        stop = preempt["signal"] is not None
                        due = bool(self.save_every and p.step % self.save_every == 0) or bool(
                            self.save_every_seconds and time.monotonic() - last_save_time >= self.save_every_seconds
                        )
                        if self.world_size > 1:  # every rank must take the same branch: saves are collective
                            stop, due = distributed.any_rank(stop, due)
                        if stop:
                            bar.close()
                            path = self.save(wait=True)
                            raise Preempted(
                                f"{preempt['signal'] or 'a signal on another rank'} received: saved step {p.step} to {path}; "
                                f"resume with: etappe resume {self.run_dir}"
                            )
                        if due:
                            self.save()
                            last_save_time = time.monotonic()
                    bar.close()
                    row = self._end_epoch(epochs)
                    if writer is not None:
                        log.tensorboard_row(writer, row)
                    stop_early = self._should_stop_early(row)  # before the save, so the checkpoint holds its count
                    p.finished = stop_early
                    self.save({k: v for k, v in row.items() if isinstance(v, (int, float))})
                    last_save_time = time.monotonic()
                    if stop_early:
                        if not self.quiet:
                            log.info(f"Stopping early: {self.monitor} has not improved for {self.patience} epochs")
                        break
        except BaseException:
            if self.store is not None and self.main:
                try:
                    self.store.close()  # an async write in flight holds a good state from before the failure
                except EtappeError as exc:
                    log.warn(f"the checkpoint being written in the background failed as well: {exc}")
            raise
        if writer is not None:
            writer.close()
        if self.store is not None and self.main:
            try:
                self.store.close()  # an async write in flight is committed before fit returns; its buffers freed
            except EtappeError as exc:
                raise TrainingError(f"the last checkpoint could not be written: {exc}") from None
        if self.run_dir is not None and self.main:
            log.write_history(self.run_dir, self.history)
            log.plot_curves(self.run_dir, self.history)
        return self.history

    def _train_step(self, batch: Any) -> tuple[int, dict[str, float]]:
        """One optimizer step. Returns the batch's sample count and its losses as floats."""
        if self.step_fn is not None:
            result = self.step_fn(batch)
            losses = {"loss": result} if not isinstance(result, Mapping) else dict(result)
            values = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in losses.items()}
            values.setdefault("loss", next(iter(values.values()), 0.0))
        else:
            x, y = batch
            loss = self.loss_fn(self.model(x), y)
            value = loss.item()
            if not math.isfinite(value):
                raise self._non_finite(value)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
            self.optimizer.step()
            values = {"loss": value}
        if not all(math.isfinite(v) for v in values.values()):
            raise self._non_finite(values["loss"])
        if self.scheduler_interval == "step":
            for s in self.schedulers.values():
                s.step()
        return _batch_len(batch), values

    def _non_finite(self, value: float) -> TrainingError:
        p = self.progress
        return TrainingError(
            f"the loss became {value} at epoch {p.epoch + 1}, step {p.step + 1}; training stopped and nothing "
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
            result = evaluate(unwrap(self.model), self.val_data, self.loss_fn)
            row["val_loss"] = result["loss"]
            if "accuracy" in result:
                row["val_accuracy"] = result["accuracy"]
        if self.metrics_fn is not None:
            row.update(self.metrics_fn(self))
        if self.optimizers:
            row["lr"] = next(iter(self.optimizers.values())).param_groups[0]["lr"]
        if self.scheduler_interval == "epoch":
            for s in self.schedulers.values():
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
        p = self.progress
        value = row.get(self.monitor)
        if value is None:
            if self.patience is not None and not self._monitor_missing_told and not self.quiet:
                self._monitor_missing_told = True
                log.warn(f"monitor {self.monitor!r} is not among this run's metrics ({', '.join(row)}): "
                         f"patience={self.patience} does nothing")
            return False
        better = (lambda a, b: a > b) if "acc" in self.monitor else (lambda a, b: a < b)
        if p.best_metric is None or better(value, p.best_metric):
            p.best_metric, p.epochs_without_improvement = value, 0
        else:
            p.epochs_without_improvement += 1
        return self.patience is not None and p.epochs_without_improvement >= self.patience


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
            from etappe.state import seed_everything

            seed_everything((self.seed * 1_000_003 + self.epoch) * 1_000_003 + items[0][0])
        return [self.dataset[i] for _, i in items]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        return self.dataset[item[1]]


def fit(model: nn.Module, train_data: Any, *, epochs: int, **kwargs: Any) -> History:
    """Train ``model`` on ``train_data`` for ``epochs`` epochs; keyword arguments as for ``Trainer``."""
    return Trainer(model, train_data=train_data, **kwargs).fit(epochs)
