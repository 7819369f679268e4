"""Plain ``torch.save`` files (.pt, .pth, .tar) and bare .safetensors files, in the layouts the seeds use.

Opened with ``torch.load(weights_only=True)``, which builds only tensors and plain containers. A file that
needs full unpickling (a whole pickled model or optimizer) is refused unless the caller passes trusted=True.

What a file is, is read from its content, never from its name: a zip archive's members are checked before
anything in it is read (torch writes its archives uncompressed, so a compressed member, or one declaring more
bytes than the file holds, is a bomb or damage, refused unread); a TorchScript archive is a program and is
refused unless trusted; a ``.pt2`` is not a checkpoint. Every sparse tensor that comes out is checked against
its invariants, because densifying one with out-of-range indices reads and writes out of bounds.
"""

import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from etappe.checkpoint import kinds
from etappe.checkpoint.errors import CheckpointError, TrustError
from etappe.errors import UsageError, check_flag, first_line

# A saved key, with these endings or in this table, also answers to the name on the right: load(f, model=net)
# finds 'model_state_dict', 'state_dict' or 'model'; load(f, modelA=a) finds 'modelA_state_dict'.
_SUFFIXES = ("_state_dict", "_state", "_sd")
_ALIASES = {
    "state_dict": "model", "net": "model", "network": "model", "model_state": "model",
    "optim": "optimizer", "opt": "optimizer",
    "lr_sched": "scheduler", "lr_scheduler": "scheduler", "sched": "scheduler",
    "grad_scaler": "scaler", "amp_scaler": "scaler",
}  # fmt: skip
BARE = "model"  # the name a bare state_dict (a file holding just one model's weights) answers to


_METHODS = {zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}


def is_safetensors(head: bytes, size: int) -> bool:
    """Whether a file starting with ``head`` (at least 9 bytes) and ``size`` bytes long has a safetensors header:
    its length as a little-endian u64 that fits in the file, then a JSON object."""
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= size - 8 and head[8:9] == b"{"


# TorchScript deflates the Python source it keeps under code/; everything else torch writes is stored as it is.
_MAX_CODE_BYTES = 256 * 2**20  # the most a TorchScript archive's code/ members may expand to, together
_MAX_DEFLATE_RATIO = 1032  # deflate packs at most 258 bytes into 2 bits


def check_archive(path: Path, what: str = "torch.save file") -> list[zipfile.ZipInfo]:
    """The members of zip archive ``path``, checked before anything in it is decompressed or read. torch.save,
    TorchScript and torch.export write their archives uncompressed (stored), but for TorchScript's source under
    code/, deflated; a few MB of deflate or bzip2 can expand to many GB, so any other compressed member, a
    member declaring more bytes than the file holds, or code/ expanding past 256 MB, is refused."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable {what}: not a valid zip archive ({first_line(e)}); the "
                              "file is truncated or damaged") from None
    stored = code = 0
    for info in infos:
        is_code = info.filename.split("/", 1)[-1].startswith("code/")
        if info.compress_type != zipfile.ZIP_STORED and not (is_code and info.compress_type == zipfile.ZIP_DEFLATED):
            method = _METHODS.get(info.compress_type, f"method {info.compress_type}")
            raise CheckpointError(
                f"{path}: member {info.filename} is compressed ({method}); torch writes its archives uncompressed, "
                "so this file was not written by torch.save, TorchScript or torch.export, and it is refused unread"
            )
        if info.header_offset + info.compress_size > size or (
            info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024
            if info.compress_type == zipfile.ZIP_DEFLATED else info.file_size != info.compress_size
        ):
            raise CheckpointError(f"{path}: member {info.filename} declares {info.file_size} bytes, more than the "
                                  f"file of {size} bytes can hold; the archive is damaged or crafted")
        stored += info.compress_size
        code += info.file_size if info.compress_type == zipfile.ZIP_DEFLATED else 0
    if stored > size:
        raise CheckpointError(f"{path}: its members declare {stored} bytes in all, more than the file's {size} "
                              "(overlapping members); the archive is damaged or crafted")
    if code > _MAX_CODE_BYTES:
        raise CheckpointError(f"{path}: its code/ members expand to {code} bytes, more than the "
                              f"{_MAX_CODE_BYTES} a TorchScript archive's source takes; refused unread")
    return infos


def archive_kind(infos: list[zipfile.ZipInfo]) -> str | None:
    """What torch wrote a checked archive as: 'torchscript', 'export' (.pt2) or 'torch.save'; None if none.
    torch puts every member under one top folder; TorchScript adds code/ and constants.pkl, .pt2 archive_format."""
    names = [i.filename for i in infos]
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or not all("/" in n for n in names):
        return None
    inner = {n.split("/", 1)[1] for n in names}
    if "constants.pkl" in inner and any(n.startswith("code/") for n in inner):
        return "torchscript"
    if "archive_format" in inner:
        return "export"
    if "data.pkl" in inner:
        return "torch.save"
    return None


def read_archive_member(path: Path, infos: list[zipfile.ZipInfo], inner: str, limit: int = 64) -> bytes | None:
    """The bytes of member ``<root>/inner`` of a checked archive, if it is there and at most ``limit`` bytes."""
    for info in infos:
        if info.filename.split("/", 1)[-1] == inner and info.file_size <= limit:
            with zipfile.ZipFile(path) as z:
                return z.read(info)
    return None


def sniff(path: Path, n: int = 16) -> tuple[int, bytes]:
    """A file's size and its first ``n`` bytes, from which its kind is told."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            return size, f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror}") from None


def read(path: Path, *, trusted: bool = False) -> Any:
    """The object stored in ``path``, opened without running code from the file unless ``trusted``. What the file
    is, is decided by its content alone, never by its name (torch.load itself picks safetensors by the suffix,
    so it is given an open file)."""
    check_flag("trusted", trusted)
    size, head = sniff(path)
    if is_safetensors(head, size):
        from etappe.checkpoint import tensorfile

        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            tensorfile.check_tensor_count(f.read(min(n, tensorfile.MAX_HEADER)), path)
        try:
            return safetensors.torch.load_file(path)
        except Exception as e:  # safetensors raises its own SafetensorError for any malformed file
            raise CheckpointError(f"{path}: not a readable safetensors file: {first_line(e)}") from None
    if head.startswith(b"PK"):
        kind = archive_kind(check_archive(path))
        if kind == "torchscript" and not trusted:
            raise TrustError(
                f"{path}: a TorchScript archive, which is a program: loading it runs code the file holds. If you "
                "trust where it came from, pass trusted=True (CLI: --trust); etappe.export.load_model loads it as "
                "a model"
            )
        if kind == "export":
            raise TrustError(f"{path}: a torch.export program (.pt2), not a checkpoint or state dict; "
                             "load it as a model with etappe.export.load_model (trusted=True, CLI: --trust)")
    elif not head.startswith(b"\x80"):  # neither zip nor pickle: torch.load would say something unhelpful
        what = other_kind(path, head, size)
        if what:
            raise CheckpointError(f"{path}: {what}, not a checkpoint; expected an etappe checkpoint folder, a "
                                  "torch.save file or a .safetensors file (run a model file with etappe predict)")
        shown = f"it starts with 0x{head[:8].hex()}" if head else "it is empty"
        raise CheckpointError(f"{path}: not a readable torch.save file ({shown}), so not a checkpoint; expected an "
                              "etappe checkpoint folder, a torch.save file (.pt, .pth, .tar) or a .safetensors file")
    try:
        with open(path, "rb") as f:
            return check_sparse(path, torch.load(f, map_location="cpu", weights_only=not trusted))
    except pickle.UnpicklingError as e:
        culprit = re.search(r"GLOBAL (\S+)", str(e))
        if trusted or not (culprit or re.search(r"Unsupported (global|class)", str(e))):
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            reason = detail[1] if detail else first_line(e)
            raise CheckpointError(f"{path}: not a readable torch.save file: {reason}") from None
        what = f" (it refers to {culprit[1]})" if culprit else ""
        raise TrustError(
            f"{path}: refused: opening it needs full unpickling{what}, which runs whatever code the file holds. "
            "If you trust where it came from, load it with trusted=True (CLI: --trust); "
            "better, re-save its state_dict()s, which open safely."
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, AttributeError, ImportError, IndexError,
            TypeError, struct.error, MemoryError, RecursionError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable torch.save file: {first_line(e)}") from None


# ModelProto's fields and their protobuf wire types (0 varint, 2 length-delimited), from onnx.proto
_ONNX_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}


def onnx_problem(path: Path, size: int) -> str | None:
    """None if ``path`` is an ONNX ModelProto as far as its top-level fields show (each a field ModelProto has, of
    its wire type, lengths ending exactly at the end of the file, a graph among them); else what is wrong."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos, graph = 0, False
        while pos < size:
            start = pos
            key, pos = _varint(m, pos, size)
            if key is None:
                return f"truncated at byte {start}"
            field, wire = key >> 3, key & 7
            if _ONNX_FIELDS.get(field) != wire:
                return f"field {field} of wire type {wire} at byte {start} is not part of an ONNX model"
            value, pos = _varint(m, pos, size)
            if value is None:
                return f"truncated at byte {start}"
            if wire == 2:
                pos += value
                if pos > size:
                    return f"truncated: field {field} at byte {start} runs {pos - size} bytes past the end of the file"
                graph = graph or field == 7
    return None if graph else "it holds no graph"


def _varint(m: Any, pos: int, size: int) -> tuple[int | None, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= size:
            return None, pos
        byte = m[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    return None, pos


def other_kind(path: Path, head: bytes, size: int) -> str | None:
    """What a file that is neither a zip archive nor a pickle nor safetensors is, if it is a model file etappe
    knows of (an ONNX model); None otherwise."""
    if size and head[:1] == b"\x08":  # ModelProto starts with its ir_version, field 1
        if onnx_problem(path, size) is None:
            return "an ONNX model"
    return None


def check_sparse(path: Path, obj: Any) -> Any:
    """``obj``, after checking every sparse tensor in it (in containers, at any depth) against its invariants:
    indices in range, compressed indices ordered. Densifying one that breaks them reads and writes out of bounds."""
    stack, seen = [obj], set()
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            if x.layout != torch.strided:
                _check_sparse_tensor(path, x)
        elif isinstance(x, Mapping):
            stack += list(x.keys()) + list(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack += list(x)
    return obj


def _check_sparse_tensor(path: Path, t: torch.Tensor) -> None:
    layout = str(t.layout).removeprefix("torch.")
    try:
        if t.layout == torch.sparse_coo:
            torch.sparse_coo_tensor(t._indices(), t._values(), t.size(), check_invariants=True)
        elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
            torch.sparse_compressed_tensor(t.crow_indices(), t.col_indices(), t.values(), t.size(), layout=t.layout,
                                           check_invariants=True)
        elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
            torch.sparse_compressed_tensor(t.ccol_indices(), t.row_indices(), t.values(), t.size(), layout=t.layout,
                                           check_invariants=True)
        else:
            raise CheckpointError(f"{path}: holds a tensor of layout {layout}, which etappe cannot check; refused")
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise CheckpointError(
            f"{path}: holds a sparse {layout} tensor whose indices are invalid ({first_line(e)}); using it would "
            "read and write out of bounds, so the file is refused"
        ) from None


def entries(obj: Any) -> dict[str, Any]:
    """The file's content as named entries: a bare state_dict becomes {'model': it}, a dict stays itself."""
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) for k in obj):
        if kinds.of_state(obj) == kinds.MODULE:
            return {BARE: obj}
        return dict(obj)
    if kinds.is_stateful(obj):
        return {BARE: obj}
    return {"value": obj}


def load(path: Path, objects: Mapping[str, Any], *, trusted: bool = False, strict: bool = True) -> kinds.Loaded:
    """Restore ``objects`` from a plain file by name (see ``_match``); return the entries not restored, with each
    model's LoadReport (``kinds.load_into``, which ``strict`` goes to)."""
    found = entries(read(path, trusted=trusted))
    plan = {}
    for name, obj in objects.items():
        if not kinds.is_stateful(obj):
            raise UsageError(
                f"cannot restore {name!r} into a {type(obj).__name__}: pass objects with load_state_dict(); "
                "plain values come back in load()'s result"
            )
        key = _match(name, obj, found, taken=set(plan.values()))
        if key is None:
            raise CheckpointError(f"{path} has nothing for {name!r}; it holds: {', '.join(map(str, found))}")
        plan[name] = key
    reports = {}
    for name, key in plan.items():
        state = found[key]
        if kinds.is_stateful(state):  # a trusted file's whole pickled object
            state = state.state_dict()
        report = kinds.load_into(objects[name], state, f"{path} entry {key!r}", strict=strict)
        if report is not None:
            reports[name] = report
    return kinds.Loaded({k: v for k, v in found.items() if k not in plan.values()}, reports)


def verify(path: Path) -> str:
    """Check a plain file as far as it can be checked: the CRC-32 of every member of a zip archive (torch.save,
    TorchScript, .pt2), or a safetensors file's header against its size. Returns what was checked and what
    loading it needs, in a line; raises CheckpointError for a damaged file. Nothing in the file runs."""
    with open(path, "rb") as f:
        head = f.read(16)
    if is_safetensors(head, path.stat().st_size):
        read(path)
        return "a safetensors file: its header parses and its tensors fill it exactly (the format has no checksums)"
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a zip-format torch.save file, so it holds no checksums to verify")
    infos = check_archive(path)  # before testzip decompresses anything
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: corrupt torch.save archive: {first_line(e)}") from None
    if bad is not None:
        raise CheckpointError(f"{path}: member {bad} fails its CRC-32 check; the file is corrupt")
    crcs = f"the CRC-32s of its {len(infos)} members match"
    kind = archive_kind(infos)
    if kind == "torchscript":
        return f"a TorchScript archive: {crcs}; it is a program, and running it needs --trust"
    if kind == "export":
        return f"a torch.export program (.pt2): {crcs}; it is a program, and running it needs --trust"
    try:
        read(path)
    except TrustError as e:
        culprit = re.search(r"\(it refers to (\S+)\)", str(e))
        return (f"a torch.save file: {crcs}; loading it needs --trust (full unpickling"
                f"{f' of {culprit[1]}' if culprit else ''}, which runs code)")
    return f"a torch.save file: {crcs}, and it opens without running code"


def _match(name: str, obj: Any, found: Mapping[str, Any], taken: set[str]) -> str | None:
    """The saved key for requested ``name``: the same key, a key that answers to it, or else the one
    remaining entry of the object's kind (load(f, model=net) on a file with a single 'netG_state_dict')."""
    free = [k for k in found if k not in taken]
    if name in free:
        return name
    answering = [k for k in free if answers_to(k) == name]
    if len(answering) == 1:
        return answering[0]
    kind = kinds.of_object(obj)
    same_kind = [k for k in free if kinds.of_state(found[k]) == kind]
    return same_kind[0] if len(same_kind) == 1 else None


def answers_to(key: str) -> str:
    for suffix in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            key = key[: -len(suffix)]
            break
    return _ALIASES.get(key, key)
