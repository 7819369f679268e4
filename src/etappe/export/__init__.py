"""Export a model for inference, and prove that the file computes what the model does.

Each format is a plain function taking a model, an example input (one batch) and a path:

    to_state_dict(model, x, "model.pt")                  torch.load(weights_only=True) + load_state_dict
    to_safetensors(model, x, "model.safetensors")        safetensors.torch.load_file + load_state_dict
    to_torchscript(model, x, "model.torchscript.pt")     traced; scripted when tracing cannot capture the model
    to_exported_program(model, x, "model.pt2")           torch.export, dynamic batch dimension
    to_onnx(model, x, "model.onnx")                      torch.onnx (dynamo exporter), dynamic batch dimension

An export, in ``export_many``, the one place its order lives:

    model in eval mode on CPU (every submodule's mode restored afterwards)
    for each target: write the file to a temporary path beside it       writers.py
    load each temporary file back and run it, in a fresh process        parity.py
      for programs and ONNX, into a NaN-filled copy of the model for state dicts
    a file within ``atol`` of the eager model: its sidecar written, both renamed into place;
      any other: the temporary file removed, and what the target held before (file and sidecar) kept

Beside each file goes ``<file>.json``: the format, the input shape and data spec (what ``predict`` needs to read
images and arrays), the model's registry name (what a state dict needs to be rebuilt), which weights of a run it
holds ("raw" or "ema"), and the parity figure.
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
from etappe.export.writers import FORMATS, ExportError, format_from_suffix, require_onnx
from etappe.state import eval_mode, unwrap

__all__ = [
    "FORMATS", "FRESH_PROCESS_FORMATS", "PARITY_BATCH", "SIDECAR_VERSION", "WEIGHTS", "ExportError", "Exported",
    "OnnxModule", "ProgramModule", "detect_format", "export", "export_all", "export_many", "export_path",
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

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.path)

    def summary(self) -> str:
        return (
            f"{self.format:<11} {self.path}  max abs diff {self.max_abs_diff:.2e} <= atol {self.atol:g} "
            f"on {self.samples} {self.inputs} ({self.method}; loaded in {self.loaded_in})"
        )


# ---------------------------------------------------------------- the public functions


def to_state_dict(model: nn.Module, example_input: torch.Tensor, path: str | Path, **kw: Any) -> Exported:
    """Save the state dict with ``torch.save``; plain ``torch.load(path, weights_only=True)`` reads it."""
    return export_many(model, example_input, {"state-dict": path}, **kw)[0]


def to_safetensors(model: nn.Module, example_input: torch.Tensor, path: str | Path, **kw: Any) -> Exported:
    """Save the state dict as safetensors (tied tensors are stored once per name)."""
    return export_many(model, example_input, {"safetensors": path}, **kw)[0]


def to_torchscript(model: nn.Module, example_input: torch.Tensor, path: str | Path, **kw: Any) -> Exported:
    """Trace the model in eval mode, or script it when tracing cannot capture it faithfully (a branch on tensor
    values); ``torch.jit.load`` reads the file without the class."""
    return export_many(model, example_input, {"torchscript": path}, **kw)[0]


def to_exported_program(model: nn.Module, example_input: torch.Tensor, path: str | Path, **kw: Any) -> Exported:
    """``torch.export`` the model with a dynamic batch dimension and save it as ``.pt2``; ``torch.export.load``
    reads it without the class."""
    return export_many(model, example_input, {"export": path}, **kw)[0]


def to_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path, **kw: Any) -> Exported:
    """Export to ONNX with the torch.export-based exporter and a dynamic batch dimension; one self-contained
    file. Needs onnx, onnxscript and onnxruntime (``pip install 'etappe[onnx]'``)."""
    return export_many(model, example_input, {"onnx": path}, **kw)[0]


def export(
    model: nn.Module, example_input: torch.Tensor, path: str | Path, format: str | None = None, **kw: Any
) -> Exported:
    """Export in ``format`` (default: from the file name's suffix). Keywords as for ``export_many``."""
    return export_many(model, example_input, {format or format_from_suffix(path): path}, **kw)[0]


def export_all(
    model: nn.Module,
    example_input: torch.Tensor,
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
    example_input: torch.Tensor,
    targets: Mapping[str, str | Path],
    *,
    inputs: torch.Tensor | None = None,
    atol: float | None = None,
    spec: Any = None,
    model_name: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    weights: str | None = None,
) -> list[Exported]:
    """Export ``model`` to each ``{format: path}`` in ``targets``, then check every file's parity.

    ``example_input`` is one batch (with the batch dimension); the dynamic-batch formats get at least two rows.
    ``inputs`` is the batch compared in the parity check (default: ``PARITY_BATCH`` seeded random rows shaped
    like the example). ``atol`` defaults to 1e-5 for float32 outputs (1e-10 for float64, 1e-2 for 16-bit).
    ``spec`` (a DataSpec or its dict), ``model_name`` and ``model_kwargs`` are recorded in each file's sidecar
    for ``predict`` and for rebuilding a state dict's model, and ``weights`` ("raw", "ema": which weights of a run
    ``model`` holds) as the sidecar's ``weights``. A path gets its new file only once that file has
    passed; until then, and whenever it fails, the path and its sidecar keep what they held.
    """
    unknown = [f for f in targets if f not in FORMATS]
    if unknown:
        raise UsageError(f"unknown export format {unknown[0]!r}; choose one of: {', '.join(FORMATS)}")
    if not torch.is_tensor(example_input):
        raise UsageError(f"the example input must be a tensor (one batch), got {type(example_input).__name__}")
    model = _on_cpu(unwrap(model))
    example = _at_least_two_rows(example_input.detach().cpu())
    check, inputs_note = parity.parity_inputs(example, inputs, seed)
    forbid = parity.class_modules(model)
    exported: list[Exported] = []
    failures: list[str] = []
    # Each target's temporary file is open in an atomic_path block of its own, so each is committed or discarded
    # alone; ``pending`` discards every one still open if anything (an error, Ctrl-C) ends the export early.
    with eval_mode(model), parity.checker(list(targets)) as process, contextlib.ExitStack() as pending:
        with torch.no_grad():
            expected = parity.outputs(model(check), "the model")
        tolerance = atol if atol is not None else parity.default_atol(expected)
        written = []
        for fmt, path in targets.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            file = pending.enter_context(contextlib.ExitStack())
            tmp = file.enter_context(fsio.atomic_path(path))
            try:
                written.append((fmt, path, tmp, writers.write(fmt, model, example, tmp), file))
            except ExportError as exc:
                _discard(file)
                failures.append(str(exc))
        results = parity.run_files(model, [(fmt, tmp) for fmt, _, tmp, _, _ in written], check, forbid, process)
        for fmt, path, tmp, method, file in written:
            diff, problem = parity.verdict(expected, results[tmp], tolerance, f"{len(check)} {inputs_note}")
            if problem:
                _discard(file)
                failures.append(f"format {fmt!r}: {path} {problem}; not written")
                continue
            done = Exported(path=path, format=fmt, method=method, max_abs_diff=diff, atol=tolerance,
                            samples=len(check), inputs=inputs_note, loaded_in=parity.where_loaded(fmt, forbid))
            with fsio.atomic_path(done.sidecar) as side:
                side.write_bytes(_sidecar(done, example, spec, model_name, model_kwargs, weights))
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


def _sidecar(done: Exported, example: torch.Tensor, spec: Any, model_name: str | None, model_kwargs: Mapping | None,
             weights: str | None) -> bytes:
    spec_dict = spec.to_dict() if hasattr(spec, "to_dict") else (dict(spec) if spec else None)
    input_shape = list(example.shape[1:])
    if spec_dict is not None and list(spec_dict.get("input_shape", input_shape)) != input_shape:
        spec_dict = {**spec_dict, "input_shape": input_shape}
    meta = {
        "etappe_export": SIDECAR_VERSION,
        "format": done.format,
        "file": done.path.name,  # the final name, not the temporary one the check loaded
        "method": done.method,
        "input_shape": input_shape,
        "input_dtype": str(example.dtype).removeprefix("torch."),
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


def _at_least_two_rows(example: torch.Tensor) -> torch.Tensor:
    # torch.export specializes a dimension of size 1; two rows keep the batch dimension dynamic.
    if example.ndim == 0:
        raise UsageError("the example input must have a batch dimension, got a scalar")
    return torch.cat([example, example]) if len(example) == 1 else example


# ---------------------------------------------------------------- from a run or checkpoint, for the CLI


def export_path(
    path: str | Path,
    formats: Sequence[str],
    *,
    out: str | Path | None = None,
    atol: float | None = None,
    input_shape: Sequence[int] | None = None,
    which: str = "best",
    model: str | None = None,
    data_dir: str | None = None,
    samples: int = 64,
    trusted: bool = False,
    weights: str = "raw",
) -> list[Exported]:
    """Export a run, checkpoint or weights file: the example and parity inputs are the first ``samples``
    test-set inputs of the data set the run records (seeded random ones if it cannot be loaded or
    ``input_shape`` differs). ``out`` is the file for one format, a folder for several (default:
    ``RUN/export/model.<suffix>``). ``model``, ``trusted`` and ``weights`` ("raw", "ema") as for ``load_model``;
    the sidecars record which weights they hold."""
    path = Path(path)
    if path.is_file():
        fmt = detect_format(path)
        if fmt in _NOT_EXPORTABLE:
            raise UsageError(f"{path}: {_NOT_EXPORTABLE[fmt]}, which export does not take: it exports a run, a "
                             "checkpoint or a weights file (a state dict or .safetensors); run this one with etappe "
                             "predict, or export again from the run it came from")
    module, config = load_model(path, which=which, model=model, input_shape=input_shape, trusted=trusted,
                                weights=weights)
    spec = dict(config.get("data_spec") or {})
    shape = tuple(input_shape or spec.get("input_shape") or config.get("input_shape") or ())
    if not shape:
        raise UsageError(f"{path} does not record its input shape; pass --input-shape C,H,W")
    if spec:
        spec["input_shape"] = list(shape)
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
