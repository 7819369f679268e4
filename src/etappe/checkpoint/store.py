"""A folder of checkpoints, one per step: save with metrics, find the latest or best that verifies, prune.

Each checkpoint is ``<root>/step-<step>``. Retention runs only after a save has committed, deletes by
renaming a checkpoint out of sight before removing it, and always keeps the checkpoint just saved.

One writer per store: the first save (or ``lock()``) takes a lock on the folder, held until ``close()``, and
only then are leftovers of crashed saves swept. Readers delete nothing, follow no symbolic link out of the
folder (a store folder that is itself a link is refused, for reading and writing alike), and take a checkpoint
pruned under them in their stride. A folder holding a store's checkpoint under another name than its step's is
ignored, with a warning.

With ``async_save=True``, ``save`` copies the state into reused memory and returns; one background thread writes
it with the same commit and then applies retention. Readers (``latest``, ``checkpoints``, ``load``) see only
committed checkpoints and do not wait; ``wait()`` does.
"""

import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etappe import distributed
from etappe.checkpoint import background, codec, folder, fsio, locks, manifest
from etappe.checkpoint import sharded as shards
from etappe.checkpoint.errors import CheckpointError, CheckpointWarning, NewerFormatError
from etappe.errors import UsageError

_STEP = re.compile(r"step-([0-9]+)")
_RESCANS = 1000  # times a reader lists the folder again when every checkpoint it found was pruned meanwhile (each
# rescan finds the checkpoint that made the writer prune: only a writer saving faster than one read exhausts it)


def _step_of(name: str) -> int | None:
    """The step of a folder named as a store names its checkpoints (``step-%08d``), else None."""
    m = _STEP.fullmatch(name)
    return int(m[1]) if m and name == f"step-{int(m[1]):08d}" else None


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint of a store (its manifest reads; ``verify`` checks its files)."""

    path: Path
    step: int
    metrics: Mapping[str, float] = field(default_factory=dict)


class CheckpointStore:
    """The checkpoints of one run folder, with a retention policy.

    keep_last: keep the k highest steps. keep_best: keep the k best by metric ``monitor`` (``mode`` "min" or
    "max"). keep_every: keep every step divisible by n, forever. A checkpoint kept by any rule stays, and so does
    the one just saved; with no rule given (all None), all stay. A checkpoint this etappe cannot read (corrupt,
    or in a newer format) is never deleted by retention.

    One writer per folder: the first ``save`` takes the folder's writer lock (``lock()``), held until ``close()``;
    a second writer, in any process, gets a CheckpointError. The writer then removes temporary folders of
    crashed saves. Opening a store and reading it changes nothing on disk.

    async_save: ``save`` snapshots the state and returns at once; a background thread writes and commits it.
    A store is used from one thread (the trainer's); call ``wait()`` before exiting or reading what was saved.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: str = "min",
        keep_every: int | None = None,
        async_save: bool = False,
    ) -> None:
        rules = (("keep_last", keep_last, 0), ("keep_best", keep_best, 0), ("keep_every", keep_every, 1))
        for name, value, least in rules:
            if value is not None and (not isinstance(value, int) or value < least):
                raise UsageError(f"{name} must be a whole number >= {least} or None, got {value!r}")
        if mode not in ("min", "max"):
            raise UsageError(f"mode must be 'min' or 'max', got {mode!r}")
        if keep_best is not None and monitor is None:
            raise UsageError("keep_best needs monitor, the name of the metric to rank checkpoints by")
        from etappe import rundir

        if rundir.looks_like_url(root):  # never a local folder named "s3:"
            url = rundir.location(root, "store root")
            raise UsageError(f"CheckpointStore keeps checkpoints in a local folder; {url} is on an object store: use "
                             "etappe.checkpoint.objectstore.open_store(root, ...), the same interface")
        self.root = Path(root)
        self.keep_last, self.keep_best, self.keep_every = keep_last, keep_best, keep_every
        self.monitor, self.mode = monitor, mode
        self.async_save = bool(async_save)
        self._pool = background.SnapshotPool()
        self._writer = background.Writer()
        self._lock: locks.Lock | None = None
        self._warned: set[str] = set()  # folders named unlike a step that a reader ignored and said so

    def path_for(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"  # _step_of reads it back

    @property
    def writing(self) -> bool:
        """Whether this store is its folder's writer now (``lock`` or a save took it, ``close`` has not let go)."""
        return self._lock is not None and self._lock.fd is not None

    def lock(self) -> None:
        """Become this folder's one writer (``save`` does it first, ``close`` lets go), and remove temporary
        folders of saves that crashed. Raises CheckpointError naming the holder if another writer has it."""
        if self._lock is not None and self._lock.fd is not None:
            return
        self._refuse_linked_root("save checkpoints in")
        self._lock = locks.lock_writer(self.root)
        fsio.sweep(self.root, writer=True)

    def save(self, step: int, objects: Mapping[str, Any], metrics: Mapping[str, float] | None = None, *,
             sharded: Mapping[str, Any] | None = None) -> Path:
        """Save ``objects`` (by name, as for ``save``) as the checkpoint of ``step``, then apply retention; return
        the checkpoint's path.

        With ``async_save``, first wait for the save in flight (raising its failure, if it failed, instead of
        saving: call again to retry), then take everything the checkpoint will hold (state_dicts, plain values,
        a copy of every tensor) and return; the checkpoint is committed when ``wait()`` returns.

        ``sharded`` ({"model": an FSDP2 module, "optimizer": its optimizer}): every rank calls ``save``; each
        writes its shards with torch.distributed.checkpoint, and rank 0 writes ``objects`` and commits once all
        shards are written and hashed (``objects`` is ignored on the other ranks). Not with ``async_save``.
        """
        if not isinstance(step, int) or step < 0:
            raise UsageError(f"step must be a whole number >= 0, got {step!r}")
        metrics = {k: _metric(k, v) for k, v in (metrics or {}).items()}
        path = self.path_for(step)
        meta = {"step": step, "metrics": codec.encode(metrics, "metrics")[0]}
        if sharded is not None:
            if self.async_save:
                raise UsageError("a store with async_save cannot save sharded state; use a synchronous store")
            if distributed.rank() != 0:
                shards.write(None, sharded)
                return path
            started = []

            def write_shards(target: Path) -> tuple[dict, dict]:
                started.append(target)
                return shards.write(target, sharded)

            try:
                self.lock()
                self._commit(path, folder.encode(objects), meta, step, write_shards)
            except BaseException as e:
                if not started:  # the other ranks wait in shards.write for a folder that will not come
                    shards.write_failed(f"rank 0 could not start checkpoint {path}: {e}")
                raise
            return path
        self.lock()
        if not self.async_save:
            self._commit(path, folder.encode(objects), meta, step)
            return path
        self._writer.wait(clear=True)  # one writer per store; the pool is free again once it is done
        snapshot = self._pool.snapshot(folder.encode(objects))
        self._writer.start(lambda: self._commit(path, snapshot, meta, step), path)
        return path

    def wait(self, *, clear: bool = False) -> Path | None:
        """Block until the background save in flight is committed and pruned; return the last checkpoint saved in
        the background (None if there was none). Raises CheckpointError if that save failed; it is raised again
        by every ``wait()`` and by the next ``save()``, until a ``wait(clear=True)`` or ``close()`` has raised it
        (the caller has been told: the next save writes afresh). Returns at once for a store that saves
        synchronously."""
        return self._writer.wait(clear=clear)

    def close(self) -> Path | None:
        """``wait(clear=True)``, then free the memory async saves copy into (the next save allocates it again) and
        let go of the writer lock."""
        try:
            return self.wait(clear=True)
        finally:
            self._pool.clear()
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _commit(self, path: Path, encoded: dict, meta: dict, step: int, write_shards=None) -> None:
        fsio.refuse_link(path, "save checkpoint")
        if path.exists() and not (path / manifest.MANIFEST).exists():
            fsio.remove_tree(path)  # an uncommitted leftover at this step: nothing in it was ever valid
        folder.write_encoded(path, encoded, meta, write_shards)
        self._prune(newest=step)

    def checkpoints(self) -> list[Checkpoint]:
        """The committed checkpoints, by step (their manifests read; their data files are not checked here).
        Raises NewerFormatError if one is in a format newer than this etappe reads."""
        return self._committed(strict=True)

    def _committed(self, *, strict: bool) -> list[Checkpoint]:
        found = []
        for path, step in self._candidates():
            try:
                body = manifest.read(path, step=step)
            except NewerFormatError:
                if strict:
                    raise
                continue
            except CheckpointError:
                continue
            found.append(Checkpoint(path, step, manifest.metrics_of(body)))
        return found

    def latest(self) -> Path | None:
        """The highest step that verifies; each bad one skipped is reported with a CheckpointWarning. Raises
        NewerFormatError at one in a newer format: falling back past it would let a run retrain over it."""
        for _ in range(_RESCANS):
            vanished = []
            found = next(self._verified(reversed(self._candidates(warn=True)), vanished), None)
            if found is not None or not vanished:
                return found
        return None

    def best(self) -> Path | None:
        """The best checkpoint by ``monitor`` that verifies; the latest one if there is no monitor or no metric."""
        ranked = self._ranked(self.checkpoints())
        if not ranked:
            return self.latest()
        return next(self._verified(((c.path, c.step) for c in ranked), []), None) or self.latest()

    def load(self, path: str | os.PathLike | None = None, /, *, trusted: bool = False, strict: bool = True,
             **objects: Any) -> dict[str, Any]:
        """``load`` a checkpoint of this store; without ``path``, the latest that verifies (bad ones are skipped
        with a warning, each read only once; one in a newer format raises NewerFormatError). ``strict`` and
        ``trusted`` as in ``etappe.load``: strict=False loads into a model what fits and reports the rest;
        trusted matters only for a plain torch.save file given as ``path`` (a store's checkpoints run no code)."""
        folder.check_options(strict, trusted)
        if path is not None:
            try:
                return folder.load(path, trusted=trusted, strict=strict, **objects)
            except CheckpointError:
                if not os.path.lexists(path):
                    raise CheckpointError(
                        f"{path}: gone (removed by the run's writer since it was listed?); call store.load() without a "
                        "path to load the newest checkpoint"
                    ) from None
                raise
        for _ in range(_RESCANS):
            vanished = False
            for candidate, step in reversed(self._candidates(warn=True)):
                try:
                    entries = folder.read(candidate, step=step)
                except NewerFormatError:
                    raise
                except CheckpointError as e:
                    if not candidate.is_dir():
                        vanished = True  # pruned meanwhile
                        continue
                    warnings.warn(f"skipping checkpoint {candidate}: {e}", CheckpointWarning, stacklevel=2)
                    continue
                return folder.restore(candidate, entries, objects, strict=strict)
            if not vanished:
                break
        raise CheckpointError(f"no valid checkpoint in {self.root}")

    def _refuse_linked_root(self, doing: str) -> None:
        if self.root.is_symlink():
            raise CheckpointError(
                f"cannot {doing} {self.root}: it is a symbolic link (to {os.readlink(self.root)}), and etappe never "
                "reads or writes a run's checkpoints through links; replace the link with the folder itself"
            )

    def _candidates(self, *, warn: bool = False) -> list[tuple[Path, int]]:
        """The step folders, by step: real folders (a symbolic link is not followed out of the store) named as
        ``path_for`` names them. ``warn``: say once (CheckpointWarning) of each folder ignored for its name that
        holds a store's checkpoint (a manifest with a step)."""
        self._refuse_linked_root("read checkpoints from")
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return []
        found = []
        for entry in entries:
            step = _step_of(entry.name)
            try:
                if step is not None and entry.is_dir(follow_symlinks=False):
                    found.append((Path(entry.path), step))
                elif warn and step is None and entry.name not in self._warned and not entry.name.startswith("."):
                    problem = _misnamed(Path(entry.path))
                    if problem:
                        self._warned.add(entry.name)
                        warnings.warn(f"ignoring {problem}", CheckpointWarning, stacklevel=3)
            except OSError:
                continue
        return sorted(found, key=lambda pc: pc[1])

    def _verified(self, candidates: Iterable[tuple[Path, int]], vanished: list[Path]) -> Iterator[Path]:
        """The candidates that verify and hold their step; the bad ones are warned about, the vanished listed."""
        for path, step in candidates:
            try:
                folder.verify(path, step=step)
            except NewerFormatError:
                raise
            except CheckpointError as e:
                if not path.is_dir():
                    vanished.append(path)  # pruned meanwhile
                    continue
                warnings.warn(f"skipping checkpoint {path}: {e}", CheckpointWarning, stacklevel=3)
                continue
            yield path

    def _ranked(self, checkpoints: list[Checkpoint]) -> list[Checkpoint]:
        """Checkpoints with a usable ``monitor`` value, best first (later steps first among equals)."""
        if self.monitor is None:
            return []
        usable = [c for c in checkpoints if not math.isnan(c.metrics.get(self.monitor, math.nan))]
        sign = 1 if self.mode == "min" else -1
        return sorted(usable, key=lambda c: (sign * c.metrics[self.monitor], -c.step))

    def _kept(self, committed: list[Checkpoint], newest: int) -> set[int]:
        """The retention rule, for this store and the object store alike: of ``committed`` (readable, by step), the
        steps kept: ``newest`` (the one just saved) and every one any rule keeps."""
        keep = {newest}
        if self.keep_last:
            keep |= {c.step for c in committed[-self.keep_last :]}
        if self.keep_best is not None:
            keep |= {c.step for c in self._ranked(committed)[: self.keep_best]}
        if self.keep_every is not None:
            keep |= {c.step for c in committed if c.step % self.keep_every == 0}
        return keep

    def _prune(self, newest: int) -> None:
        if self.keep_last is None and self.keep_best is None and self.keep_every is None:
            return
        committed = self._committed(strict=False)  # what cannot be read is not ours to delete
        keep = self._kept(committed, newest)
        for c in committed:
            if c.step not in keep:
                fsio.remove_tree(c.path)


def _metric(name: Any, value: Any) -> float:
    """A metric given to ``save`` as a float; UsageError naming it if it is not a number."""
    try:
        if isinstance(value, (str, bytes, bool)) or value is None:
            raise TypeError
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise UsageError(
            f"metric {name!r} must be a number (a float, an int or a one-element tensor), got {shown} "
            f"({type(value).__name__})"
        ) from None


def _holds_checkpoints(link: Path) -> bool:
    """Whether the folder a link points to looks like a store or a checkpoint (only its names are listed)."""
    if link.name == "checkpoints":
        return True
    try:
        names = os.listdir(link)
    except OSError:
        return False
    return manifest.MANIFEST in names or any(_STEP.fullmatch(n) for n in names)


def _misnamed(path: Path) -> str | None:
    """Why a real folder (not a link) holding a store's checkpoint (its manifest records a step) is not read by the
    store under its name; None if it is named as ``path_for`` names that step, or holds none."""
    if _step_of(path.name) is not None or path.is_symlink() or not path.is_dir():
        return None
    try:
        body = manifest.read(path)
    except CheckpointError:
        return None
    step = body.get("step")
    if step is None or path.name == f"step-{step:08d}":
        return None
    return (f"{path}: the manifest says step {step}, but the folder is named {path.name}; a store reads it only as "
            f"step-{step:08d}")


def verify_tree(path: str | os.PathLike) -> list[tuple[Path, str | None]]:
    """Verify a checkpoint, a plain checkpoint file, or every checkpoint under a folder (a run, or many runs).

    Returns (path, error message or None) for each, by path. A store's step folder must hold its step, and a
    checkpoint of a store's step must be in the folder named for it; a symbolic link inside the folder that stands
    for a step folder or a store (and ``path`` itself, unless it is a checkpoint) is reported, not followed; a
    checkpoint pruned while this runs is left out. Raises
    CheckpointError if there is nothing to check.
    """
    from etappe import rundir

    if rundir.looks_like_url(path):  # a run, store or checkpoint on an object store, checked where it is
        from etappe.checkpoint.objectstore import verify_url

        return verify_url(rundir.location(path, "path"))
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file() or (path / manifest.MANIFEST).exists():
        targets = [path]
    elif path.is_symlink():
        return [(path, f"{path}: a symbolic link (to {os.readlink(path)}); not followed")]
    else:
        targets = []
        for here, dirs, _ in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for d in list(dirs):
                if Path(here, d).is_symlink():  # not followed: reported if it stands for a step or a store
                    dirs.remove(d)
                    if _STEP.fullmatch(d) or _holds_checkpoints(Path(here, d)):
                        targets.append(Path(here, d))
                elif (Path(here, d) / manifest.MANIFEST).exists() or _STEP.fullmatch(d):
                    targets.append(Path(here, d))
                    dirs.remove(d)  # a checkpoint's insides are its own business
        if not targets:
            raise CheckpointError(f"{path}: no checkpoints in it (folders with a manifest.json, or step-N folders)")
    results = []
    for target in targets:
        if target != path and target.is_symlink():
            results.append((target, f"{target}: a symbolic link (to {os.readlink(target)}); not followed"))
            continue
        try:
            folder.verify(target, step=_step_of(target.name))
            results.append((target, _misnamed(target) if target != path else None))
        except CheckpointError as e:
            if target != path and not target.exists():
                continue  # pruned meanwhile: it was not there to verify
            results.append((target, str(e)))
    return results
