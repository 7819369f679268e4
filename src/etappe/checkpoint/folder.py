"""One checkpoint folder: save it atomically, read it back verified, restore it into objects.

Layout: ``state.json`` (every entry's kind, type and JSON state), one ``<entry>.safetensors`` per entry that
holds tensors, and ``manifest.json``, written last, listing them all with sizes and checksums.

A new checkpoint is written into a temporary folder beside its place and renamed into it. Overwriting an
existing checkpoint writes the new files beside the old ones under other names (``model.1.safetensors``
where ``model.safetensors`` is in use, and back), then replaces the manifest: until that rename the old
manifest and its files stand untouched.
"""

import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from etappe.checkpoint import codec, fsio, hf, kinds, manifest, sharded, tensorfile, tied, torchsave
from etappe.checkpoint.errors import CheckpointError, NewerFormatError
from etappe.errors import UsageError, check_flag

STATE = "state.json"
_ENTRY_NAME = re.compile(r"[A-Za-z0-9_-]+")  # no dots: "model.1.safetensors" can never be another entry's file


def save(path: str | os.PathLike, /, **objects: Any) -> Path:
    """Save ``objects`` by name into checkpoint folder ``path``, atomically; return the folder's path.

    Objects with ``state_dict()``/``load_state_dict()`` (modules, optimizers, schedulers, grad scalers, ...) are
    saved as their state; anything else must be a plain value: None, bool, int, float (inf and nan too), str,
    bytes, list, tuple, dict, tensor or numpy array. An existing checkpoint at ``path`` is replaced, and stays
    valid until the new one is complete. Raises CheckpointError on any failure; nothing is left half-written.
    """
    from etappe import rundir

    if rundir.looks_like_url(path):  # no rename on an object store: its commit is a store's (one manifest PUT)
        url = rundir.location(path, "checkpoint")
        raise UsageError(f"etappe.save writes a local folder; {url} is on an object store: save there through its "
                         "store, etappe.checkpoint.objectstore.open_store(ROOT).save(step, objects)")
    return write(Path(path), objects)


def load(path: str | os.PathLike, /, *, trusted: bool = False, strict: bool = True, **objects: Any) -> kinds.Loaded:
    """Verify checkpoint ``path``, restore the named ``objects`` in place, and return everything else it holds.

    ``path`` is an etappe checkpoint folder, a plain ``torch.save`` file (.pt/.pth/.tar), a .safetensors file, or
    a Hugging Face style folder (``model.safetensors`` or shards with ``model.safetensors.index.json``; restore
    its one model by any name). Objects are restored with ``load_state_dict`` in the order given, and only after
    every file has been verified. A model takes names saved with a wrapper's prefix (``module.``,
    ``_orig_mod.``) or any other consistent prefix more or less (``kinds.renaming``, said in a
    CheckpointWarning), and a tied weight the file stored once. ``strict=False`` loads into a model what fits
    (names and shapes) and leaves the rest; strict loads refuse any difference, listing it, before anything is
    loaded. The result maps each entry not restored to its value (plain values as saved; Stateful entries as
    their state_dict), and its ``reports`` each model restored to a ``kinds.LoadReport`` (missing, unexpected and
    mismatched names); its tensors view the checkpoint's files copy-on-write, as ``safetensors.load_file``'s do.
    ``trusted=True`` allows fully unpickling a torch.save file, which can run code from it. ``strict`` and
    ``trusted`` are load's own: an entry of either name comes back in the result, not restored by name.
    """
    check_options(strict, trusted)
    from etappe import rundir

    if rundir.looks_like_url(path):  # a checkpoint on an object store: fetched, verified and loaded as a local one
        with rundir.local_copy(path) as local:
            return load(local, trusted=trusted, strict=strict, **objects)
    path = Path(path)
    if path.is_file():
        return torchsave.load(path, objects, trusted=trusted, strict=strict)
    if hf.is_folder(path):
        return hf.load(path, objects, strict=strict)
    return restore(path, read(path), objects, strict=strict)


def verify(path: str | os.PathLike, *, step: int | None = None) -> None:
    """Check every file of checkpoint ``path`` against its manifest, and that its state and tensor headers parse;
    raise CheckpointError naming the bad file. ``step``: the manifest must say this step (``manifest.read``).

    A plain torch.save file is checked against the CRC-32s its zip archive holds; a Hugging Face style folder,
    which has no checksums, by its index and each file's safetensors header and size (``hf.verify``).
    """
    from etappe import rundir

    if rundir.looks_like_url(path):  # a checkpoint on an object store, checked where it is
        from etappe.checkpoint.objectstore import verify_url

        url = rundir.location(path, "checkpoint")
        results = verify_url(url)
        if not results:
            raise CheckpointError(f"{url}: no checkpoint found there")
        problem = next((p for _, p in results if p), None)
        if problem:
            raise CheckpointError(problem)
        return None
    path = Path(path)
    if path.is_file():
        torchsave.verify(path)
        return None
    if hf.is_folder(path):
        hf.verify(path)
        return None
    read(path, step=step)  # the pass over every byte that the checksums need, and the parse a load would do


def write(path: Path, objects: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> Path:
    """``save`` for callers with a mapping of objects and extra manifest fields (the store's step and metrics)."""
    return write_encoded(path, encode(objects), meta)  # encoded before touching the disk: state_dict() may raise


def write_encoded(path: Path, encoded: Mapping[str, tuple[dict, dict]], meta: Mapping[str, Any] | None = None,
                  shards: Callable[[Path], tuple[dict, dict]] | None = None) -> Path:
    """``write`` of objects already turned into ``encode``'s records and tensors (by the store's async save).
    ``shards(folder)``, if given, writes sharded entries into ``folder`` first (``sharded.write``) and returns
    their records and files."""
    fsio.refuse_link(path, "save to")
    old_files = None
    if (path / manifest.MANIFEST).exists() or (path / manifest.MANIFEST).is_symlink():
        try:
            old_files = set(manifest.read(path)["files"])
        except NewerFormatError:
            raise  # a valid checkpoint this etappe cannot read: overwriting it would destroy it
        except CheckpointError:
            old_files = set()  # a corrupt checkpoint holds nothing worth keeping: overwrite it like strays
    elif path.exists() and not _empty_dir(path):
        raise CheckpointError(
            f"cannot save to {path}: it exists and is not an etappe checkpoint (no manifest.json); "
            "pick another path or remove it"
        )
    try:
        if old_files is None:
            _write_new(path, encoded, dict(meta or {}), shards)
        else:
            _overwrite(path, encoded, dict(meta or {}), old_files, shards)
    except OSError as e:
        what = f"{e.strerror} ({e.filename})" if e.filename else str(e)
        raise CheckpointError(f"cannot save checkpoint {path}: {what}; any previous checkpoint there is unchanged") from e
    return path


def read(path: Path, *, step: int | None = None) -> dict[str, Any]:
    """Read every file of checkpoint ``path`` once, verifying sizes and checksums; return {entry: value}.
    ``step``: the manifest must say this step. Anything malformed raises CheckpointError."""
    body = manifest.read(path, step=step)
    blobs = {name: manifest.read_verified(path, name, entry) for name, entry in body["files"].items()}
    state_file = path / body["state"]
    entries = state_entries(state_file, blobs[body["state"]], body["files"])
    tensors = {name: tensorfile.parse(blobs[e["tensors"]], path / e["tensors"]) if "tensors" in e else {}
               for name, e in entries.items()}
    out = {}
    for name, e in entries.items():
        try:
            out[name] = (sharded.Shards.of(path, e, body["files"]) if "shards" in e
                         else codec.decode(e["data"], tensors[name]))
        except CheckpointError as err:
            raise CheckpointError(f"{state_file}: entry {name!r}: {err}") from None
    return out


def state_entries(state_file: Path, blob, files: Mapping[str, Any]) -> dict[str, dict]:
    """state.json's entries (``blob``: its verified bytes; ``files``: the manifest's file list), each a record with
    the fields ``read`` and inspection use, of the types they need; anything else raises CheckpointError."""
    try:
        state = json.loads(bytes(blob))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(
            f"{state_file}: malformed checkpoint state ({type(e).__name__}: {str(e)[:200]}); "
            "was it written by a newer etappe?"
        ) from None
    entries = state.get("entries") if isinstance(state, dict) else None
    if not isinstance(entries, dict):
        raise CheckpointError(
            f"{state_file}: malformed checkpoint state (no entries); was it written by a newer etappe?"
        )
    for name, e in entries.items():
        if not (isinstance(e, dict) and isinstance(e.get("kind"), str) and ("data" in e or "shards" in e)):
            raise CheckpointError(f"{state_file}: malformed checkpoint state: entry {name[:80]!r} is not a record")
        if "tensors" in e and not (isinstance(e["tensors"], str) and e["tensors"] in files):
            raise CheckpointError(
                f"{state_file}: entry {name[:80]!r} names a tensor file {str(e['tensors'])[:80]!r} the manifest does "
                "not list"
            )
        if "type" in e and not isinstance(e["type"], str):
            raise CheckpointError(f"{state_file}: malformed checkpoint state: entry {name[:80]!r} has type "
                                  f"{str(e['type'])[:80]!r}, not a class name")
        parameters = e.get("parameters")
        if parameters is not None and not (isinstance(parameters, int) and not isinstance(parameters, bool)
                                           and parameters >= 0):
            raise CheckpointError(f"{state_file}: malformed checkpoint state: entry {name[:80]!r} has "
                                  f"{str(parameters)[:80]!r} parameters, not a whole number >= 0")
    return entries


def check_options(strict: object, trusted: object) -> None:
    """load()'s own options are True or False; an entry of either name is not restored by name (it comes back in
    the result)."""
    for name, value in (("strict", strict), ("trusted", trusted)):
        check_flag(name, value, f"; {name} is load()'s own option, so an entry named {name!r} is not restored by "
                                f"name: take it from the result, obj.load_state_dict(etappe.load(path)[{name!r}]) "
                                f"(from a store: store.load()[{name!r}])")


def restore(path: Path, entries: Mapping[str, Any], objects: Mapping[str, Any], *,
            strict: bool = True) -> kinds.Loaded:
    """Load entries into ``objects`` by name; return the entries not restored, with each model's LoadReport.
    ``strict=False``: a (whole, not sharded) model takes what fits (``kinds.load_into``)."""
    for name, obj in objects.items():
        if name not in entries:
            hint = "; the checkpoint's path comes first, without a name: load(path, ...)" if name == "path" else ""
            raise CheckpointError(f"{path} has no entry {name!r}; it holds: {', '.join(entries) or 'nothing'}{hint}")
        if not kinds.is_stateful(obj):
            raise UsageError(
                f"cannot restore {name!r} into a {type(obj).__name__}: pass objects with load_state_dict(); "
                "plain values come back in load()'s result"
            )
    if any(isinstance(entries[name], sharded.Shards) for name in objects):
        sharded.restore(path, entries, objects)
    done = sharded.restore_whole(path, entries, objects) if any(map(sharded.is_sharded, objects.values())) else set()
    reports = {}
    for name, obj in objects.items():
        state = entries[name]
        if isinstance(state, sharded.Shards) or name in done:
            continue
        if not isinstance(obj, torch.nn.Module):  # a module copies into its parameters; an optimizer keeps the
            state = tied.owned(state)  # tensors it is given, which would pin the checkpoint's file until exit
        report = kinds.load_into(obj, state, f"{path} entry {name!r}", strict=strict)
        if report is not None:
            reports[name] = report
    return kinds.Loaded({name: sharded.materialize(value) if isinstance(value, sharded.Shards) else value
                         for name, value in entries.items() if name not in objects}, reports)


def encode(objects: Mapping[str, Any]) -> dict[str, tuple[dict, dict[str, torch.Tensor]]]:
    """{entry: (state.json record, tensors)}; calls each object's state_dict() once. The records are new JSON-able
    trees; the tensors are detached views of the objects' own memory."""
    out = {}
    for name, obj in objects.items():
        if not isinstance(name, str) or not _ENTRY_NAME.fullmatch(name):
            raise UsageError(f"cannot save an entry named {name!r}: use letters, digits, '_' and '-'")
        kind = kinds.of_object(obj)
        if kind == kinds.MODULE and sharded.is_sharded_module(obj):
            raise UsageError(
                f"{name!r} is sharded (FSDP): one process cannot save it whole; save it with every rank through "
                "the Trainer or CheckpointStore.save(step, objects, sharded={...})"
            )
        record: dict[str, Any] = {"kind": kind}
        if kind != kinds.VALUE:
            record["type"] = kinds.type_name(obj)
            state = obj.state_dict()
        else:
            state = obj
        if kind == kinds.MODULE:
            record["parameters"] = sum(p.numel() for p in obj.parameters())
        record["data"], tensors = codec.encode(state, f"{name!r}")
        out[name] = (record, tensors)
    return out


def _write_files(folder: Path, encoded: dict, taken: set[str], written: dict[str, tuple[int, str]],
                 records: Mapping[str, dict]) -> str:
    """Write the state and tensor files into ``folder`` under names not in ``taken``, recording each in
    ``written`` ({name: (size, checksum)}) as it is started; return the state file's name. An entry's tensors
    are a dict of tensors, or a ``tensorfile.Image`` already holding the file (async save's snapshot)."""

    def put(name: str, write) -> str:
        if name in taken:
            stem, ext = name.split(".", 1)
            name = f"{stem}.1.{ext}"
        fsio.remove_quietly(folder / name)  # only ever an unreferenced leftover of an interrupted overwrite
        written[name] = (0, "")
        hasher = manifest.new_hasher()
        size = write(folder / name, hasher)
        written[name] = (size, hasher.hexdigest())
        return name

    entries = {}
    for entry, (record, tensors) in encoded.items():
        record = dict(record)
        if isinstance(tensors, tensorfile.Image):
            record["tensors"] = put(f"{entry}.safetensors", tensors.write)
        elif tensors:
            record["tensors"] = put(f"{entry}.safetensors",
                                    lambda path, hasher: fsio.write_file(path, tensorfile.chunks(tensors), hasher))
        entries[entry] = record
    entries.update(records)
    state = json.dumps({"entries": entries}, separators=(",", ":"), allow_nan=False).encode()
    return put(STATE, lambda path, hasher: fsio.write_file(path, [state], hasher))


def _write_new(path: Path, encoded: dict, meta: dict, shards) -> None:
    def write_files(tmp: Path) -> tuple[str, bytes]:
        records, files = shards(tmp) if shards is not None else ({}, {})
        state = _write_files(tmp, encoded, set(), files, records)
        return manifest.MANIFEST, manifest.encode(files, state, meta)

    fsio.commit_folder(path, write_files)


def _overwrite(path: Path, encoded: dict, meta: dict, old_files: set[str], shards) -> None:
    files: dict[str, tuple[int, str]] = {}
    try:
        records, shard_files = shards(path) if shards is not None else ({}, {})
        files.update(shard_files)  # in a new shards-<random>/ beside the old one
        state = _write_files(path, encoded, old_files, files, records)
        fsio.atomic_write_bytes(path / manifest.MANIFEST, manifest.encode(files, state, meta))  # the commit
    except BaseException:
        for name in {n.split("/")[0] for n in files}:
            fsio.remove_quietly(path / name)
        raise
    kept = {name.split("/")[0] for name in files}
    for child in path.iterdir():  # the old checkpoint's files, and strays of earlier interrupted overwrites
        if child.name not in kept and child.name != manifest.MANIFEST:
            fsio.remove_quietly(child)
    fsio.fsync_dir(path)


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())
