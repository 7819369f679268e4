"""A reader for the IDX format of MNIST and Fashion-MNIST, gzipped or not.

The format: two zero bytes, a type code, the number of dimensions, then one
big-endian uint32 per dimension, then the data. Every header field is checked
and a mismatch names what was expected and what was found.
"""

from __future__ import annotations

import gzip
import struct
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


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (``.gz`` or plain) into a NumPy array of its declared type and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file: {exc}") from None
    if len(raw) < 4:
        raise DataError(f"{path}: expected an IDX header of at least 4 bytes, found {len(raw)} bytes")
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code not in _DTYPES:
        raise DataError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()}: expected 0x0000 then a type code in "
            f"{sorted(hex(c) for c in _DTYPES)}, then the number of dimensions"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header declares {ndim} dimensions but the file ends after {len(raw)} bytes")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _DTYPES[type_code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{path}: IDX header declares shape {shape} of {dtype.name} ({expected} bytes with header), "
            f"but the file holds {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


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
