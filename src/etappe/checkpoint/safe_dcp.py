"""torch.distributed.checkpoint (DCP) made safe to read: its reader and load planners, so that nothing in a sharded
checkpoint runs code, and only files the manifest lists are read.

DCP keeps its metadata as a pickle, and small values (an optimizer's param groups) as ``torch.save`` blobs that
its load planners unpickle fully. Here the metadata is read by an unpickler that only builds DCP's own metadata
classes (and torch.Size, dtypes, layouts, paths) and never sets state on a class (``MetadataUnpickler``); the values
by planners that use ``torch.load(weights_only=True)`` and check every sparse tensor (``SafeLoadPlanner``,
``SafeEmptyStateDictLoadPlanner``). Anything else is refused, never run.

Importing this module imports DCP, which is slow: sharded.py imports it only when sharded state is read.
"""

import os
import pathlib
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as filesystem
import torch.distributed.checkpoint.metadata as metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner

from etappe.checkpoint import torchsave
from etappe.checkpoint.errors import CheckpointError


def _allowed() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("torch", "Size"): torch.Size,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): filesystem._StorageInfo,
    }
    for cls in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath):
        allowed[("pathlib", cls.__name__)] = cls
    for name in dir(metadata):  # DCP's metadata dataclasses and enums, and nothing callable beyond them
        value = getattr(metadata, name)
        if isinstance(value, type) and value.__module__ == metadata.__name__:
            allowed[(metadata.__name__, name)] = value
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


ALLOWED = _allowed()  # what DCP metadata may name: {(module, name): the object}
_CLASSES = tuple(v for v in ALLOWED.values() if isinstance(v, type))


class MetadataUnpickler(pickle._Unpickler):  # the Python one: its opcodes can be overridden
    """Builds DCP metadata and nothing else (the "restricting globals" recipe of Python's pickle documentation):
    globals only from ``ALLOWED``, and state set only on instances of allowed classes, never on a class."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, where: Path) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise self._refuse(f"{module}.{name}") from None

    def load_build(self) -> None:
        target = self.stack[-2]
        if isinstance(target, type) or not isinstance(target, _CLASSES):
            raise self._refuse(f"setting the state of {type(target).__name__!r} {target!r}"[:200])
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = load_build

    def _refuse(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.where}: refusing to load {what}; DCP metadata holds only DCP's own classes, "
            "so this file was not written by torch.distributed.checkpoint (or was altered)"
        )


class SafeReader(dcp.FileSystemReader):
    """DCP's file system reader that reads metadata without running code from it, and only files the manifest
    lists (``listed``; None: not checked)."""

    def __init__(self, path: str | os.PathLike, listed: frozenset[str] | set[str] | None = None) -> None:
        super().__init__(path)
        self.listed = listed

    def read_metadata(self, *args: Any, **kwargs: Any) -> metadata.Metadata:
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        try:
            with open(path, "rb") as f:
                found = MetadataUnpickler(f, path).load()
        except CheckpointError:
            raise
        except Exception as e:  # anything malformed: a truncated stream, a wrong argument to a class
            raise CheckpointError(f"{path}: cannot read DCP metadata ({type(e).__name__}: {e})") from None
        storage = found.storage_data if isinstance(found, metadata.Metadata) else None
        if not isinstance(storage, Mapping):  # a dtype, say: any class the unpickler allows can be the whole file
            raise CheckpointError(f"{path}: not DCP metadata (no map of where each value is stored)")
        if self.listed is not None:
            for info in storage.values():
                name = getattr(info, "relative_path", None)
                if not isinstance(name, str) or name not in self.listed:
                    raise CheckpointError(f"{path}: names a data file {name!r} that the manifest does not list")
        if getattr(found, "storage_meta", None) is None:
            found.storage_meta = metadata.StorageMeta()
        found.storage_meta.load_id = self.load_id
        return found


class _SafeLoadBytes:
    """DCP's own ``load_bytes``, with ``torch.load(weights_only=True)`` instead of a full unpickle, and sparse
    tensors checked (densifying one with out-of-range indices reads and writes out of bounds)."""

    def __init__(self, *args: Any, where: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.where = where  # the shards folder, for messages

    def load_bytes(self, read_item, value) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{self.where}: refusing to load a value of the shards: {one_line(e)}") from None
        stored = (getattr(self.metadata, "storage_data", None) or {}).get(read_item.storage_index)
        file = getattr(stored, "relative_path", None)
        torchsave.check_sparse(self.where / file if isinstance(file, str) else self.where, obj)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafeLoadPlanner(_SafeLoadBytes, DefaultLoadPlanner):
    """DCP's default load planner, loading values safely; ``where``: the shards folder, for messages."""


class SafeEmptyStateDictLoadPlanner(_SafeLoadBytes, _EmptyStateDictLoadPlanner):
    """DCP's planner that builds the whole state from the metadata (as ``dcp_to_torch_save`` does), safely."""


def one_line(e: BaseException) -> str:
    """An exception's whole message on one line, cut at 500 characters: torch's messages name the
    culprit past their first line."""
    return " ".join(str(e).split())[:500] or type(e).__name__
