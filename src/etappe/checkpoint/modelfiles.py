"""Model files that are not checkpoints, described without running them: TorchScript archives, ``torch.export``
programs (.pt2) and ONNX models. What a file is, is read from its content (``kind``), never from its name.

    kind(path) -> "torchscript" | "export" | "onnx" | None        describe(path, kind) -> dict
    format_lines(info) -> list[str]

Nothing in the file runs, whatever ``--trust`` says: TorchScript's ``code/`` is parsed as text (``ast.parse``,
never compiled or executed) for each class's ``__parameters__``, ``__buffers__`` and ``forward`` signature, and its
``data.pkl`` is read by an unpickler that builds only inert stand-ins (a ``__torch__`` object keeps the state its
``__setstate__`` would have been given; a tensor is its storage's dtype, shape and strides, data unread); a .pt2 is
read from its JSON (the serialized program, its graph signature and weights config), its pickles left unread;
an ONNX model is parsed as protobuf, its external data unread. Each archive's members are checked before any is
read (``torchsave.check_archive``); what is read is bounded below.
"""

from __future__ import annotations

import ast
import json
import math
import pickle
import re
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from etappe.checkpoint import torchsave
from etappe.checkpoint.errors import CheckpointError
from etappe.errors import UsageError, first_line

TORCHSCRIPT, EXPORT, ONNX = "torchscript", "export", "onnx"  # the names etappe.export.detect_format uses
FORMATS = {TORCHSCRIPT: "TorchScript archive", EXPORT: "torch.export program (.pt2)", ONNX: "ONNX model"}
NEXT_STEP = {  # what going further takes, in etappe's words
    TORCHSCRIPT: "running it needs --trust: TorchScript code runs on load (its methods and __setstate__); "
                 "etappe predict/eval FILE --trust, if you trust where it came from",
    EXPORT: "running it needs --trust: torch.export.load unpickles parts of the archive and executes code it holds "
            "(guards, shape expressions); etappe predict/eval FILE --trust, if you trust where it came from",
    ONNX: "runs in onnxruntime, which executes no Python: etappe predict FILE INPUT takes it without --trust",
}
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm's statistics: not parameters
MAX_PICKLE = 64 * 2**20  # data.pkl holds the module tree and tensor records, not the tensors' data
_MAX_CODE = 16 * 2**20  # TorchScript source parsed to describe one archive, all classes together
_MAX_JSON = 128 * 2**20  # a .pt2's serialized program (a large model's graph runs to tens of MB)
MAX_DEPTH = 200  # nesting of modules and containers in a TorchScript archive


def kind(path: Path) -> str | None:
    """'torchscript', 'export' or 'onnx' when ``path``'s content is one; None for anything else (a torch.save or
    safetensors file, garbage: ``torchsave.read`` names those). A zip archive's members are checked first; a file
    that starts as an ONNX model does (with its ir_version) but is not a whole one raises CheckpointError."""
    size, head = torchsave.sniff(path)
    if head.startswith(b"PK"):
        infos = torchsave.check_archive(path, "model file")
        found = torchsave.archive_kind(infos)
        if found == "torchscript":
            return TORCHSCRIPT
        if found == "export" and read_member(path, infos, "archive_format", 64) == b"pt2":
            return EXPORT
        return None
    if not head or head[:1] == b"\x80" or torchsave.is_safetensors(head, size):
        return None
    problem = torchsave.onnx_problem(path, size)
    if problem is None:
        return ONNX
    if head[:1] == b"\x08":  # ModelProto starts with its ir_version, field 1
        raise CheckpointError(f"{path}: starts as an ONNX model but is not a valid one ({problem}); the file is "
                              "truncated or damaged: export it again")
    return None


def describe(path: Path, found: str) -> dict[str, Any]:
    """A JSON-able description of model file ``path`` of kind ``found`` (see ``kind``): format and its version,
    producer, inputs and outputs (names, shapes and dtypes where the file records them), its weights (name, shape,
    dtype, bytes, role), the parameter count without buffers, and what running it needs (``next_step``)."""
    info: dict[str, Any] = {"path": str(path), "format": FORMATS[found], "kind": found, "bytes": path.stat().st_size}
    try:
        info.update({TORCHSCRIPT: _torchscript, EXPORT: _export, ONNX: _onnx}[found](path))
    except RecursionError:
        raise CheckpointError(f"{path}: nested too deeply to describe; the file is damaged or crafted") from None
    except _Unsupported as e:
        raise CheckpointError(f"{path}: a {FORMATS[found]} that etappe cannot describe without running it: {e}; "
                              "etappe predict/eval FILE --trust runs it, if you trust where it came from") from None
    except Malformed as e:
        raise CheckpointError(f"{path}: a {FORMATS[found]} that is malformed ({e}); the file is damaged: export it "
                              "again") from None
    weights = info.setdefault("weights", [])
    params = [w for w in weights if w["role"] == "parameter"]
    info["parameters"] = sum(math.prod(w["shape"]) for w in _distinct(params))
    info["buffers"] = sum(math.prod(w["shape"]) for w in _distinct(w for w in weights if w["role"] == "buffer"))
    info["weights_bytes"] = sum(w["bytes"] for w in _distinct(weights))
    for w in weights:
        w.pop("storage", None)  # told tied weights apart; not part of the description
    info["next_step"] = NEXT_STEP[found]
    info["entries"] = []  # what checkpoints list; a model file's weights are under "weights"
    return info


class Malformed(Exception):
    """A file of the right kind whose content does not have the structure its format gives it."""


class _Unsupported(Malformed):
    """A file that may be sound but holds something etappe reads only by running code (a quantized tensor)."""


def _distinct(weights: Any) -> list[dict]:
    """Weights with each shared tensor (a tied weight: the same storage view under two names) once."""
    seen, out = set(), []
    for w in weights:
        ident = w.get("storage") or id(w)
        if ident not in seen:
            seen.add(ident)
            out.append(w)
    return out


def _weight(name: str, shape: list, dtype: str, itemsize: int, role: str, storage: Any = None) -> dict[str, Any]:
    out = {"name": name, "shape": shape, "dtype": dtype, "bytes": math.prod(shape) * itemsize, "role": role}
    if storage is not None:
        out["storage"] = storage
    return out


# ------------------------------------------------------------------ ONNX


def _onnx(path: Path) -> dict[str, Any]:
    try:
        import onnx
        from onnx import helper
    except ImportError:
        raise UsageError(f"{path}: an ONNX model; describing it needs the onnx package, which is not installed: "
                         "pip install 'etappe[onnx]'") from None

    try:
        model = onnx.load(str(path), load_external_data=False)  # protobuf only: no operator runs, no file beside
    except Exception as e:  # protobuf's DecodeError, onnx's own errors: the file does not parse
        raise CheckpointError(f"{path}: not a readable ONNX model ({first_line(e)}); the file is truncated or "
                              "damaged: export it again") from None

    def dtype(code: int) -> tuple[str, int]:
        try:
            np_dtype = helper.tensor_dtype_to_np_dtype(code)
            return str(np_dtype), np_dtype.itemsize
        except Exception:  # an element type numpy has no dtype for (or a number onnx does not define)
            name = onnx.TensorProto.DataType.Name(code) if code in onnx.TensorProto.DataType.values() else str(code)
            return name.lower(), 0

    def text(s: Any) -> str:  # protobuf hands over a string field that is not UTF-8 as bytes
        return s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s)

    def value(v: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"name": text(v.name)}
        if v.type.HasField("tensor_type"):
            t = v.type.tensor_type
            out["dtype"] = dtype(t.elem_type)[0]
            if t.HasField("shape"):
                out["shape"] = [d.dim_value if d.HasField("dim_value") else (text(d.dim_param) or None)
                                for d in t.shape.dim]
        else:
            out["type"] = v.type.WhichOneof("value") or "unknown"
        return out

    g = model.graph
    initialized = {text(i.name) for i in g.initializer}
    weights = []
    for init in g.initializer:
        name, (dt, size), shape = text(init.name), dtype(init.data_type), list(init.dims)
        if any(d < 0 for d in shape):
            raise Malformed(f"initializer {name[:80]!r} has shape {shape[:8]}")
        # ONNX does not tell parameters from constants: floating-point initializers are the weights, less
        # BatchNorm's statistics; integer ones are shapes and indices the exporter folded in
        floating = dt.startswith(("float", "bfloat", "complex"))
        role = "buffer" if name.rsplit(".", 1)[-1] in _BUFFERS else "parameter" if floating else "constant"
        weights.append(_weight(name, shape, dt, size, role))
    return {
        "format_version": model.ir_version,
        "producer": " ".join(text(p) for p in (model.producer_name, model.producer_version) if p) or None,
        "opset": {(text(o.domain) or "ai.onnx"): o.version for o in model.opset_import},
        "inputs": [value(v) for v in g.input if text(v.name) not in initialized],  # IR < 4 lists initializers too
        "outputs": [value(v) for v in g.output],
        "weights": weights,
        "counted": "ONNX does not mark parameters: counted are its floating-point initializers, less BatchNorm "
                   "statistics",
    }


# ------------------------------------------------------------------ torch.export (.pt2)


def read_member(path: Path, infos: list[zipfile.ZipInfo], inner: str, limit: int) -> bytes | None:
    """Member ``<root>/inner`` of checked archive ``path`` (None when absent); over ``limit`` bytes is refused."""
    for info in infos:
        if info.filename.split("/", 1)[-1] == inner:
            if info.file_size > limit:
                raise CheckpointError(f"{path}: member {info.filename} is {info.file_size} bytes, more than the "
                                      f"{limit} etappe reads to describe it; refused unread")
            try:
                with zipfile.ZipFile(path) as z:
                    return z.read(info)  # checks the member's CRC-32
            except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError, ValueError,
                    struct.error, NotImplementedError) as e:  # a damaged member: bad CRC, bad deflate, bad header
                raise CheckpointError(f"{path}: member {info.filename} cannot be read ({first_line(e)}); the file "
                                      "is damaged") from None
    return None


def _json(path: Path, infos: list[zipfile.ZipInfo], inner: str) -> Any:
    data = read_member(path, infos, inner, _MAX_JSON)
    if data is None:
        raise CheckpointError(f"{path}: a .pt2 archive without {inner}; the file is damaged or not one "
                              "torch.export.save wrote")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path}: {inner} is not valid JSON ({first_line(e)}); the file is damaged") from None


def _export(path: Path) -> dict[str, Any]:
    from torch._export.serde.schema import ScalarType
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE  # the serializer's own table

    def dtype(code: Any) -> tuple[str, int]:
        try:
            t = _SERIALIZE_TO_TORCH_DTYPE[ScalarType(code)]
        except (ValueError, KeyError, TypeError):
            raise Malformed(f"dtype {str(code)[:20]} is none torch.export writes") from None
        return str(t).removeprefix("torch."), t.itemsize

    def sizes(meta: Mapping) -> list:
        dims = []
        for d in _list(meta["sizes"]):
            if "as_int" in d:
                dims.append(_int(d["as_int"]))
            else:  # a dynamic size: its symbol or expression, as sympy's srepr (never sympified: that evaluates it)
                dims.append(re.sub(r"Symbol\('(\w+)'[^)]*\)", r"\1", str(d["as_expr"]["expr_str"])))
        return dims

    def tensor(meta: Mapping) -> dict[str, Any]:
        return {"shape": sizes(meta), "dtype": dtype(meta["dtype"])[0]}

    infos = torchsave.check_archive(path, ".pt2 file")
    inner = {i.filename.split("/", 1)[-1] for i in infos}
    models = sorted(n.removeprefix("models/").removesuffix(".json") for n in inner
                    if n.startswith("models/") and n.endswith(".json"))
    if not models:
        raise CheckpointError(f"{path}: a .pt2 archive without a serialized program (models/*.json): an AOTInductor "
                              "package or not one torch.export.save wrote; etappe describes torch.export.save files")
    name = "model" if "model" in models else models[0]
    try:
        program = _json(path, infos, f"models/{name}.json")
        weights_config = _json(path, infos, f"data/weights/{name}_weights_config.json")
        graph = program["graph_module"]["graph"]
        values = graph["tensor_values"]
        signature = program["graph_module"]["signature"]

        def argument(arg: Mapping) -> dict[str, Any]:
            kind_, value = next(iter(arg.items()))
            if kind_ == "as_tensor":
                return {"name": value["name"], **tensor(values[value["name"]])}
            return {"name": value.get("name") if isinstance(value, Mapping) else None, "type": kind_}

        inputs = [argument(s["user_input"]["arg"]) for s in _list(signature["input_specs"]) if "user_input" in s]
        outputs = [argument(s["user_output"]["arg"]) for s in _list(signature["output_specs"]) if "user_output" in s]
        roles = {}
        for spec in _list(signature["input_specs"]):
            for key, field, role in (("parameter", "parameter_name", "parameter"), ("buffer", "buffer_name", "buffer"),
                                     ("tensor_constant", "tensor_constant_name", "constant")):
                if key in spec:
                    roles[str(spec[key][field])] = role
        weights = []
        for fqn, payload in _mapping(weights_config["config"]).items():
            meta = payload.get("tensor_meta")
            if payload.get("use_pickle") or not isinstance(meta, Mapping):  # a tensor subclass, pickled: unread
                weights.append({"name": fqn, "shape": [], "dtype": "unknown", "bytes": 0, "role": "pickled"})
                continue
            dt, size = dtype(meta["dtype"])
            shape = sizes(meta)
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise Malformed(f"weight {fqn[:80]!r} has shape {shape}")
            role = roles.get(fqn, "parameter" if payload.get("is_param") else "buffer")
            weights.append(_weight(fqn, shape, dt, size, role, storage=f"{payload['path_name']}:{shape}"))
        schema = program["schema_version"]
        version = f"{_int(schema['major'])}.{_int(schema['minor'])}"
        ranges = _mapping(program["range_constraints"])
        dynamic = {str(k): [v.get("min_val"), v.get("max_val")] for k, v in ranges.items()}
    except (KeyError, TypeError, AttributeError, ValueError, StopIteration) as e:
        raise Malformed(f"{type(e).__name__} {first_line(e)[:80]}") from None
    out = {
        "format_version": version,
        "archive_version": (read_member(path, infos, "archive_version", 64) or b"").decode("ascii", "replace"),
        "torch_version": str(program.get("torch_version")),
        "producer": f"torch {program.get('torch_version')}",
        "opset": {str(k): v for k, v in _mapping(program.get("opset_version", {})).items()},
        "inputs": inputs,
        "outputs": outputs,
        "weights": weights,
    }
    if dynamic:
        out["dynamic_sizes"] = dynamic  # each symbol's [min, max]
    if len(models) > 1:
        out["programs"] = models
    return out


def _list(x: Any) -> list:
    if not isinstance(x, list):
        raise Malformed(f"a {type(x).__name__} where a list belongs")
    return x


def _mapping(x: Any) -> Mapping:
    if not isinstance(x, Mapping):
        raise Malformed(f"a {type(x).__name__} where a mapping belongs")
    return x


def _int(x: Any) -> int:
    if not isinstance(x, int) or isinstance(x, bool):
        raise Malformed(f"{str(x)[:20]!r} where a whole number belongs")
    return x


# ------------------------------------------------------------------ TorchScript


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class TensorRecord:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class ObjectRecord:
    """A ``__torch__`` object (a scripted module or class) as data: its class's qualified name and the state its
    ``__setstate__`` (or the default one) would have been given. Nothing of the class runs."""

    qualname = "__torch__"

    def __init__(self, *args: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


@dataclass(frozen=True)
class _StorageType:
    """A storage class named in a pickle (``torch.FloatStorage``), as its dtype: the class itself is never touched."""

    dtype: torch.dtype


def _storage_types() -> dict[str, _StorageType]:
    from torch.storage import _dtype_to_storage_type_map  # torch's own table of the legacy storage names

    return {name: _StorageType(dtype) for dtype, name in _dtype_to_storage_type_map().items()} | {
        "UntypedStorage": _StorageType(torch.uint8)}


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> TensorRecord:
    """What ``torch._utils._rebuild_tensor_v2`` would build, as a record: the tensor's view of its storage."""
    if not isinstance(storage, _Storage):
        raise Malformed("a tensor without a storage record")
    shape, strides = tuple(map(_int, size)), tuple(map(_int, stride))
    if len(shape) != len(strides) or min(shape, default=0) < 0 or _int(offset) < 0:
        raise Malformed(f"a tensor of shape {list(shape)[:8]} and strides {list(strides)[:8]}")
    if math.prod(shape) and offset + sum((n - 1) * abs(s) for n, s in zip(shape, strides)) >= storage.numel:
        raise Malformed(f"a tensor of shape {list(shape)} reaching past its storage of {storage.numel} elements")
    return TensorRecord(storage, offset, shape, strides)


def _rebuild_qtensor(storage: Any, offset: Any, size: Any, stride: Any, quantizer: Any, *rest: Any) -> TensorRecord:
    """``torch._utils._rebuild_qtensor``'s record: a quantized tensor's view of its (integer) storage."""
    return _rebuild_tensor(storage, offset, size, stride)


_QSCHEMES = ("per_tensor_affine", "per_channel_affine", "per_tensor_symmetric", "per_channel_symmetric",
             "per_channel_affine_float_qparams")


def _passthrough(value: Any, *rest: Any) -> Any:  # torch.jit._pickle's build_intlist, restore_type_tag, ...
    return value


_JIT_PICKLE = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "build_tensor_from_id",
               "restore_type_tag")


class _Unpickler(pickle.Unpickler):
    """TorchScript's pickles as data: ``__torch__`` classes become inert ``ObjectRecord`` subclasses, tensors
    ``TensorRecord`` records of the storages in ``data/``, whose sizes are checked; any other global is refused."""

    def __init__(self, data: bytes, storages: Mapping[str, int], member: str) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self.storages = storages  # storage key -> bytes in the archive; None: not checked (traced inputs)
        self.member = member
        self.classes: dict[str, type] = {}
        self.storage_types = _storage_types()

    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        if module == "__torch__" or module.startswith("__torch__."):
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (ObjectRecord,), {"qualname": qualname})
            return self.classes[qualname]
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_qtensor"):
            return _rebuild_qtensor
        if module == "torch" and name in _QSCHEMES:
            return name  # a quantization scheme, named
        if module == "torch.jit._pickle" and name in _JIT_PICKLE:
            return _passthrough
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in self.storage_types:
            return self.storage_types[name]  # only ever handed to persistent_load
        if (module, name) == ("torch", "device"):
            return str
        raise _Unsupported(f"{self.member} refers to {qualname[:120]}, which etappe does not build")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise Malformed(f"{self.member} holds a persistent id {str(pid)[:60]} that is not a storage record")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise Malformed(f"{self.member} holds a storage of type {str(storage_type)[:60]}")
        dtype, numel, key = storage_type.dtype, _int(numel), str(key)
        if self.storages is not None:
            have = self.storages.get(key)
            if have is None or have < numel * dtype.itemsize:
                raise Malformed(f"storage {key[:40]} of {numel} {str(dtype).removeprefix('torch.')} values is "
                                 f"{'missing' if have is None else f'only {have} bytes'} in the archive")
        return _Storage(key, dtype, numel)


def unpickle(data: bytes, storages: Mapping[str, int] | None, member: str) -> Any:
    try:
        return _Unpickler(data, storages, member).load()
    except (Malformed, RecursionError):
        raise
    except Exception as e:  # the pickle machinery's own errors on a damaged stream (UnpicklingError, EOFError ...)
        raise Malformed(f"{member} does not unpickle ({type(e).__name__}: {first_line(e)[:80]})") from None


@dataclass
class _Class:
    parameters: list[str]
    buffers: list[str]
    inputs: list[dict[str, Any]] | None  # forward's arguments after self; None without a forward
    output: str | None


def _classes(source: str, module: str) -> dict[str, _Class]:
    """The classes TorchScript source ``source`` (the file of Python module ``module``) defines, by qualified name:
    their ``__parameters__`` and ``__buffers__`` and their ``forward``'s signature. Parsed, never run."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise Malformed(f"code of {module[:80]} does not parse ({type(e).__name__})") from None
    found = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        names: dict[str, list[str]] = {"__parameters__": [], "__buffers__": []}
        inputs, output = None, None
        for item in node.body:
            if isinstance(item, ast.Assign) and len(item.targets) == 1 and isinstance(item.targets[0], ast.Name) \
                    and item.targets[0].id in names:
                try:
                    listed = ast.literal_eval(item.value)
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                    listed = None
                if not (isinstance(listed, list) and all(isinstance(n, str) for n in listed)):
                    raise Malformed(f"{module}.{node.name}.{item.targets[0].id} is not a list of names")
                names[item.targets[0].id] = listed
            elif isinstance(item, ast.FunctionDef) and item.name == "forward":
                args = item.args.posonlyargs + item.args.args + item.args.kwonlyargs
                inputs = [{"name": a.arg, "type": ast.unparse(a.annotation) if a.annotation else None}
                          for a in args[1:]]
                output = ast.unparse(item.returns) if item.returns else None
        found[f"{module}.{node.name}"] = _Class(names["__parameters__"], names["__buffers__"], inputs, output)
    return found


def _torchscript(path: Path) -> dict[str, Any]:
    infos = torchsave.check_archive(path, "TorchScript archive")
    by_inner = {i.filename.split("/", 1)[-1]: i for i in infos}
    storages = {n.removeprefix("data/"): i.file_size for n, i in by_inner.items() if n.startswith("data/")}
    data = read_member(path, infos, "data.pkl", MAX_PICKLE)
    if data is None:
        raise CheckpointError(f"{path}: a TorchScript archive without data.pkl; the file is damaged")
    root = unpickle(data, storages, "data.pkl")
    if not isinstance(root, ObjectRecord):
        raise Malformed("data.pkl does not hold a scripted module")
    code_read = [0]
    classes: dict[str, _Class] = {}
    sources_read: set[str] = set()

    def class_of(obj: ObjectRecord) -> _Class | None:
        module = obj.qualname.rsplit(".", 1)[0]
        if obj.qualname not in classes and module not in sources_read:
            sources_read.add(module)
            source = read_member(path, infos, "code/" + module.replace(".", "/") + ".py", _MAX_CODE)
            if source is not None:
                code_read[0] += len(source)
                if code_read[0] > _MAX_CODE:
                    raise CheckpointError(f"{path}: its code/ is more than the {_MAX_CODE} bytes etappe parses to "
                                          "describe an archive; refused")
                classes.update(_classes(source.decode("utf-8", "replace"), module))
        return classes.get(obj.qualname)

    weights: list[dict[str, Any]] = []
    own_setstate: list[str] = []
    seen: set[int] = set()

    def add(name: str, t: TensorRecord, role: str) -> None:
        dtype = t.storage.dtype
        storage = f"{t.storage.key}:{t.offset}:{list(t.shape)}:{list(t.stride)}"
        weights.append(_weight(name, list(t.shape), str(dtype).removeprefix("torch."), dtype.itemsize, role, storage))

    def walk(value: Any, name: str, role: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise Malformed(f"modules nested more than {MAX_DEPTH} deep")
        if isinstance(value, TensorRecord):
            add(name, value, role)
            return
        if id(value) in seen:  # shared and cyclic references: each object once
            return
        seen.add(id(value))
        if isinstance(value, ObjectRecord):
            cls = class_of(value)
            state = value.state
            prefix = f"{name}." if name else ""
            if not isinstance(state, Mapping):  # the class has its own __setstate__: its state is opaque data
                if _has_tensor(state):
                    own_setstate.append(name or "(the model)")
                walk(state, f"{prefix}__getstate__()", "state", depth + 1)
                return
            for key, v in state.items():
                key = str(key)
                sub = "parameter" if cls and key in cls.parameters else "buffer" if cls and key in cls.buffers \
                    else "attribute"
                walk(v, prefix + key, sub, depth + 1)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{name}[{str(k)[:40]!r}]", role, depth + 1)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{name}[{i}]", role, depth + 1)

    walk(root, "", "attribute", 0)
    top = class_of(root)
    if top is None:
        raise Malformed(f"data.pkl's module {root.qualname[:80]} has no class in code/")
    inputs = top.inputs or []
    traced = _traced_shapes(path, infos)
    if traced is not None and len(traced) == len(inputs):
        for spec, shape in zip(inputs, traced):
            if shape is not None:
                spec["example_shape"] = shape  # the input torch.jit.trace was given: one shape that works
    out: dict[str, Any] = {
        "format_version": (read_member(path, infos, "version", 64) or b"").decode("ascii", "replace").strip(),
        "producer": "torch.jit.trace" if traced is not None else "torch.jit (script or trace)",
        "model_class": re.sub(r"___torch_mangle_\d+\.", "", root.qualname.removeprefix("__torch__.")),
        "inputs": inputs,
        "outputs": [{"type": top.output}] if top.output else [],
        "weights": weights,
    }
    if own_setstate:
        out["own_setstate"] = own_setstate  # their tensors are listed with role "state", not counted
    return out


def _has_tensor(value: Any) -> bool:
    stack, seen = [value], set()
    while stack:
        x = stack.pop()
        if isinstance(x, TensorRecord):
            return True
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, Mapping):
            stack += list(x.values())
        elif isinstance(x, (list, tuple)):
            stack += list(x)
    return False


def _traced_shapes(path: Path, infos: list[zipfile.ZipInfo]) -> list | None:
    """The shapes of the inputs ``torch.jit.trace`` recorded in traced_inputs.pkl (None when it is absent: a
    scripted module); an entry that is not a tensor is None. torch stores these tensors' records, not their data."""
    data = read_member(path, infos, "traced_inputs.pkl", MAX_PICKLE)
    if data is None:
        return None
    traced = unpickle(data, None, "traced_inputs.pkl")
    args = traced.get("forward") if isinstance(traced, Mapping) else None
    if not isinstance(args, (list, tuple)):
        return None
    return [list(a.shape) if isinstance(a, TensorRecord) else None for a in args]


# ------------------------------------------------------------------ text


def format_lines(info: Mapping[str, Any]) -> list[str]:
    """The lines ``format_inspection`` prints after a model file's heading: producer and opset, inputs, outputs,
    weights one per line as ``name\\tshape\\tdtype\\tsize\\trole``, and what running it needs."""
    lines = []
    facts = [f"producer {info['producer']}"] if info.get("producer") else []
    if info.get("model_class"):
        facts.append(f"class {info['model_class']}")
    if info.get("opset"):
        facts.append("opset " + ", ".join(f"{k} {v}" for k, v in info["opset"].items()))
    if facts:
        lines.append(", ".join(facts))
    for key in ("inputs", "outputs"):
        shown = [_value(v) for v in info.get(key, [])]
        lines.append(f"{key}: " + ("; ".join(shown) if shown else "none recorded"))
    if info.get("dynamic_sizes"):
        lines.append("dynamic sizes: " + ", ".join(f"{k} in [{lo}, {hi}]" for k, (lo, hi) in
                                                   info["dynamic_sizes"].items()))
    weights = info.get("weights", [])
    lines.append(f"weights: {info['parameters']:,} parameters, {info['buffers']:,} buffer values, "
                 f"{len(weights)} tensors, {size_text(info['weights_bytes'])}")
    if info.get("counted"):
        lines.append(f"  ({info['counted']})")
    if info.get("own_setstate"):
        lines.append(f"  ({', '.join(info['own_setstate'])}: restored by the class's own __setstate__, which runs "
                     "only with --trust; its tensors are listed as 'state', not counted)")
    lines += [f"  {w['name']}\t{w['shape']}\t{w['dtype']}\t{size_text(w['bytes'])}\t{w['role']}" for w in weights]
    lines.append(info["next_step"])
    return lines


def _value(v: Mapping[str, Any]) -> str:
    parts = [str(v["name"])] if v.get("name") else []
    if "shape" in v:
        parts.append(str(["?" if d is None else d for d in v["shape"]]))
    for key in ("dtype", "type"):
        if v.get(key):
            parts.append(str(v[key]))
    if "example_shape" in v:
        parts.append(f"(traced with {v['example_shape']})")
    return " ".join(parts)


def size_text(n: int) -> str:
    """A byte count for people: 512 B, 1.5 kB, 3.2 MB, 1.0 GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
