"""How etappe writes files so that a crash leaves the old version or the new one, never a mix: a checkpoint's
commit, and every other file it writes.

A new checkpoint (``commit_folder``, called by ``folder.write``):

    sweep(parent, name)      remove temporary folders of crashed saves of this name (those nobody holds locked)
    temp_folder(final)       make .tmp-<name>-<pid>-<random> beside the final place, locked while it is written
      write_file(...)        each file, fsynced (a large one around the page cache: direct.py)
      write_file(manifest)   last: the manifest lists every file with its size and checksum (manifest.py)
      fsync_dir(tmp)         the folder's entries, durable
    replace(tmp, final)      the commit: one rename, then the parent folder fsynced

Overwriting a checkpoint in place writes the new files beside the old ones under other names, then replaces the
manifest with ``atomic_write_bytes``. Every other file (config.json, metrics, curves.png, exports, sidecars) goes
through ``atomic_write_bytes`` or ``atomic_path``: a temporary file beside it, fsynced, renamed into place; a
failed write removes the temporary file and leaves the previous one as it was. A checkpoint is deleted by renaming
it out of sight first (``remove_tree``). Readers ignore temporary names. Locks are in locks.py, reading in
reading.py.
"""

import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from etappe.checkpoint import direct, locks
from etappe.checkpoint.errors import CheckpointError

_TEMP = re.compile(r"\.tmp-(?P<name>.*)-(?P<pid>\d+)-[0-9a-f]{8}")


def replace(src: Path, dst: Path) -> None:
    """Move ``src`` onto ``dst`` atomically and durably: a file onto a file, a folder onto a missing or empty folder.

    This is the only ``os.replace`` in etappe; every commit, every atomic write and every delete of a checkpoint
    goes through it.
    """
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (created, renamed, deleted files) durable."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a folder; NTFS journals renames itself
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(final: Path) -> Path:
    """A fresh temporary name beside ``final`` that readers ignore and ``sweep`` recognizes."""
    return final.parent / f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"


def write_file(path: Path, chunks: Iterable[bytes | memoryview], hasher=None) -> int:
    """Write ``chunks`` to a new file, feeding each to ``hasher`` on the way, and fsync it. Returns the size.
    A file of ``direct.MIN`` bytes or more goes around the page cache where the file system allows it."""
    views = [memoryview(chunk).cast("B") for chunk in chunks]
    size = sum(len(view) for view in views)
    if size >= direct.MIN and direct.write(path, views, size, hasher):
        return size
    with open(path, "xb") as f:  # "x": a name we did not pick fresh is never clobbered
        for view in views:
            for at in range(0, len(view), direct.PIECE):
                piece = view[at : at + direct.PIECE]
                if hasher is not None:
                    hasher.update(piece)
                f.write(piece)
        f.flush()
        os.fsync(f.fileno())
    return size


def commit_folder(final: Path, write_files: Callable[[Path], tuple[str, bytes]]) -> None:
    """Make folder ``final`` (missing or empty) appear whole or not at all. ``write_files(tmp)`` writes every file
    into a locked temporary folder beside it, each with ``write_file``, and returns the name and bytes of the
    manifest, which is written last: a folder is a checkpoint only once its manifest is there."""
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep(final.parent, final.name)  # leftovers of crashed saves of this name; saves in progress hold a lock
    with temp_folder(final) as tmp:  # locked until committed; removed if anything fails
        name, manifest = write_files(tmp)
        write_file(tmp / name, [manifest])
        fsync_dir(tmp)
        replace(tmp, final)  # the commit


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Replace file ``path`` by ``data`` so that a reader, even after a crash, finds the old content or the new."""
    with _replacing(Path(path)) as tmp:
        write_file(tmp, [data])


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write a file to (by any writer: torch.onnx, matplotlib, ...). When the
    block ends without an error the file is fsynced and renamed onto ``path``; otherwise it is removed, and
    ``path`` keeps what it held. A link at ``path`` is refused, not written through."""
    path = Path(path)
    refuse_link(path, "write")
    with _replacing(path) as tmp:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it when the block succeeds and removed when it fails."""
    tmp = temp_path(path)
    try:
        yield tmp
        replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


@contextmanager
def temp_folder(final: Path) -> Iterator[Path]:
    """A new temporary folder beside ``final``, locked while the block runs (so ``sweep`` keeps it), and removed
    after it unless the block committed it (renamed it into place; the lock goes with the folder)."""
    for _ in range(100):
        tmp = temp_path(final)
        os.mkdir(tmp)
        fd = _open_folder(tmp)
        # a sweep may have found the folder between mkdir and the lock: then it is being removed; take another
        if locks.try_lock(fd) is not False and locks.same(tmp, fd):
            break
        os.close(fd)
    else:
        raise CheckpointError(f"cannot make a temporary folder beside {final}: each one vanished as it was made")
    lock = locks.Lock(fd)
    try:
        yield tmp
    finally:
        if locks.same(tmp, fd):  # not committed (renamed into place): nothing in it is of use
            remove_quietly(tmp)
        lock.release()


def sweep(folder: Path, name: str | None = None, *, writer: bool = False) -> list[Path]:
    """Remove the temporary folders in ``folder`` (only those for ``name``, if given) of saves that no longer run:
    those whose lock nobody holds. Files and symbolic links are left alone.

    ``writer``: the caller holds ``folder``'s writer lock, so a temporary folder whose lock this file system cannot
    test (NFS) is a leftover of an earlier writer as well. Without it, such a folder is kept: never delete in doubt.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.fullmatch(entry.name)
        if m is None or (name is not None and m["name"] != name):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            fd = _open_folder(entry.path)
        except OSError:
            continue  # gone meanwhile
        try:
            taken = locks.try_lock(fd)
            if taken is False or (taken is None and not writer) or not locks.same(Path(entry.path), fd):
                continue  # in progress; or cannot tell; or renamed meanwhile (committed)
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
        finally:
            os.close(fd)
    return removed


def _open_folder(path: str | os.PathLike) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))


def remove_tree(path: Path) -> None:
    """Delete a folder so that readers see it either whole or gone: rename it to a temporary name first. A folder
    already gone is fine (pruned meanwhile); a symbolic link is refused, never followed."""
    refuse_link(path, "delete")
    doomed = temp_path(path)
    try:
        replace(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def remove_quietly(path: Path) -> None:
    """Best-effort cleanup after a failure; the original error is the one worth reporting."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def refuse_link(path: Path, doing: str) -> None:
    """Raise CheckpointError if ``path`` is a symbolic link: etappe never writes, overwrites or deletes through one,
    so that nothing outside the run is touched."""
    if path.is_symlink():
        raise CheckpointError(
            f"cannot {doing} {path}: it is a symbolic link (to {os.readlink(path)}), and etappe never writes or "
            "deletes through links; remove the link or use another path"
        )
