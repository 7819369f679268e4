"""The manifest: the file that makes a folder a checkpoint, written last, listing every file with size and checksum.

The manifest carries its own checksum (its last field, computed with that field's digits zeroed), so a flipped
byte anywhere in it, a step or a metric included, is caught like one in a data file.
"""

import json
import mmap
import os
import re
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import xxhash

from etappe.checkpoint import reading
from etappe.checkpoint.errors import CheckpointError, NewerFormatError

MANIFEST = "manifest.json"
FORMAT = "etappe-checkpoint"
FORMAT_VERSION = 1
CHECKSUM = "xxh3_128"  # the fastest to compute of the checksums measured (benchmarks/bench_checksum.py)
_SELF = b'"manifest_checksum": "'
_DIGITS = 32
SHARDS = "shards-"  # the prefix of the subfolder DCP writes sharded state into (see sharded.py)
MAX_BYTES = 16 << 20  # a manifest lists files: ~100 bytes each, so this is 160,000 of them; larger is not one
# state.json holds JSON values only (tensors live in safetensors files): an Adam optimizer's records, every RNG's
# state and a history of 10,000 epochs make a few MB; larger is not one etappe wrote (and parsing costs many times
# its size in memory)
STATE_MAX_BYTES = 32 << 20
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,255}")  # what etappe and DCP name files; no NUL, no separator, fits any fs
_HEX = re.compile(r"[0-9a-f]{32}")
_TAG = "$type"  # codec.TAG: how a metric that is not a finite float is written (nan, inf)


def new_hasher():
    """A streaming hasher for the checksum named by ``CHECKSUM`` (``update(bytes)``, ``hexdigest()``)."""
    return xxhash.xxh3_128()


def checksum(data: bytes | bytearray | memoryview) -> str:
    """The checksum etappe records for a file's bytes, as hex."""
    return xxhash.xxh3_128_hexdigest(data)


def encode(files: dict[str, tuple[int, str]], state: str, meta: dict[str, Any]) -> bytes:
    """The manifest for ``files`` ({name: (size, checksum)}), ``state`` (the state file's name) and ``meta`` (the
    store's step and metrics), with its own checksum filled in: what ``fsio.commit_folder`` writes last."""
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
    return bytes(text)


def read(folder: Path, *, step: int | None = None) -> dict[str, Any]:
    """Read, self-check and validate the manifest of checkpoint ``folder``; raise CheckpointError naming what is
    wrong, or NewerFormatError for an etappe manifest whose format_version is not a whole number this etappe reads
    (such a checkpoint must stop a run, not be fallen back past and overwritten), unless its checksum is one of
    ours (32 hex digits) that fails: a newer format may checksum differently, a flipped byte breaks ours. ``step``: the manifest must say this step
    (a store's folder ``step-N`` must hold step N, or two folders swapped between names would load as each other).

    Every field etappe reads is checked for its type here, so a reader of the result meets no surprise.
    """
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    try:
        fd = reading.open_listed(folder, MANIFEST)
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: missing, so {folder} is not a committed checkpoint "
            "(an interrupted save, a deleted manifest, or a run folder: pass one of its checkpoints)"
        ) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size > MAX_BYTES:
            raise CheckpointError(
                f"{path}: {size} bytes, more than a manifest holds (at most {MAX_BYTES}); the file is corrupt"
            )
        data = bytearray(size)
        done = 0
        while done < size and (n := os.preadv(fd, [memoryview(data)[done:]], done)):
            done += n
        del data[done:]
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        body = json.loads(bytes(data))  # parsed first: a newer format may record its checksum differently
    except (ValueError, RecursionError):
        body = None
    at = data.rfind(_SELF)
    recorded = body.get("manifest_checksum") if isinstance(body, dict) else None
    found = bytes(data[at + len(_SELF) : at + len(_SELF) + _DIGITS]).decode("ascii", "replace") if at >= 0 else ""
    if at >= 0:
        data[at + len(_SELF) : at + len(_SELF) + _DIGITS] = b"0" * _DIGITS
    expected = checksum(data)
    intact = at >= 0 and found == expected and (body is None or recorded == expected)
    if isinstance(body, dict) and body.get("format") == FORMAT:
        version = body.get("format_version", _MISSING)
        # a version this etappe does not read stops every reader, whatever the checksum, unless the checksum is one
        # of ours that fails: then one flipped byte, of the version or anywhere, is the likelier story (corrupt)
        ours = at >= 0 and isinstance(recorded, str) and _HEX.fullmatch(recorded)  # as we write it, where we do
        if not (_whole(version) and version <= FORMAT_VERSION) and (intact or not ours):
            raise NewerFormatError(
                f"{path}: checkpoint format {_shown(version)} is not one this etappe (format {FORMAT_VERSION}) reads: "
                "written by a newer etappe (or damaged); upgrade etappe, or move the folder away to resume from an "
                "older checkpoint"
            )
    if at < 0:
        raise CheckpointError(f"{path}: no manifest_checksum field (truncated or not an etappe manifest)")
    if not intact:
        shown = _text(recorded) if isinstance(body, dict) else (found if _HEX.fullmatch(found) else "no 32 hex digits")
        raise CheckpointError(
            f"{path}: manifest checksum mismatch (recorded {shown}, content hashes to {expected}); the manifest is corrupt"
        )
    if not (isinstance(body, dict) and body.get("format") == FORMAT):
        raise CheckpointError(f"{path}: not an etappe checkpoint manifest")
    problem = _schema_problem(body)
    if problem:
        raise CheckpointError(f"{path}: malformed manifest: {problem}; the file is corrupt or was forged")
    if step is not None and body.get("step") != step:
        said = f"step {body['step']}" if "step" in body else "no step"
        raise CheckpointError(
            f"{path}: the manifest says {said}, but its folder {folder.name} is for step {step} "
            "(a renamed or swapped checkpoint); not used"
        )
    return body


def _schema_problem(body: dict[str, Any]) -> str | None:
    """What is wrong with a parsed manifest of this format, or None. Unknown fields are allowed (and ignored)."""
    if body["format_version"] < 1:
        return f"format_version {body['format_version']}"
    for key in ("etappe_version", "torch_version", "created"):
        if key in body and not isinstance(body[key], str):
            return f"{key} is a {type(body[key]).__name__}, not a string"
    if body.get("checksum") != CHECKSUM:
        return f"checksum kind {_text(body.get('checksum'))}, expected {CHECKSUM!r}"
    if "step" in body and not (_whole(body["step"]) and body["step"] >= 0):
        return f"step {_text(body['step'])}, expected a whole number >= 0"
    if "metrics" in body:
        metrics = body["metrics"]
        if not isinstance(metrics, dict):
            return f"metrics is a {type(metrics).__name__}, not an object"
        for name, value in metrics.items():
            if metric_value(value) is None:
                return f"metric {name[:80]!r} is {_text(value)}, not a number"
    files = body.get("files")
    if not isinstance(files, dict) or not files:
        return "no file list"
    for name, entry in files.items():
        if not _plain_name(name):
            return f"a file named {_text(name)}, which is not a plain name inside the checkpoint folder"
        if not (isinstance(entry, dict) and _whole(entry.get("size")) and entry["size"] >= 0
                and isinstance(entry.get("checksum"), str) and _HEX.fullmatch(entry["checksum"])):
            return f"the entry for {name!r} needs a size (a whole number >= 0) and a {CHECKSUM} checksum"
    state = body.get("state")
    if not isinstance(state, str) or state not in files or "/" in state:
        return f"the state file {_text(state)} is not one of its files"
    if files[state]["size"] > STATE_MAX_BYTES:
        return (f"the state file {state!r} has {files[state]['size']} bytes, more than a checkpoint's state holds "
                f"(at most {STATE_MAX_BYTES}: tensors live in safetensors files)")
    return None


def metric_value(value: Any) -> float | None:
    """A metric as the manifest holds it (a number, or ``{"$type": "float", "value": "nan"}`` for a non-finite
    one) as a float; None if it is not one."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict) and value.keys() == {_TAG, "value"} and value[_TAG] == "float":
        if value["value"] in ("nan", "inf", "-inf"):
            return float(value["value"])
    return None


def metrics_of(body: dict[str, Any]) -> dict[str, float]:
    """The metrics of a manifest ``read`` returned, as floats."""
    return {name: metric_value(value) for name, value in body.get("metrics", {}).items()}


_MISSING = object()


def _shown(value: Any) -> str:
    """A format version from a file, on one line: as JSON, or "(none recorded)"."""
    if value is _MISSING:
        return "(none recorded)"
    try:
        shown = json.dumps(value)
    except (TypeError, ValueError):
        shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: Any) -> str:
    """A value from a file, shown short and on one line."""
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def read_verified(folder: Path, name: str, entry: dict[str, Any]) -> mmap.mmap | bytes | bytearray:
    """A listed file's bytes, checked against its size and checksum (the one pass over them before use)."""
    path = folder / name
    expected = entry["size"]
    try:
        fd = reading.open_listed(folder, name)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the manifest lists it with {expected} bytes)") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        found = os.fstat(fd).st_size
        if found != expected:
            hint = "truncated" if found < expected else "has extra bytes"
            raise CheckpointError(f"{path}: {found} bytes, the manifest says {expected} ({hint}); the file is corrupt")
        data = reading.map_fd(fd, expected, path)
    except (OSError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    finally:
        os.close(fd)
    _check_digest(path, entry, checksum(data))
    return data


def verify_file(folder: Path, name: str, entry: dict[str, Any]) -> None:
    """Check a listed file's size and checksum."""
    data = read_verified(folder, name, entry)
    if isinstance(data, mmap.mmap):
        data.close()


def _check_digest(path: Path, entry: dict[str, Any], found: str) -> None:
    if found != entry["checksum"]:
        raise CheckpointError(
            f"{path}: checksum mismatch (manifest {CHECKSUM} {entry['checksum']}, file {found}); the file is corrupt"
        )


def _plain_name(name: Any) -> bool:
    """A file directly in the checkpoint folder, or in its one subfolder of shards (``shards-<hex>/<file>``)."""
    if not isinstance(name, str):
        return False
    folder, _, file = name.rpartition("/")
    if folder and not (folder.startswith(SHARDS) and _simple(folder)):
        return False
    return _simple(file) and name != MANIFEST


def _simple(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and name not in (".", "..")


def _etappe_version() -> str:
    try:
        return metadata.version("etappe")
    except metadata.PackageNotFoundError:
        return "unknown"
