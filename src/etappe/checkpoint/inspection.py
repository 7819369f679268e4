"""What a checkpoint holds, as the seeds print it by hand: every tensor's name, shape, dtype and size, each
model's parameter count, each optimizer's type, hyperparameters and state size, schedulers, counters, metrics;
and how it was trained (precision, accumulation, compile, EMA, the gradient scaler's state) where it says.

Works from headers and JSON alone for etappe checkpoints (no tensor data is read), and on plain torch.save
and .safetensors files, read as ``torchsave.read`` reads them: nothing in the file runs, and nothing in it is
decompressed (see ``torchsave.check_archive``).
"""

import json
import math
import mmap
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from etappe.checkpoint import codec, folder, kinds, manifest, modelfiles, sharded, tensorfile, tied, torchsave
from etappe.checkpoint.errors import CheckpointError
from etappe.errors import check_flag

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # in a module state_dict, not parameters
_OPTIMIZER_BY_KEY = [  # a param-group key only that optimizer has, for files that do not record the type
    ("max_iter", "LBFGS"), ("beta2_decay", "Adafactor"), ("etas", "Rprop"), ("lambd", "ASGD"),
    ("lr_decay", "Adagrad"), ("rho", "Adadelta"), ("centered", "RMSprop"), ("momentum_decay", "NAdam"),
    ("nesterov", "SGD"), ("amsgrad", "Adam"), ("decoupled_weight_decay", "RAdam"), ("betas", "Adamax"),
]  # fmt: skip
_LONG = 16  # lists longer than this (an RNG state's 625 ints) are summarized


def inspect(path: str | os.PathLike, *, trusted: bool = False) -> dict[str, Any]:
    """A JSON-able description of checkpoint ``path`` (an etappe checkpoint folder or a plain file). Anything
    malformed raises CheckpointError naming the file. A TorchScript, .pt2 or ONNX file is described by
    ``modelfiles.describe`` (inputs, outputs, weights), without running it, ``trusted`` or not."""
    check_flag("trusted", trusted)
    from etappe import rundir

    if rundir.looks_like_url(path):  # a checkpoint on an object store: described from a local copy
        with rundir.local_copy(path) as local:
            return inspect(local, trusted=trusted)
    path = Path(path)
    if path.is_file():
        return _inspect_file(path, trusted)
    from etappe.checkpoint import hf

    if hf.is_folder(path):  # model.safetensors or its shards, and config.json: no manifest
        return hf.inspect(path)
    body = manifest.read(path)
    state_file = path / body["state"]
    blob = manifest.read_verified(path, body["state"], body["files"][body["state"]])
    try:
        entries = folder.state_entries(state_file, blob, body["files"])  # the schema load checks, in one place
    finally:
        if isinstance(blob, mmap.mmap):
            blob.close()
    info: dict[str, Any] = {
        "path": str(path),
        "format": "etappe checkpoint",
        **{k: body[k] for k in ("format_version", "etappe_version", "torch_version", "created", "step") if k in body},
        "metrics": _plain(codec.decode(body.get("metrics", {}), {})),  # numbers: manifest.read checked them
        "files": [{"name": n, "bytes": f["size"]} for n, f in body["files"].items()],
        "entries": [],
    }
    values = {}
    for name, e in entries.items():
        tensors = {}
        if "tensors" in e:
            file = path / e["tensors"]
            try:
                if file.stat().st_size != body["files"][e["tensors"]]["size"]:
                    raise CheckpointError(f"{file}: size differs from the manifest's; run verify for details")
            except OSError as err:
                raise CheckpointError(f"{file}: cannot read: {err.strerror}") from None
            tensors = tensorfile.infos(file)  # the header alone, checked as a load checks it
        try:
            value = _sharded_value(path, e, body["files"]) if "shards" in e else codec.decode(e["data"], tensors)
            info["entries"].append(_describe(name, e["kind"], e.get("type"), value, e.get("parameters")))
        except CheckpointError as err:
            raise CheckpointError(f"{state_file}: entry {name[:80]!r}: {err}") from None
        values[name] = (e["kind"], value)
    return _with_training(info, values)


def _sharded_value(path: Path, record: Mapping[str, Any], files: Mapping[str, Any]) -> Any:
    """A sharded entry: a model's whole-tensor shapes from DCP's metadata; an optimizer's state read whole."""
    shards = sharded.Shards.of(path, record, files)
    if record["kind"] != kinds.MODULE:
        return sharded.materialize(shards)
    return {name: tensorfile.TensorInfo(name, shape, dtype, size)
            for name, (shape, dtype, size) in sharded.tensor_infos(shards).items()}


def format_inspection(info: Mapping[str, Any]) -> str:
    """``inspect``'s result as text: a heading, then each entry, tensors one per line as ``name\\tshape\\tdtype\\tsize``."""
    head = f"{info['path']}: {info['format']}"
    keys = ("format_version", "etappe_version", "torch_version", "step")
    facts = [f"{k.replace('_', ' ')} {info[k]}" for k in keys if k in info]
    if "bytes" in info:
        facts.append(modelfiles.size_text(info["bytes"]))
    lines = [head + (f" ({', '.join(facts)})" if facts else "")]
    if info.get("kind") in modelfiles.FORMATS:
        return "\n".join(lines + modelfiles.format_lines(info))
    if info.get("metrics"):
        lines.append("metrics: " + ", ".join(f"{k}={v}" for k, v in info["metrics"].items()))
    if info.get("training"):
        lines.append("training: " + _format_training(info["training"]))
    if info.get("files"):
        lines.append("files: " + ", ".join(f"{f['name']} {modelfiles.size_text(f['bytes'])}" for f in info["files"]))
    for e in info["entries"]:
        lines.append("")
        lines += _format_entry(e)
    return "\n".join(lines)


def _inspect_file(path: Path, trusted: bool) -> dict[str, Any]:
    found = modelfiles.kind(path)  # TorchScript, .pt2 or ONNX, by content: described as data, never run
    if found:
        return modelfiles.describe(path, found)
    # torchsave.read decides what the file is from its content, checks a zip archive's members before reading any,
    # refuses TorchScript unless trusted and .pt2 programs always, and checks sparse tensors
    content = torchsave.read(path, trusted=trusted)
    with open(path, "rb") as f:
        head = f.read(9)
    fmt = "safetensors" if torchsave.is_safetensors(head, path.stat().st_size) else "torch.save"
    info: dict[str, Any] = {"path": str(path), "format": fmt, "bytes": path.stat().st_size, "entries": []}
    values = {}
    for name, value in torchsave.entries(content).items():
        typ = None
        if kinds.is_stateful(value):  # a whole pickled object, from a trusted file
            typ, value = kinds.type_name(value), value.state_dict()
        kind = kinds.of_state(value)
        try:
            info["entries"].append(_describe(name, kind, typ, value, None))
        except CheckpointError as err:
            raise CheckpointError(f"{path}: entry {str(name)[:80]!r}: {err}") from None
        values[name] = (kind, value)
    return _with_training(info, values)


_TRAINING = ("precision", "accumulate", "compile", "warmup_steps")  # config keys, under the same names


def _with_training(info: dict[str, Any], values: Mapping[str, tuple[str, Any]]) -> dict[str, Any]:
    """``info`` with ``training``: how the checkpoint's run trained, from its ``config`` entry (precision,
    accumulate, compile, warmup_steps, ema: the decay) and its entries (``ema``, the averaged model; a gradient
    scaler's scale and growth tracker). Only what the checkpoint says; nothing when it says none of it."""
    kind, config = values.get("config", (None, None))
    config = config if kind == kinds.VALUE and isinstance(config, Mapping) else {}
    training: dict[str, Any] = {k: _plain(config[k]) for k in _TRAINING if k in config}
    ema_kind = values.get("ema", (None,))[0]
    if config.get("ema") is not None or ema_kind == kinds.MODULE:
        training["ema"] = {"decay": _plain(config.get("ema")), "saved": ema_kind == kinds.MODULE}
    elif "ema" in config:
        training["ema"] = None  # trained without
    scalers = [(name, v) for name, (k, v) in values.items() if k == kinds.SCALER and isinstance(v, Mapping)]
    if scalers:
        name, state = scalers[0]
        training["scaler"] = {"entry": name, "scale": _plain(state.get("scale")),
                              "growth_tracker": _plain(state.get("_growth_tracker"))}
    if training:
        info["training"] = training
    return info


def _format_training(t: Mapping[str, Any]) -> str:
    parts = [f"precision {_short(t['precision'])}"] if "precision" in t else []
    if "accumulate" in t:
        parts.append(f"accumulate {_short(t['accumulate'])}")
    if "compile" in t:
        parts.append("compiled" if t["compile"] else "not compiled")
    if t.get("warmup_steps"):
        parts.append(f"warm-up {_short(t['warmup_steps'])} steps")
    if t.get("ema"):
        ema = t["ema"]
        decay = f"decay {_short(ema['decay'])}" if ema["decay"] is not None else "decay not recorded"
        saved = "averaged model saved as entry 'ema'" if ema["saved"] else "no averaged model saved"
        parts.append(f"ema {decay} ({saved})")
    elif "ema" in t:
        parts.append("no ema")
    if "scaler" in t:
        sc = t["scaler"]
        named = "" if sc["entry"] == "scaler" else f" (entry {_short(sc['entry'])})"
        parts.append(f"grad scaler{named} scale {_short(sc['scale'])}, growth tracker {_short(sc['growth_tracker'])}")
    return ", ".join(parts)


def _describe(name: str, kind: str, typ: str | None, value: Any, parameters: int | None) -> dict[str, Any]:
    """An entry's description; a state not of the shape its kind has raises CheckpointError."""
    out: dict[str, Any] = {"name": name, "kind": kind}
    if typ:
        out["type"] = typ
    try:
        if kind == kinds.MODULE:
            if not (isinstance(value, Mapping) and all(isinstance(k, str) for k in value)):
                raise CheckpointError(f"a model's state is {_a(value)}, not a state_dict of named tensors")
            listed = [{"name": k, **_tensor(t)} for k, t in value.items() if _is_tensor(t)]
            out["parameters"] = parameters if parameters is not None else _count_parameters(value)
            out["bytes"] = sum(_tensor(t)["bytes"] for t in tied.distinct(filter(_is_tensor, value.values())))
            out["tensors"] = listed
        elif kind == kinds.OPTIMIZER:
            groups, state = _optimizer_parts(value)
            if not typ:
                out["type"] = _guess_optimizer(groups)
            out["param_groups"] = [
                {**{str(k): _plain(v) for k, v in g.items() if k != "params"}, "params": len(g.get("params", []))}
                for g in groups
            ]
            tensors = _tensors_in(state)
            size = sum(_tensor(t)["bytes"] for t in tensors)
            out["state"] = {"params": len(state), "tensors": len(tensors), "bytes": size}
        elif kind == kinds.VALUE:
            out["value"] = _plain(value)
        else:
            out["state"] = _plain(value)
    except RecursionError:
        raise CheckpointError("nested too deeply to describe") from None
    return out


def _optimizer_parts(value: Any) -> tuple[list[Mapping], Mapping]:
    """An optimizer state_dict's param groups and per-parameter state, of the types torch gives them."""
    if not isinstance(value, Mapping):
        raise CheckpointError(f"an optimizer's state is {_a(value)}, not a state_dict")
    groups, state = value.get("param_groups", []), value.get("state", {})
    if not (isinstance(groups, (list, tuple)) and all(
            isinstance(g, Mapping) and isinstance(g.get("params", []), (list, tuple)) for g in groups)):
        raise CheckpointError("an optimizer's param_groups are not a list of groups, each with a list of params")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"an optimizer's state is {_a(state)}, not a mapping of parameters to their state")
    return list(groups), state


def _a(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def _format_entry(e: Mapping[str, Any]) -> list[str]:
    typ = e.get("type", "").rsplit(".", 1)[-1]
    if e["kind"] == kinds.MODULE:
        lines = [f"{e['name']}: {typ or 'model'} state_dict, {e['parameters']:,} parameters, {modelfiles.size_text(e['bytes'])}"]
        lines += [f"  {t['name']}\t{list(t['shape'])}\t{t['dtype']}\t{modelfiles.size_text(t['bytes'])}" for t in e["tensors"]]
        return lines
    if e["kind"] == kinds.OPTIMIZER:
        s = e["state"]
        lines = [f"{e['name']}: {typ}, state for {s['params']} params ({s['tensors']} tensors, {modelfiles.size_text(s['bytes'])})"]
        for i, g in enumerate(e["param_groups"]):
            lines.append(f"  group {i}: " + ", ".join(f"{k}={v}" for k, v in g.items()))
        return lines
    if e["kind"] == kinds.VALUE:
        return [f"{e['name']}: {_short(e['value'])}"]
    lines = [f"{e['name']}: {typ or e['kind']}"]
    state = e["state"]
    if isinstance(state, Mapping):
        lines += [f"  {k}: {_short(v)}" for k, v in state.items()]
    else:
        lines.append(f"  {_short(state)}")
    return lines


def _is_tensor(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, tensorfile.TensorInfo, np.ndarray))


def _tensor(t: Any) -> dict[str, Any]:
    if isinstance(t, tensorfile.TensorInfo):
        return {"shape": list(t.shape), "dtype": t.dtype, "bytes": t.bytes}
    if isinstance(t, np.ndarray):
        return {"shape": list(t.shape), "dtype": str(t.dtype), "bytes": t.nbytes}
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "bytes": t.numel() * t.element_size()}


def _tensors_in(value: Any) -> list[Any]:
    if _is_tensor(value):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    return []


def _count_parameters(state: Mapping[str, Any]) -> int:
    """Elements of a module state_dict's tensors, tied ones once, without the usual buffers."""
    params = [t for key, t in state.items() if _is_tensor(t) and key.rsplit(".", 1)[-1] not in _BUFFERS]
    return sum(math.prod(_tensor(t)["shape"]) for t in tied.distinct(params))


def _guess_optimizer(groups: list) -> str:
    keys = set().union(*(g.keys() for g in groups)) if groups else set()
    for key, name in _OPTIMIZER_BY_KEY:
        if key in keys:
            if name == "Adam" and any(g.get("decoupled_weight_decay") for g in groups):
                name = "AdamW"
            return f"{name} (guessed from its hyperparameters)"
    return "unknown optimizer"


def _plain(v: Any) -> Any:
    """A JSON-able rendering: tensors as their description, tuples as lists, long lists summarized."""
    if _is_tensor(v):
        return {"tensor": _tensor(v)}
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        if len(v) > _LONG:
            return f"<{type(v).__name__} of {len(v)} items>"
        return [_plain(x) for x in v]
    return repr(v)


def _short(v: Any) -> str:
    t = v.get("tensor") if isinstance(v, Mapping) and len(v) == 1 else None
    if isinstance(t, Mapping) and set(t) == {"shape", "dtype", "bytes"} and type(t["bytes"]) is int:
        return f"tensor {t['shape']} {t['dtype']} {modelfiles.size_text(t['bytes'])}"  # _plain's tensor (or a value just like it)
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 200 else text[:197] + "..."
