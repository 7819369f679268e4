"""A reader for the IDX format of MNIST and Fashion-MNIST, gzipped or not.

The format: two zero bytes, a type code, the number of dimensions, then one
big-endian uint32 per dimension, then the data. Every header field is checked
and a mismatch names what was expected and what was found.

A gzipped file is decompressed as a stream, header first: the header says how
many bytes the file holds, and no more than that (plus one, to see whether
there is more) is ever decompressed, so a small file cannot expand into GBs.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from etappe.errors import DataError

_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# deflate packs at most 258 bytes into 2 bits: no gzip file expands more than this (plus its small header)
_MAX_GZIP_RATIO = 1032


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or plain) into a NumPy array of its declared type and shape."""
    path = Path(path)
    gzipped = path.suffix == ".gz"
    try:
        size = path.stat().st_size
        with (gzip.open if gzipped else open)(path, "rb") as f:
            raw, shape, dtype, expected = _read_header(path, f)
            if gzipped and expected > _MAX_GZIP_RATIO * size + 1024:
                raise DataError(f"{path}: IDX header declares shape {shape} of {dtype.name} ({expected} bytes with "
                                f"header), which a gzip file of {size} bytes cannot hold; the file is damaged")
            if not gzipped and expected != size:
                raise DataError(f"{path}: IDX header declares shape {shape} of {dtype.name} ({expected} bytes with "
                                f"header), but the file holds {size} bytes")
            body = f.read(expected - len(raw) + 1)  # one byte more than declared: is there more?
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read IDX file: {exc}") from None
    if len(raw) + len(body) != expected:
        found = "more" if len(raw) + len(body) > expected else f"{len(raw) + len(body)} bytes"
        raise DataError(f"{path}: IDX header declares shape {shape} of {dtype.name} ({expected} bytes with header), "
                        f"but the file holds {found}" + (" decompressed" if gzipped else ""))
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _read_header(path: Path, f: object) -> tuple[bytes, tuple[int, ...], np.dtype, int]:
    """The header's bytes, the shape and type it declares, and the file's size in bytes that follows from them."""
    raw = f.read(4)
    if len(raw) < 4:
        raise DataError(f"{path}: expected an IDX header of at least 4 bytes, found {len(raw)} bytes")
    zero, type_code, ndim = struct.unpack(">HBB", raw)
    if zero != 0 or type_code not in _DTYPES:
        raise DataError(
            f"{path}: bad IDX magic number 0x{raw.hex()}: expected 0x0000 then a type code in "
            f"{sorted(hex(c) for c in _DTYPES)}, then the number of dimensions"
        )
    raw += f.read(4 * ndim)
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: IDX header declares {ndim} dimensions but the file ends after {len(raw)} bytes")
    shape = struct.unpack(f">{ndim}I", raw[4:])
    dtype = _DTYPES[type_code]
    return raw, shape, dtype, len(raw) + math.prod(shape) * dtype.itemsize


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped when the name ends in ``.gz``); used by tests and tools."""
    path = Path(path)
    codes = {dt.newbyteorder(">") if dt.itemsize > 1 else dt: code for code, dt in _DTYPES.items()}
    big = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if big not in codes:
        raise DataError(f"cannot write dtype {array.dtype} as IDX; use uint8, int8, int16, int32, float32 or float64")
    data = struct.pack(">HBB", 0, codes[big], array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += np.ascontiguousarray(array, dtype=big).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(data)
