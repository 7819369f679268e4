"""Locks: a store's one writer (``lock_writer``) and a save in progress (``fsio.temp_folder`` locks its folder).

A lock is an ``flock`` on an open folder or file. Unlike a pid, it is seen alike from every pid namespace (a
container) that shares the file system, and it is released however its process ends, so ``fsio.sweep`` can tell
a crashed save's temporary folder (nobody holds its lock) from one in progress.
"""

import os
import socket
import weakref
from pathlib import Path

from etappe.checkpoint.errors import CheckpointError

try:
    import fcntl
except ImportError:  # Windows: no flock; there nothing is swept and one writer per folder is not enforced
    fcntl = None

WRITER_LOCK = ".writer.lock"  # only where a folder itself cannot be locked (NFS): see ``lock_writer``


class Lock:
    """An ``flock`` held on an open folder or file, until ``release()``, garbage collection, or the end of the
    process, however it ends. A forked child closes its copy at once (``_forget_in_child``), so a DataLoader
    worker does not keep a run locked after its trainer died."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        _HELD.add(self)

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            _HELD.discard(self)
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 -- at interpreter exit; the process's end releases it anyway
            pass


_HELD: "weakref.WeakSet[Lock]" = weakref.WeakSet()


def _forget_in_child() -> None:
    # closing the child's copy leaves the parent's lock alone (flock belongs to the open file, shared by both)
    for lock in list(_HELD):
        if lock.fd is not None:
            fd, lock.fd = lock.fd, None
            try:
                os.close(fd)
            except OSError:
                pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def try_lock(fd: int) -> bool | None:
    """Take an exclusive flock on ``fd`` without waiting: True if taken, False if another holds it, None where the
    file system cannot lock it (NFS cannot flock a folder, which opens read-only) or there is no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def same(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the folder or file open as ``fd`` (not renamed or removed meanwhile)."""
    try:
        here, there = os.lstat(path), os.fstat(fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def lock_writer(folder: Path) -> Lock | None:
    """Become ``folder``'s one writer: take an exclusive lock on it, held until the returned Lock is released (or
    this process ends). Raises CheckpointError naming the holder if another process (or another store of this
    one) has it. Returns None where no lock can be taken (no flock here); the folder is created if missing.

    The lock is an flock on the folder itself, so no file is added to it; where the file system cannot lock a
    folder (NFS), on a ``WRITER_LOCK`` file in it, which also records the holder.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        raise CheckpointError(f"cannot save checkpoints in {folder}: {e.strerror} ({e.filename})") from None
    taken = try_lock(fd)
    holder = None
    if taken is None and fcntl is not None:  # a folder this file system cannot lock: a file in it
        os.close(fd)
        try:
            fd = os.open(folder / WRITER_LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise CheckpointError(f"cannot save checkpoints in {folder}: {e.strerror} ({e.filename})") from None
        taken = try_lock(fd)
        if taken is False:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or None
        elif taken:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    if taken is None:
        os.close(fd)
        return None
    if not taken:
        ours = _held_here(fd)
        os.close(fd)
        if ours:
            raise CheckpointError(
                f"{folder} is being written by another CheckpointStore of this process (pid {os.getpid()}); "
                "one writer per run folder: close() the other store (or the Trainer that resumed or saved the run: "
                "its close()) first"
            )
        raise CheckpointError(
            f"{folder} is being written by another process ({holder or _flock_holder(folder)}); one writer per run "
            "folder: wait for it to end or stop it, or use another folder"
        )
    return Lock(fd)


def _held_here(fd: int) -> bool:
    st = os.fstat(fd)
    for lock in list(_HELD):
        try:
            other = os.fstat(lock.fd) if lock.fd is not None else None
        except OSError:
            continue
        if other is not None and (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def _flock_holder(folder: Path) -> str:
    """'pid N on HOST' of the process holding an flock on ``folder``, from /proc/locks (Linux). A holder in another
    pid namespace or on another host does not show there."""
    try:
        st = os.stat(folder)
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for line in f:
                fields = line.replace("->", "").split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key and fields[4] != "0":
                    return f"pid {fields[4]} on {socket.gethostname()}"
    except OSError:
        pass
    return "pid unknown: in another container or on another host"
