"""Durable file operations: the one atomic rename, fsync, temporary folders beside their final place, locks,
and opening a checkpoint's files without following links.

A temporary name is ``.tmp-<name>-<pid>-<random>``: readers ignore it. A save holds an ``flock`` on its temporary
folder while it writes, and ``sweep`` removes only temporary folders whose lock it can take: a lock, unlike a pid,
is seen alike from every pid namespace (a container) that shares the file system, and is released however its
process ends. A store's one writer holds a lock on the store's folder too (``lock_writer``).
"""

import errno
import json
import mmap
import os
import re
import secrets
import shutil
import socket
import stat
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from etappe.checkpoint.errors import CheckpointError

try:
    import fcntl
except ImportError:  # Windows: no flock; there nothing is swept and one writer per folder is not enforced
    fcntl = None

_TEMP = re.compile(r"\.tmp-(?P<name>.*)-(?P<pid>\d+)-[0-9a-f]{8}")
WRITER_LOCK = ".writer.lock"  # only where a folder itself cannot be locked (NFS): see ``lock_writer``


def replace(src: Path, dst: Path) -> None:
    """Move ``src`` onto ``dst`` atomically and durably: a file onto a file, a folder onto a missing or empty folder.

    This is the only ``os.replace`` in etappe; every commit and every delete of a checkpoint goes through it.
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


def refuse_link(path: Path, doing: str) -> None:
    """Raise CheckpointError if ``path`` is a symbolic link: etappe never writes, overwrites or deletes through one,
    so that nothing outside the run is touched."""
    if path.is_symlink():
        raise CheckpointError(
            f"cannot {doing} {path}: it is a symbolic link (to {os.readlink(path)}), and etappe never writes or "
            "deletes through links; remove the link or use another path"
        )


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Replace file ``path`` by ``data`` so that a reader, even after a crash, finds the old content or the new."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write_file(tmp, [data])
        replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write a file to (by any writer: torch.onnx, matplotlib, ...). When the
    block ends without an error the file is fsynced and renamed onto ``path``; otherwise it is removed, and
    ``path`` keeps what it held. A link at ``path`` is refused, not written through."""
    path = Path(path)
    refuse_link(path, "write")
    tmp = temp_path(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


# Bytes hashed at a time, each while still in cache: then written (small files) or copied on (large ones).
# 2 MB beat 8 MB and whole tensors here, and a foreground that trains meanwhile keeps more of its cache.
PIECE = 2 << 20
DIRECT_MIN = 8 << 20  # files at least this large go around the page cache (``write_file``)
DIRECT_PIECE = 16 << 20  # bytes per O_DIRECT write (4 of the disk's 4 MB requests); 8-64 MB did alike here


def write_file(path: Path, chunks: Iterable[bytes | memoryview], hasher=None) -> int:
    """Write ``chunks`` to a new file, feeding each to ``hasher`` on the way, and fsync it. Returns the size.

    A file of DIRECT_MIN bytes or more goes to the disk with O_DIRECT where the file system has it: the chunks are
    copied (and hashed) into one of two reused page-aligned buffers while a helper thread writes the other. Why:
    through the page cache every save fills fresh pages, and on a VM that hands freed pages back to its host (free
    page reporting, as on the benchmark machine) each costs a host fault: the same 3.2 GB write ran at 0.5-2.5 GB/s
    by luck, with up to 6x the CPU. Around the cache it ran at 1.6-2.3 GB/s, with half the CPU of a bare
    safetensors write. Elsewhere (tmpfs), through the page cache, as smaller files always are.
    """
    views = [memoryview(chunk).cast("B") for chunk in chunks]
    size = sum(len(view) for view in views)
    if size >= DIRECT_MIN and _write_direct(path, size, hasher, lambda fd: _write_through(fd, views, hasher)):
        return size
    with open(path, "xb") as f:  # "x": a name we did not pick fresh is never clobbered
        for view in views:
            for at in range(0, len(view), PIECE):
                piece = view[at : at + PIECE]
                if hasher is not None:
                    hasher.update(piece)
                f.write(piece)
        f.flush()
        os.fsync(f.fileno())
    return size


def _open_direct(path: Path) -> int | None:
    """A new file opened for writing with O_DIRECT, or None where the file system does not do it (tmpfs)."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | direct, 0o666)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return None


_SPARE: list[mmap.mmap] = []  # the two copy buffers, kept between saves: fresh memory fills 5-10x slower here
_SPARE_LOCK = threading.Lock()


def _write_through(fd: int, views: list[memoryview], hasher) -> None:
    """Write ``views`` to O_DIRECT ``fd`` through two page-aligned buffers, the last write padded with zeros to
    whole pages. The caller's thread fills and hashes one buffer while a helper thread writes the other, in
    order; a failed write is raised here, after the helper has stopped."""
    own = _SPARE_LOCK.acquire(blocking=False)  # a second save running at the same time gets buffers of its own
    try:
        if not own or not _SPARE:
            buffers = [mmap.mmap(-1, DIRECT_PIECE) for _ in range(2)]
            if own:
                _SPARE.extend(buffers)
        else:
            buffers = _SPARE
        # a pool of its own per file: a module-wide one would leave a forked child (a DataLoader worker, a test's
        # zygote) a pool whose thread is gone, and its saves waiting for ever
        with ThreadPoolExecutor(1, thread_name_prefix="etappe-write") as helper:
            sent: list[Future | None] = [None, None]
            which = fill = 0
            for view in views:
                at = 0
                while at < len(view):
                    if fill == 0 and sent[which] is not None:
                        sent[which].result()  # this buffer's last write is done: it may be refilled
                    buffer = memoryview(buffers[which])
                    n = min(PIECE, DIRECT_PIECE - fill, len(view) - at)
                    buffer[fill : fill + n] = view[at : at + n]
                    if hasher is not None:
                        hasher.update(buffer[fill : fill + n])
                    fill, at = fill + n, at + n
                    if fill == DIRECT_PIECE:
                        sent[which] = helper.submit(_write_all, fd, buffer)
                        which, fill = 1 - which, 0
            if fill:
                pad = -fill % mmap.PAGESIZE
                buffer = memoryview(buffers[which])
                buffer[fill : fill + pad] = bytes(pad)
                sent[which] = helper.submit(_write_all, fd, buffer[: fill + pad])
            for done in sent:
                if done is not None:
                    done.result()
    finally:
        if own:
            _SPARE_LOCK.release()


DIRECT_PIECE_ASYNC = 8 << 20  # bytes per write_direct write: large enough for the disk, small enough to hash in cache


def write_direct(path: Path, buffer: mmap.mmap, size: int, hasher=None) -> int:
    """``write_file`` of the first ``size`` bytes of a page-aligned ``buffer`` padded to whole pages (an anonymous
    mmap), with O_DIRECT where the file system has it: the data goes from ``buffer`` to the disk, not through the
    page cache, so the writing thread spends next to no CPU (for 3.2 GB here: ~0.2 s against ~5 s through the
    cache) and a training process running meanwhile keeps its cores and its cache. Elsewhere, ``write_file``.
    """
    view = memoryview(buffer)

    def write_pieces(fd: int) -> None:
        for at in range(0, size, DIRECT_PIECE_ASYNC):
            end = min(at + DIRECT_PIECE_ASYNC, size)
            if hasher is not None:
                hasher.update(view[at:end])
            _write_all(fd, view[at : end + (-end % mmap.PAGESIZE)])  # whole pages; the tail is cut after

    if _write_direct(path, size, hasher, write_pieces):
        return size
    return write_file(path, [view[:size]], hasher)


def _write_direct(path: Path, size: int, hasher, write: Callable[[int], None]) -> bool:
    """Create ``path`` with O_DIRECT, ``write(fd)`` whole pages into it, cut it to ``size`` and fsync it. False (and
    no file, and ``hasher`` reset) where the file system or device refuses O_DIRECT: write it the usual way then."""
    fd = _open_direct(path)
    if fd is None:
        return False
    try:
        write(fd)
        os.ftruncate(fd, size)  # the last write was padded to whole pages
        os.fsync(fd)
        return True
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: the device wants other alignment
            raise
        if hasher is not None:
            hasher.reset()
    finally:
        os.close(fd)
    os.unlink(path)
    return False


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def open_listed(folder: Path, name: str) -> int:
    """A file descriptor for reading file ``name`` (``file`` or ``sub/file``) of checkpoint ``folder``.

    No symbolic link inside ``folder`` is followed (a listed file that is a link to a file outside could hold the
    right bytes), and nothing but a regular file is opened (a FIFO would block the reader for ever): both raise
    CheckpointError. A missing file raises FileNotFoundError; other failures OSError.
    """
    parts = name.split("/")
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            try:
                inner = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR) and Path(folder, *parts[: i + 1]).is_symlink():
                    raise CheckpointError(
                        f"{Path(folder, *parts[: i + 1])}: a symbolic link; etappe never reads a run's or a "
                        "checkpoint's files through links: replace it with the file itself"
                    ) from None
                raise
            os.close(fd)
            fd = inner
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{folder / name}: not a regular file")
        return fd
    except BaseException:
        os.close(fd)
        raise


SMALL_FILE_LIMIT = 16 << 20  # config.json, metrics.jsonl, sidecars: far below this; a larger one is hostile


def read_inside(folder: Path, name: str, limit: int = SMALL_FILE_LIMIT) -> bytes | None:
    """The bytes of file ``name`` of ``folder`` (a run folder's config.json, metrics.jsonl, a sidecar), read as
    ``open_listed`` opens files: never through a symbolic link, only a regular file. None if it does not exist;
    CheckpointError if it is a link, not a regular file, or larger than ``limit`` bytes."""
    try:
        fd = open_listed(Path(folder), name)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointError(f"{Path(folder, name)}: cannot read: {e.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CheckpointError(f"{Path(folder, name)}: {size} bytes, more than the {limit} such a file can hold; "
                                  "it is not one etappe wrote")
        chunks, left = [], size + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise CheckpointError(f"{Path(folder, name)}: grew past {limit} bytes while read; it is not one etappe wrote")
        return data
    except OSError as e:
        raise CheckpointError(f"{Path(folder, name)}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)


def read_json(folder: Path, name: str, what: str, fix: str) -> dict | None:
    """File ``name`` of ``folder`` (a run's config.json, an export's sidecar) as a JSON object, read as
    ``read_inside`` reads; None if it does not exist. CheckpointError, saying ``what`` was expected and ``fix``,
    if it is not a JSON object."""
    data = read_inside(folder, name)
    if data is None:
        return None
    path = Path(folder, name)
    try:
        value = json.loads(data)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(f"{path} is not valid JSON ({str(e)[:200]}); {fix}") from None
    except RecursionError:
        raise CheckpointError(f"{path} nests deeper than Python can read, which no file etappe writes does; "
                              f"{fix}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a {type(value).__name__}, expected {what}; {fix}")
    return value


def map_fd(fd: int, size: int, where: Path) -> mmap.mmap | bytes | bytearray:
    """The bytes of open file ``fd`` of known ``size``, mapped copy-on-write rather than read: hashing them and
    viewing them as tensors then costs no copy (writes to those tensors stay private to this process)."""
    found = os.fstat(fd).st_size
    if found != size:
        raise EOFError(f"{where}: {found} bytes, expected {size}")
    if not size:
        return b""
    try:
        return mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    except OSError:  # a file system that cannot map files: read them
        buf = bytearray(size)
        view, done = memoryview(buf), 0
        while done < size and (n := os.preadv(fd, [view[done:]], done)):
            done += n
        if done != size:
            raise EOFError(f"{where}: shorter than its {size} bytes while reading") from None
        return buf


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


# ------------------------------------------------------------------ locks


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


def _try_lock(fd: int) -> bool | None:
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


def _same(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the folder or file open as ``fd`` (not renamed or removed meanwhile)."""
    try:
        here, there = os.lstat(path), os.fstat(fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


@contextmanager
def temp_folder(final: Path) -> Iterator[Path]:
    """A new temporary folder beside ``final``, locked while the block runs (so ``sweep`` keeps it), and removed
    after it unless the block committed it (renamed it into place; the lock goes with the folder)."""
    for _ in range(100):
        tmp = temp_path(final)
        os.mkdir(tmp)
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
        # a sweep may have found the folder between mkdir and the lock: then it is being removed; take another
        if _try_lock(fd) is not False and _same(tmp, fd):
            break
        os.close(fd)
    else:
        raise CheckpointError(f"cannot make a temporary folder beside {final}: each one vanished as it was made")
    lock = Lock(fd)
    try:
        yield tmp
    finally:
        if _same(tmp, fd):  # not committed (renamed into place): nothing in it is of use
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
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue  # gone meanwhile
        try:
            taken = _try_lock(fd)
            if taken is False or (taken is None and not writer) or not _same(Path(entry.path), fd):
                continue  # in progress; or cannot tell; or renamed meanwhile (committed)
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
        finally:
            os.close(fd)
    return removed


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
    taken = _try_lock(fd)
    holder = None
    if taken is None and fcntl is not None:  # a folder this file system cannot lock: a file in it
        os.close(fd)
        try:
            fd = os.open(folder / WRITER_LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise CheckpointError(f"cannot save checkpoints in {folder}: {e.strerror} ({e.filename})") from None
        taken = _try_lock(fd)
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
                "one writer per run folder: close() the other store first"
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
