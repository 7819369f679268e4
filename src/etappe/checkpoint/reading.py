"""Reading a checkpoint's listed files and a run's small files (config.json, metrics.jsonl, sidecars) without
following symbolic links: a listed file that is a link to a file outside could hold the right bytes, and a FIFO
would block its reader for ever. Small files are bounded in size; listed ones are mapped, not copied.
"""

import errno
import json
import mmap
import os
import stat
from pathlib import Path

from etappe.checkpoint.errors import CheckpointError


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
    except OSError as e:  # a file system that cannot map files: read them, if they fit in memory
        if e.errno == errno.ENOMEM:
            raise CheckpointError(f"{where}: {size} bytes do not fit in this process's memory (mmap: out of "
                                  "memory); the file is too large for this machine, or damaged") from None
        try:
            buf = bytearray(size)
        except MemoryError:
            raise CheckpointError(f"{where}: {size} bytes do not fit in this process's memory; the file is too "
                                  "large for this machine, or damaged") from None
        view, done = memoryview(buf), 0
        while done < size and (n := os.preadv(fd, [view[done:]], done)):
            done += n
        if done != size:
            raise EOFError(f"{where}: shorter than its {size} bytes while reading") from None
        return buf
