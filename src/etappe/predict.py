"""Run a trained or exported model on files: images, IDX files, NumPy arrays, CSV rows.

    predict("runs/digits-cnn/export/model.onnx", ["three.png", "more.npy"], top=3)
    -> [{"input": "three.png", "class": 3, "probability": 0.98, "top": [{"class": 3, "probability": 0.98}, ...]},
        ...]
    predict("detector.onnx", ["face.npy"])                    # several outputs: every one comes back, named
    -> [{"input": "face.npy", "outputs": {"box": [...], "probability": 0.97, "landmarks": [[...], ...]}}]
    predict("metric.safetensors", [("a.npy", "b.npy")], model_name="mine:metric")   # several inputs

The model is anything ``etappe.export.load_model`` reads: a run or checkpoint folder, a state dict, TorchScript,
``.pt2`` or ``.onnx``. What the model expects comes from the checkpoint's data spec or the export's sidecar:
the inputs (names, one sample's shape, dtype), the outputs' names, the number of classes (none: regression), the
input scale of the data set and the range its inputs had after scaling (``input_range``).

Files to inputs: a model with one input runs every file given, each one sample or a batch. A model with k > 1
inputs (k from the sidecar's ``inputs``, the ONNX file's, or ``input_shape`` given once per input) takes one file
(or array) per input, in the model's input order, or as ``NAME=FILE``; all must hold the same number of samples.

How values become model inputs (``scale``, CLI ``--scale``):
  auto (default)  what the model was trained on. Images (.png .jpg ...): pixels / 255 (/ 65535 for 16-bit), the
                  [0, 1] range the built-in image sets use. Integer arrays (.npy, IDX): raw stored values, scaled
                  like the data set (digits: / 16, MNIST: / 255). Floating arrays and CSV rows: as they are.
  none            every value as the file holds it (pixels 0..255 too).
  a number N      every value divided by N (e.g. 16 for digits saved as floats 0..16).
An input the model takes as integers (token ids, a sample rate) is never scaled. When the model records its
training inputs' range and an input is clearly outside it after scaling, a warning says which ``--scale`` fits.
Images must match the model's (C, H, W) unless ``resize=True``; CSV rows are one flattened sample each, a header
row is skipped.
"""

from __future__ import annotations

import csv
import inspect
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from etappe.errors import DataError, UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAX_PIXELS = 2**25  # an image's width x height: decoding one allocates several bytes per pixel
READS = ("images (" + " ".join(IMAGE_SUFFIXES) + "), IDX files (*-ubyte, *.idx, optionally .gz), "
         "NumPy arrays (.npy) and CSV rows (.csv)")


@dataclass(frozen=True)
class ModelInput:
    """One input of a model: its name, one sample's shape (without the batch; None while unknown) and the dtype it
    takes."""

    name: str
    shape: tuple[int, ...] | None
    dtype: str = "float32"


def predict(
    model: Any,
    inputs: Any,
    *,
    top: int = 1,
    resize: bool = False,
    batch_size: int = 256,
    which: str = "best",
    input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
    model_name: str | None = None,
    trusted: bool = False,
    weights: str = "raw",
    scale: str | float = "auto",
    strict: bool = True,
) -> list[dict]:
    """Predict for every sample in ``inputs``. ``model`` is a path ``load_model`` reads.

    ``inputs``, for a model with one input: a path, an array or tensor, or a sequence of them (each one sample or
    a batch). For a model with several: one path or array per input, as a tuple (in the model's order; ``"NAME=
    FILE"`` strings go to the input named), a dict of input name to path or array, or a list of such tuples.

    One output and a recorded number of classes: ``{"input", "class", "probability", "top": [{"class",
    "probability"}, ...]}`` with the ``top`` most probable classes (softmax of the outputs). One output otherwise:
    ``{"input", "value"}``. Several outputs (a tuple or dict): ``{"input", "outputs": {name: value, ...}}``, every
    output, named as the sidecar, the dict's keys or the ONNX file name them (else output0, output1 ...). A value
    is a number, or nested lists shaped like one sample's output. When nothing records what the model was trained
    on (no sidecar, no data spec), a warning says so and each result has ``"raw": True``.

    ``scale``: "auto" (default), "none" or a number to divide every input value by; see the module's docstring.
    ``input_shape`` (one shape, or one per input) overrides what the model's files record; ``model_name`` (a
    registry name or module:factory) names the model to rebuild weights into, built with the first input's
    shape; ``trusted`` allows files that run code when loaded (TorchScript, .pt2) and a module:factory named in
    the model's files, as for ``load_model``; ``weights`` "ema" runs a run's averaged weights (trained with
    ``ema``), "raw" its own.
    """
    if top < 1:
        raise UsageError(f"--top must be at least 1, got {top}")
    divisor = parse_scale(scale)
    shapes = _given_shapes(input_shape)
    import torch

    from etappe.export import load_model

    module, config = load_model(model, which=which, model=model_name, input_shape=shapes[0] if shapes else None,
                                trusted=trusted, weights=weights, strict=strict)
    spec = dict(config.get("data_spec") or {})
    signature = model_inputs(module, config, shapes, where=str(model))
    data_scale = float(spec.get("input_scale") or 1.0)
    batches, labels, read = _read_all(_groups(inputs, [i.name for i in signature]), signature, divisor, data_scale,
                                      resize)
    tensors = [torch.from_numpy(b).to(_torch_dtype(i.dtype)) for b, i in zip(batches, signature)]
    chunks: list[list[tuple[str, Any]]] = []
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            part = [t[start:start + batch_size] for t in tensors]
            chunks.append(_flatten(module(*part), len(part[0]), str(model)))
    # warnings once the inputs were read and ran: a failure before is the one line a user must see
    raw = not (spec.get("name") or spec.get("num_classes") or spec.get("input_range"))
    if raw:
        warnings.warn(f"{model} records no data spec (no sidecar or run config beside it): class names and input "
                      "scaling are unknown, so inputs go in as read (--scale) and outputs are shown raw", stacklevel=2)
    trained = trained_range(spec)
    if trained and len(signature) == 1 and _is_float(signature[0].dtype):
        _warn_range(read, trained)
    if not chunks:
        return []
    names = output_names(config, module, [name for name, _ in chunks[0]])
    outputs = [(name, torch.cat([c[j][1] for c in chunks])) for j, name in enumerate(names)]
    return _results(labels, outputs, spec.get("num_classes"), top, raw)


def format_results(results: list[dict]) -> str:
    """One line per input, for people."""
    lines = []
    for r in results:
        if "class" in r:
            ranked = "  ".join(f"{t['class']} ({t['probability']:.3f})" for t in r["top"][1:])
            rest = f"  then {ranked}" if ranked else ""
            lines.append(f"{r['input']}: class {r['class']} (p={r['probability']:.3f}){rest}")
        elif "outputs" in r:
            shown = "  ".join(f"{name}={_shown(v)}" for name, v in r["outputs"].items())
            lines.append(f"{r['input']}: {'raw outputs ' if r.get('raw') else ''}{shown}")
        else:
            lines.append(f"{r['input']}: {'raw output ' if r.get('raw') else ''}{_shown(r['value'])}")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- the rules: scale, files to inputs, range


def parse_scale(value: str | float | None) -> float | None:
    """``--scale``: None for "auto" (the model's own scaling), 1.0 for "none", else the positive finite number
    every input value is divided by. Raises UsageError for anything else."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return None
        if text == "none":
            return 1.0
        try:
            number = float(text)
        except ValueError:
            number = math.nan
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        number = math.nan
    if not (0 < number < math.inf):  # nan compares false
        raise UsageError(f"--scale: expected auto, none or a positive number to divide inputs by (e.g. 16 or 255), "
                         f"got {value!r}")
    return number


def split_named(item: Any, names: Sequence[str]) -> tuple[str | None, Any]:
    """``"NAME=FILE"`` with NAME one of the model's input ``names``: (NAME, FILE); anything else: (None, item)."""
    if isinstance(item, str) and "=" in item:
        name, _, value = item.partition("=")
        if name in names:
            return name, value
    return None, item


def assign_files(items: Sequence[Any], names: Sequence[str]) -> list[Any]:
    """One item per model input, in the order of ``names``: ``NAME=FILE`` strings go to the input NAME, the
    other items to the remaining inputs in order. Raises UsageError unless every input gets exactly one."""
    named: dict[str, Any] = {}
    positional = []
    for item in items:
        name, value = split_named(item, names)
        if name is None:
            positional.append(item)
        elif name in named:
            raise UsageError(f"input {name!r} is given twice ({named[name]} and {value}); give one file per input")
        else:
            named[name] = value
    free = [n for n in names if n not in named]
    if len(positional) != len(free):
        given = ", ".join(_short(i) for i in items[:4]) + (", ..." if len(items) > 4 else "")
        raise UsageError(f"the model takes {len(names)} inputs ({', '.join(names)}), one file or array each, in that "
                         f"order or as NAME=FILE; got {len(items)}: {given}")
    named.update(zip(free, positional))
    return [named[n] for n in names]


def _short(item: Any) -> str:
    return f"an array shaped {_shape_text(np.shape(item))}" if not isinstance(item, (str, Path)) else str(item)


def trained_range(spec: Mapping) -> tuple[float, float] | None:
    """The range of the inputs the model was trained on, after scaling: the data spec's ``input_range``; for a
    spec from before it was recorded, [0, 1] when the data set scaled its stored integers (the image sets)."""
    recorded = spec.get("input_range")
    if isinstance(recorded, (list, tuple)) and len(recorded) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in recorded):
        lo, hi = float(recorded[0]), float(recorded[1])
        return (lo, hi) if lo <= hi else None
    scale = spec.get("input_scale")
    if isinstance(scale, (int, float)) and scale not in (0, 1) and spec.get("name"):
        return 0.0, 1.0
    return None


def range_warning(found: tuple[float, float], trained: tuple[float, float], multiplier: float = 1.0) -> str | None:
    """The warning for inputs whose values (after scaling) span ``found`` when the model was trained on values in
    ``trained``; None when they fit. "Clearly outside": beyond the trained range by more than half its width.
    ``multiplier`` is what the file's values were multiplied by, to suggest the --scale that would fit."""
    lo, hi = trained
    width = hi - lo if hi > lo else max(abs(lo), abs(hi), 1.0)
    f_lo, f_hi = found
    if f_lo >= lo - width / 2 and f_hi <= hi + width / 2:
        return None
    message = f"input values {f_lo:.4g}..{f_hi:.4g} but the model was trained on {lo:.4g}..{hi:.4g}"
    if f_lo >= lo - width / 2 and hi > 0 and multiplier > 0 and math.isfinite(f_hi):
        divisor = _round_divisor(f_hi / multiplier / hi)
        return f"{message}; pass --scale {divisor:g} (Python: scale={divisor:g}) to divide them by {divisor:g}"
    return f"{message}; check how they were scaled (--scale: auto, none or a number to divide by)"


def _round_divisor(ratio: float) -> float:
    """A divisor bringing values up to ``ratio`` x the trained maximum into range: the common full scales (16 for
    digits, 255 for 8-bit, 65535 for 16-bit) when the ratio is near one, else the ratio rounded up."""
    for common in (16.0, 255.0, 65535.0):
        if common / 2 < ratio <= common:
            return common
    return float(math.ceil(ratio * 1000) / 1000) if ratio < 10 else float(math.ceil(ratio))


# ---------------------------------------------------------------- what the model takes and returns


def model_inputs(module: Any, config: Mapping, shapes: list[tuple[int, ...]] | None, where: str) -> list[ModelInput]:
    """The model's inputs, in order: how many and their names from the sidecar's ``inputs``, the ONNX file's or
    the forward's parameters; one sample's shape from ``shapes`` (given once per input), else as recorded."""
    recorded = _recorded_inputs(config.get("inputs"), where) or _onnx_inputs(module)
    params = _forward_parameters(module)
    k = len(recorded) or len(shapes or ()) or 1
    if recorded:
        names = [r.name for r in recorded]
    elif params and len(params[0]) >= k:
        names = params[0][:k]
    else:
        names = ["input"] if k == 1 else [f"input{i}" for i in range(k)]
    if not recorded and params and params[1] > k:
        raise UsageError(f"{where}: the model's forward takes {params[1]} inputs ({', '.join(params[0][:params[1]])})"
                         "; give --input-shape once per input, in that order")
    if shapes and len(shapes) != k:
        raise UsageError(f"{where}: the model takes {k} input{'s' if k > 1 else ''} ({', '.join(names)}); give "
                         f"--input-shape once per input, in that order, not {len(shapes)} times")
    spec = config.get("data_spec") or {}
    result = []
    for i, name in enumerate(names):
        shape = shapes[i] if shapes else recorded[i].shape if recorded and recorded[i].shape is not None else None
        if shape is None and k == 1:
            shape = spec.get("input_shape") or config.get("input_shape")
        if not shape and shape != ():
            raise UsageError(f"{where} does not record the shape of input {name!r}; pass --input-shape "
                             f"{'C,H,W' if k == 1 else 'once per input, in order'}")
        dtype = recorded[i].dtype if recorded else config.get("input_dtype") if k == 1 else None
        result.append(ModelInput(name, tuple(int(d) for d in shape), _dtype_name(dtype or "float32", where)))
    return result


def _recorded_inputs(value: Any, where: str) -> list[ModelInput]:
    """A sidecar's ``inputs``: [{"name", "shape" (one sample's; None or a name for a dynamic size), "dtype"}]."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise UsageError(f"{where}: its sidecar records inputs as {str(value)[:60]!r}, not a list of {{name, shape, "
                         "dtype}}; export it again or delete the sidecar")
    inputs = []
    for i, v in enumerate(value):
        name = v.get("name") if isinstance(v.get("name"), str) and v.get("name") else f"input{i}"
        shape = v.get("shape")
        static = isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                 for d in shape)
        inputs.append(ModelInput(name, tuple(shape) if static else None, _dtype_name(v.get("dtype"), where)))
    return inputs


_ONNX_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
               "tensor(bfloat16)": "bfloat16", "tensor(int64)": "int64", "tensor(int32)": "int32",
               "tensor(int16)": "int16", "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def _onnx_inputs(module: Any) -> list[ModelInput]:
    """The inputs an ONNX file declares (run by onnxruntime behind ``module.session``): names, static shapes."""
    session = getattr(module, "session", None)
    if session is None or not hasattr(session, "get_inputs"):
        return []
    inputs = []
    for arg in session.get_inputs():
        dims = list(arg.shape[1:])
        static = all(isinstance(d, int) and d > 0 for d in dims)
        inputs.append(ModelInput(arg.name, tuple(dims) if static else None, _ONNX_TYPES.get(arg.type, "float32")))
    return inputs


def _forward_parameters(module: Any) -> tuple[list[str], int] | None:
    """The names of the forward's positional parameters and how many have no default; None when unknown."""
    forward = getattr(module, "forward", None)
    schema = getattr(forward, "schema", None)  # a TorchScript method: its schema, first argument self
    if schema is not None:
        arguments = [a for a in schema.arguments[1:] if not a.kwarg_only]
        return [a.name for a in arguments], sum(not a.has_default_value() for a in arguments)
    try:
        parameters = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return None
    names, required = [], 0
    for p in parameters:
        if p.kind is p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
            required += p.default is p.empty
    return names, required


def _dtype_name(value: Any, where: str) -> str:
    if value is None:
        return "float32"
    if _torch_dtype(value) is None:
        raise UsageError(f"{where}: its sidecar records input dtype {str(value)[:40]!r}, not a torch dtype like "
                         "'float32'; export it again or delete the sidecar")
    return str(value)


def _torch_dtype(name: Any) -> Any:
    import torch

    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _is_float(name: str) -> bool:
    return _torch_dtype(name).is_floating_point


def _given_shapes(input_shape: Any) -> list[tuple[int, ...]] | None:
    """``input_shape`` as one shape per input: (1, 8, 8) is one input's, [(1, 8, 8), (3,)] two inputs'."""
    if input_shape is None or len(input_shape) == 0:
        return None
    if all(isinstance(s, (list, tuple)) for s in input_shape):
        return [tuple(int(d) for d in s) for s in input_shape]
    return [tuple(int(d) for d in input_shape)]


def output_names(config: Mapping, module: Any, found: Sequence[str]) -> list[str]:
    """Names for the outputs a call returned (``found``: "output" for one tensor, output0... for a tuple's, a dict's
    keys): the sidecar's ``outputs`` names, else the ONNX file's, when they are as many and distinct."""
    recorded = config.get("outputs")
    candidates = []
    if isinstance(recorded, list) and all(isinstance(o, Mapping) for o in recorded):
        candidates.append([o.get("name") for o in recorded])
    session = getattr(module, "session", None)
    if session is not None and hasattr(session, "get_outputs"):
        candidates.append([o.name for o in session.get_outputs()])
    for names in candidates:
        if (len(names) == len(found) and all(isinstance(n, str) and n for n in names)
                and len(set(names)) == len(names)):
            return list(names) if len(found) > 1 else list(found)
    return list(found)


def _flatten(out: Any, rows: int, where: str, prefix: str = "") -> list[tuple[str, Any]]:
    """Every tensor a model returned, in order, named: "output" for a lone tensor, output0.. for a tuple's, a
    dict's keys (nested: "box.0")."""
    import torch

    if torch.is_tensor(out):
        if out.ndim == 0 or out.shape[0] != rows:
            raise DataError(f"{where}: output {prefix or 'output'!r} is shaped {_shape_text(tuple(out.shape))}, not "
                            f"one row per input sample ({rows}); predict reads outputs whose first dimension is the "
                            "batch")
        return [(prefix or "output", out)]
    if out is None:
        return []
    if isinstance(out, Mapping):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(f"{prefix}.{i}" if prefix else f"output{i}", v) for i, v in enumerate(out)]
    else:
        raise DataError(f"{where}: the model returned {type(out).__name__}; predict reads tensors, or tuples or "
                        "dicts of them")
    return [flat for name, value in items for flat in _flatten(value, rows, where, name)]


def _results(labels: list[str], outputs: list[tuple[str, Any]], num_classes: Any, top: int, raw: bool) -> list[dict]:
    import torch

    if len(outputs) == 1 and num_classes and not raw:
        logits = outputs[0][1].float().reshape(len(labels), -1)
        if logits.shape[1] == num_classes:
            probs = torch.softmax(logits, dim=1)
            p, c = probs.topk(min(top, probs.shape[1]), dim=1)
            results = []
            for label, pi, ci in zip(labels, p.tolist(), c.tolist()):
                ranked = [{"class": int(cls), "probability": float(prob)} for cls, prob in zip(ci, pi)]
                results.append({"input": label, "class": ranked[0]["class"], "probability": ranked[0]["probability"],
                                "top": ranked})
            return results
    results = []
    for i, label in enumerate(labels):
        if len(outputs) == 1:
            result = {"input": label, "value": _value(outputs[0][1][i])}
        else:
            result = {"input": label, "outputs": {name: _value(t[i]) for name, t in outputs}}
        if raw:
            result["raw"] = True
        results.append(result)
    return results


def _value(t: Any) -> Any:
    """One sample's output: a number, or nested lists shaped like it."""
    if t.is_floating_point() and t.dtype.itemsize < 4:
        t = t.float()
    return t.item() if t.numel() == 1 else t.tolist()


def _warn_range(read: list[tuple[str, np.ndarray, float]], trained: tuple[float, float]) -> None:
    """One warning for the files whose values, after scaling, are clearly outside what the model trained on."""
    outside = []
    for where, batch, multiplier in read:
        if batch.size == 0 or np.isnan(batch).all():
            continue
        message = range_warning((float(np.nanmin(batch)), float(np.nanmax(batch))), trained, multiplier)
        if message:
            outside.append((where, message))
    if outside:
        where, message = outside[0]
        more = f" (and {len(outside) - 1} more input{'s' if len(outside) > 2 else ''})" if len(outside) > 1 else ""
        warnings.warn(f"{where}{more}: {message}", stacklevel=3)


# ---------------------------------------------------------------- reading inputs


def read_inputs(
    inputs: Any,
    input_shape: Sequence[int],
    input_scale: float = 1.0,
    *,
    resize: bool = False,
    scale: str | float = "auto",
) -> tuple[np.ndarray, list[str]]:
    """All samples of ``inputs`` for a model with one input, as one float32 batch shaped (N, *input_shape), and a
    label per sample. ``input_scale`` is the data set's (integer arrays are multiplied by it under "auto")."""
    single = ModelInput("input", tuple(int(d) for d in input_shape))
    batches, labels, _ = _read_all(_groups(inputs, [single.name]), [single], parse_scale(scale), input_scale, resize)
    return batches[0], labels


def _is_one(item: Any) -> bool:
    """A path, an array or a tensor: one input's file or values (not a group of them)."""
    import torch

    return isinstance(item, (str, Path, np.ndarray)) or torch.is_tensor(item)


def _groups(inputs: Any, names: list[str]) -> list[list[Any]]:
    """``inputs`` as groups of one item (path, array, tensor) per model input, in the model's input order."""
    if isinstance(inputs, Mapping):
        return [_by_name(inputs, names)]
    if _is_one(inputs):
        inputs = [inputs]
    elif not isinstance(inputs, (list, tuple)):
        raise UsageError(f"inputs: expected paths, arrays or tensors (or tuples of them, one per model input), got "
                         f"{type(inputs).__name__}")
    grouped = [isinstance(item, (list, tuple, Mapping)) for item in inputs]
    if inputs and all(grouped):  # a list of groups, each one item per input
        return [_by_name(g, names) if isinstance(g, Mapping) else assign_files(list(g), names) for g in inputs]
    if any(grouped):
        raise UsageError("inputs: give one file or array per model input, or a list of such tuples, not both mixed")
    if len(names) == 1:  # every item is samples for the one input
        return [[split_named(item, names)[1]] for item in inputs]
    return [assign_files(list(inputs), names)]


def _by_name(group: Mapping, names: list[str]) -> list[Any]:
    unknown = [k for k in group if k not in names]
    missing = [n for n in names if n not in group]
    if unknown or missing:
        problem = f"no input named {unknown[0]!r}" if unknown else f"input {missing[0]!r} is missing"
        raise UsageError(f"inputs: {problem}; the model takes {', '.join(names)}")
    return [group[n] for n in names]


def _read_all(groups: list[list[Any]], signature: list[ModelInput], divisor: float | None, data_scale: float,
              resize: bool) -> tuple[list[np.ndarray], list[str], list[tuple[str, np.ndarray, float]]]:
    """One batch per model input from ``groups``, a label per sample, and (where, values, factor) of each file of
    a one-input model, for the range check."""
    if not groups:
        raise UsageError("no inputs given; pass image, IDX, .npy or .csv files")
    per_input: list[list[np.ndarray]] = [[] for _ in signature]
    labels: list[str] = []
    read = []
    several = len(signature) > 1
    for group in groups:
        parts = [_read_item(item, inp, divisor, data_scale, resize, inp.name if several else "array")
                 for item, inp in zip(group, signature)]
        sizes = [len(batch) for batch, _, _ in parts]
        if len(set(sizes)) > 1:
            counts = ", ".join(f"{inp.name} {n} ({_short(item)})" for item, n, inp in zip(group, sizes, signature))
            raise UsageError(f"the inputs hold different numbers of samples: {counts}; give every input the same "
                             "number (one sample each, or batches of the same size)")
        for i, (batch, _, _) in enumerate(parts):
            per_input[i].append(batch)
        labels += [", ".join(item_labels[j] for _, item_labels, _ in parts) for j in range(sizes[0])]
        if not several:
            batch, item_labels, factor = parts[0]
            read.append((_short(group[0]), batch, factor))
    return [np.concatenate(b) for b in per_input], labels, read


def _read_item(item: Any, inp: ModelInput, divisor: float | None, data_scale: float, resize: bool,
               array_label: str) -> tuple[np.ndarray, list[str], float]:
    """One file's or array's samples for input ``inp``: a batch in the input's dtype (floats: float32, or float64),
    a label per sample, and the factor the values were multiplied by."""
    import torch

    if torch.is_tensor(item):
        item = item.detach().cpu()
        item = (item.float() if item.dtype == torch.bfloat16 else item).numpy()
    shape = inp.shape
    if isinstance(item, np.ndarray):
        values, single = _from_array(item, shape, array_label)
        labels = [f"{array_label}[{i}]" for i in range(len(values))]
        kind, full = ("integers" if values.dtype.kind in "biu" else "floats"), None
    elif isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
        kind = input_kind(path)
        full = None
        if kind == "image":
            pixels, full = _read_image(path, shape, resize)
            values, labels = pixels[None], [str(path)]
        elif kind == "csv":
            values, lines = _read_csv(path, shape)
            labels = [f"{path}:{line}" for line in lines]
        else:
            values, single = _from_array(_read_array(path, kind), shape, str(path), resize)
            labels = [str(path)] if single else [f"{path}[{i}]" for i in range(len(values))]
        kind = "image" if kind == "image" and full else "integers" if values.dtype.kind in "biu" else "floats"
    else:
        raise UsageError(f"inputs: expected paths, arrays or tensors, got {type(item).__name__}")
    if not _is_float(inp.dtype):  # token ids, a sample rate: taken as they are, never scaled
        return _as_integers(values, inp, labels), labels, 1.0
    values = values.astype(np.float64 if inp.dtype == "float64" else np.float32)
    if divisor is None:  # auto: what the model was trained on
        if kind == "image":
            return values / full, labels, 1 / full
        if kind == "integers":
            return values * values.dtype.type(data_scale), labels, data_scale
        return values, labels, 1.0
    return (values / values.dtype.type(divisor) if divisor != 1 else values), labels, 1 / divisor


def _as_integers(values: np.ndarray, inp: ModelInput, labels: list[str]) -> np.ndarray:
    if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
        raise UsageError(f"{labels[0]}: input {inp.name!r} takes whole numbers ({inp.dtype}), found fractions")
    return values.astype(np.int64)


def input_kind(path: Path) -> str:
    name = path.name.lower()
    base = name[:-3] if name.endswith(".gz") else name
    if base.endswith(IMAGE_SUFFIXES) and not name.endswith(".gz"):
        return "image"
    if base.endswith(".npy") and not name.endswith(".gz"):
        return "npy"
    if base.endswith(".csv") and not name.endswith(".gz"):
        return "csv"
    if base.endswith(("-ubyte", ".idx", "ubyte")) or ".idx" in base:
        return "idx"
    raise UsageError(f"{path}: unknown input type {''.join(path.suffixes) or '(no suffix)'!r}; predict reads {READS}")


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _read_image(path: Path, shape: tuple[int, ...], resize: bool) -> tuple[np.ndarray, int | None]:
    """The pixels shaped (C, H, W) as stored, and their full scale (255 for 8-bit, 65535 for 16-bit; None for
    floating-point images, taken as they are)."""
    try:
        from PIL import Image
    except ImportError:
        raise UsageError("reading images needs Pillow: pip install 'etappe[images]'") from None
    if len(shape) != 3:
        raise UsageError(f"{path}: the model expects inputs shaped {_shape_text(shape)}, not images (C x H x W); "
                         "pass .npy or .csv inputs")
    channels, height, width = shape
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in one line
            img = Image.open(path)  # reads the header only
            if img.width * img.height > MAX_PIXELS:
                raise DataError(f"{path}: image is {img.width}x{img.height}, {img.width * img.height} pixels, more "
                                f"than the {MAX_PIXELS} predict reads; scale it down first")
            img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read the image: {exc}") from None
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "1":
        img = img.convert("L")
    found_channels = len(img.getbands())
    found = (found_channels, img.height, img.width)
    if found != shape:
        if not resize:
            raise UsageError(
                f"{path}: image is {_shape_text(found)} (channels x height x width, mode {img.mode}), the model "
                f"expects {_shape_text(shape)}; pass --resize to convert and resize it"
            )
        if found_channels != channels:
            modes = {1: "L", 3: "RGB", 4: "RGBA"}
            if channels not in modes:
                raise UsageError(f"{path}: cannot convert an image to {channels} channels (1, 3 or 4 can be made)")
            img = img.convert(modes[channels])
        if (img.height, img.width) != (height, width):
            img = img.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(img)
    if array.dtype == np.uint8:
        full = 255
    elif array.dtype in (np.uint16, np.int32) and img.mode.startswith("I"):
        full = 65535
    else:
        full, array = None, array.astype(np.float32)
    return (array[None] if array.ndim == 2 else array.transpose(2, 0, 1)), full


def _read_array(path: Path, kind: str) -> np.ndarray:
    if kind == "npy":
        try:
            _check_npy_size(path)
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{path}: cannot read it as a NumPy .npy array: {exc}") from None
    from etappe.data.idx import read_idx

    return read_idx(path)


def _check_npy_size(path: Path) -> None:
    """A .npy header's shape and type must account for exactly the bytes that follow it: numpy allocates what the
    header declares before reading, so a 100-byte file declaring 10**10 values would ask for 75 GB."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        start, size = f.tell(), path.stat().st_size
    declared = math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and start + declared != size:
        raise DataError(f"{path}: .npy header declares shape {tuple(shape)} of {dtype} ({start + declared} bytes with "
                        f"header), but the file holds {size} bytes")


def _from_array(array: np.ndarray, shape: tuple[int, ...], where: str, resize: bool = False) -> tuple[np.ndarray, bool]:
    """A batch shaped (N, *shape) from one sample or a batch, values as stored, and whether it was one sample."""
    if array.dtype.kind not in "biuf":
        raise DataError(f"{where}: expected numbers, found an array of {array.dtype}")
    values = array
    size = math.prod(shape)
    if values.shape == shape:
        return values[None], True
    if shape[:1] == (1,) and values.shape == shape[1:]:  # one grey image without its channel axis
        return values[None, None], True
    if values.ndim >= 1:
        rest = values.shape[1:]
        if rest == shape:
            return values, False
        if shape[:1] == (1,) and rest == shape[1:]:  # a batch of grey images (IDX: N x H x W)
            return values[:, None], False
        if rest == (size,):  # flattened rows
            return values.reshape(len(values), *shape), False
    hint = " (--resize applies to images only)" if resize else ""
    raise UsageError(
        f"{where}: array shaped {_shape_text(values.shape)} does not fit the model, which expects one sample "
        f"shaped {_shape_text(shape)} or a batch N x {_shape_text(shape)}{hint}"
    )


def _read_csv(path: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, list[int]]:
    size = math.prod(shape)
    # A row of ``size`` numbers needs no more characters than this; a longer line is refused before it is split,
    # so that neither a row of millions of values nor one huge field is ever materialised.
    longest = size * 40 + 4096
    rows, lines = [], []
    with open(path, newline="") as f:
        for number, line in enumerate(iter(lambda: f.readline(longest + 1), ""), start=1):
            if len(line) > longest:
                raise UsageError(f"{path}:{number}: expected {size} values per row (one sample shaped "
                                 f"{_shape_text(shape)}), found a row of more than {longest} characters")
            try:
                row = next(csv.reader([line]), [])
            except csv.Error as exc:
                raise DataError(f"{path}:{number}: not a CSV row: {exc}") from None
            cells = [c.strip() for c in row if c.strip()]
            if not cells:
                continue
            try:
                values = [float(c) for c in cells]
            except ValueError:
                if not rows and number == 1:
                    continue  # a header row
                raise DataError(f"{path}:{number}: expected numbers, found {','.join(cells)[:60]!r}") from None
            if len(values) != size:
                raise UsageError(f"{path}:{number}: expected {size} values per row (one sample shaped "
                                 f"{_shape_text(shape)}), found {len(values)}")
            rows.append(values)
            lines.append(number)
    if not rows:
        raise DataError(f"{path}: no rows of numbers found")
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), *shape), lines
