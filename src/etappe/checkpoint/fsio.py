"""Durable file operations: the one atomic rename, fsync, temporary folders beside their final place.

A temporary name is ``.tmp-<name>-<pid>-<random>``: readers ignore it, and ``sweep`` removes it once
the process that made it is gone.
"""

import errno
import mmap
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

_TEMP = re.compile(r"\.tmp-(?P<name>.*)-(?P<pid>\d+)-[0-9a-f]{8}")


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


_MINE: set[str] = set()  # temporary names made by this process: in a container, a crashed run had our pid too


def temp_path(final: Path) -> Path:
    """A fresh temporary name beside ``final`` that readers ignore and ``sweep`` recognizes."""
    name = f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
    _MINE.add(name)
    return final.parent / name


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


def map_file(path: Path, size: int) -> mmap.mmap | bytes | bytearray:
    """The bytes of a file of known ``size``, mapped copy-on-write rather than read: hashing them and viewing
    them as tensors then costs no copy (writes to those tensors stay private to this process)."""
    with open(path, "rb", buffering=0) as f:
        found = os.fstat(f.fileno()).st_size
        if found != size:
            raise EOFError(f"{path}: {found} bytes, expected {size}")
        if not size:
            return b""
        try:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError:  # a file system that cannot map files: read them
            buf = bytearray(size)
            view, done = memoryview(buf), 0
            while done < size and (n := f.readinto(view[done:])):
                done += n
            if done != size:
                raise EOFError(f"{path}: shorter than its {size} bytes while reading") from None
            return buf


def remove_tree(path: Path) -> None:
    """Delete a folder so that readers see it either whole or gone: rename it to a temporary name first."""
    doomed = temp_path(path)
    replace(path, doomed)
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


def sweep(folder: Path, name: str | None = None) -> list[Path]:
    """Remove temporary entries in ``folder`` left by processes that no longer run (optionally only for ``name``)."""
    removed = []
    try:
        children = list(folder.iterdir())
    except FileNotFoundError:
        return removed
    for child in children:
        m = _TEMP.fullmatch(child.name)
        if m is None or (name is not None and m["name"] != name):
            continue
        pid = int(m["pid"])
        in_use = (child.name in _MINE) if pid == os.getpid() else _alive(pid)
        if in_use:
            continue
        remove_quietly(child)
        removed.append(child)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True
