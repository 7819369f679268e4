"""The writers: one plain function per format, ``(model, example, path) -> how it was captured``, and the one map
from format to file suffix.

A writer only writes: the caller (``etappe.export.export_many``) has put the model in eval mode on CPU, hands it
a temporary path beside the final one, checks the file's parity and renames it into place. A writer raises
ExportError when its format cannot capture the model, naming the formats that can.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from etappe.errors import EtappeError, UsageError, first_line, strip_ansi

# The one map from format to file suffix, in the order ``--format all`` writes them.
FORMATS: dict[str, str] = {
    "state-dict": ".pt",
    "safetensors": ".safetensors",
    "torchscript": ".torchscript.pt",
    "export": ".pt2",
    "onnx": ".onnx",
}
STATE_DICT_SUFFIXES = (".pth", ".bin")  # other names a state dict goes by; etappe writes .pt


class ExportError(EtappeError):
    """An export that failed: the format cannot capture the model, or the file does not compute what the model
    does. ``exported`` holds the files of the same call that did export and pass their parity check."""

    def __init__(self, message: str, exported: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.exported = list(exported)


def format_from_suffix(path: str | Path) -> str:
    """The format a file name asks for: ``m.onnx`` -> 'onnx'. Only for choosing what to write; what a file that
    exists is, is read from its content (``etappe.export.detect_format``)."""
    name = Path(path).name
    for fmt, suffix in sorted(FORMATS.items(), key=lambda item: -len(item[1])):  # .torchscript.pt before .pt
        if name.endswith(suffix):
            return fmt
    if name.endswith(STATE_DICT_SUFFIXES):
        return "state-dict"
    raise UsageError(
        f"cannot tell the format from the file name {name!r}; name it "
        + ", ".join(f"*{s} ({f})" for f, s in FORMATS.items())
        + ", or give the format"
    )


def write(fmt: str, model: nn.Module, example: torch.Tensor, path: Path) -> str:
    """Write ``model`` (in eval mode, on CPU) to ``path`` in format ``fmt``; returns how it was captured:
    state_dict, trace, script, torch.export or torch.onnx."""
    return _WRITERS[fmt](model, example, path)


# torch.save, torch.jit.save and torch.export.save write to an open file here, not to a name: given a name, the
# first two put it in the archive (as its top folder), which would be the temporary name, and torch.export warns
# about a name not ending in .pt2.


def write_state_dict(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    with open(path, "wb") as f:
        torch.save(model.state_dict(), f)
    return "state_dict"


def write_safetensors(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    from safetensors.torch import save_file

    # A copy per name: safetensors refuses tensors that share memory (tied weights), and load_file then
    # returns every name load_state_dict expects.
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    save_file(state, str(path), metadata={"format": "pt"})
    return "state_dict"


def write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    try:
        module, method = _capture_torchscript(model, example)
    except ExportError as exc:
        raise ExportError(f"{exc}; {_what_works(model, example, 'torchscript')}") from None
    with open(path, "wb") as f:
        torch.jit.save(module, f)
    return method


def write_program(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    try:
        program = _capture_program(model, example)
    except Exception as exc:
        raise _cannot("export", exc, model, example) from None
    with open(path, "wb") as f:
        torch.export.save(program, f)
    return "torch.export"


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    require_onnx("format 'onnx'")
    import torch.onnx  # noqa: F401  (imported before quiet() so its loggers exist and are silenced)

    try:
        with quiet():
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


_WRITERS: dict[str, Callable[[nn.Module, torch.Tensor, Path], str]] = {
    "state-dict": write_state_dict,
    "safetensors": write_safetensors,
    "torchscript": write_torchscript,
    "export": write_program,
    "onnx": write_onnx,
}


def require_onnx(what: str) -> None:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"{what} needs {', '.join(missing)}, which is not installed: pip install 'etappe[onnx]'")


@contextlib.contextmanager
def quiet() -> Iterator[list]:
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


# ---------------------------------------------------------------- graph capture, and why it fails


def _capture_torchscript(model: nn.Module, example: torch.Tensor) -> tuple[Any, str]:
    with quiet() as caught:
        try:
            module = torch.jit.trace(model, example, check_trace=False)
            problem = next((_warning_text(w) for w in caught if issubclass(w.category, torch.jit.TracerWarning)), None)
        except Exception as exc:  # anything tracing cannot follow; scripting may still capture it
            module, problem = None, first_line(exc)
        if problem is None:
            return module, "trace"
        try:
            return torch.jit.script(model), "script"
        except Exception as exc:
            raise ExportError(
                f"format 'torchscript' cannot capture this model: tracing would not be faithful ({problem}) "
                f"and scripting fails ({first_line(exc)})"
            ) from None


def _capture_program(model: nn.Module, example: torch.Tensor) -> Any:
    with quiet():
        return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))


def _cannot(fmt: str, exc: BaseException, model: nn.Module, example: torch.Tensor) -> ExportError:
    """The one-line error of a model a format cannot capture; a Ctrl-C or a file-system error that torch's exporter
    wrapped is raised as itself: neither says anything of the model."""
    e: BaseException | None = exc
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        if isinstance(e, KeyboardInterrupt) or (isinstance(e, OSError) and e.errno is not None):
            raise e  # (an OSError without errno is inspect's "could not get source code": scripting's failure)
        e = e.__cause__ or e.__context__
    return ExportError(f"format {fmt!r} cannot capture this model: {_reason(exc)}; {_what_works(model, example, fmt)}")


def _reason(exc: BaseException) -> str:
    chain = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = strip_ansi("\n".join(str(e) for e in chain))
    if any("DataDependent" in type(e).__name__ for e in chain) or "data-dependent" in text.lower():
        m = re.search(r'File "([^"]+)", line (\d+), in [^\n]+\n\s*([^\n]+)', text)
        where = f" at {Path(m[1]).name}:{m[2]} `{m[3].strip()}`" if m else ""
        return f"data-dependent control flow{where} (a Python branch on tensor values)"
    m = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)'", text)
    if m:
        return f"operator {m[1]} has no ONNX translation"
    root = chain[-1]
    return f"{type(root).__name__}: {first_line(root)}"


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


def _warning_text(w: warnings.WarningMessage) -> str:
    first = str(w.message).split(". ")[0].strip().rstrip(".")
    return f"{first} at {Path(w.filename).name}:{w.lineno}"
