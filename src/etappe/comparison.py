"""Is this the same model? Two checkpoints or weight files compared tensor by tensor (``etappe diff A B``).

    result = etappe.diff("runs/exp1", "model.pt")      # result.equal, result.items, print(result.summary())

Each side is read as etappe reads it, never running code from the file unless ``trusted``: an etappe checkpoint
folder (a run folder: its newest valid checkpoint), a plain ``torch.save`` file, a ``.safetensors`` file (mapped,
not copied), a Hugging Face style folder, an ONNX model's initializers, a ``.pt2`` program's weights and a
TorchScript archive's tensors (each read as data: none of them runs). What a side holds becomes named entries
(model, optimizer, scheduler, plain values). Entries are lined up by name (``model_state_dict`` answers to
``model`` as in ``etappe.load``), a bare state dict with the other side's only model, and a model's keys that
differ only by a wrapper's prefix (``module.``, ``_orig_mod.``) are matched; each of these is said in ``notes``.

Then every leaf is compared, one pair at a time: tensors by shape, dtype and bits (equal when ``torch.equal``
says so or their bits match, so NaNs in the same places with the same bits are equal), with the largest absolute
difference when they differ; plain values (epoch, loss, config fields, hyperparameters) by equality.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from etappe.checkpoint import folder, kinds, manifest, reading, sharded, tensorfile, torchsave
from etappe.checkpoint.errors import CheckpointError, TrustError
from etappe.errors import UsageError, check_flag, first_line

EQUAL, CLOSE, DIFFERS, SHAPE, DTYPE = "equal", "close", "differs", "shape", "dtype"  # an Item's status
ONLY_A, ONLY_B = "only in A", "only in B"
_ORDER = (ONLY_A, ONLY_B, SHAPE, DTYPE, DIFFERS, CLOSE)  # how the summary groups what differs
_CHUNK = 1 << 20  # elements widened to float64 at a time: a difference never copies a whole large tensor
_SHOWN = 20  # lines of differences the summary shows at most


@dataclass(frozen=True)
class Item:
    """One compared leaf: a tensor (``tensor``) or a plain value, by its path (``model/fc.weight``,
    ``optimizer/param_groups/0/lr``, ``epoch``). ``a`` and ``b`` describe it on each side (``[10, 4] float32``
    or the value), None where it is absent; ``max_abs`` is the largest absolute difference of tensors compared
    element by element (NaN where NaNs do not line up)."""

    name: str
    status: str
    tensor: bool
    a: str | None = None
    b: str | None = None
    max_abs: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "status": self.status, "tensor": self.tensor, "a": self.a, "b": self.b}
        if self.max_abs is not None:
            out["max_abs"] = self.max_abs if math.isfinite(self.max_abs) else str(self.max_abs)
        return out


@dataclass(frozen=True)
class DiffResult:
    """What ``diff`` found. ``equal``: nothing differs. ``close``: everything that differs is within ``atol``
    (only when an ``atol`` was given; close is not equal). ``exit_code``: 0 when equal or close, else 1."""

    a: str
    b: str
    a_format: str
    b_format: str
    items: list[Item]
    pairs: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    atol: float | None = None

    @property
    def differences(self) -> list[Item]:
        """The items that differ, grouped (only in A, only in B, shape, dtype, values), largest first."""
        rank = {s: i for i, s in enumerate(_ORDER)}
        return sorted((i for i in self.items if i.status != EQUAL),
                      key=lambda i: (rank[i.status], not i.tensor, -_magnitude(i.max_abs)))

    @property
    def equal(self) -> bool:
        return all(i.status == EQUAL for i in self.items)

    @property
    def close(self) -> bool:
        return self.atol is not None and all(i.status in (EQUAL, CLOSE) for i in self.items)

    @property
    def exit_code(self) -> int:
        return 0 if self.equal or self.close else 1

    def summary(self) -> str:
        """A few lines: what was compared with what, then ``equal: 26 tensors, 3 values`` or what differs,
        grouped, the largest differences first, at most about 20 lines of them."""
        lines = [f"A {self.a} ({self.a_format})", f"B {self.b} ({self.b_format})"]
        lines += [f"note: {n}" for n in self.notes]
        equal_counts = _counts([i for i in self.items if i.status == EQUAL])
        if self.equal:
            lines.append(f"equal: {equal_counts}")
            return "\n".join(lines)
        diffs = self.differences
        tensors, values = sum(i.tensor for i in self.items), sum(not i.tensor for i in self.items)
        n_t, n_v = sum(i.tensor for i in diffs), sum(not i.tensor for i in diffs)
        verdict = f"close (all within atol {self.atol:g})" if self.close else "differ"
        lines.append(f"{verdict}: {n_t} of {tensors} tensors, {n_v} of {values} values")
        groups = [(s, [i for i in diffs if i.status == s]) for s in _ORDER]
        groups = [(s, g) for s, g in groups if g]
        each = max(2, (_SHOWN - len(groups)) // len(groups))
        hidden = 0
        width = min(48, max(len(i.name) for i in diffs))
        for status, group in groups:
            lines.append(f"{_HEADINGS[status]} ({len(group)}):")
            lines += [f"  {i.name:<{width}}  {_detail(i)}" for i in group[:each]]
            hidden += max(0, len(group) - each)
        if hidden:
            lines.append(f"... and {hidden} more (--json lists every one)")
        if equal_counts != "nothing":
            lines.append(f"equal: {equal_counts}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Everything, for ``--json``: both sides, the pairs of entries, the notes, and every item compared."""
        return {
            "a": {"path": self.a, "format": self.a_format}, "b": {"path": self.b, "format": self.b_format},
            "equal": self.equal, "close": self.close, "atol": self.atol,
            "pairs": [list(p) for p in self.pairs], "notes": self.notes,
            "differences": [i.to_dict() for i in self.differences],
            "items": [i.to_dict() for i in self.items],
        }


_HEADINGS = {ONLY_A: "only in A", ONLY_B: "only in B", SHAPE: "shape changed", DTYPE: "dtype changed",
             DIFFERS: "values differ", CLOSE: "values close"}


def diff(a: str | os.PathLike, b: str | os.PathLike, *, atol: float | None = None,
         trusted: bool = False) -> DiffResult:
    """Compare checkpoint or weights file ``a`` with ``b``, tensor by tensor and value by value.

    Differences within ``atol`` (tensors' largest absolute difference, numbers' difference) are called close;
    they still differ. ``trusted=True`` also reads files that run code when opened (a whole pickled model, a
    TorchScript archive whose modules keep their state with their own ``__setstate__``). A path that is missing
    or of a kind etappe does not read raises UsageError or CheckpointError with one line.
    """
    check_flag("trusted", trusted)
    if atol is not None and not (atol >= 0 and math.isfinite(atol)):
        raise UsageError(f"atol must be a finite number >= 0, got {atol!r}")
    side_a, side_b = read_side(a, trusted), read_side(b, trusted)
    pairs, only_a, only_b, notes = pair_entries(side_a.kinds(), side_b.kinds())
    notes = side_a.notes("A") + side_b.notes("B") + notes
    items: list[Item] = []
    for name_a, name_b in pairs:
        leaves_a = dict(leaves(side_a.value(name_a)))
        leaves_b = dict(leaves(side_b.value(name_b)))
        if side_a.entries[name_a][0] == kinds.MODULE and side_b.entries[name_b][0] == kinds.MODULE:
            strip_a, strip_b = wrapper_prefixes(list(leaves_a), list(leaves_b))
            for side, strip, other in (("A", strip_a, "B"), ("B", strip_b, "A")):
                if strip:
                    entry = name_a if side == "A" else name_b
                    notes.append(f"{side}'s {entry!r} keys carry the prefix {strip!r} and {other}'s do not: "
                                 "matched without it")
            leaves_a = {k[len(strip_a):]: v for k, v in leaves_a.items()}
            leaves_b = {k[len(strip_b):]: v for k, v in leaves_b.items()}
        items += compare_leaves(leaves_a, leaves_b, prefix=name_a, atol=atol)
    for name in only_a:
        items += [_absent(f"{name}/{k}" if k else name, v, ONLY_A) for k, v in leaves(side_a.value(name))]
    for name in only_b:
        items += [_absent(f"{name}/{k}" if k else name, v, ONLY_B) for k, v in leaves(side_b.value(name))]
    return DiffResult(str(a), str(b), side_a.format, side_b.format, items, pairs, notes, atol)


# --- reading a side ---------------------------------------------------------------------------------------------


@dataclass
class Side:
    """One side of a diff: where it was read from, what it is, and its entries as {name: (kind, value)}."""

    path: Path
    format: str
    entries: dict[str, tuple[str, Any]]
    came_from: str | None = None  # a run folder whose newest checkpoint this is
    remark: str | None = None  # what to keep in mind about its weights

    def kinds(self) -> dict[str, str]:
        return {name: kind for name, (kind, _) in self.entries.items()}

    def value(self, name: str) -> Any:
        value = self.entries[name][1]
        if isinstance(value, sharded.Shards):  # read whole when compared, and only then
            value = sharded.materialize(value)
        return value

    def notes(self, which: str) -> list[str]:
        notes = [f"{which} is run {self.came_from}'s newest valid checkpoint, {self.path.name}"] if self.came_from \
            else []
        return notes + ([f"{which} {self.remark}"] if self.remark else [])


def read_side(path: str | os.PathLike, trusted: bool = False) -> Side:
    """What ``path`` holds, as named entries, read as etappe reads it (see the module's docstring)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder; expected an etappe checkpoint or run folder, a torch.save "
                         "file, a .safetensors file or an ONNX model")
    try:
        if path.is_dir():
            return _read_folder(path)
        return _read_file(path, trusted)
    except OSError as e:
        raise CheckpointError(f"{e.filename or path}: cannot read: {e.strerror or e}") from None


def _read_folder(path: Path) -> Side:
    from etappe.checkpoint import hf
    from etappe.checkpoint.store import CheckpointStore

    if hf.is_folder(path):  # weights in model.safetensors or shards, config.json beside them; no checksums
        entries = {name: (kinds.MODULE if name == "model" else kinds.of_state(value), value)
                   for name, value in hf.load(path, {}).items()}
        return Side(path, hf.FORMAT, entries)
    came_from = None
    if (path / "checkpoints").is_dir() and not (path / manifest.MANIFEST).exists():
        latest = CheckpointStore(path / "checkpoints").latest()
        if latest is None:
            raise CheckpointError(f"{path} holds no valid checkpoint; check it with: etappe verify {path}")
        came_from, path = str(path), latest
    if not (path / manifest.MANIFEST).exists():
        raise UsageError(f"{path}: a folder that is neither an etappe checkpoint (no {manifest.MANIFEST}) nor a run "
                         "folder (no checkpoints/); expected one of those, or a weights file")
    values = folder.read(path)  # every file verified against the manifest; tensors map the files, not copies
    body = manifest.read(path)
    blob = manifest.read_verified(path, body["state"], body["files"][body["state"]])
    try:
        records = folder.state_entries(path / body["state"], blob, body["files"])
    finally:
        close = getattr(blob, "close", None)
        if close is not None:
            close()
    entries = {name: (records[name]["kind"], value) for name, value in values.items()}
    return Side(path, "etappe checkpoint", entries, came_from)


def _read_file(path: Path, trusted: bool) -> Side:
    size, head = torchsave.sniff(path)
    if torchsave.is_safetensors(head, size):
        return Side(path, "safetensors", _as_entries(_map_safetensors(path)))
    if head.startswith(b"PK"):
        kind = torchsave.archive_kind(torchsave.check_archive(path))
        if kind == "torchscript":
            return _read_torchscript(path, trusted)
        if kind == "export":
            return Side(path, "torch.export program", {torchsave.BARE: (kinds.MODULE, _pt2_weights(path))})
    elif torchsave.other_kind(path, head, size) == "an ONNX model":
        return Side(path, "ONNX model", {torchsave.BARE: (kinds.MODULE, _onnx_initializers(path))},
                    remark="is an ONNX model: its initializers are the weights as the exporter left them (a "
                           "BatchNorm folded into the layer before it, constants renamed or dropped)")
    return Side(path, "torch.save", _as_entries(torchsave.read(path, trusted=trusted)))


def _as_entries(content: Any) -> dict[str, tuple[str, Any]]:
    out = {}
    for name, value in torchsave.entries(content).items():
        if kinds.is_stateful(value):  # a whole pickled object, from a trusted file: its state is what it holds
            value = value.state_dict()
        out[str(name)] = (kinds.of_state(value), value)
    return out


def _map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors, viewing the mapped file (pages are read as they are compared)."""
    fd = reading.open_listed(path.parent, path.name)
    try:
        buf = reading.map_fd(fd, os.fstat(fd).st_size, path)
    finally:
        os.close(fd)
    return tensorfile.parse(buf if not isinstance(buf, bytes) else bytearray(buf), path)


def _read_torchscript(path: Path, trusted: bool) -> Side:
    """A TorchScript archive's parameters and buffers, read as data: ``data.pkl`` by modelfiles' unpickler, which
    builds inert stand-ins for its modules and tensor records, and each tensor's bytes from the archive's
    ``data/``. A module with its own ``__setstate__`` keeps its state opaque: with ``trusted`` the archive is
    then loaded with torch.jit.load (which runs its code), else refused."""
    from etappe.checkpoint import modelfiles

    infos = torchsave.check_archive(path, "TorchScript archive")
    by_inner = {i.filename.split("/", 1)[-1]: i for i in infos}
    data = modelfiles.read_member(path, infos, "data.pkl", modelfiles.MAX_PICKLE)
    if data is None:
        raise CheckpointError(f"{path}: a TorchScript archive without data.pkl; the file is damaged")
    storages = {n.removeprefix("data/"): i.file_size for n, i in by_inner.items() if n.startswith("data/")}
    try:
        root = modelfiles.unpickle(data, storages, "data.pkl")
    except (modelfiles.Malformed, RecursionError) as e:
        raise CheckpointError(f"{path}: a TorchScript archive that is malformed ({e or 'nested too deeply'}); "
                              "export it again") from None
    records: dict[str, Any] = {}
    opaque: list[str] = []

    def walk(obj: Any, prefix: str, depth: int) -> None:
        if depth > modelfiles.MAX_DEPTH:
            raise CheckpointError(f"{path}: modules nested more than {modelfiles.MAX_DEPTH} deep")
        if not isinstance(obj.state, Mapping):
            opaque.append(prefix.rstrip(".") or "the model")
            return
        for key, v in obj.state.items():
            if isinstance(v, modelfiles.TensorRecord):
                records[f"{prefix}{key}"] = v
            elif isinstance(v, modelfiles.ObjectRecord):
                walk(v, f"{prefix}{key}.", depth + 1)

    if not isinstance(root, modelfiles.ObjectRecord):
        raise CheckpointError(f"{path}: data.pkl does not hold a scripted module; the file is damaged")
    walk(root, "", 0)
    if opaque:
        if not check_flag("trusted", trusted):
            raise TrustError(f"{path}: a TorchScript archive whose module {opaque[0][:80]!r} keeps its state with its "
                             "own __setstate__, which only running its code reads; it is not compared without "
                             "--trust (Python: trusted=True)")
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable TorchScript archive: {first_line(e)}") from None
        return Side(path, "TorchScript archive", {torchsave.BARE: (kinds.MODULE, dict(module.state_dict()))})
    tensors, read = {}, {}
    with zipfile.ZipFile(path) as z:
        for name, r in records.items():
            key = r.storage.key
            if key not in read:
                read[key] = bytearray(z.read(by_inner[f"data/{key}"]))
            flat = torch.frombuffer(read[key], dtype=r.storage.dtype, count=r.storage.numel) if r.storage.numel \
                else torch.empty(0, dtype=r.storage.dtype)
            tensors[name] = flat.as_strided(r.shape, r.stride, r.offset)  # bounds checked by the unpickler
    return Side(path, "TorchScript archive", {torchsave.BARE: (kinds.MODULE, tensors)},
                remark="is a TorchScript archive, read as data (its code never runs): every tensor its modules "
                       "hold is compared, parameters, buffers and tensor attributes alike")


def _onnx_initializers(path: Path) -> dict[str, torch.Tensor]:
    """An ONNX model's floating-point initializers (its weights, as the exporter named and folded them), parsed as
    data by the onnx package; nothing in the model runs. Integer and boolean initializers are the graph's own
    constants (a reshape's shape, an index), not weights, and are left out; weights kept in external data files
    are not read."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise UsageError(f"{path}: an ONNX model; comparing its weights needs the onnx package: pip install "
                         "'etappe[onnx]'") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and onnx's own, for a damaged file
        raise CheckpointError(f"{path}: not a readable ONNX model: {first_line(e)}") from None
    out = {}
    floats = _onnx_float_types()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise UsageError(f"{path}: initializer {init.name[:80]!r} is kept in an external data file, which etappe "
                             "does not read; compare the exported checkpoint or state dict instead")
        if init.data_type not in floats:
            continue
        try:
            out[init.name] = torch.from_numpy(np.array(numpy_helper.to_array(init)))
        except Exception as e:  # data that does not fit its dims or type: a damaged or crafted file
            raise CheckpointError(f"{path}: initializer {init.name[:80]!r} cannot be read ({first_line(e)[:160]}); "
                                  "the file is damaged") from None
    return out


def _onnx_float_types() -> set[int]:
    import onnx

    names = ("FLOAT", "DOUBLE", "FLOAT16", "BFLOAT16", "COMPLEX64", "COMPLEX128")
    return {getattr(onnx.TensorProto, n) for n in names}


_PT2_CONFIG = "data/weights/model_weights_config.json"


def _pt2_weights(path: Path) -> dict[str, torch.Tensor]:
    """A ``.pt2`` program's weights and buffers, read as data: torch.export keeps each as raw bytes beside a JSON
    list of names, dtypes, sizes and strides (one it pickled instead is opened with ``weights_only=True``); the
    program itself, whose loading runs code, is never unpickled."""
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    infos = torchsave.check_archive(path, "torch.export program")
    by_inner = {i.filename.split("/", 1)[-1]: i for i in infos}
    config_info = by_inner.get(_PT2_CONFIG)
    if config_info is None or config_info.file_size > reading.SMALL_FILE_LIMIT:
        raise UsageError(f"{path}: a torch.export program without a readable {_PT2_CONFIG} (a .pt2 of another torch "
                         "version); its weights are not compared")
    out = {}
    with zipfile.ZipFile(path) as z:
        try:
            config = json.loads(z.read(config_info))["config"]
            for name, w in config.items():
                meta = w["tensor_meta"]
                member = by_inner.get(f"data/weights/{w['path_name']}")
                if member is None:
                    raise CheckpointError(f"{path}: weight {name[:80]!r} names a missing member {w['path_name']!r}")
                if w.get("use_pickle"):  # a tensor torch.export could not store raw: a torch.save of it alone
                    out[name] = torch.load(io.BytesIO(z.read(member)), map_location="cpu", weights_only=True)
                    continue
                dtype = _SERIALIZE_TO_TORCH_DTYPE[meta["dtype"]]
                sizes = [s["as_int"] for s in meta["sizes"]]
                strides = [s["as_int"] for s in meta["strides"]]
                data = bytearray(z.read(member))
                flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
                out[name] = flat.as_strided(sizes, strides, meta["storage_offset"]["as_int"])
        except (KeyError, TypeError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise CheckpointError(f"{path}: malformed torch.export weights: {first_line(e)}") from None
    return out


# --- lining up entries and keys ---------------------------------------------------------------------------------


def pair_entries(a: Mapping[str, str], b: Mapping[str, str]
                 ) -> tuple[list[tuple[str, str]], list[str], list[str], list[str]]:
    """Which entry of A is compared with which of B, given each side's {entry: kind}: (pairs, only in A, only in
    B, notes). A side holding a single model (a bare state dict) is compared with the other side's model alone:
    the entry of that name, else its only model; the other side's other entries are not compared. Otherwise
    entries pair by name, then by the name they answer to (``model_state_dict`` is ``model``, ``optim`` is
    ``optimizer``), then the one model left on each side with each other."""
    for bare, other, one, two in ((a, b, "A", "B"), (b, a, "B", "A")):
        if len(bare) == 1 and next(iter(bare.values())) == kinds.MODULE:
            (name,) = bare
            models = [k for k, kind in other.items() if kind == kinds.MODULE]
            match = name if name in models else models[0] if len(models) == 1 else None
            if match is None:
                continue
            rest = [k for k in other if k != match]
            pair = (name, match) if one == "A" else (match, name)
            notes = [f"compared A's {pair[0]!r} with B's {pair[1]!r}"] if name != match else []
            if rest:
                notes.append(f"{one} holds only a model: {two}'s other entries not compared ({', '.join(rest)})")
            return [pair], [], [], notes
    pairs = [(k, k) for k in a if k in b]
    left_a, left_b = [k for k in a if k not in b], [k for k in b if k not in a]
    for k in list(left_a):
        answering = [j for j in left_b if torchsave.answers_to(j) == torchsave.answers_to(k)]
        if len(answering) == 1:
            pairs.append((k, answering[0]))
            left_a.remove(k)
            left_b.remove(answering[0])
    models_a = [k for k in left_a if a[k] == kinds.MODULE]
    models_b = [k for k in left_b if b[k] == kinds.MODULE]
    if len(models_a) == 1 and len(models_b) == 1:
        pairs.append((models_a[0], models_b[0]))
        left_a.remove(models_a[0])
        left_b.remove(models_b[0])
    notes = [f"compared A's {x!r} with B's {y!r}" for x, y in pairs if x != y]
    return pairs, left_a, left_b, notes


def wrapper_prefixes(a: list[str], b: list[str]) -> tuple[str, str]:
    """The wrapper prefixes to take off A's and B's keys so that they line up: a prefix of ``kinds``'
    WRAPPER_PREFIXES (``module.`` of DDP, ``_orig_mod.`` of torch.compile, nested ones in turn) goes from one
    side when every one of its keys carries it and none of the other side's does. ('', '') when none does."""
    strip = {"a": "", "b": ""}
    keys = {"a": list(a), "b": list(b)}
    for _ in range(8):  # wrappers nest a few deep at most
        moved = False
        for this, that in (("a", "b"), ("b", "a")):
            mine, theirs = keys[this], keys[that]
            prefix = next((p for p in kinds.WRAPPER_PREFIXES if mine and all(k.startswith(p) for k in mine)
                           and not any(k.startswith(p) for k in theirs)), None)
            if prefix:
                strip[this] += prefix
                keys[this] = [k[len(prefix):] for k in mine]
                moved = True
        if not moved:
            break
    return strip["a"], strip["b"]


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, leaf) for every tensor and plain value in ``value``: mappings and sequences that hold containers or
    tensors are walked (``state/0/exp_avg``); a sequence of plain values (an RNG state, betas) is one value."""
    if _is_tensor(value):
        yield path, value
    elif isinstance(value, Mapping) and value:
        for k, v in value.items():
            yield from leaves(v, f"{path}/{k}" if path else str(k))
    elif isinstance(value, (list, tuple)) and any(_is_tensor(v) or isinstance(v, (Mapping, list, tuple))
                                                  for v in value):
        for i, v in enumerate(value):
            yield from leaves(v, f"{path}/{i}" if path else str(i))
    else:
        yield path, value


# --- comparing ----------------------------------------------------------------------------------------------------


def compare_leaves(a: Mapping[str, Any], b: Mapping[str, Any], *, prefix: str = "",
                   atol: float | None = None) -> list[Item]:
    """An Item for every leaf of ``a`` and ``b`` (as ``leaves`` gives them), by path, one pair at a time."""
    def named(k: str) -> str:
        return f"{prefix}/{k}" if prefix and k else prefix or k

    items = []
    for k, x in a.items():
        if k not in b:
            items.append(_absent(named(k), x, ONLY_A))
        else:
            items.append(compare(named(k), x, b[k], atol))
    items += [_absent(named(k), y, ONLY_B) for k, y in b.items() if k not in a]
    return items


def compare(name: str, a: Any, b: Any, atol: float | None = None) -> Item:
    """One leaf of each side compared: tensors by shape, dtype, bits and largest absolute difference; plain
    values by equality (lists and tuples alike, NaN equal to NaN)."""
    if _is_tensor(a) and _is_tensor(b):
        x, y = _as_tensor(a), _as_tensor(b)
        da, db = _describe_tensor(x), _describe_tensor(y)
        if x.shape != y.shape:
            return Item(name, SHAPE, True, da, db)
        if x.dtype != y.dtype:
            return Item(name, DTYPE, True, da, db, _max_abs(x, y))
        if _bits_equal(x, y):
            return Item(name, EQUAL, True, da, db)
        worst = _max_abs(x, y)
        close = atol is not None and worst is not None and worst <= atol
        return Item(name, CLOSE if close else DIFFERS, True, da, db, worst)
    if _is_tensor(a) or _is_tensor(b):
        shown = [_describe_tensor(_as_tensor(v)) if _is_tensor(v) else _show(v) for v in (a, b)]
        return Item(name, DIFFERS, False, *shown)
    if _same(a, b):
        return Item(name, EQUAL, False, _show(a), _show(b))
    close = atol is not None and _number(a) and _number(b) and abs(a - b) <= atol
    return Item(name, CLOSE if close else DIFFERS, False, _show(a), _show(b),
                float(abs(a - b)) if _number(a) and _number(b) else None)


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit for bit: a NaN equals the same NaN, and -0.0 is not 0.0 (they differ in a bit, and in 1 / x)."""
    if not (x.is_floating_point() or x.is_complex()):
        return torch.equal(x, y)
    if x.is_complex():
        x, y = torch.view_as_real(x), torch.view_as_real(y)
    as_int = _INT_OF_SIZE[x.element_size()]
    return torch.equal(x.view(as_int), y.view(as_int))


def _max_abs(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """The largest |x - y| over elements, widened chunk by chunk (so no whole copy of a large tensor): 0 where
    both are the same infinity or both NaN, NaN where only one is NaN. None for dtypes without arithmetic."""
    wide = torch.complex128 if x.is_complex() or y.is_complex() else torch.float64
    fx, fy = x.reshape(-1), y.reshape(-1)
    worst = 0.0
    try:
        for start in range(0, fx.numel(), _CHUNK):
            u, v = fx[start:start + _CHUNK].to(wide), fy[start:start + _CHUNK].to(wide)
            d = (u - v).abs().masked_fill((u == v) | (u.isnan() & v.isnan()), 0)
            m = d.max().item()
            if math.isnan(m):
                return math.nan
            worst = max(worst, m)
    except (RuntimeError, TypeError):  # a dtype torch cannot widen (quantized, some float8 kinds on old torch)
        return None
    return worst


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor) or (isinstance(v, np.ndarray) and v.dtype != object)


def _as_tensor(v: Any) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.detach()
    return t.to_dense() if t.layout != torch.strided else t


def _describe_tensor(t: torch.Tensor) -> str:
    return f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _absent(name: str, v: Any, status: str) -> Item:
    shown = _describe_tensor(_as_tensor(v)) if _is_tensor(v) else _show(v)
    return Item(name, status, _is_tensor(v), shown if status == ONLY_A else None, shown if status == ONLY_B else None)


def _show(v: Any) -> str:
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, (list, tuple)) and len(v) > 16:
        return f"<{type(v).__name__} of {len(v)} items>"
    try:
        text = json.dumps(v, default=repr) if not isinstance(v, str) else repr(v)
    except (ValueError, RecursionError):
        text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _magnitude(v: float | None) -> float:
    return -1.0 if v is None else math.inf if math.isnan(v) else v


def _detail(i: Item) -> str:
    if i.status in (ONLY_A, ONLY_B):
        return i.a if i.status == ONLY_A else i.b
    if i.status in (SHAPE, DTYPE):
        change = f"{i.a} -> {i.b}"
        return change + (f", max abs diff {i.max_abs:.4g}" if i.max_abs is not None else "")
    if i.tensor:
        if i.max_abs == 0:
            return "max abs diff 0, bits differ (a zero's sign or a NaN's payload)"
        return f"max abs diff {i.max_abs:.4g}" if i.max_abs is not None else "bits differ"
    return f"{i.a} -> {i.b}"


def _counts(items: list[Item]) -> str:
    tensors, values = sum(i.tensor for i in items), sum(not i.tensor for i in items)
    parts = [f"{n} {what}{'s' * (n != 1)}" for n, what in ((tensors, "tensor"), (values, "value")) if n]
    return ", ".join(parts) or "nothing"
