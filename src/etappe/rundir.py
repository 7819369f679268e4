"""Where a run lives: a local folder (a Path) or an object-store URL (``s3://bucket/prefix``, kept as a string).

Every place a run folder, checkpoint path or store root comes in turns it into a location here, so a URL is
either honoured (s3://, through etappe.checkpoint.objectstore) or refused in one line; it never silently becomes
a local folder named ``s3:/bucket/prefix``. A URL's files are written as one object each (no rename on an
object store), a local folder's through the one atomic-write helper.

    location("runs/a") -> Path("runs/a")      location("s3://b/run/") -> "s3://b/run"
    join(loc, "config.json")   write_bytes(target, data)   read_bytes(target)   open_store(loc, **retention)
    fetched(url, which) -> a temporary local copy of a run's (or store's) best/latest checkpoint
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

from etappe.errors import EtappeError, UsageError

Location = Union[Path, str]  # a str is always a checked URL
CONFIG, CHECKPOINTS = "config.json", "checkpoints"
SMALL_OBJECT_LIMIT = 16 * 2**20  # config.json, metrics.jsonl: as for a local run's small files

# "scheme:/..." with a scheme of two letters or more: a URL (or one typed with a slash missing). One letter is a
# Windows drive ("C:/runs"), which is a path.
_URL_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]+:/")


def looks_like_url(value: object) -> bool:
    """Whether ``value`` is a string that reads as a URL ("s3://...", "gs://...", or "s3:/..." with a slash lost)."""
    return isinstance(value, str) and _URL_LIKE.match(value.strip()) is not None  # spaced: refused as a URL


def is_url(loc: object) -> bool:
    """Whether ``loc`` (a location) is an object-store URL."""
    return isinstance(loc, str) and looks_like_url(loc)


def location(value: str | os.PathLike, what: str = "run folder") -> Location:
    """``value`` as a location: a URL etappe honours (as its string, without a trailing slash), or a Path.
    A URL etappe cannot honour, or one missing a slash ("s3:/b/run"), is a UsageError, one line."""
    if isinstance(value, Path) or not isinstance(value, str):
        return Path(value)
    if value != value.strip() and looks_like_url(value):  # pasted, or read from a file, with a space
        raise UsageError(f"{what} {value!r} has white space around a URL; write {value.strip()!r}")
    if not looks_like_url(value):
        return Path(value)
    scheme, _, rest = value.partition(":")
    if not rest.startswith("//"):
        raise UsageError(f"{what} {value!r} reads as a URL with a slash missing; write {scheme}://{rest.lstrip('/')} "
                         f"for an object store, or ./{value} for a local folder of that name")
    from etappe.checkpoint.objectstore import check_url

    check_url(value)
    return value.rstrip("/")


def join(loc: Location, *names: str) -> Location:
    if is_url(loc):
        return "/".join([loc.rstrip("/"), *names])
    return Path(loc, *names)


def write_bytes(target: Location, data: bytes) -> None:
    """One file whole: an object's one PUT on a store, the atomic-write helper on a disk."""
    if is_url(target):
        from etappe.checkpoint.objectstore import write_object

        write_object(target, data)
        return
    from etappe.checkpoint.fsio import atomic_write_bytes

    atomic_write_bytes(Path(target), data)


def read_object(url: str, limit: int = SMALL_OBJECT_LIMIT) -> bytes | None:
    """A small object of a run (config.json, metrics.jsonl), bounded as a local run's small files are; None if
    absent."""
    from etappe.checkpoint.objectstore import read_object as read

    data = read(url)
    if data is not None and len(data) > limit:
        raise EtappeError(f"{url}: {len(data)} bytes, more than the {limit} such a file can hold; it is not one "
                          "etappe wrote")
    return data


def read_json(url: str, what: str, fix: str) -> dict | None:
    """Object ``url`` as a JSON object, as etappe.checkpoint.reading.read_json reads a local file; None if absent."""
    from etappe.checkpoint.errors import CheckpointError

    data = read_object(url)
    if data is None:
        return None
    try:
        value = json.loads(data)
    except ValueError as e:
        raise CheckpointError(f"{url} is not valid JSON ({str(e)[:200]}); {fix}") from None
    except RecursionError:
        raise CheckpointError(f"{url} nests deeper than Python can read, which no file etappe writes does; {fix}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{url} holds a {type(value).__name__}, expected {what}; {fix}")
    return value


def open_store(loc: Location, **kwargs: Any) -> Any:
    """The checkpoint store of the run at ``loc`` (its ``checkpoints`` folder or prefix)."""
    if is_url(loc):
        from etappe.checkpoint.objectstore import open_store as open_objects

        return open_objects(join(loc, CHECKPOINTS), **kwargs)
    from etappe.checkpoint.store import CheckpointStore

    return CheckpointStore(Path(loc, CHECKPOINTS), **kwargs)


def has_checkpoints(loc: Location) -> bool:
    """Whether the run at ``loc`` holds checkpoints (locally: a checkpoints folder; on a store: a committed one)."""
    if is_url(loc):
        return open_store(loc).latest() is not None
    return Path(loc, CHECKPOINTS).is_dir()


def is_file(target: Location) -> bool:
    """Whether file ``target`` exists (an object, on a store)."""
    if is_url(target):
        return read_object(target, limit=2**40) is not None
    return Path(target).is_file()


def ensure_reachable(url: str) -> None:
    """A cheap check that the store answers before a run starts (the store's lock then proves it writable)."""
    read_object(join(url, CONFIG))


class Fetched:
    """A temporary local copy of a URL's run or checkpoint: ``path`` to read, and the URLs its paths stand for."""

    def __init__(self, path: Path, names: list[tuple[str, str]]) -> None:
        self.path, self.names = path, names  # (local path, URL), the longest local path first

    def shown(self, text: str) -> str:
        """``text`` (printed output, an error) naming the URLs where it names the local copy."""
        for local, url in self.names:
            text = text.replace(local, url)
        return text

    def renamed(self, exc: EtappeError) -> EtappeError:
        """``exc`` naming the URLs (same type, same exit code)."""
        text = self.shown(str(exc))
        if text == str(exc):
            return exc
        try:
            return type(exc)(text)
        except TypeError:  # an error type with another signature: the message as it was
            return exc


@contextmanager
def fetched(url: str, which: str = "latest", monitor: str | None = None) -> Iterator[Fetched]:
    """A temporary local copy of what ``url`` names, for the code that reads local folders: a run (its
    config.json, model.safetensors and its ``which`` checkpoint, best or latest, as RUN/checkpoints/step-N), a
    store root (its ``which`` checkpoint), or one checkpoint. Removed afterwards. An EtappeError raised inside
    names ``url``, not the temporary folder."""
    tmp = Path(tempfile.mkdtemp(prefix="etappe-fetch-"))
    copy = Fetched(tmp, [(str(tmp), url)])
    try:
        try:
            copy = _fetch(url, tmp, which, monitor)
        except EtappeError as exc:
            raise copy.renamed(exc) from None
        try:
            yield copy
        except EtappeError as exc:
            raise copy.renamed(exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def local_copy(path: str | os.PathLike) -> Iterator[Path]:
    """``path`` itself as a Path, or, for a checkpoint's URL (as a store's ``latest()`` gives it), a temporary
    local copy of that checkpoint, removed afterwards; an EtappeError raised inside names the URL."""
    if not looks_like_url(path):
        yield Path(path)
        return
    url = location(path, "checkpoint")
    from etappe.checkpoint.objectstore import fetch

    tmp = Path(tempfile.mkdtemp(prefix="etappe-fetch-"))
    copy = Fetched(tmp / "checkpoint", [(str(tmp / "checkpoint"), url)])
    try:
        try:
            local = Path(fetch(url, tmp / "checkpoint"))
        except EtappeError as exc:
            raise copy.renamed(exc) from None
        copy.names.insert(0, (str(local), url))
        try:
            yield local
        except EtappeError as exc:
            raise copy.renamed(exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch(url: str, tmp: Path, which: str, monitor: str | None) -> Fetched:
    from etappe.checkpoint.objectstore import fetch
    from etappe.config import monitor_mode

    config = read_json(join(url, CONFIG), "a run's config (a JSON object of config keys)",
                       "restore it from the run's checkpoint or start a new run")
    monitor = monitor or (config or {}).get("monitor") or "val_loss"
    monitor = monitor if isinstance(monitor, str) else "val_loss"
    names: list[tuple[str, str]] = []
    for root, run in ((join(url, CHECKPOINTS), True), (url, False)):
        store = _open(root, monitor=monitor, mode=monitor_mode(monitor))
        found = store.best() if which == "best" else store.latest()
        if found is None:
            continue
        step = next((c.step for c in store.checkpoints() if str(c.path) == str(found)), None)
        name = f"step-{step:08d}" if step is not None else "checkpoint"
        if not run:
            local = Path(fetch(found, tmp / name))
            return Fetched(local, [(str(local), str(found)), (str(tmp), url)])
        (tmp / CHECKPOINTS).mkdir()
        local = Path(fetch(found, tmp / CHECKPOINTS / name))
        names.append((str(local), str(found)))
        break
    else:
        if config is None:  # neither a run nor a store: one checkpoint, or nothing fetch can find
            local = Path(fetch(url, tmp / "checkpoint"))
            return Fetched(local, [(str(local), url), (str(tmp), url)])
    if config is not None:
        (tmp / CONFIG).write_bytes((json.dumps(config) + "\n").encode())
    weights = read_object(join(url, "model.safetensors"), limit=2**40)
    if weights is not None:
        (tmp / "model.safetensors").write_bytes(weights)
    return Fetched(tmp, [*names, (str(tmp), url)])


def _open(root: str, **kwargs: Any) -> Any:
    from etappe.checkpoint.objectstore import open_store as open_objects

    return open_objects(root, **kwargs)
