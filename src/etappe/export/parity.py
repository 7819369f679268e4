"""The parity check: load an exported file back, run it on a batch of inputs and compare with the eager model:
every output (flattened in the one order of ``writers.flatten_outputs``), each within ``atol``.

TorchScript, torch.export and ONNX files are loaded in a fresh Python process (``_parity_worker.py``) that cannot
import etappe or the modules defining the model's classes; ONNX files run there in onnxruntime. State-dict files
need the class, so they are loaded into a copy of the model whose every tensor was first set to NaN: a tensor
missing from the file shows up. The caller hands over the temporary file it is about to rename into place, so the
bytes checked are the bytes that land.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from etappe.errors import UsageError, first_line
from etappe.export.writers import ExportError, Inputs, as_inputs, flatten_outputs

FRESH_PROCESS_FORMATS = ("torchscript", "export", "onnx")
PARITY_BATCH = 16
_WORKER = Path(__file__).resolve().parent.parent / "_parity_worker.py"


def parity_inputs(example: Inputs, inputs: Any, seed: int) -> tuple[Inputs, str]:
    """The batch compared, and where it came from: ``inputs`` when given (shaped as ``example``: the same inputs,
    each sample shaped alike), else ``PARITY_BATCH`` seeded random rows for every input, shaped like the
    example's (a batch size other than the example's, so a fixed batch dimension shows)."""
    if inputs is not None:
        given = as_inputs(inputs, "the parity inputs").map(lambda t: t.detach().cpu())
        if len(given.args) != len(example.args) or list(given.kwargs) != list(example.kwargs):
            raise UsageError(f"the parity inputs are {_layout(given)}, the example's {_layout(example)}; give the "
                             "parity batch as the example is given")
        for i, (g, e) in enumerate(zip(given.tensors, example.tensors)):
            if tuple(g.shape[1:]) != tuple(e.shape[1:]):
                which = "" if example.single else f" (input {i})"
                raise UsageError(f"parity inputs shaped {tuple(g.shape[1:])} (one sample){which} do not match the "
                                 f"example's {tuple(e.shape[1:])}")
        return given, "given inputs"
    g = torch.Generator().manual_seed(seed)
    rows = PARITY_BATCH if len(example) != PARITY_BATCH else PARITY_BATCH + 1
    return example.map(lambda t: _random_like(t, rows, g)), f"seeded random inputs (seed {seed})"


def _layout(inputs: Inputs) -> str:
    keywords = f" and keyword inputs {', '.join(inputs.kwargs)}" if inputs.kwargs else ""
    return f"{len(inputs.args)} positional input(s){keywords}"


def _random_like(t: torch.Tensor, rows: int, g: torch.Generator) -> torch.Tensor:
    shape = (rows, *t.shape[1:])
    if t.is_floating_point():
        return torch.randn(shape, generator=g, dtype=t.dtype)
    if t.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    low, high = (int(t.min()), int(t.max()) + 1) if t.numel() else (0, 1)
    return torch.randint(low, high, shape, generator=g, dtype=t.dtype)


def outputs(out: Any, who: str) -> list[torch.Tensor]:
    """A model's outputs as one flat list of tensors (``writers.flatten_outputs``); UsageError for anything
    export cannot compare."""
    return flatten_outputs(out, who)[1]


def default_atol(expected: list[torch.Tensor]) -> float:
    tolerances = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
    return max((tolerances.get(t.dtype, 0.0) for t in expected), default=1e-5)


def abs_diff(e: torch.Tensor, g: np.ndarray) -> float:
    """The largest difference between one output of the model and a file's (NaN where both are NaN counts as
    equal; a shape that differs, or a NaN in one only, is infinite)."""
    e = e.numpy()
    if e.shape != g.shape:
        return math.inf
    if not e.size:
        return 0.0
    d = np.abs(e.astype(np.float64) - g.astype(np.float64))
    worst = float(np.max(np.where(np.isnan(e) & np.isnan(g), 0.0, d)))
    return worst if not math.isnan(worst) else math.inf


def verdict(
    expected: list[torch.Tensor], got: list[np.ndarray] | str, atol: float, on: str,
    names: Sequence[str] | None = None,
) -> tuple[float, str | None]:
    """How far a file's outputs ``got`` (or why it did not load) are from the model's ``expected`` ones (named
    ``names``) on the inputs described by ``on``, and what is wrong with the file, None if nothing: every output
    within ``atol`` passes; the message names the output furthest off."""
    if isinstance(got, str):
        return math.inf, f"does not load back ({got})"
    names = list(names or [f"output{i}" for i in range(len(expected))])
    if len(got) != len(expected):
        return math.inf, (f"does not compute what the model does: it returns {len(got)} outputs, the model "
                          f"{len(expected)} ({', '.join(names)})")
    diffs = [abs_diff(e, g) for e, g in zip(expected, got)]
    worst = max(range(len(diffs)), key=lambda i: diffs[i]) if diffs else 0
    diff = diffs[worst] if diffs else 0.0
    if diff <= atol:
        return diff, None
    which = "" if len(expected) == 1 else f"output {names[worst]!r} "
    if expected[worst].shape != got[worst].shape:
        return diff, (f"does not compute what the model does: {which}shaped {tuple(got[worst].shape)} where the "
                      f"model's is {tuple(expected[worst].shape)} on {on}")
    return diff, f"does not compute what the model does: {which}max abs diff {diff:.3g} > atol {atol:g} on {on}"


def class_modules(model: nn.Module) -> list[str]:
    """etappe and the modules defining the model's own (not torch's) classes: what the fresh process must not
    be able to import."""
    names = {type(m).__module__ for m in model.modules()}
    return sorted({"etappe"} | {n for n in names if n.split(".")[0] not in ("torch", "__main__", "builtins")})


def where_loaded(fmt: str, forbid: Sequence[str]) -> str:
    if fmt in FRESH_PROCESS_FORMATS:
        return f"a fresh process without {', '.join(forbid)}"
    return "a copy of the model with every tensor set to NaN first"


def run_files(
    model: nn.Module,
    files: list[tuple[str, Path]],
    inputs: Inputs,
    forbid: list[str],
    process: "FreshProcess | None",
    input_names: dict[str, list[str]] | None = None,
) -> dict[Path, list[np.ndarray] | str]:
    """Each ``(format, path)`` of ``files`` loaded back and run on ``inputs``: its outputs (flattened), or why it
    does not load. Programs and ONNX files go to ``process`` (a fresh one, see ``checker``), state dicts into a copy
    of ``model``. ``input_names``: per format, the names its file gives the inputs (ONNX's are fed by name)."""
    fresh = [(fmt, path) for fmt, path in files if fmt in FRESH_PROCESS_FORMATS]
    results = process.check(fresh, inputs, forbid, input_names or {}) if fresh and process else {}
    for fmt, path in files:
        if fmt not in FRESH_PROCESS_FORMATS:
            results[path] = _reload_state(model, fmt, path, inputs)
    return results


def _reload_state(model: nn.Module, fmt: str, path: Path, inputs: Inputs) -> list[np.ndarray] | str:
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
            return [t.numpy() for t in outputs(inputs.call(fresh), "the reloaded model")]
    except Exception as exc:
        return f"{type(exc).__name__}: {first_line(exc)}"


# ---------------------------------------------------------------- the fresh process


class FreshProcess:
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
        self, targets: list[tuple[str, Path]], inputs: Inputs, forbid: list[str],
        input_names: dict[str, list[str]] | None = None,
    ) -> dict[Path, list[np.ndarray] | str]:
        with self.lock:
            self.checks += 1
            folder = self.tmpdir / f"check{self.checks}"
            folder.mkdir()
            # positional inputs as a0, a1 ..., keyword inputs as k0, k1 ... (their names in the job)
            np.savez(folder / "inputs.npz", **{f"a{i}": t.numpy() for i, t in enumerate(inputs.args)},
                     **{f"k{i}": t.numpy() for i, t in enumerate(inputs.kwargs.values())})
            jobs = [
                {"format": fmt, "file": str(path.resolve()), "inputs": str(folder / "inputs.npz"),
                 "args": len(inputs.args), "kwargs": list(inputs.kwargs),
                 "names": (input_names or {}).get(fmt), "outputs": str(folder / f"out{i}.npz")}
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


_SHARED_PROCESS: contextvars.ContextVar[FreshProcess | None] = contextvars.ContextVar("parity_process", default=None)


@contextlib.contextmanager
def parity_process() -> Iterator[None]:
    """Check the exports made inside the block in one fresh process, started here, instead of one process per
    export call: it saves seconds per model (torch's imports) when exporting many. The process still never
    imports etappe, nor, during each check, the modules defining that model's classes."""
    process = FreshProcess(FRESH_PROCESS_FORMATS)
    token = _SHARED_PROCESS.set(process)
    try:
        yield
    finally:
        _SHARED_PROCESS.reset(token)
        process.close()


@contextlib.contextmanager
def checker(formats: Sequence[str]) -> Iterator[FreshProcess | None]:
    """The fresh process for files in ``formats``: the one ``parity_process`` started, else one started now (so
    that its imports overlap the writing) and closed after the block; None when no format needs one."""
    fresh = [f for f in formats if f in FRESH_PROCESS_FORMATS]
    shared = _SHARED_PROCESS.get()
    if not fresh or shared:
        yield shared if fresh else None
        return
    process = FreshProcess(fresh)
    try:
        yield process
    finally:
        process.close()
