"""Export a model for inference, and prove that the file computes what the model does.

Each format is a plain function taking a model, an example input (one batch) and a path. The example is a tensor,
a tuple of tensors (a model with several inputs), a dict of name -> tensor (keyword inputs) or a tuple and a dict,
each with the batch dimension first; the model may return a tensor, nested tuples or lists of them, or a dict:


    to_state_dict(model, x, "model.pt")                  torch.load(weights_only=True) + load_state_dict
    to_safetensors(model, x, "model.safetensors")        safetensors.torch.load_file + load_state_dict
    to_torchscript(model, x, "model.ts")                 traced; scripted when tracing cannot capture the model
    to_exported_program(model, x, "model.pt2")           torch.export, dynamic batch dimension
    to_onnx(model, x, "model.onnx")                      torch.onnx (dynamo exporter), dynamic batch dimension

An export, in ``export_many``, the one place its order lives:

    model in eval mode on CPU (every submodule's mode restored afterwards)
    for each target: write the file to a temporary path beside it       writers.py
    load each temporary file back and run it, in a fresh process        parity.py
      for programs and ONNX, into a NaN-filled copy of the model for state dicts
    a file with every output within ``atol`` of the eager model's: its sidecar written, both renamed into place;
      any other: the temporary file removed, and what the target held before (file and sidecar) kept

Beside each file goes ``<file>.json``: the format, the inputs and outputs (``"inputs"``: name, per-sample shape
and dtype of each; ``"outputs"``: name, per-sample shape and dtype of each, in the order the file returns them;
``input_shape``, the first input's, for older readers), the data spec (what ``predict`` needs to read images and
arrays), the model's registry name (what a state dict needs to be rebuilt), which weights of a run it holds ("raw"
or "ema"), and the parity figure.
Loading a file back for eval and predict (``load_model``, ``detect_format``, ``read_sidecar``) is loading.py.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from etappe.checkpoint import fsio
from etappe.errors import EtappeError, UsageError
from etappe.export import parity, writers
from etappe.export.loading import (
    WEIGHTS,
    OnnxModule,
    ProgramModule,
    detect_format,
    load_model,
    read_sidecar,
    sidecar_path,
)
from etappe.export.parity import FRESH_PROCESS_FORMATS, PARITY_BATCH, parity_process
from etappe.export.writers import (
    FORMATS,
    ExportError,
    Inputs,
    Signature,
    ambiguous,
    as_inputs,
    flatten_outputs,
    format_from_suffix,
    input_names,
    require_onnx,
)
from etappe.state import eval_mode, unwrap

__all__ = [
    "FORMATS", "FRESH_PROCESS_FORMATS", "PARITY_BATCH", "SIDECAR_VERSION", "WEIGHTS", "ExportError", "Exported",
    "Inputs", "OnnxModule", "ProgramModule", "detect_format", "export", "export_all", "export_many", "export_path",
    "format_from_suffix", "load_model", "parity_process", "read_sidecar", "require_onnx", "sidecar_path",
    "to_exported_program", "to_onnx", "to_safetensors", "to_state_dict", "to_torchscript",
]

SIDECAR_VERSION = 1


@dataclass(frozen=True)
class Exported:
    """One exported file that passed its parity check."""

    path: Path
    format: str
    method: str  # how it was captured: state_dict, trace, script, torch.export, torch.onnx
    max_abs_diff: float
    atol: float
    samples: int  # inputs compared
    inputs: str  # where they came from
    loaded_in: str  # where the file was loaded back
    input_names: tuple[str, ...] = ()  # as the file names them, in the order it takes them
    output_names: tuple[str, ...] = ()  # in the order the file returns them (flattened)

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.path)

    @property
    def note(self) -> str:
        """What was written, said in words when the file's name does not say it (``model.pt``); else ''."""
        if not ambiguous(self.path):
            return ""
        if self.format == "state-dict":
            stem = self.path.name.split(".")[0] or "model"
            return (f"wrote a state dict (weights only) to {self.path.name}; a TorchScript file: use --format "
                    f"torchscript or {stem}.ts")
        return f"wrote {_WHAT[self.format]} to {self.path.name}, a name several formats use; it is read by its content"

    def summary(self) -> str:
        io = f"inputs {', '.join(self.input_names)} -> outputs {', '.join(self.output_names)}; " \
            if self.input_names else ""
        note = f"; {self.note}" if self.note else ""
        return (
            f"{self.format:<11} {self.path}  max abs diff {self.max_abs_diff:.2e} <= atol {self.atol:g} "
            f"on {self.samples} {self.inputs} ({io}{self.method}; loaded in {self.loaded_in}){note}"
        )


_WHAT = {"state-dict": "a state dict (weights only)", "safetensors": "safetensors weights",
         "torchscript": "a TorchScript archive", "export": "a torch.export program", "onnx": "an ONNX model"}
ExampleInput = Any  # a tensor, a tuple of tensors, a dict of name -> tensor, or a tuple and a dict (as_inputs)


# ---------------------------------------------------------------- the public functions


def to_state_dict(model: nn.Module, example_input: ExampleInput, path: str | Path, **kw: Any) -> Exported:
    """Save the state dict with ``torch.save``; plain ``torch.load(path, weights_only=True)`` reads it."""
    return export_many(model, example_input, {"state-dict": path}, **kw)[0]


def to_safetensors(model: nn.Module, example_input: ExampleInput, path: str | Path, **kw: Any) -> Exported:
    """Save the state dict as safetensors (tied tensors are stored once per name)."""
    return export_many(model, example_input, {"safetensors": path}, **kw)[0]


def to_torchscript(model: nn.Module, example_input: ExampleInput, path: str | Path, **kw: Any) -> Exported:
    """Trace the model in eval mode, or script it when tracing cannot capture it faithfully (a branch on tensor
    values); ``torch.jit.load`` reads the file without the class."""
    return export_many(model, example_input, {"torchscript": path}, **kw)[0]


def to_exported_program(model: nn.Module, example_input: ExampleInput, path: str | Path, **kw: Any) -> Exported:
    """``torch.export`` the model with a dynamic batch dimension and save it as ``.pt2``; ``torch.export.load``
    reads it without the class."""
    return export_many(model, example_input, {"export": path}, **kw)[0]


def to_onnx(model: nn.Module, example_input: ExampleInput, path: str | Path, **kw: Any) -> Exported:
    """Export to ONNX with the torch.export-based exporter and a dynamic batch dimension; one self-contained
    file. Needs onnx, onnxscript and onnxruntime (``pip install 'etappe[onnx]'``)."""
    return export_many(model, example_input, {"onnx": path}, **kw)[0]


def export(
    model: nn.Module, example_input: ExampleInput, path: str | Path, format: str | None = None, **kw: Any
) -> Exported:
    """Export in ``format`` (default: from the file name's suffix). Keywords as for ``export_many``."""
    return export_many(model, example_input, {format or format_from_suffix(path): path}, **kw)[0]


def export_all(
    model: nn.Module,
    example_input: ExampleInput,
    directory: str | Path,
    formats: Sequence[str] = tuple(FORMATS),
    stem: str = "model",
    **kw: Any,
) -> list[Exported]:
    """Export in every format in ``formats`` into ``directory`` (``model.pt``, ``model.onnx``, ...), with one
    fresh process for all parity checks. A format that fails does not stop the others; ExportError is raised at
    the end, naming the failures and holding the files that exported."""
    return export_many(model, example_input, {f: Path(directory) / (stem + FORMATS[f]) for f in formats}, **kw)


def export_many(
    model: nn.Module,
    example_input: ExampleInput,
    targets: Mapping[str, str | Path],
    *,
    inputs: ExampleInput | None = None,
    atol: float | None = None,
    spec: Any = None,
    model_name: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    weights: str | None = None,
) -> list[Exported]:
    """Export ``model`` to each ``{format: path}`` in ``targets``, then check every file's parity.

    ``example_input`` is one batch (with the batch dimension) of what the model takes: a tensor, a tuple of
    tensors, a dict of name -> tensor (keyword inputs) or a tuple and a dict; every format takes keyword inputs
    (TorchScript traces them by parameter name). The batch dimension is dynamic for every input, and the
    dynamic-batch formats get at least two rows. ``inputs`` is the batch compared in the parity check, given as
    the example is (default: ``PARITY_BATCH`` seeded random rows for every input, shaped like the example's).
    Every output is compared (tuples, nested ones and dicts flattened in one order), each within ``atol``: 1e-5
    for float32 outputs by default (1e-10 for float64, 1e-2 for 16-bit).
    ``spec`` (a DataSpec or its dict), ``model_name`` and ``model_kwargs`` are recorded in each file's sidecar
    for ``predict`` and for rebuilding a state dict's model, and ``weights`` ("raw", "ema": which weights of a run
    ``model`` holds) as the sidecar's ``weights``. A path gets its new file only once that file has
    passed; until then, and whenever it fails, the path and its sidecar keep what they held.
    """
    unknown = [f for f in targets if f not in FORMATS]
    if unknown:
        raise UsageError(f"unknown export format {unknown[0]!r}; choose one of: {', '.join(FORMATS)}")
    given = as_inputs(example_input)
    model = _on_cpu(unwrap(model))
    example = _at_least_two_rows(given.map(lambda t: t.detach().cpu()))
    check, inputs_note = parity.parity_inputs(example, inputs, seed)
    forbid = parity.class_modules(model)
    exported: list[Exported] = []
    failures: list[str] = []
    # Each target's temporary file is open in an atomic_path block of its own, so each is committed or discarded
    # alone; ``pending`` discards every one still open if anything (an error, Ctrl-C) ends the export early.
    with eval_mode(model), parity.checker(list(targets)) as process, contextlib.ExitStack() as pending:
        with torch.no_grad():
            out_names, expected, out_kind = flatten_outputs(check.call(model), "the model")
        signature = Signature(tuple(input_names(model, check)), tuple(out_names), out_kind)
        tolerance = atol if atol is not None else parity.default_atol(expected)
        written = []
        for fmt, path in targets.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            file = pending.enter_context(contextlib.ExitStack())
            tmp = file.enter_context(fsio.atomic_path(path))
            try:
                written.append((fmt, path, tmp, writers.write(fmt, model, example, tmp, signature), file))
            except ExportError as exc:
                _discard(file)
                failures.append(str(exc))
        names = {fmt: signature.file_input_names(fmt, check) for fmt in targets}
        results = parity.run_files(model, [(fmt, tmp) for fmt, _, tmp, _, _ in written], check, forbid, process,
                                   names)
        for fmt, path, tmp, method, file in written:
            diff, problem = parity.verdict(expected, results[tmp], tolerance, f"{len(check)} {inputs_note}",
                                           out_names)
            if problem:
                _discard(file)
                failures.append(f"format {fmt!r}: {path} {problem}; not written")
                continue
            done = Exported(path=path, format=fmt, method=method, max_abs_diff=diff, atol=tolerance,
                            samples=len(check), inputs=inputs_note, loaded_in=parity.where_loaded(fmt, forbid),
                            input_names=tuple(names[fmt]), output_names=signature.output_names)
            with fsio.atomic_path(done.sidecar) as side:
                side.write_bytes(_sidecar(done, example, expected, spec, model_name, model_kwargs, weights))
                file.close()  # the file into place, then (leaving this block) its sidecar
            exported.append(done)
    if failures:
        ok = f" (exported: {', '.join(e.format for e in exported)})" if exported else ""
        raise ExportError("; ".join(failures) + ok, exported)
    return exported


class _Discarded(Exception):
    pass


def _discard(file: contextlib.ExitStack) -> None:
    """Leave a target's atomic_path block by an error: it removes the temporary file, and the path keeps what it
    held."""
    with contextlib.suppress(_Discarded), file:
        raise _Discarded


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _sidecar(done: Exported, example: Inputs, expected: list[torch.Tensor], spec: Any, model_name: str | None,
             model_kwargs: Mapping | None, weights: str | None) -> bytes:
    spec_dict = spec.to_dict() if hasattr(spec, "to_dict") else (dict(spec) if spec else None)
    first = example.tensors[0]
    input_shape = list(first.shape[1:])
    if spec_dict is not None and list(spec_dict.get("input_shape", input_shape)) != input_shape:
        spec_dict = {**spec_dict, "input_shape": input_shape}
    meta = {
        "etappe_export": SIDECAR_VERSION,
        "format": done.format,
        "file": done.path.name,  # the final name, not the temporary one the check loaded
        "method": done.method,
        "input_shape": input_shape,  # the first input's, for readers older than "inputs"
        "input_dtype": _dtype(first),
        "inputs": [{"name": name, "shape": list(t.shape[1:]), "dtype": _dtype(t)}
                   for name, t in zip(done.input_names, example.tensors)],
        "outputs": [{"name": name, "shape": list(t.shape[1:]), "dtype": _dtype(t)}
                    for name, t in zip(done.output_names, expected)],
        "data_spec": spec_dict,
        "model": model_name,
        "model_kwargs": dict(model_kwargs or {}),
        "weights": weights,
        "parity": {
            "max_abs_diff": done.max_abs_diff,
            "atol": done.atol,
            "samples": done.samples,
            "inputs": done.inputs,
            "example_batch": len(example),
            "loaded_in": done.loaded_in,
        },
    }
    return (json.dumps(meta, indent=2) + "\n").encode()


def _on_cpu(model: nn.Module) -> nn.Module:
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == "cpu" for t in tensors):
        return model
    return copy.deepcopy(model).cpu()  # the user's model stays where it is


def _at_least_two_rows(example: Inputs) -> Inputs:
    # torch.export specializes a dimension of size 1; two rows keep the batch dimension dynamic.
    return example.map(lambda t: torch.cat([t, t])) if len(example) == 1 else example


# ---------------------------------------------------------------- from a run or checkpoint, for the CLI


def export_path(
    path: str | Path,
    formats: Sequence[str],
    *,
    out: str | Path | None = None,
    atol: float | None = None,
    input_shape: Sequence[int] | None = None,
    input_shapes: Sequence[Sequence[int]] | None = None,
    which: str = "best",
    model: str | None = None,
    data_dir: str | None = None,
    samples: int = 64,
    trusted: bool = False,
    weights: str = "raw",
    strict: bool = True,
) -> list[Exported]:
    """Export a run, checkpoint or weights file: the example and parity inputs are the first ``samples``
    test-set inputs of the data set the run records (seeded random ones if it cannot be loaded or
    ``input_shape`` differs). ``input_shapes``, one sample's shape per input, is for a model with several inputs
    (a ``module:factory`` is called with the first as ``input_shape=``; the inputs are then seeded random ones); a
    sidecar that records several inputs gives them too. ``out`` is the file for one format, a folder for several
    (default: ``RUN/export/model.<suffix>``). ``model``, ``trusted`` and ``weights`` ("raw", "ema") as for
    ``load_model``; the sidecars record which weights they hold. ``strict=False``: the weights that fit by name
    and shape, the rest of the model as initialised (said in a warning)."""
    path = Path(path)
    if path.is_file():
        fmt = detect_format(path)
        if fmt in _NOT_EXPORTABLE:
            raise UsageError(f"{path}: {_NOT_EXPORTABLE[fmt]}, which export does not take: it exports a run, a "
                             "checkpoint or a weights file (a state dict or .safetensors); run this one with etappe "
                             "predict, or export again from the run it came from")
    shapes = [tuple(s) for s in input_shapes or ([input_shape] if input_shape else [])]
    module, config = load_model(path, which=which, model=model, input_shape=shapes[0] if shapes else None,
                                trusted=trusted, weights=weights, strict=strict)
    recorded = _recorded_inputs(config)
    if not shapes and len(recorded) > 1:
        shapes = [shape for shape, _ in recorded]
    spec = dict(config.get("data_spec") or {})
    shape = tuple(shapes[0] if shapes else spec.get("input_shape") or config.get("input_shape") or ())
    if not shape and len(shapes) <= 1:
        raise UsageError(f"{path} does not record its input shape; pass --input-shape C,H,W")
    if spec:
        spec["input_shape"] = list(shape)
    if len(shapes) > 1:  # a data set holds one input per sample: the parity inputs are seeded random ones
        dtypes = [dtype for _, dtype in recorded] if [s for s, _ in recorded] == shapes else []
        example: Any = tuple(torch.zeros((2, *s), dtype=dtypes[i] if dtypes else torch.float32)
                             for i, s in enumerate(shapes))
        inputs = None
    else:
        inputs = _real_inputs(config, shape, samples, data_dir)
        example = inputs[:2] if inputs is not None else torch.zeros((2, *shape))
    kw = dict(inputs=inputs, atol=atol, spec=spec or None, model_name=config.get("model"),
              model_kwargs=config.get("model_kwargs"), seed=int(config.get("seed", 0) or 0),
              weights=config.get("weights") if config.get("weights") in WEIGHTS else None)  # a sidecar's: a record
    if len(formats) == 1 and out is not None and not Path(out).is_dir():
        return export_many(module, example, {formats[0]: out}, **kw)
    directory = Path(out) if out is not None else _default_export_dir(path)
    if out is None:
        fsio.refuse_link(directory, "write into")  # the folder etappe makes inside the run
    stem = "model" if path.is_dir() else path.name.split(".")[0]
    return export_all(module, example, directory, formats, stem=stem, **kw)


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


def _recorded_inputs(config: Mapping) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The inputs a sidecar records (shape, dtype), or [] when it records none that make sense."""
    recorded = config.get("inputs")
    if not isinstance(recorded, list):
        return []
    found = []
    for item in recorded:
        shape = item.get("shape") if isinstance(item, Mapping) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                  for d in shape):
            return []
        found.append((tuple(shape), _DTYPES.get(item.get("dtype"), torch.float32)))
    return found


_NOT_EXPORTABLE = {"onnx": "an ONNX model", "export": "a torch.export program (.pt2)",
                   "torchscript": "a TorchScript archive"}


def _real_inputs(config: dict, shape: tuple[int, ...], samples: int, data_dir: str | None) -> torch.Tensor | None:
    name = config.get("data") or (config.get("data_spec") or {}).get("name")
    if not name:
        return None
    from etappe.data import load_dataset

    try:
        data = load_dataset(name, data_dir=data_dir or config.get("data_dir"), seed=int(config.get("seed", 0) or 0),
                            allow_download=False)
    except EtappeError:
        return None
    x, _ = data.test.batch(torch.arange(min(samples, len(data.test))))
    return x if tuple(x.shape[1:]) == tuple(shape) else None


def _default_export_dir(path: Path) -> Path:
    if path.is_file():
        return path.parent / "export"
    if (path / "checkpoints").is_dir() or (path / "config.json").is_file():
        return path / "export"
    return (path.parent.parent if path.parent.name == "checkpoints" else path.parent) / "export"
