"""Tensors to and from the safetensors format, streamed: no extra copy of tensor bytes on either side.

Writing yields the file as chunks (header, then each tensor's memory), so the caller can hash while writing; or,
for async save, builds it in one reusable page-aligned buffer (``Image``) that tensors are copied into.
Reading views a verified buffer: each tensor is a ``torch.frombuffer`` slice of it. Dtypes the safetensors
format lacks (complex128, complex32, newer float8/4 kinds) are stored as raw bytes, with their real dtype and
shape in the header's ``__metadata__``; the files stay readable by any safetensors reader.
Tensors are laid out by element size, largest first, as safetensors does, so every slice is aligned.
"""

import json
import math
import mmap
import os
import struct
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from etappe.checkpoint import direct, fsio, reading
from etappe.checkpoint.errors import CheckpointError
from etappe.errors import first_line

_CODES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2": "float8_e5m2", "F8_E5M2FNUZ": "float8_e5m2fnuz", "C64": "complex64",
}  # fmt: skip
_DTYPE_OF_CODE = {code: getattr(torch, name) for code, name in _CODES.items() if hasattr(torch, name)}
_CODE_OF_DTYPE = {dtype: code for code, dtype in _DTYPE_OF_CODE.items()}
MAX_HEADER = 100_000_000  # the largest header safetensors itself reads
# Tensors in one file: models hold a few thousand per file, an optimizer's state a few per parameter. A header
# within MAX_HEADER can still list 1.4 million empty tensors, which then cost every reader (inspect, diff) tens of
# seconds and gigabytes; past this count a file is refused as one a model would not write.
MAX_TENSORS = 200_000
_RAW = "etappe.raw"  # __metadata__ key: {name: {"dtype", "shape"}} for tensors stored as raw bytes


@dataclass(frozen=True)
class TensorInfo:
    """What inspection shows of a stored tensor, read from the header alone."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int


def chunks(tensors: dict[str, torch.Tensor]) -> Iterator[bytes | memoryview]:
    """The safetensors file holding ``tensors``, as a header and one chunk per tensor."""
    data = {name: _bytes(t) for name, t in tensors.items()}
    head, places = layout({name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()})
    yield head
    for name in places:  # in file order
        if len(data[name]):
            yield data[name]


def layout(specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The start of a safetensors file holding tensors of these dtypes and shapes (length field, header, padding),
    and where each tensor's bytes lie in the file, {name: (start, end)} in file order. ``chunks`` writes this."""
    stored = sorted(((name, _stored(dtype, shape)) for name, (dtype, shape) in specs.items()),
                    key=lambda it: (-it[1][3], it[0]))
    header: dict = {}
    raw: dict = {}
    offset = 0
    for name, (code, shape, nbytes, _, real) in stored:
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        if real is not None:
            raw[name] = real
    if raw:
        header["__metadata__"] = {_RAW: json.dumps(raw, separators=(",", ":"))}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keeps the data, and so every tensor, 8-byte aligned
    head = struct.pack("<Q", len(text)) + text
    places = {name: (len(head) + start, len(head) + end) for name, (start, end) in
              ((name, header[name]["data_offsets"]) for name, _ in stored)}
    return head, places


class Image:
    """A safetensors file built in memory, to be filled and written more than once: the file's bytes in one
    page-aligned buffer (padded to a whole number of pages, as O_DIRECT writes need), with a place for each
    tensor. ``fill``-ing every tensor and writing ``buffer[:size]`` writes what ``chunks`` would."""

    def __init__(self, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
        head, places = layout(specs)
        self.size = max([len(head), *(end for _, end in places.values())])
        self.buffer = mmap.mmap(-1, self.size + (-self.size % mmap.PAGESIZE))  # anonymous: page-aligned, zeroed
        self.buffer[: len(head)] = head
        self._places: dict[str, torch.Tensor] = {}
        for name, (start, end) in places.items():
            if end > start:
                dtype, shape = specs[name]
                flat = torch.frombuffer(self.buffer, dtype=torch.uint8, count=end - start, offset=start)
                # the format aligns data to 8 bytes: a 16-byte complex128 may sit off its alignment, and torch's
                # vector copies fault on such a view, so it is filled by bytes
                self._places[name] = flat.view(dtype).reshape(shape) if start % dtype.itemsize == 0 else flat
        self.pinned = False

    def pin(self) -> bool:
        """Page-lock the buffer for copies from a GPU (``cudaHostRegister``, as torch.distributed.checkpoint's
        stager pins its buffers): they then go by DMA, without the driver's staging copy, and ``fill`` queues them
        without waiting (``synchronize`` before the buffer is read). Once; undone when the image is freed.
        Returns whether the buffer is pinned (the driver may refuse: the copies then just wait, as unpinned)."""
        if not self.pinned:
            ptr = torch.frombuffer(self.buffer, dtype=torch.uint8).data_ptr()
            if int(torch.cuda.cudart().cudaHostRegister(ptr, len(self.buffer), 0)) == 0:
                # before the mmap is unmapped (the finalizer runs as the image is freed, before its buffer);
                # not at exit, when the CUDA context may be gone already
                weakref.finalize(self, torch.cuda.cudart().cudaHostUnregister, ptr).atexit = False
                self.pinned = True
        return self.pinned

    def fill(self, name: str, t: torch.Tensor) -> None:
        """Copy tensor ``t`` (of the dtype and shape given for ``name``) into its place. From a GPU into a pinned
        buffer the copy is only queued: ``synchronize`` before the buffer is read."""
        place = self._places.get(name)
        if place is None:
            return  # no bytes
        queued = self.pinned and t.is_cuda
        if place.dtype == t.dtype:
            place.copy_(t, non_blocking=queued)  # also resolves conjugate and negative views, and fetches from devices
        else:
            place.copy_(t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8),
                        non_blocking=queued)

    def write(self, path: Path, hasher=None) -> int:
        """Write the file to new file ``path`` and fsync it, from the buffer itself, around the page cache where
        the file system allows it (``direct.write_aligned``). Returns its size."""
        if direct.write_aligned(path, self.buffer, self.size, hasher):
            return self.size
        return fsio.write_file(path, [memoryview(self.buffer)[: self.size]], hasher)


def parse(buf, where: Path) -> dict[str, torch.Tensor]:
    """Tensors viewing ``buf`` (a writable buffer: an mmap or bytearray), a whole, verified safetensors file."""
    header, base = _header(bytes(buf[:8]), lambda n: buf[8 : 8 + n], len(buf), where)
    raw = _raw_of(header, where)
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype, shape = _real(name, info, raw, where)
        try:
            if end == start:
                out[name] = torch.empty(shape, dtype=dtype)
                continue
            flat = torch.frombuffer(buf, dtype=torch.uint8, count=end - start, offset=base + start)
            if flat.data_ptr() % dtype.itemsize:  # the format aligns to 8 bytes: a complex128 may sit off its 16,
                aligned = torch.empty(shape, dtype=dtype)  # and torch's vector kernels fault on such a view: copy it
                aligned.reshape(-1).view(torch.uint8).copy_(flat)
                out[name] = aligned
            else:
                out[name] = flat.view(dtype).reshape(shape)
        except (RuntimeError, ValueError) as e:  # a shape torch refuses (too many dimensions, say)
            raise CheckpointError(f"{where}: tensor {name[:80]!r} of shape {list(shape[:8])}: {first_line(e)}") from None
    return out


def infos(path: Path) -> dict[str, TensorInfo]:
    """Names, shapes, dtypes and sizes of the tensors in a safetensors file, reading only its header (a symbolic
    link to one is not followed)."""
    try:
        fd = reading.open_listed(path.parent, path.name)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    with open(fd, "rb") as f:
        size = os.fstat(fd).st_size
        header, _ = _header(f.read(8), f.read, size, path)
    raw = _raw_of(header, path)
    out = {}
    for name, info in header.items():
        dtype, shape = _real(name, info, raw, path)
        start, end = info["data_offsets"]
        out[name] = TensorInfo(name, shape, str(dtype).removeprefix("torch."), end - start)
    return out


def _bytes(t: torch.Tensor) -> memoryview | bytes:
    """A tensor's bytes in memory order (a view of its memory when it is a plain contiguous CPU tensor)."""
    t = t.detach().cpu().resolve_conj().resolve_neg().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""


def _stored(dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[str, list[int], int, int, dict | None]:
    """(safetensors dtype code, stored shape, bytes, alignment, real dtype/shape if stored raw)."""
    nbytes = math.prod(shape) * dtype.itemsize
    code = _CODE_OF_DTYPE.get(dtype)
    if code is not None:
        return code, list(shape), nbytes, dtype.itemsize, None
    real = {"dtype": str(dtype).removeprefix("torch."), "shape": list(shape)}
    return "U8", [nbytes], nbytes, dtype.itemsize, real


def _header(first8: bytes, read, size: int, where: Path) -> tuple[dict, int]:
    """The header of a safetensors file, every field checked for its type and every tensor for lying inside the
    file, and where the data starts. Anything else raises CheckpointError, as for any corrupt file."""
    if len(first8) != 8:
        raise CheckpointError(f"{where}: too short for a safetensors file ({size} bytes)")
    (n,) = struct.unpack("<Q", first8)
    if n > MAX_HEADER:
        raise CheckpointError(
            f"{where}: safetensors header of {n} bytes, more than the format allows ({MAX_HEADER}); the file is corrupt"
        )
    if 8 + n > size:
        raise CheckpointError(f"{where}: safetensors header of {n} bytes does not fit in {size} bytes")
    text = bytes(read(n))
    check_tensor_count(text, where)
    try:
        header = json.loads(text)  # a name given twice: the last one counts, as in the safetensors library
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: malformed safetensors header: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: malformed safetensors header: a {type(header).__name__}, not an object")
    if len(header) > MAX_TENSORS + 1:  # + 1: __metadata__
        raise CheckpointError(f"{where}: safetensors header lists {len(header) - 1} tensors, more than the "
                              f"{MAX_TENSORS} etappe reads in one file; not a file a model or optimizer writes")
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            if not (info is None or (isinstance(info, dict) and all(isinstance(v, str) for v in info.values()))):
                raise CheckpointError(f"{where}: malformed safetensors header: __metadata__ must map names to strings")
            continue
        problem = _info_problem(info)
        if problem:
            raise CheckpointError(f"{where}: malformed safetensors header: tensor {name[:80]!r} {problem}")
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= size - base:
            raise CheckpointError(f"{where}: tensor {name[:80]!r} at bytes {start}..{end} lies outside the file")
    _check_tiling(header, size - base, where)
    return header, base


def _check_tiling(header: dict, data_size: int, where: Path) -> None:
    """The safetensors library's rule: the tensors' byte ranges, in order, tile the data exactly, from its first
    byte to the file's end, each range starting where the one before it ended. No two tensors share bytes (a tied
    weight is stored once, under one name), and no bytes lie between or after them."""
    ranges = sorted((info["data_offsets"][0], info["data_offsets"][1], name) for name, info in header.items()
                    if name != "__metadata__")
    at = 0
    for start, end, name in ranges:
        if start != at:
            what = "overlaps the tensor before it" if start < at else f"leaves bytes {at}..{start} unused before it"
            raise CheckpointError(f"{where}: malformed safetensors header: tensor {name[:80]!r} at bytes "
                                  f"{start}..{end} {what}")
        at = end
    if at != data_size:
        raise CheckpointError(f"{where}: malformed safetensors header: the tensors end at byte {at} of the data, "
                              f"which is {data_size} bytes long: the file is truncated or damaged")


def check_tensor_count(header: bytes, where: Path) -> None:
    """CheckpointError if a safetensors header (its JSON bytes) lists more than MAX_TENSORS tensors, counted
    before parsing: on such a header the parse, and everything after it, is what costs."""
    if header.count(b"data_offsets") > MAX_TENSORS:
        raise CheckpointError(f"{where}: safetensors header lists more than the {MAX_TENSORS} tensors etappe reads in "
                              "one file; not a file a model or optimizer writes")


def _info_problem(info) -> str | None:
    if not isinstance(info, dict):
        return f"is a {type(info).__name__}, not an object"
    if not isinstance(info.get("dtype"), str):
        return "has no dtype"
    if not _dims(info.get("shape")):
        return f"has shape {str(info.get('shape'))[:80]}, not a list of whole numbers >= 0"
    offsets = info.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and _dims(offsets)):
        return f"has data_offsets {str(offsets)[:80]}, not two whole numbers >= 0"
    return None


def _dims(value) -> bool:
    return isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)


def _raw_of(header: dict, where: Path) -> dict:
    meta = header.pop("__metadata__", None) or {}
    try:
        raw = json.loads(meta.get(_RAW, "{}"))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: malformed {_RAW} metadata: {type(e).__name__}") from None
    if not (isinstance(raw, dict) and all(isinstance(r, dict) and isinstance(r.get("dtype"), str)
                                          and _dims(r.get("shape")) for r in raw.values())):
        raise CheckpointError(f"{where}: malformed {_RAW} metadata: each tensor needs a dtype and a shape")
    return raw


def _real(name: str, info: dict, raw: dict, where: Path) -> tuple[torch.dtype, tuple[int, ...]]:
    if name in raw:
        dtype = getattr(torch, raw[name]["dtype"], None) if raw[name]["dtype"].isidentifier() else None
        shape = tuple(raw[name]["shape"])
    else:
        dtype = _DTYPE_OF_CODE.get(info["dtype"])
        shape = tuple(info["shape"])
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(
            f"{where}: tensor {name[:80]!r} has dtype {info['dtype'][:40]!r}, which this torch does not have"
        )
    start, end = info["data_offsets"]
    numel = math.prod(shape)
    if numel * dtype.itemsize != end - start:
        raise CheckpointError(
            f"{where}: tensor {name[:80]!r} of shape {list(shape)[:8]} {dtype} needs {numel * dtype.itemsize} bytes, "
            f"the file has {end - start}"
        )
    return dtype, shape
