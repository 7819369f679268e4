"""Turn a state tree (what ``state_dict()`` returns, or a plain value) into JSON plus named tensors, and back.

JSON carries None, bools, strings, ints, finite floats, lists and dicts with string keys as themselves.
Everything JSON would blur is tagged with ``"$type"``: tuples, non-finite floats, dicts with other keys
(the optimizer's int-keyed ``state``), bytes, numpy arrays, torch's per-module ``_metadata``, and tensors,
which become references by name into the entry's safetensors file. A tensor reachable under two keys
(a tied weight, as ``tied.key`` tells) is stored once and both keys get the same tensor object back.
"""

import base64
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from etappe.checkpoint import tied
from etappe.checkpoint.errors import CheckpointError

TAG = "$type"


def encode(value: Any, where: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """Return (JSON-able tree, {name: tensor}) for ``value``; ``where`` names it in error messages."""
    tensors: dict[str, torch.Tensor] = {}
    names_by_view: dict[tuple, str] = {}

    def tensor_ref(t: torch.Tensor, path: tuple) -> dict:
        problem = _unsavable(t)
        if problem:
            raise CheckpointError(f"cannot save {where}{_show(path)}: {problem}")
        view = tied.key(t)
        if view in names_by_view:
            return {TAG: "tensor", "name": names_by_view[view]}
        name = _fresh_name(".".join(map(str, path)) or "value", tensors)
        tensors[name] = t.detach()
        if view is not None:
            names_by_view[view] = name
        return {TAG: "tensor", "name": name}

    def enc(v: Any, path: tuple) -> Any:
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            return float(v) if math.isfinite(v) else {TAG: "float", "value": repr(float(v))}
        if isinstance(v, torch.Tensor):
            return tensor_ref(v, path)
        if isinstance(v, np.ndarray):
            try:
                t = torch.from_numpy(v if v.flags.c_contiguous else v.copy(order="C"))
            except TypeError:
                raise CheckpointError(
                    f"cannot save {where}{_show(path)}: numpy arrays of dtype {v.dtype} have no torch equivalent"
                ) from None
            return {TAG: "ndarray", "tensor": tensor_ref(t, path)}
        if isinstance(v, np.generic):
            return enc(v.item(), path)
        if isinstance(v, (bytes, bytearray)):
            return {TAG: "bytes", "base64": base64.b64encode(v).decode("ascii")}
        if isinstance(v, tuple):
            return {TAG: "tuple", "items": [enc(x, path + (i,)) for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [enc(x, path + (i,)) for i, x in enumerate(v)]
        if isinstance(v, Mapping):
            return enc_mapping(v, path)
        raise CheckpointError(
            f"cannot save {where}{_show(path)}: a {type(v).__module__}.{type(v).__qualname__} is not something a "
            "checkpoint holds; use numbers, strings, bools, None, lists, tuples, dicts, tensors or numpy arrays, "
            "or an object with state_dict()"
        )

    def enc_mapping(v: Mapping, path: tuple) -> dict:
        metadata = getattr(v, "_metadata", None)  # torch's per-module versions, used by load_state_dict
        if all(isinstance(k, str) for k in v):
            fields = {k: enc(x, path + (k,)) for k, x in v.items()}
            if metadata is None and TAG not in v:
                return fields
            out = {TAG: "dict", "fields": fields}
        else:
            out = {TAG: "dict", "items": [[enc(k, path), enc(x, path + (k,))] for k, x in v.items()]}
        if metadata is not None:
            out["metadata"] = enc(metadata, path + ("_metadata",))
        return out

    return enc(value, ()), tensors


def decode(tree: Any, tensors: Mapping[str, Any]) -> Any:
    """Rebuild the value ``encode`` described; ``tensors`` maps names to tensors (or to stand-ins, for inspection).

    A tree that ``encode`` could not have made (an unknown tag, a field of the wrong type, a missing tensor, a
    nesting too deep to rebuild) raises CheckpointError saying where in the tree it is."""
    try:
        return _decode(tree, tensors, ())
    except RecursionError:
        raise CheckpointError("malformed state: nested too deeply to rebuild") from None


def _decode(tree: Any, tensors: Mapping[str, Any], path: tuple) -> Any:
    if isinstance(tree, list):
        return [_decode(x, tensors, path + (i,)) for i, x in enumerate(tree)]
    if not isinstance(tree, dict):
        return tree
    tag = tree.get(TAG)
    if tag is None:
        return {k: _decode(v, tensors, path + (k,)) for k, v in tree.items()}

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"malformed state at {(_show(path) or 'the top')[:120]}: {what}")

    def field(name: str, kind: type) -> Any:
        value = tree.get(name)
        if not isinstance(value, kind):
            raise bad(f"a {str(tag)[:40]!r} needs {name!r} as a {kind.__name__}, found a {type(value).__name__}")
        return value

    if tag == "tensor":
        name = field("name", str)
        if name not in tensors:
            raise bad(f"no tensor named {name[:80]!r}")
        return tensors[name]
    if tag == "float":
        value = field("value", str)
        if value not in ("nan", "inf", "-inf"):
            raise bad(f"float {value[:40]!r}")
        return float(value)
    if tag == "tuple":
        return tuple(_decode(x, tensors, path + (i,)) for i, x in enumerate(field("items", list)))
    if tag == "bytes":
        try:
            return base64.b64decode(field("base64", str), validate=True)
        except ValueError:  # binascii.Error
            raise bad("bad base64") from None
    if tag == "ndarray":
        t = _decode(field("tensor", dict), tensors, path)
        return t.numpy() if isinstance(t, torch.Tensor) else t
    if tag == "dict":
        if "fields" in tree:
            out = {k: _decode(v, tensors, path + (k,)) for k, v in field("fields", dict).items()}
        else:
            out = {}
            for item in field("items", list):
                if not (isinstance(item, list) and len(item) == 2):
                    raise bad("a dict item is not a [key, value] pair")
                key = _decode(item[0], tensors, path)
                try:
                    hash(key)
                except TypeError:
                    raise bad(f"a {type(key).__name__} as a dict key") from None
                out[key] = _decode(item[1], tensors, path + (key,))
        if "metadata" in tree:
            out = OrderedDict(out)
            out._metadata = _decode(tree["metadata"], tensors, path + ("_metadata",))
        return out
    raise bad(f"unknown {TAG} {str(tag)[:40]!r}")


def _unsavable(t: torch.Tensor) -> str | None:
    if t.layout != torch.strided:
        return f"a {t.layout} tensor; make it dense with .to_dense() first"
    if t.is_quantized:
        return "a quantized tensor; dequantize it or save its int_repr() and scales"
    if t.device.type == "meta":
        return "a tensor on the meta device has no data to save"
    return None


def _fresh_name(name: str, taken: Mapping[str, Any]) -> str:
    if name not in taken:
        return name
    n = 2
    while f"{name}#{n}" in taken:
        n += 1
    return f"{name}#{n}"


def _show(path: tuple) -> str:
    return "".join(f"[{k!r}]" for k in path)
