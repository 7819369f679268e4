"""Writing a large file around the page cache (O_DIRECT), for ``fsio.write_file`` and async save's images.

Why: through the page cache every save fills fresh pages, and on a VM that hands freed pages back to its host
(free page reporting) each one costs a host fault, so the speed of a large write is luck and its CPU cost several
times that of the write itself. Around the cache, the bytes go from memory to the disk, the speed is steady, and a
training process running meanwhile keeps its cores and its cache. Not every file system has O_DIRECT (tmpfs has
not) and a device may want other alignment: then each function here returns False, leaving no file, and the
caller writes through the cache.

O_DIRECT writes whole pages from page-aligned memory: the last write is padded with zeros to a whole page and the
file cut back to its size after. The chunks of ``write`` are copied (and hashed) into one of two reused
page-aligned buffers while a helper thread writes the other; ``write_aligned`` sends an already page-aligned
buffer (``tensorfile.Image``) as it is.
"""

import errno
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

# Bytes hashed at a time, each while still in cache, then written (small files) or copied on (large ones): small
# enough that a foreground that trains meanwhile keeps most of its cache.
PIECE = 2 << 20
MIN = 8 << 20  # files at least this large go around the page cache (``fsio.write_file``)
BUFFER = 16 << 20  # bytes per O_DIRECT write from the copy buffers: several of the disk's largest requests
ALIGNED_PIECE = 8 << 20  # bytes per ``write_aligned`` write: large enough for the disk, small enough to hash in cache

_SPARE: list[mmap.mmap] = []  # the two copy buffers, kept between saves: memory already faulted in fills faster
_SPARE_LOCK = threading.Lock()


def write(path: Path, views: list[memoryview], size: int, hasher=None) -> bool:
    """Write ``views`` (``size`` bytes in all) to new file ``path`` with O_DIRECT, feeding them to ``hasher``, and
    fsync it; False (no file, ``hasher`` reset) where O_DIRECT is refused."""
    return _create(path, size, hasher, lambda fd: _write_through(fd, views, hasher))


def write_aligned(path: Path, buffer: mmap.mmap, size: int, hasher=None) -> bool:
    """``write`` of the first ``size`` bytes of page-aligned ``buffer``, padded to whole pages (an anonymous mmap):
    the data goes from ``buffer`` to the disk with no copy, so the writing thread spends next to no CPU."""
    view = memoryview(buffer)

    def write_pieces(fd: int) -> None:
        for at in range(0, size, ALIGNED_PIECE):
            end = min(at + ALIGNED_PIECE, size)
            if hasher is not None:
                hasher.update(view[at:end])
            _write_all(fd, view[at : end + (-end % mmap.PAGESIZE)])  # whole pages; the tail is cut after

    return _create(path, size, hasher, write_pieces)


def _create(path: Path, size: int, hasher, write_pages: Callable[[int], None]) -> bool:
    """Create ``path`` with O_DIRECT, ``write_pages(fd)`` whole pages into it, cut it to ``size`` and fsync it.
    False (and no file, and ``hasher`` reset) where the file system or device refuses O_DIRECT."""
    fd = _open_direct(path)
    if fd is None:
        return False
    try:
        write_pages(fd)
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


def _open_direct(path: Path) -> int | None:
    """A new file opened for writing with O_DIRECT, or None where the file system does not do it (tmpfs)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flag, 0o666)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return None


def _write_through(fd: int, views: list[memoryview], hasher) -> None:
    """Write ``views`` to O_DIRECT ``fd`` through two page-aligned buffers, the last write padded with zeros to
    whole pages. The caller's thread fills and hashes one buffer while a helper thread writes the other, in
    order; a failed write is raised here, after the helper has stopped."""
    own = _SPARE_LOCK.acquire(blocking=False)  # a second save running at the same time gets buffers of its own
    try:
        if not own or not _SPARE:
            buffers = [mmap.mmap(-1, BUFFER) for _ in range(2)]
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
                    n = min(PIECE, BUFFER - fill, len(view) - at)
                    buffer[fill : fill + n] = view[at : at + n]
                    if hasher is not None:
                        hasher.update(buffer[fill : fill + n])
                    fill, at = fill + n, at + n
                    if fill == BUFFER:
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


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]
