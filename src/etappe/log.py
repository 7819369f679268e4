"""What a run shows and writes: the progress bar, the epoch summary line, the metrics files."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from etappe.errors import EtappeError, UsageError


def info(message: str) -> None:
    print(message, flush=True)


def warn(message: str) -> None:
    """One ``etappe: warning:`` line on stderr."""
    print(f"etappe: warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def epoch_line(row: dict, epochs: int) -> str:
    """``Epoch 3/10 | train loss 0.2103 | val loss 0.1932 | val acc 94.1% | 2.1 s``"""
    parts = [f"Epoch {row['epoch']}/{epochs}", f"train loss {row['train_loss']:.4f}"]
    ema = " (EMA weights)" if row.get("val_weights") == "ema" else ""
    if "val_loss" in row:
        parts.append(f"val loss {row['val_loss']:.4f}{ema}")
    if "val_accuracy" in row:
        parts.append(f"val acc {100 * row['val_accuracy']:.1f}%")
    if row.get("skipped_steps"):
        parts.append(f"{row['skipped_steps']} steps skipped (non-finite fp16 gradients)")
    parts.append(f"{row['seconds']:.1f} s")
    return " | ".join(parts)


class ProgressBar:
    """A bar over the batches of one epoch (batches, loss, samples/s), or nothing when not shown: tqdm's on a
    terminal, a widget or HTML bar in a notebook (etappe.notebook), nothing when stderr is a file or a pipe."""

    def __init__(self, total: int, initial: int, epoch: int, epochs: int, show: bool) -> None:
        from etappe.notebook import in_notebook

        self.bar = None
        desc = f"Epoch {epoch + 1}/{epochs}"
        if show and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False,
                            unit="batch", dynamic_ncols=True, mininterval=0.2)
        elif show and in_notebook():  # a kernel's stderr is no terminal, yet its front end shows a bar
            from etappe.notebook import progress_bar as notebook_bar

            self.bar = notebook_bar(total, initial, desc)
        self.last_postfix = 0.0

    def update(self, progress: Any, world_size: int) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        now = time.monotonic()
        if now - self.last_postfix > 0.5:
            self.last_postfix = now
            loss = progress.loss_sum_in_epoch / max(progress.samples_in_epoch, 1)
            rate = progress.samples_in_epoch * world_size / max(progress.seconds_in_epoch, 1e-9)
            self.bar.set_postfix_str(f"loss {loss:.4f}, {rate:,.0f} samples/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress_bar(total: int, initial: int, epoch: int, epochs: int, show: bool) -> ProgressBar:
    return ProgressBar(total, initial, epoch, epochs, show)


def ensure_writable(run_dir: Path | str) -> None:
    """Fail before any training when the run folder cannot be created or written (an object store's run: when
    the store does not answer; its writer lock, taken next, proves it writable)."""
    from etappe import rundir

    if rundir.is_url(run_dir):
        rundir.ensure_reachable(run_dir)
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except (FileExistsError, NotADirectoryError):  # bad input: a file where the folder should be
        raise UsageError(f"cannot write to the run folder {run_dir}: it is a file, or inside one; choose another "
                         "with --run-dir") from None
    except OSError as exc:
        raise EtappeError(
            f"cannot write to the run folder {run_dir}: {exc.strerror or exc}; choose another with --run-dir"
        ) from None


def write_history(run_dir: Path, history: Any) -> None:
    """metrics.jsonl (one JSON object per epoch) and metrics.csv, rewritten whole from the history."""
    rows = list(history.epochs)
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    _write_text(_join(run_dir, "metrics.jsonl"), lines)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    _write_text(_join(run_dir, "metrics.csv"), buf.getvalue())


def read_history(run_dir: Path) -> list[dict]:
    """The epochs of a run's metrics.jsonl, read without following a link and bounded in size."""
    from etappe.checkpoint.reading import read_inside

    path = Path(run_dir) / "metrics.jsonl"
    content = read_inside(Path(run_dir), "metrics.jsonl")
    if content is None:
        raise EtappeError(f"{path} does not exist; expected a run folder written by etappe train")
    rows = []
    for number, line in enumerate(content.decode("utf-8", "replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            row = exc
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), (int, float)):
            raise EtappeError(f"{path} line {number} is not an epoch's metrics (a JSON object with an epoch); "
                              f"the run's checkpoints hold the same history: see etappe inspect {Path(run_dir)}")
        rows.append(row)
    return rows


def _join(run_dir: Path | str, name: str) -> Path | str:
    from etappe import rundir

    return rundir.join(run_dir, name)


def _write_text(path: Path | str, text: str) -> None:
    from etappe import rundir

    rundir.write_bytes(path, text.encode())  # on an object store: one object, one PUT


def plot_curves(run_dir: Path | str, history: Any) -> Path | str:
    from etappe import rundir
    from etappe.plots import plot_history, render

    if rundir.is_url(run_dir):  # rendered to bytes, written as one object
        target = rundir.join(run_dir, "curves.png")
        rundir.write_bytes(target, render(list(history.epochs), "png", getattr(history, "resumed", ())))
        return target
    return plot_history(list(history.epochs), Path(run_dir) / "curves.png", getattr(history, "resumed", ()))


class NoCurves:
    """What a run shows of its curves outside a notebook: nothing (curves.png is written at the end)."""

    def update(self, history: Any) -> None:
        pass

    def close(self, history: Any) -> None:
        pass


def live_curves(show: bool, history: Any) -> Any:
    """In a notebook (and ``show``), the run's curves as one figure updated at each epoch's end; else nothing."""
    from etappe.notebook import LiveCurves, in_notebook

    return LiveCurves(history) if show and in_notebook() else NoCurves()


def refuse_tensorboard_on(run_dir: Path | str | None) -> None:
    """TensorBoard appends to its event files as it goes, which an object store cannot do: refused there."""
    from etappe import rundir

    if rundir.is_url(run_dir):
        raise UsageError(f"--tensorboard (tensorboard=True) appends to event files, which the object store of "
                         f"{run_dir} cannot hold; drop it (metrics.jsonl and curves.png are written there), or "
                         "train into a local --run-dir")


def tensorboard_writer(run_dir: Path | str | None, start_epoch: int) -> Any:
    refuse_tensorboard_on(run_dir)
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise EtappeError("--tensorboard needs the tensorboard package: pip install 'etappe[tensorboard]'") from None
    from etappe.checkpoint.fsio import refuse_link

    folder = Path(run_dir or "runs") / "tensorboard"
    refuse_link(folder, "write TensorBoard event files into")  # a link would have them written outside the run
    return SummaryWriter(log_dir=str(folder), purge_step=start_epoch + 1)


def tensorboard_row(writer: Any, row: dict) -> None:
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)):
            writer.add_scalar(key, value, row["epoch"])
    writer.flush()
