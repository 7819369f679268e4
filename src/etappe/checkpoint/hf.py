"""Hugging Face style folders: a model's weights in ``model.safetensors``, or in shards that
``model.safetensors.index.json`` lists (its ``weight_map``: tensor name -> shard file), beside ``config.json``.

They have no manifest and so no checksums. What can be checked is checked before anything is loaded: every shard
the index names is there, each shard's safetensors header parses and its tensors fill the file exactly, and each
tensor is in the one shard the index maps it to. Loading goes shard by shard (each mapped copy-on-write, copied
into the model, let go), so a model never needs its file in memory twice. config.json is read as JSON only:
nothing in the folder ever runs.

Files may be symbolic links (the Hub's cache is made of them): a link is followed to a regular file, as the
user named the folder; etappe's own run folders never follow links.
"""

import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from etappe.checkpoint import kinds, manifest, reading, tensorfile
from etappe.checkpoint.errors import CheckpointError
from etappe.errors import UsageError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
FORMAT = "Hugging Face style folder"
_CONFIG_FIELDS = ("model_type", "architectures", "torch_dtype", "dtype", "hidden_size", "num_hidden_layers",
                  "num_attention_heads", "vocab_size", "transformers_version")  # what inspect shows of config.json


def is_folder(path: Path) -> bool:
    """Whether ``path`` is a Hugging Face style folder: weights in ``model.safetensors`` or an index, and neither
    an etappe checkpoint nor a run folder (``checkpoints/``). A checkpoint is told by any file etappe writes into
    one (its manifest, ``state.json``, a ``shards-*`` folder), not by its manifest alone: a checkpoint whose
    manifest was lost is a damaged checkpoint, never a folder of weights without checksums."""
    path = Path(path)
    if not path.is_dir() or (path / "checkpoints").is_dir():
        return False
    if any((path / name).exists() or (path / name).is_symlink() for name in (manifest.MANIFEST, "state.json")):
        return False
    try:
        if any(p.name.startswith("shards-") for p in path.iterdir()):
            return False
    except OSError:  # gone, or unreadable, while we look (a checkpoint pruned under a reader): not such a folder
        return False
    return any((path / name).exists() or (path / name).is_symlink() for name in (SINGLE, INDEX))


@dataclass(frozen=True)
class Contents:
    """A checked folder: each weights file's tensors ({file: {name: TensorInfo}}, in the index's order), each
    file's size, and whether it is sharded (an index)."""

    files: dict[str, dict[str, tensorfile.TensorInfo]]
    sizes: dict[str, int]
    sharded: bool

    @property
    def tensors(self) -> dict[str, tensorfile.TensorInfo]:
        return {name: info for infos in self.files.values() for name, info in infos.items()}


def contents(path: Path) -> Contents:
    """Read and check a folder's index (if sharded) and every weights file's header; CheckpointError naming the
    file and what is wrong otherwise."""
    path = Path(path)
    index = None
    if _present(path / SINGLE):
        names = [SINGLE]
    else:
        index = _read_index(path)
        names = list(dict.fromkeys(index.values()))
    files, sizes = {}, {}
    for name in names:
        file = _file(path, name, index)
        files[name], sizes[name] = _header(file)
    if index is not None:
        _check_index(path, index, files)
    return Contents(files, sizes, index is not None)


def verify(path: Path) -> str:
    """Check a Hugging Face style folder as far as it can be checked (``contents``); return what was checked, in
    a line. Such a folder has no checksums: a flipped bit inside a tensor's data goes unseen."""
    c = contents(path)
    config = "" if _config(path) is None else "; config.json parses"
    what = f"{len(c.files)} shards, index checked" if c.sharded else "one file"
    return (f"a {FORMAT} ({what}, {len(c.tensors)} tensors, {sum(c.sizes.values())} bytes): each file's header "
            f"parses and its tensors fill it exactly{config}; it has no checksums to check")


def load(path: Path, objects: Mapping[str, Any], *, strict: bool = True) -> kinds.Loaded:
    """``etappe.load`` of a Hugging Face style folder: its weights into the one model in ``objects`` (by any name),
    shard by shard, by ``kinds.load_parts``'s rules (prefixes, tied weights, ``strict``); with no object, the whole
    state dict as ``model``. config.json, if there, comes back as ``config``."""
    path = Path(path)
    c = contents(path)
    config = _config(path)
    values = {"config": config} if config is not None else {}
    if not objects:
        state: dict[str, torch.Tensor] = {}
        for part in _parts(path, c):
            state.update(part)
        return kinds.Loaded({"model": state, **values})
    if len(objects) != 1 or not isinstance(next(iter(objects.values())), torch.nn.Module):
        given = ", ".join(f"{k}={type(v).__name__}" for k, v in objects.items())
        raise UsageError(f"{path}: a {FORMAT} holds one model's weights: restore one model (model=net), not {given}")
    (name, module), = objects.items()
    shapes = {n: info.shape for n, info in c.tensors.items()}
    report = kinds.load_parts(module, shapes, _parts(path, c), str(path), strict=strict)
    return kinds.Loaded(values, {name: report})


def inspect(path: Path) -> dict[str, Any]:
    """``inspection.inspect`` of a Hugging Face style folder, from headers and config.json alone: the weights as
    entry ``model`` (tensors, shapes, dtypes, parameter count), a few config.json fields as entry ``config``."""
    from etappe.checkpoint.inspection import _describe  # inspection dispatches here: imported when used

    path = Path(path)
    c = contents(path)
    config = _config(path) or {}
    files = [{"name": n, "bytes": size} for n, size in c.sizes.items()]
    for extra in (INDEX, CONFIG) if c.sharded else (CONFIG,):
        if _present(path / extra):
            files.append({"name": extra, "bytes": (path / extra).stat().st_size})
    entries = [_describe("model", kinds.MODULE, None, c.tensors, None)]
    if config:
        entries.append(_describe("config", kinds.VALUE, None, {k: config[k] for k in _CONFIG_FIELDS if k in config},
                                 None))
    return {"path": str(path), "format": FORMAT, "shards": len(c.files) if c.sharded else 0,
            "bytes": sum(f["bytes"] for f in files), "files": files, "entries": entries}


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _file(folder: Path, name: str, index: Mapping[str, str] | None) -> Path:
    """The regular file ``name`` of ``folder`` (a link followed), checked to be a plain file name in it."""
    where = folder / INDEX if index is not None else folder
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointError(f"{where}: names weights file {name[:80]!r}, not a file name in the folder; the index "
                              "is damaged or crafted")
    file = folder / name
    if not _present(file) or (file.is_symlink() and not file.exists()):
        if index is None:
            raise CheckpointError(f"{file}: missing")
        count = sum(shard == name for shard in index.values())
        raise CheckpointError(f"{where} maps {count} tensors to {name}, which is missing; download it again or "
                              "fix the index")
    real = file.resolve()
    if not real.is_file():
        raise CheckpointError(f"{file}: not a regular file")
    return real


def _header(file: Path) -> tuple[dict[str, tensorfile.TensorInfo], int]:
    """A weights file's tensors from its header (checked as a load checks it), and its size, which must be the
    header's and the tensors' bytes exactly: a truncated or padded file is refused."""
    infos = tensorfile.infos(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
    except (OSError, struct.error) as e:
        raise CheckpointError(f"{file}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    data = sum(info.bytes for info in infos.values())
    if 8 + n + data != size:
        raise CheckpointError(f"{file}: {size} bytes, but its header ({8 + n} bytes) and tensors ({data} bytes) "
                              f"make {8 + n + data}; the file is truncated or damaged")
    return infos, size


def _read_index(folder: Path) -> dict[str, str]:
    """The index's weight_map ({tensor name: shard file}), its JSON checked; a name listed twice is refused."""
    where = folder / INDEX
    file = _file(folder, INDEX, None)
    blob = reading.read_inside(file.parent, file.name)

    def pairs(items: list) -> dict:
        out = {}
        for k, v in items:
            if k in out:
                raise CheckpointError(f"{where}: names tensor {k[:80]!r} twice; a tensor lives in one shard")
            out[k] = v
        return out

    try:
        index = json.loads(blob, object_pairs_hook=pairs)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: not a valid index ({type(e).__name__}: {str(e)[:200]})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
        raise CheckpointError(f"{where}: expected a JSON object with a weight_map of tensor names to shard files, "
                              "found none; download it again")
    return weight_map


def _check_index(folder: Path, index: Mapping[str, str], files: Mapping[str, Mapping[str, Any]]) -> None:
    """Each tensor the index maps is in its shard, and each tensor of a shard is mapped to that shard."""
    where = folder / INDEX
    for name, shard in index.items():
        if name not in files[shard]:
            raise CheckpointError(f"{where} maps {name[:80]!r} to {shard}, which does not hold it; the index does "
                                  "not fit its shards")
    for shard, infos in files.items():
        for name in infos:
            if name not in index:
                raise CheckpointError(f"{folder / shard} holds {name[:80]!r}, which the index does not list")
            if index[name] != shard:
                raise CheckpointError(f"{name[:80]!r} is in {shard} and in {index[name]}; a tensor lives in one "
                                      "shard")


def _parts(path: Path, c: Contents) -> Iterator[dict[str, torch.Tensor]]:
    """Each weights file's tensors in turn, viewing the file mapped copy-on-write (no copy until loaded)."""
    for name in c.files:
        file = _file(path, name, None)
        fd = os.open(file, os.O_RDONLY)
        try:
            buf = reading.map_fd(fd, c.sizes[name], file)
        except EOFError as e:
            raise CheckpointError(f"{file}: changed size while read ({e})") from None
        finally:
            os.close(fd)
        yield tensorfile.parse(buf, file)


def _config(folder: Path) -> dict | None:
    """config.json as a JSON object (never anything that runs), or None when there is none."""
    if not _present(folder / CONFIG):
        return None
    file = _file(folder, CONFIG, None)
    return reading.read_json(file.parent, file.name, "a model config (a JSON object)", "download it again")
