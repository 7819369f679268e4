"""The manifest: the file that makes a folder a checkpoint, written last, listing every file with size and checksum.

The manifest carries its own checksum (its last field, computed with that field's digits zeroed), so a flipped
byte anywhere in it, a step or a metric included, is caught like one in a data file.
"""

import json
import mmap
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import xxhash

from etappe.checkpoint import fsio
from etappe.checkpoint.errors import CheckpointError

MANIFEST = "manifest.json"
FORMAT = "etappe-checkpoint"
FORMAT_VERSION = 1
CHECKSUM = "xxh3_128"  # ~20 GB/s in memory; crc32 ~4 GB/s, sha256 ~1.8 GB/s on the same machine
_SELF = b'"manifest_checksum": "'
_DIGITS = 32
SHARDS = "shards-"  # the prefix of the subfolder DCP writes sharded state into (see sharded.py)


def new_hasher():
    """A streaming hasher for the checksum named by ``CHECKSUM`` (``update(bytes)``, ``hexdigest()``)."""
    return xxhash.xxh3_128()


def checksum(data: bytes | bytearray | memoryview) -> str:
    """The checksum etappe records for a file's bytes, as hex."""
    return xxhash.xxh3_128_hexdigest(data)


def write(folder: Path, files: dict[str, tuple[int, str]], state: str, meta: dict[str, Any], name: str = MANIFEST) -> Path:
    """Write the manifest for ``files`` ({name: (size, checksum)}) into ``folder`` as ``name`` and fsync it."""
    body = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "etappe_version": _etappe_version(),
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **meta,
        "state": state,
        "checksum": CHECKSUM,
        "files": {n: {"size": size, "checksum": digest} for n, (size, digest) in files.items()},
        "manifest_checksum": "0" * _DIGITS,
    }
    text = bytearray((json.dumps(body, indent=1, allow_nan=False) + "\n").encode())
    at = text.rindex(_SELF) + len(_SELF)
    text[at : at + _DIGITS] = checksum(text).encode()
    path = folder / name
    fsio.write_file(path, [bytes(text)])
    return path


def read(folder: Path) -> dict[str, Any]:
    """Read and self-check the manifest of checkpoint ``folder``; raise CheckpointError naming what is wrong."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    try:
        data = bytearray(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: missing, so {folder} is not a committed checkpoint "
            "(an interrupted save, a deleted manifest, or a run folder: pass one of its checkpoints)"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror}") from None
    at = data.rfind(_SELF)
    if at < 0:
        raise CheckpointError(f"{path}: no manifest_checksum field (truncated or not an etappe manifest)")
    at += len(_SELF)
    found = bytes(data[at : at + _DIGITS]).decode("ascii", "replace")
    data[at : at + _DIGITS] = b"0" * _DIGITS
    expected = checksum(data)
    if found != expected:
        raise CheckpointError(
            f"{path}: manifest checksum mismatch (recorded {found}, content hashes to {expected}); the manifest is corrupt"
        )
    try:
        body = json.loads(bytes(data))
        ok = body.get("format") == FORMAT and isinstance(body.get("format_version"), int)
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: not an etappe checkpoint manifest")
    if body["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written in checkpoint format {body['format_version']} by etappe {body.get('etappe_version')}; "
            f"this etappe reads format {FORMAT_VERSION}: upgrade etappe"
        )
    files = body.get("files")
    if not isinstance(files, dict) or body.get("state") not in files:
        raise CheckpointError(f"{path}: malformed manifest (no file list, or the state file is not in it)")
    for name, entry in files.items():
        if not _plain_name(name):
            raise CheckpointError(f"{path}: lists a file {name!r} outside the checkpoint folder")
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("checksum"), str)):
            raise CheckpointError(f"{path}: malformed entry for {name!r} (needs size and checksum)")
    return body


def read_verified(folder: Path, name: str, entry: dict[str, Any]) -> mmap.mmap | bytes | bytearray:
    """A listed file's bytes, checked against its size and checksum (the one pass over them before use)."""
    path = folder / name
    size = _checked_size(path, entry)
    try:
        data = fsio.map_file(path, size)
    except (OSError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    _check_digest(path, entry, checksum(data))
    return data


def verify_file(folder: Path, name: str, entry: dict[str, Any]) -> None:
    """Check a listed file's size and checksum."""
    data = read_verified(folder, name, entry)
    if isinstance(data, mmap.mmap):
        data.close()


def _checked_size(path: Path, entry: dict[str, Any]) -> int:
    expected = entry["size"]
    try:
        found = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the manifest lists it with {expected} bytes)") from None
    if found != expected:
        hint = "truncated" if found < expected else "has extra bytes"
        raise CheckpointError(f"{path}: {found} bytes, the manifest says {expected} ({hint}); the file is corrupt")
    return found


def _check_digest(path: Path, entry: dict[str, Any], found: str) -> None:
    if found != entry["checksum"]:
        raise CheckpointError(
            f"{path}: checksum mismatch (manifest {CHECKSUM} {entry['checksum']}, file {found}); the file is corrupt"
        )


def _plain_name(name: str) -> bool:
    """A file directly in the checkpoint folder, or in its one subfolder of shards (``shards-<hex>/<file>``)."""
    folder, _, file = name.rpartition("/")
    if folder and not (folder.startswith(SHARDS) and _simple(folder)):
        return False
    return _simple(file) and name != MANIFEST


def _simple(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def _etappe_version() -> str:
    try:
        return metadata.version("etappe")
    except metadata.PackageNotFoundError:
        return "unknown"
