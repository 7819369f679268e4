"""Async save's two parts: a pool that snapshots a checkpoint's tensors at call time into its files built in
memory, and a writer that runs one save at a time in a background thread and keeps its failure until told.

The pool allocates on the first save and is reused after: copying into memory already faulted in runs several times
faster than into fresh memory, and the copy is most of what the caller waits for. For a state on a GPU the pool's
buffers are pinned (page-locked), so the copies from the device go by DMA. Because each file is already whole in one
page-aligned buffer, the writer sends it to the disk with O_DIRECT, around the page cache, and takes next to no CPU
from the training that goes on meanwhile.
"""

import os
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from etappe.checkpoint import tensorfile
from etappe.checkpoint.errors import CheckpointError

# The writer thread's nice value (Linux sets it per thread): training threads win the CPU whenever they want it,
# and the write (mostly waiting on O_DIRECT I/O) proceeds in their gaps, a little slower.
NICE = 10


class SnapshotPool:
    """Per entry, its safetensors file built in memory (a ``tensorfile.Image``), keyed by the entry's name and its
    tensors' names, shapes and dtypes, and reused from one save to the next."""

    def __init__(self) -> None:
        self._images: dict[tuple, tensorfile.Image] = {}

    def snapshot(self, encoded: Mapping[str, tuple[dict, dict[str, torch.Tensor]]]) -> dict[str, tuple[dict, Any]]:
        """``encoded`` (``folder.encode``'s records and tensors) with each entry's tensors copied into its image.

        Images the new state does not use are freed before new ones are allocated, so the pool never holds
        more than one copy of the state. An image must not be written to by anyone else until the write of
        this snapshot has finished: the next snapshot reuses it.
        """
        keys = {entry: (entry, *sorted((name, tuple(t.shape), t.dtype) for name, t in tensors.items()))
                for entry, (_, tensors) in encoded.items() if tensors}
        self._images = {key: image for key, image in self._images.items() if key in keys.values()}
        out = {}
        queued: set[torch.device] = set()  # the GPUs copying into pinned images, waited for before returning
        for entry, (record, tensors) in encoded.items():
            if not tensors:
                out[entry] = (record, tensors)
                continue
            image = self._images.get(keys[entry])
            if image is None:
                image = self._images[keys[entry]] = tensorfile.Image(
                    {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()})
            gpus = {t.device for t in tensors.values() if t.is_cuda}
            if gpus and image.pin():
                queued |= gpus
            for name, t in tensors.items():
                image.fill(name, t)
            out[entry] = (record, image)
        for gpu in queued:
            torch.cuda.synchronize(gpu)  # the state at the call is in host memory before training goes on
        return out

    def clear(self) -> None:
        self._images = {}


class Writer:
    """Runs one ``work()`` at a time in a background thread; ``wait`` joins it and raises its failure."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._failure: tuple[str, BaseException] | None = None
        self._done: Path | None = None

    def start(self, work: Callable[[], None], path: Path) -> None:
        """Run ``work`` (which writes checkpoint ``path``) in a new thread; the previous one must be waited for.

        The thread is not a daemon: a program that ends without waiting still finishes the write at exit.
        """
        if self._thread is not None:
            raise RuntimeError("a background write is still in flight: wait() for it first")
        self._thread = threading.Thread(target=self._run, args=(work, path), name=f"etappe-save-{path.name}")
        self._thread.start()

    def wait(self, *, clear: bool = False) -> Path | None:
        """Block until the write in flight has finished; return the last checkpoint committed in the background
        (None before the first). Raise CheckpointError if the last write failed, every time until a call with
        ``clear=True`` has raised it."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failure is not None:
            message, cause = self._failure
            if clear:
                self._failure = None
            raise CheckpointError(message) from cause
        return self._done

    def _run(self, work: Callable[[], None], path: Path) -> None:
        _lower_priority()
        try:
            work()
        except BaseException as e:  # noqa: BLE001 -- kept and raised by wait(); nothing escapes unreported
            if isinstance(e, CheckpointError):  # names the path already
                self._failure = (f"background save failed: {e}", e)
            else:
                self._failure = (f"background save of {path} failed: {type(e).__name__}: {e}", e)
        else:
            self._done = path


def _lower_priority() -> None:
    """Give the calling thread (only it, on Linux) a higher nice value; elsewhere leave it as it is."""
    if sys.platform != "linux":  # elsewhere a thread id is not a pid: setpriority would hit another process
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), NICE))
    except OSError:
        pass
