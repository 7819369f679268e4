"""Export a model for inference, and prove that the file computes what the model does.

Each format is a plain function taking a model, an example input (one batch) and a path:

    to_state_dict(model, x, "model.pt")                  torch.load(weights_only=True) + load_state_dict
    to_safetensors(model, x, "model.safetensors")        safetensors.torch.load_file + load_state_dict
    to_torchscript(model, x, "model.torchscript.pt")     traced; scripted when tracing cannot capture the model
    to_exported_program(model, x, "model.pt2")           torch.export, dynamic batch dimension
    to_onnx(model, x, "model.onnx")                      torch.onnx (dynamo exporter), dynamic batch dimension

Every export is made from eval mode on CPU (the model's modes are restored afterwards) and is followed by a
parity check: the file is loaded back, run on a batch of inputs (real ones when given, else seeded random ones,
of a batch size other than the example's) and compared with the eager model. TorchScript, torch.export and ONNX
files are loaded in a fresh Python process that cannot import etappe or the modules defining the model's
classes; ONNX files run there in onnxruntime. State-dict files need the class, so they are loaded into a copy
of the model whose every tensor was first set to NaN: a tensor missing from the file shows up. A difference
above ``atol`` removes the file and raises ExportError.

Beside each file goes ``<file>.json``: the format, the input shape and data spec (what ``predict`` needs to read
images and arrays), the model's registry name (what a state dict needs to be rebuilt), and the parity figure.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import io
import json
import logging
import math
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from etappe.checkpoint import fsio
from etappe.checkpoint.errors import TrustError
from etappe.errors import EtappeError, UsageError
from etappe.state import unwrap

FORMATS: dict[str, str] = {
    "state-dict": ".pt",
    "safetensors": ".safetensors",
    "torchscript": ".torchscript.pt",
    "export": ".pt2",
    "onnx": ".onnx",
}
FRESH_PROCESS_FORMATS = ("torchscript", "export", "onnx")
SIDECAR_VERSION = 1
PARITY_BATCH = 16
_WORKER = Path(__file__).with_name("_parity_worker.py")


class ExportError(EtappeError):
    """An export that failed: the format cannot capture the model, or the file does not compute what the model
    does. ``exported`` holds the files of the same call that did export and pass their parity check."""

    def __init__(self, message: str, exported: Sequence["Exported"] = ()) -> None:
        super().__init__(message)
        self.exported = list(exported)


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


def sidecar_path(path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``: the metadata and parity record beside an exported file."""
    path = Path(path)
    return path.with_name(path.name + ".json")


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


def format_from_suffix(path: str | Path) -> str:
    name = Path(path).name
    for fmt in ("torchscript", "safetensors", "export", "onnx", "state-dict"):  # longest suffix first
        if name.endswith(FORMATS[fmt]):
            return fmt
    if name.endswith((".pth", ".bin")):
        return "state-dict"
    raise UsageError(
        f"cannot tell the format from the file name {name!r}; name it "
        + ", ".join(f"*{s} ({f})" for f, s in FORMATS.items())
        + ", or give the format"
    )


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
) -> list[Exported]:
    """Export ``model`` to each ``{format: path}`` in ``targets``, then check every file's parity.

    ``example_input`` is one batch (with the batch dimension); the dynamic-batch formats get at least two rows.
    ``inputs`` is the batch compared in the parity check (default: ``PARITY_BATCH`` seeded random rows shaped
    like the example). ``atol`` defaults to 1e-5 for float32 outputs (1e-10 for float64, 1e-2 for 16-bit).
    ``spec`` (a DataSpec or its dict), ``model_name`` and ``model_kwargs`` are recorded in each file's sidecar
    for ``predict`` and for rebuilding a state dict's model.
    """
    unknown = [f for f in targets if f not in FORMATS]
    if unknown:
        raise UsageError(f"unknown export format {unknown[0]!r}; choose one of: {', '.join(FORMATS)}")
    if not torch.is_tensor(example_input):
        raise UsageError(f"the example input must be a tensor (one batch), got {type(example_input).__name__}")
    model = _on_cpu(unwrap(model))
    example = _at_least_two_rows(example_input.detach().cpu())
    check, inputs_note = _parity_inputs(example, inputs, seed)
    forbid = _class_modules(model)
    fresh_formats = [f for f in targets if f in FRESH_PROCESS_FORMATS]
    exported: list[Exported] = []
    failures: list[str] = []
    shared = _SHARED_PROCESS.get()
    with _eval_mode(model):
        checker = (shared or _FreshProcess(fresh_formats)) if fresh_formats else None
        try:
            with torch.no_grad():
                expected = _outputs(model(check), "the model")
            tolerance = atol if atol is not None else _default_atol(expected)
            written = []
            for fmt, path in targets.items():
                path = Path(path)
                path.parent.mkdir(parents=True, exist_ok=True)
                _remove(path)  # a stale file and sidecar from an earlier export must not survive a failure
                try:
                    written.append((fmt, path, _WRITERS[fmt](model, example, path)))
                except ExportError as exc:
                    _remove(path)
                    failures.append(str(exc))
                except BaseException:
                    _remove(path)  # no half-written file left behind
                    raise
            fresh = [(fmt, path) for fmt, path, _ in written if fmt in FRESH_PROCESS_FORMATS]
            results = checker.check(fresh, check, forbid) if fresh and checker else {}
        finally:
            if checker and checker is not shared:
                checker.close()
        for fmt, path, _ in written:
            if fmt not in FRESH_PROCESS_FORMATS:
                results[path] = _reload_state(model, fmt, path, check)
        for fmt, path, method in written:
            got = results[path]
            if isinstance(got, str):
                _remove(path)
                failures.append(f"format {fmt!r}: {path} was written but does not load back ({got}); file removed")
                continue
            diff = _max_abs_diff(expected, got)
            if not diff <= tolerance:
                _remove(path)
                failures.append(
                    f"format {fmt!r}: {path} does not compute what the model does: max abs diff {diff:.3g} > atol "
                    f"{tolerance:g} on {len(check)} {inputs_note}; file removed"
                )
                continue
            done = Exported(
                path=path,
                format=fmt,
                method=method,
                max_abs_diff=diff,
                atol=tolerance,
                samples=len(check),
                inputs=inputs_note,
                loaded_in=(f"a fresh process without {', '.join(forbid)}" if fmt in FRESH_PROCESS_FORMATS
                           else "a copy of the model with every tensor set to NaN first"),
            )
            _write_sidecar(done, example, spec, model_name, model_kwargs)
            exported.append(done)
    if failures:
        ok = f" (exported: {', '.join(e.format for e in exported)})" if exported else ""
        raise ExportError("; ".join(failures) + ok, exported)
    return exported


# ---------------------------------------------------------------- writers


def _write_state_dict(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    torch.save(model.state_dict(), path)
    return "state_dict"


def _write_safetensors(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    from safetensors.torch import save_file

    # A copy per name: safetensors refuses tensors that share memory (tied weights), and load_file then
    # returns every name load_state_dict expects.
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    save_file(state, str(path), metadata={"format": "pt"})
    return "state_dict"


def _capture_torchscript(model: nn.Module, example: torch.Tensor) -> tuple[Any, str]:
    with _quiet() as caught:
        try:
            module = torch.jit.trace(model, example, check_trace=False)
            problem = next((_warning_text(w) for w in caught if issubclass(w.category, torch.jit.TracerWarning)), None)
        except Exception as exc:  # anything tracing cannot follow; scripting may still capture it
            module, problem = None, _first_line(exc)
        if problem is None:
            return module, "trace"
        try:
            return torch.jit.script(model), "script"
        except Exception as exc:
            raise ExportError(
                f"format 'torchscript' cannot capture this model: tracing would not be faithful ({problem}) "
                f"and scripting fails ({_first_line(exc)})"
            ) from None


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    try:
        module, method = _capture_torchscript(model, example)
    except ExportError as exc:
        raise ExportError(f"{exc}; {_what_works(model, example, 'torchscript')}") from None
    module.save(str(path))
    return method


def _capture_program(model: nn.Module, example: torch.Tensor) -> Any:
    with _quiet():
        return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))


def _write_program(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    try:
        program = _capture_program(model, example)
    except Exception as exc:
        raise _cannot("export", exc, model, example) from None
    torch.export.save(program, str(path))
    return "torch.export"


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    require_onnx("format 'onnx'")
    import torch.onnx  # noqa: F401  (imported before _quiet so its loggers exist and are silenced)

    try:
        with _quiet():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                input_names=["input"],
                external_data=False,
                verbose=False,
            )
    except Exception as exc:
        raise _cannot("onnx", exc, model, example) from None
    return "torch.onnx"


_WRITERS = {
    "state-dict": _write_state_dict,
    "safetensors": _write_safetensors,
    "torchscript": _write_torchscript,
    "export": _write_program,
    "onnx": _write_onnx,
}


def require_onnx(what: str) -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"{what} needs {', '.join(missing)}, which is not installed: pip install 'etappe[onnx]'")


# ---------------------------------------------------------------- when a format cannot capture the model


def _cannot(fmt: str, exc: BaseException, model: nn.Module, example: torch.Tensor) -> ExportError:
    return ExportError(f"format {fmt!r} cannot capture this model: {_reason(exc)}; {_what_works(model, example, fmt)}")


def _reason(exc: BaseException) -> str:
    chain = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = _strip_ansi("\n".join(str(e) for e in chain))
    if any("DataDependent" in type(e).__name__ for e in chain) or "data-dependent" in text.lower():
        m = re.search(r'File "([^"]+)", line (\d+), in [^\n]+\n\s*([^\n]+)', text)
        where = f" at {Path(m[1]).name}:{m[2]} `{m[3].strip()}`" if m else ""
        return f"data-dependent control flow{where} (a Python branch on tensor values)"
    m = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    if m:
        return f"operator {m[1]} has no ONNX translation"
    root = chain[-1]
    return f"{type(root).__name__}: {_first_line(root)}"


def _what_works(model: nn.Module, example: torch.Tensor, failed: str) -> str:
    """Try the other graph captures in memory, so the advice names formats that do work for this model."""
    works = []
    if failed != "export":
        try:
            _capture_program(model, example)
            works.append("export")
        except Exception:
            pass
    if failed != "torchscript":
        try:
            works.append(f"torchscript ({_capture_torchscript(model, example)[1]})")
        except Exception:
            pass
    return f"formats that capture it: {', '.join(works + ['state-dict', 'safetensors'])}"


# ---------------------------------------------------------------- parity


def _parity_inputs(example: torch.Tensor, inputs: torch.Tensor | None, seed: int) -> tuple[torch.Tensor, str]:
    if inputs is not None:
        inputs = inputs.detach().cpu()
        if tuple(inputs.shape[1:]) != tuple(example.shape[1:]):
            raise UsageError(
                f"parity inputs shaped {tuple(inputs.shape[1:])} (one sample) do not match the example's "
                f"{tuple(example.shape[1:])}"
            )
        return inputs, "given inputs"
    g = torch.Generator().manual_seed(seed)
    shape = (PARITY_BATCH if len(example) != PARITY_BATCH else PARITY_BATCH + 1, *example.shape[1:])
    if example.is_floating_point():
        return torch.randn(shape, generator=g, dtype=example.dtype), f"seeded random inputs (seed {seed})"
    low, high = int(example.min()), int(example.max()) + 1
    return torch.randint(low, high, shape, generator=g, dtype=example.dtype), f"seeded random inputs (seed {seed})"


class _FreshProcess:
    """The parity check's fresh Python process. It starts before the files are written, so its imports (seconds
    for torch and torch.export's loader) overlap the export work; ``check`` then hands it files to load. It
    never imports etappe, and each check forbids the modules defining that model's classes."""

    MARK = "@@etappe-parity "

    def __init__(self, formats: Sequence[str]) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="etappe-parity-")
        self.tmpdir = Path(self.tmp.name)
        self.stderr = open(self.tmpdir / "stderr.txt", "w+")  # a file, not a pipe: nobody reads it meanwhile
        self.proc = subprocess.Popen(
            [sys.executable, str(_WORKER), json.dumps(["etappe"]), ",".join(formats)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
        )
        self.checks = 0
        self.lock = threading.Lock()

    def check(
        self, targets: list[tuple[str, Path]], inputs: torch.Tensor, forbid: list[str]
    ) -> dict[Path, list[np.ndarray] | str]:
        with self.lock:
            self.checks += 1
            folder = self.tmpdir / f"check{self.checks}"
            folder.mkdir()
            np.save(folder / "inputs.npy", inputs.numpy())
            jobs = [
                {"format": fmt, "file": str(path.resolve()), "inputs": str(folder / "inputs.npy"),
                 "outputs": str(folder / f"out{i}.npz")}
                for i, (fmt, path) in enumerate(targets)
            ]
            (folder / "jobs.json").write_text(json.dumps({"forbid": forbid, "jobs": jobs}))
            report = None
            try:
                self.proc.stdin.write(str(folder / "jobs.json") + "\n")
                self.proc.stdin.flush()
                for line in self.proc.stdout:
                    if line.startswith(self.MARK):
                        report = json.loads(line[len(self.MARK):])
                        break
            except OSError:
                pass
            if report is None:
                self.proc.kill()
                self.proc.wait()
                self.stderr.seek(0)
                lines = [line for line in self.stderr.read().strip().splitlines() if line.strip()]
                raise ExportError(f"the parity check process failed (exit code {self.proc.returncode}): "
                                  f"{lines[-1] if lines else 'no output'}")
            out: dict[Path, list[np.ndarray] | str] = {}
            for (fmt, path), job, result in zip(targets, jobs, report["results"]):
                if result["ok"]:
                    with np.load(job["outputs"]) as z:
                        out[path] = [z[f"arr_{i}"] for i in range(len(z.files))]
                else:
                    out[path] = f"in a fresh process: {result['error']}"
            shutil.rmtree(folder, ignore_errors=True)
            return out

    def close(self) -> None:
        if self.proc.poll() is None:
            if self.checks:
                self.proc.stdin.close()  # end of input: the process exits
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            else:
                self.proc.kill()  # never handed any files (every export failed): no need to wait for its imports
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.stderr):
            if stream and not stream.closed:
                stream.close()
        self.tmp.cleanup()


_SHARED_PROCESS: contextvars.ContextVar[_FreshProcess | None] = contextvars.ContextVar("parity_process", default=None)


@contextlib.contextmanager
def parity_process() -> Iterator[None]:
    """Check the exports made inside the block in one fresh process, started here, instead of one process per
    export call: it saves seconds per model (torch's imports) when exporting many. The process still never
    imports etappe, nor, during each check, the modules defining that model's classes."""
    process = _FreshProcess(FRESH_PROCESS_FORMATS)
    token = _SHARED_PROCESS.set(process)
    try:
        yield
    finally:
        _SHARED_PROCESS.reset(token)
        process.close()


def _reload_state(model: nn.Module, fmt: str, path: Path, inputs: torch.Tensor) -> list[np.ndarray] | str:
    """Load the file into a copy of the model whose tensors are all NaN (or -1) first, and run it."""
    try:
        fresh = copy.deepcopy(model)
        with torch.no_grad():
            for t in fresh.state_dict().values():
                if torch.is_tensor(t):
                    t.fill_(math.nan if t.is_floating_point() or t.is_complex() else -1)
        if fmt == "safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, weights_only=True, map_location="cpu")
        fresh.load_state_dict(state)
        fresh.eval()
        with torch.no_grad():
            return [t.numpy() for t in _outputs(fresh(inputs), "the reloaded model")]
    except Exception as exc:
        return f"{type(exc).__name__}: {_first_line(exc)}"


def _outputs(out: Any, who: str) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out.detach()]
    if isinstance(out, (tuple, list)) and out and all(torch.is_tensor(o) for o in out):
        return [o.detach() for o in out]
    raise UsageError(f"{who} returns {type(out).__name__}; export needs a tensor or a tuple of tensors")


def _max_abs_diff(expected: list[torch.Tensor], got: list[np.ndarray]) -> float:
    if len(expected) != len(got):
        return math.inf
    worst = 0.0
    for e, g in zip(expected, got):
        e = e.numpy()
        if e.shape != g.shape:
            return math.inf
        if e.size:
            d = np.abs(e.astype(np.float64) - g.astype(np.float64))
            worst = max(worst, float(np.max(np.where(np.isnan(e) & np.isnan(g), 0.0, d))))
    return worst if not math.isnan(worst) else math.inf


def _default_atol(expected: list[torch.Tensor]) -> float:
    tolerances = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
    return max((tolerances.get(t.dtype, 0.0) for t in expected), default=1e-5)


def _class_modules(model: nn.Module) -> list[str]:
    """etappe and the modules defining the model's own (not torch's) classes: what the fresh process must not
    be able to import."""
    names = {type(m).__module__ for m in model.modules()}
    return sorted({"etappe"} | {n for n in names if n.split(".")[0] not in ("torch", "__main__", "builtins")})


# ---------------------------------------------------------------- sidecar


def _write_sidecar(
    done: Exported, example: torch.Tensor, spec: Any, model_name: str | None, model_kwargs: Mapping | None
) -> None:
    spec_dict = spec.to_dict() if hasattr(spec, "to_dict") else (dict(spec) if spec else None)
    input_shape = list(example.shape[1:])
    if spec_dict is not None and list(spec_dict.get("input_shape", input_shape)) != input_shape:
        spec_dict = {**spec_dict, "input_shape": input_shape}
    meta = {
        "etappe_export": SIDECAR_VERSION,
        "format": done.format,
        "file": done.path.name,
        "method": done.method,
        "input_shape": input_shape,
        "input_dtype": str(example.dtype).removeprefix("torch."),
        "data_spec": spec_dict,
        "model": model_name,
        "model_kwargs": dict(model_kwargs or {}),
        "parity": {
            "max_abs_diff": done.max_abs_diff,
            "atol": done.atol,
            "samples": done.samples,
            "inputs": done.inputs,
            "example_batch": len(example),
            "loaded_in": done.loaded_in,
        },
    }
    fsio.atomic_write_bytes(done.sidecar, (json.dumps(meta, indent=2) + "\n").encode())


def read_sidecar(path: str | Path) -> dict | None:
    """The sidecar of an exported file, or None when there is none."""
    side = sidecar_path(path)
    return fsio.read_json(side.parent, side.name, "an export sidecar (a JSON object)", "delete it or export again")


# ---------------------------------------------------------------- loading models back


class OnnxModule(nn.Module):
    """An ONNX file run by onnxruntime behind the ``nn.Module`` call: tensors in, tensors out, CPU only."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        require_onnx(f"reading {path}")
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        outs = [torch.from_numpy(o) for o in self.session.run(None, {self.input_name: x.detach().cpu().numpy()})]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def input_shape(self) -> tuple[int, ...] | None:
        dims = self.session.get_inputs()[0].shape[1:]
        return tuple(dims) if all(isinstance(d, int) for d in dims) else None


class ProgramModule(nn.Module):
    """A loaded ``torch.export`` program behind a module that ``eval()`` can be called on (the program's own
    module refuses it; it is fixed in the mode it was exported from: eval)."""

    def __init__(self, program: Any) -> None:
        super().__init__()
        object.__setattr__(self, "_run", program.module())  # not a submodule: eval() must not reach it

    def forward(self, x: torch.Tensor) -> Any:
        return self._run(x)


def load_model(
    path: str | Path,
    *,
    which: str = "best",
    model: str | None = None,
    input_shape: Sequence[int] | None = None,
    num_outputs: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    trusted: bool = False,
) -> tuple[nn.Module, dict]:
    """Load a model for inference, in eval mode, from a run folder (its ``which`` checkpoint: best or latest),
    a checkpoint folder, a state dict (torch.save or safetensors), a TorchScript file, a ``.pt2`` or an ONNX file
    (run by onnxruntime). Returns the model and its config: the run's saved config, or the export sidecar;
    ``config["data_spec"]`` describes the inputs when known.

    What a file is, is read from its content (``detect_format``), never from its name or its sidecar. TorchScript
    and ``.pt2`` files are programs that run code from the file when loaded: they load only with ``trusted=True``
    (CLI: ``--trust``). A state dict is rebuilt from its sidecar or the run's ``config.json`` beside it, or from a
    checkpoint's config; a model named there must be one of etappe's built-in models, unless ``trusted`` or the
    same ``module:factory`` is given as ``model``. ``model`` (a registry name or module:factory), ``input_shape``
    and ``num_outputs`` supply or override what those record.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist; expected a run folder, a checkpoint folder or a model file")
    overrides = {"model": model, "input_shape": input_shape, "num_outputs": num_outputs, "model_kwargs": model_kwargs}
    if path.is_dir():
        module, config = _load_folder(path, which, overrides, trusted)
    else:
        module, config = _load_file(path, overrides, trusted)
    module.eval()
    return module, config


def _load_folder(path: Path, which: str, overrides: dict, trusted: bool) -> tuple[nn.Module, dict]:
    if which not in ("best", "latest"):
        raise UsageError(f"which checkpoint: expected 'best' or 'latest', got {which!r}")
    if (path / "checkpoints").is_dir() or (path / "config.json").is_file():  # a run folder
        from etappe.checkpoint import CheckpointStore

        saved = _read_json(path / "config.json") or {}
        monitor = saved.get("monitor")
        monitor = monitor if isinstance(monitor, str) and monitor else "val_loss"
        # ranked as the trainer ranks them; without a monitor, best() would be the latest
        store = CheckpointStore(path / "checkpoints", monitor=monitor, mode="max" if "acc" in monitor else "min")
        ckpt = store.best() if which == "best" else store.latest()
        if ckpt is None:
            if (path / "model.safetensors").is_file():
                return _load_file(path / "model.safetensors", overrides, trusted)
            raise EtappeError(f"{path}: no valid checkpoint under {path / 'checkpoints'} and no model.safetensors; "
                              "train first (etappe train --run-dir ...) or check it with etappe verify")
        path = Path(ckpt)
    return _load_checkpoint(path, overrides, trusted)


def _load_checkpoint(path: Path, overrides: dict, trusted: bool) -> tuple[nn.Module, dict]:
    from etappe.checkpoint import load

    values = load(path)  # verified; entries come back as plain values, the model as its state dict
    config = values.get("config")
    config = dict(config) if isinstance(config, Mapping) else {}
    state = values.get("model")
    if not isinstance(state, Mapping):
        raise EtappeError(f"{path}: the checkpoint holds no 'model' entry; it holds: {', '.join(values)}")
    module = _build(config, overrides, str(path), trusted, state)
    _load_state(module, state, path, config)
    config["checkpoint"] = str(path)
    return module, config


def _read_json(path: Path) -> dict | None:
    data = fsio.read_inside(path.parent, path.name)  # never through a link, and bounded in size
    try:
        value = json.loads(data) if data is not None else None
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _load_state(module: nn.Module, state: Mapping, path: Path, config: dict) -> None:
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise UsageError(f"{path} does not fit model {config['model']!r} with input shape "
                         f"{tuple(config['input_shape'])}: {' '.join(lines[:2])}") from None


_PROGRAMS = {
    "torchscript": "{path}: a TorchScript archive, which is a program: loading it runs code the file holds (its "
                   "methods and __setstate__). etappe loads one only with --trust (Python: trusted=True), if you "
                   "trust where it came from; or use its .onnx or .safetensors export",
    "export": "{path}: a torch.export program (.pt2): torch's loader unpickles parts of it in full and executes "
              "Python code it holds (guards, shape expressions), so etappe loads one only with --trust (Python: "
              "trusted=True), if you trust where it came from; or use its .onnx or .safetensors export",
}


def _load_file(path: Path, overrides: dict, trusted: bool) -> tuple[nn.Module, dict]:
    fmt = detect_format(path)  # the content decides; a sidecar's "format" is only a record
    meta = read_sidecar(path)
    if meta is None:
        meta = _read_json(path.parent / "config.json")  # weights beside their run's config
    config = dict(meta or {})
    spec = config.get("data_spec")
    if not isinstance(spec, Mapping):
        config.pop("data_spec", None)
    elif not config.get("data"):
        config["data"] = spec.get("name")
    config["format"] = fmt
    if fmt in _PROGRAMS and not trusted:
        raise TrustError(_PROGRAMS[fmt].format(path=path))
    if fmt == "onnx":
        module: nn.Module = _opened(path, "ONNX file", lambda: OnnxModule(path))
        shape = module.input_shape()
        if shape and not config.get("input_shape"):
            config["input_shape"] = list(shape)
    elif fmt == "export":
        def load_program() -> tuple[nn.Module, Any]:
            with _quiet():
                program = torch.export.load(str(path))
                return ProgramModule(program), program.example_inputs

        module, examples = _opened(path, ".pt2 (torch.export) file", load_program)
        if not config.get("input_shape") and examples and examples[0] and torch.is_tensor(examples[0][0]):
            config["input_shape"] = list(examples[0][0].shape[1:])
    elif fmt == "torchscript":
        module = _opened(path, "TorchScript archive", lambda: torch.jit.load(str(path), map_location="cpu"))
    else:
        state = _read_state(path, fmt)
        module = _build(config, overrides, str(path), trusted, state)
        _load_state(module, state, path, config)
    if overrides["input_shape"]:
        config["input_shape"] = list(overrides["input_shape"])
    if not config.get("data_spec") and config.get("input_shape"):
        config["data_spec"] = {"name": None, "input_shape": config["input_shape"], "num_classes": None,
                               "num_outputs": None, "input_scale": 1.0}
    return module, config


def _opened(path: Path, what: str, load: Any) -> Any:
    """``load()``, with any failure of torch's or onnxruntime's loaders as one line naming the file."""
    try:
        return load()
    except EtappeError:
        raise
    except Exception as exc:  # each loader has its own exception types (RuntimeError, InvalidProtobuf, ...)
        raise EtappeError(f"{path}: not a valid {what} ({_first_line(exc)})") from None


_EXPECTED = ("expected a state dict (torch.save or safetensors), a TorchScript archive, a .pt2 (torch.export) or an "
             "ONNX file")


def detect_format(path: str | Path) -> str:
    """What model file ``path`` is, from its content alone (never its name or a sidecar): 'torchscript',
    'export' (.pt2), 'onnx', 'safetensors' or 'state-dict' (a torch.save file). A zip archive's members are
    checked (uncompressed, within the file) before anything in it is read. Raises EtappeError for anything else."""
    from etappe.checkpoint import torchsave

    path = Path(path)
    size, head = torchsave.sniff(path)
    if not head:
        raise EtappeError(f"{path}: the file is empty; {_EXPECTED}")
    if head.startswith(b"PK"):
        infos = torchsave.check_archive(path, "model file")
        kind = torchsave.archive_kind(infos)
        if kind == "export" and torchsave.read_archive_member(path, infos, "archive_format") != b"pt2":
            kind = None
        if kind is None:
            raise EtappeError(f"{path}: a zip archive, but not one torch.save, TorchScript or torch.export writes; "
                              + _EXPECTED)
        return "state-dict" if kind == "torch.save" else kind
    if torchsave.is_safetensors(head, size):
        return "safetensors"
    if head[0] == 0x80:  # a pickle: torch.save's older, non-zip format
        return "state-dict"
    problem = torchsave.onnx_problem(path, size)
    if problem is None:
        return "onnx"
    if path.name.endswith(".onnx") or head[0] == 0x08:  # ModelProto starts with its ir_version, field 1
        raise EtappeError(f"{path}: not a valid ONNX file ({problem})")
    raise EtappeError(f"{path}: not a model file etappe reads (it starts with 0x{head[:8].hex()}); {_EXPECTED}")


def _read_state(path: Path, fmt: str) -> dict:
    from etappe.checkpoint import torchsave

    state = torchsave.read(path)  # weights only: checked archive, no pickled objects, sparse tensors checked
    if isinstance(state, Mapping):
        for key in ("model_state_dict", "state_dict", "model"):  # common wrappers around a state dict
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise EtappeError(f"{path}: expected a state dict (names to tensors), found {type(state).__name__}")
    return dict(state)


def _build(config: dict, overrides: dict, where: str, trusted: bool, state: Mapping | None = None) -> nn.Module:
    from etappe import models

    spec = config.get("data_spec") or {}
    name = overrides["model"] or config.get("model")
    if name and not overrides["model"]:
        name = models.from_file(name, where, trusted=trusted)  # a name from a file: built-in, or trusted
    shape = overrides["input_shape"] or spec.get("input_shape") or config.get("input_shape")
    if not name or not shape:
        raise UsageError(
            f"{where} holds weights only; to rebuild the model pass --model NAME and --input-shape C,H,W "
            "(or keep the .json sidecar etappe export writes, or the run's config.json, beside it)"
        )
    if not isinstance(shape, (list, tuple)) or not shape or not all(_positive_int(d) for d in shape):
        raise UsageError(f"{where}: its config gives input shape {shape!r}, not positive sizes; pass "
                         "--input-shape C,H,W")
    if math.prod(shape) > MAX_SAMPLE_VALUES:
        raise UsageError(f"{where}: its config gives input shape {tuple(shape)}, {math.prod(shape)} values per "
                         f"sample, more than the {MAX_SAMPLE_VALUES} etappe builds a model for; pass --input-shape")
    outputs = overrides["num_outputs"] or spec.get("num_outputs") or config.get("num_outputs")
    if not outputs and state:
        weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim >= 1]
        outputs = int(weights[-1].shape[0]) if weights else None
    if not outputs:
        raise UsageError(f"{where}: cannot tell how many outputs the model has; pass --num-outputs N")
    if not _positive_int(outputs) or outputs > MAX_OUTPUTS:
        raise UsageError(f"{where}: its config gives {outputs!r} outputs, not a count from 1 to {MAX_OUTPUTS}; "
                         "pass --num-outputs N")
    kwargs = overrides["model_kwargs"] or config.get("model_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise UsageError(f"{where}: its config gives model_kwargs {kwargs!r}; expected keyword arguments (a mapping)")
    kwargs = dict(kwargs)
    config.update(model=name, input_shape=list(shape), num_outputs=int(outputs), model_kwargs=kwargs)
    if state is not None:
        _check_fits(name, tuple(shape), int(outputs), kwargs, state, where, config)
    module = models.build(name, tuple(shape), int(outputs), **kwargs)
    if config.get("channels_last"):  # the layout the run trained in: eval then computes exactly as training did
        from etappe.build import to_channels_last

        to_channels_last(module)
    return module


MAX_SAMPLE_VALUES = 2**26  # values in one input sample a model is built for (a 4096x4096 RGBA image is 2**26)
MAX_OUTPUTS = 2**24


def _check_fits(name: str, shape: tuple[int, ...], outputs: int, kwargs: dict, state: Mapping, where: str,
                config: dict) -> None:
    """Build the model on the meta device (no memory) and compare its parameter and buffer shapes with the
    weights': a config can size a model far beyond its weights, and building that for real could take gigabytes."""
    from etappe import models

    try:
        with torch.device("meta"):
            probe = models.build(name, shape, outputs, **kwargs)
    except EtappeError:
        raise
    except Exception:  # a factory that cannot run on the meta device: the real build reports its own failure
        return
    wanted = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)}
    missing = [k for k in wanted if k not in given]
    unexpected = [k for k in given if k not in wanted]
    differ = [k for k in wanted if k in given and wanted[k] != given[k]]
    if differ:
        detail = f"{differ[0]} is {given[differ[0]]} in the weights, {wanted[differ[0]]} in the model"
    elif missing:
        detail = f"the weights lack {missing[0]}"
    elif unexpected:
        detail = f"the model has no {unexpected[0]}"
    else:
        return
    raise UsageError(f"{where} does not fit model {name!r} with input shape {shape}: {detail}")


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


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
) -> list[Exported]:
    """Export a run, checkpoint or weights file: the example and parity inputs are the first ``samples``
    test-set inputs of the data set the run records (seeded random ones if it cannot be loaded or
    ``input_shape`` differs). ``out`` is the file for one format, a folder for several (default:
    ``RUN/export/model.<suffix>``). ``model`` and ``trusted`` as for ``load_model``."""
    path = Path(path)
    if path.is_file():
        fmt = detect_format(path)
        if fmt in _NOT_EXPORTABLE:
            raise UsageError(f"{path}: {_NOT_EXPORTABLE[fmt]}, which export does not take: it exports a run, a "
                             "checkpoint or a weights file (a state dict or .safetensors); run this one with etappe "
                             "predict, or export again from the run it came from")
    module, config = load_model(path, which=which, model=model, input_shape=input_shape, trusted=trusted)
    spec = dict(config.get("data_spec") or {})
    shape = tuple(input_shape or spec.get("input_shape") or config.get("input_shape") or ())
    if not shape:
        raise UsageError(f"{path} does not record its input shape; pass --input-shape C,H,W")
    if spec:
        spec["input_shape"] = list(shape)
    inputs = _real_inputs(config, shape, samples, data_dir)
    example = inputs[:2] if inputs is not None else torch.zeros((2, *shape))
    kw = dict(inputs=inputs, atol=atol, spec=spec or None, model_name=config.get("model"),
              model_kwargs=config.get("model_kwargs"), seed=int(config.get("seed", 0) or 0))
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


# ---------------------------------------------------------------- small helpers


def _on_cpu(model: nn.Module) -> nn.Module:
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == "cpu" for t in tensors):
        return model
    return copy.deepcopy(model).cpu()  # the user's model stays where it is


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the export; afterwards every submodule gets its own mode back (not one flag for all)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _quiet() -> Iterator[list]:
    """torch.export and torch.onnx print graphs, logs and warnings, most of all when they fail; the user gets
    one line from us instead. Yields the warnings caught."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("always")
            yield caught
    finally:
        logging.disable(previous)


def _at_least_two_rows(example: torch.Tensor) -> torch.Tensor:
    # torch.export specializes a dimension of size 1; two rows keep the batch dimension dynamic.
    if example.ndim == 0:
        raise UsageError("the example input must have a batch dimension, got a scalar")
    return torch.cat([example, example]) if len(example) == 1 else example


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    sidecar_path(path).unlink(missing_ok=True)


def _warning_text(w: warnings.WarningMessage) -> str:
    first = str(w.message).split(". ")[0].strip().rstrip(".")
    return f"{first} at {Path(w.filename).name}:{w.lineno}"


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in _strip_ansi(str(exc)).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
