"""The writers: one plain function per format, ``(model, example, path) -> how it was captured``, and the one map
from format to file suffix.

A writer only writes: the caller (``etappe.export.export_many``) has put the model in eval mode on CPU, hands it
a temporary path beside the final one, checks the file's parity and renames it into place. A writer raises
ExportError when its format cannot capture the model, naming the formats that can.

What a model takes and returns, in the one order every format and the parity check use: ``Inputs`` (positional
tensors, then keyword tensors, each with the batch dimension first; ``as_inputs`` reads a tensor, a tuple, a dict
or a tuple and a dict) and ``flatten_outputs`` (a tensor, nested tuples and lists, a dict: depth first, dict
entries in their order, named by their keys, tuple entries ``output0``, ``output1`` ...).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

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
# Every name a format goes by, for choosing what to write; .pt, .pth and .bin are also what people call TorchScript
# files and whole pickled models, so a state dict written to one says so (``ambiguous``).
SUFFIXES: dict[str, str] = {
    **{suffix: fmt for fmt, suffix in FORMATS.items()},
    ".ts": "torchscript", ".torchscript": "torchscript", ".pth": "state-dict", ".bin": "state-dict",
}
AMBIGUOUS_SUFFIXES = (".pt", ".pth", ".bin")


class ExportError(EtappeError):
    """An export that failed: the format cannot capture the model, or the file does not compute what the model
    does. ``exported`` holds the files of the same call that did export and pass their parity check."""

    def __init__(self, message: str, exported: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.exported = list(exported)


def format_from_suffix(path: str | Path) -> str:
    """The format a file name asks for: ``m.onnx`` -> 'onnx', ``m.ts`` -> 'torchscript', ``m.pt`` -> 'state-dict'.
    Only for choosing what to write; what a file that exists is, is read from its content
    (``etappe.export.detect_format``)."""
    name = Path(path).name.lower()
    for suffix, fmt in sorted(SUFFIXES.items(), key=lambda item: -len(item[0])):  # .torchscript.pt before .pt
        if name.endswith(suffix) and len(name) > len(suffix):
            return fmt
    raise UsageError(
        f"cannot tell the format from the file name {Path(path).name!r}; name it "
        + ", ".join(f"*{s} ({f})" for f, s in FORMATS.items())
        + " (*.ts is TorchScript too), or give the format"
    )


def ambiguous(path: str | Path) -> bool:
    """A name several formats go by (``model.pt``): what it holds is told by its content, and a writer says which."""
    name = Path(path).name.lower()
    return name.endswith(AMBIGUOUS_SUFFIXES) and not name.endswith(FORMATS["torchscript"])


# ---------------------------------------------------------------- what a model takes and returns


@dataclass(frozen=True)
class Inputs:
    """A model's inputs for one call: positional tensors, then keyword tensors, each with the batch dimension
    first and all with the same batch size."""

    args: tuple[torch.Tensor, ...]
    kwargs: Mapping[str, torch.Tensor]

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Every input in the one order: positional, then keyword inputs in their order."""
        return [*self.args, *self.kwargs.values()]

    @property
    def single(self) -> bool:
        """One positional tensor: the tutorials' model, exported as it always was."""
        return len(self.args) == 1 and not self.kwargs

    def __len__(self) -> int:  # the batch size
        return len(self.tensors[0])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Inputs":
        return Inputs(tuple(fn(t) for t in self.args), {k: fn(v) for k, v in self.kwargs.items()})

    def call(self, model: Callable) -> Any:
        return model(*self.args, **self.kwargs)


_INPUT_KINDS = "a tensor, a tuple of tensors, a dict of name -> tensor, or a tuple and a dict"


def as_inputs(example: Any, what: str = "the example input") -> Inputs:
    """``example`` as Inputs: a tensor, a tuple (or list) of tensors, a dict of name -> tensor (keyword inputs), or
    a tuple whose last item is that dict (``(x1, x2, {"mask": m})``, ``((x1, x2), {"mask": m})``). UsageError for
    anything else, a tensor without a batch dimension, or batch sizes that differ."""
    if torch.is_tensor(example):
        args, kwargs = (example,), {}
    elif isinstance(example, Mapping):
        args, kwargs = (), example
    elif isinstance(example, (tuple, list)):
        items = list(example)
        kwargs = items.pop() if items and isinstance(items[-1], Mapping) else {}
        if len(items) == 1 and isinstance(items[0], (tuple, list)):
            items = list(items[0])
        args = tuple(items)
    else:
        raise UsageError(f"{what} must be {_INPUT_KINDS} (one batch each), got {type(example).__name__}")
    bad = next((f"input {i}" for i, t in enumerate(args) if not torch.is_tensor(t)), None)
    bad = bad or next((f"input {k!r}" for k, t in kwargs.items() if not isinstance(k, str) or not torch.is_tensor(t)),
                      None)
    if bad:
        raise UsageError(f"{what} must be {_INPUT_KINDS} (one batch each); its {bad} is not a tensor with a name")
    inputs = Inputs(tuple(args), dict(kwargs))
    if not inputs.tensors:
        raise UsageError(f"{what} holds no tensor; give one batch of each input the model takes")
    names = [f"input {i}" for i in range(len(args))] + [f"input {k!r}" for k in kwargs]
    for name, t in zip(names, inputs.tensors):
        if t.ndim == 0:
            raise UsageError(f"{what} must have a batch dimension, got a scalar" + ("" if inputs.single else
                             f" for {name}"))
    sizes = {name: len(t) for name, t in zip(names, inputs.tensors)}
    if len(set(sizes.values())) > 1:
        raise UsageError(f"{what}: every input needs the same batch size (the first dimension), got "
                         + ", ".join(f"{n} {b}" for n, b in sizes.items()))
    return inputs


def input_names(model: nn.Module, inputs: Inputs) -> list[str]:
    """The names of ``inputs`` in their order: the forward's parameter names for positional inputs (``input0`` ...
    where it takes ``*args``), the keys for keyword inputs."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):  # a forward without a signature Python can read
        params = []
    names = [params[i].name if i < len(params) else f"input{i}" for i in range(len(inputs.args))]
    return names + list(inputs.kwargs)


def flatten_outputs(out: Any, who: str) -> tuple[list[str], list[torch.Tensor], str]:
    """A model's output as (names, tensors, kind): a tensor ('output', kind 'tensor'); tuples and lists, nested too,
    depth first (``output0``, ``output1.0`` ..., kind 'tuple'); a dict in its order, named by its keys (nested:
    ``key.0``, ``key.sub``; kind 'dict'). UsageError for anything else."""
    names: list[str] = []
    tensors: list[torch.Tensor] = []

    def walk(value: Any, name: str) -> None:
        if torch.is_tensor(value):
            names.append(name)
            tensors.append(value.detach())
        elif isinstance(value, (tuple, list)) and value:
            for i, v in enumerate(value):
                walk(v, f"{name}.{i}" if name else f"output{i}")
        elif isinstance(value, Mapping) and value and all(isinstance(k, str) for k in value):
            for k, v in value.items():
                walk(v, f"{name}.{k}" if name else k)
        else:
            where = f" at output {name!r}" if name else ""
            raise UsageError(f"{who} returns {type(value).__name__}{where}; export needs a tensor, tuples or lists "
                             "of tensors, or a dict of name -> tensor")

    if torch.is_tensor(out):
        return ["output"], [out.detach()], "tensor"
    walk(out, "")
    return names, tensors, "dict" if isinstance(out, Mapping) else "tuple"


@dataclass(frozen=True)
class Signature:
    """What an export records of a model's inputs and outputs: their names in the one order, and the output's
    kind ('tensor', 'tuple', 'dict'), which ONNX files keep in their metadata so a reader returns a dict again."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    output_kind: str

    def file_input_names(self, fmt: str, inputs: Inputs) -> list[str]:
        """The input names ``fmt``'s file uses: ONNX takes one input as 'input' (as etappe always named it)."""
        return ["input"] if fmt == "onnx" and inputs.single else list(self.input_names)


ONNX_OUTPUT_KIND = "etappe.outputs"  # the ONNX metadata key: 'dict' when the model returned a dict


def write(fmt: str, model: nn.Module, example: Inputs, path: Path, signature: Signature) -> str:
    """Write ``model`` (in eval mode, on CPU) to ``path`` in format ``fmt``; returns how it was captured:
    state_dict, trace, script, torch.export or torch.onnx."""
    return _WRITERS[fmt](model, example, path, signature)


# torch.save, torch.jit.save and torch.export.save write to an open file here, not to a name: given a name, the
# first two put it in the archive (as its top folder), which would be the temporary name, and torch.export warns
# about a name not ending in .pt2.


def write_state_dict(model: nn.Module, example: Inputs, path: Path, signature: Signature) -> str:
    with open(path, "wb") as f:
        torch.save(model.state_dict(), f)
    return "state_dict"


def write_safetensors(model: nn.Module, example: Inputs, path: Path, signature: Signature) -> str:
    from safetensors.torch import save_file

    # A copy per name: safetensors refuses tensors that share memory (tied weights), and load_file then
    # returns every name load_state_dict expects.
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    save_file(state, str(path), metadata={"format": "pt"})
    return "state_dict"


def write_torchscript(model: nn.Module, example: Inputs, path: Path, signature: Signature) -> str:
    try:
        module, method = _capture_torchscript(model, example, signature.output_kind)
    except ExportError as exc:
        raise ExportError(f"{exc}; {_what_works(model, example, 'torchscript', signature.output_kind)}") from None
    with open(path, "wb") as f:
        torch.jit.save(module, f)
    return method


def write_program(model: nn.Module, example: Inputs, path: Path, signature: Signature) -> str:
    try:
        program = _capture_program(model, example)
    except Exception as exc:
        raise _cannot("export", exc, model, example, signature.output_kind) from None
    with open(path, "wb") as f:
        torch.export.save(program, f)
    return "torch.export"


def write_onnx(model: nn.Module, example: Inputs, path: Path, signature: Signature) -> str:
    require_onnx("format 'onnx'")
    import torch.onnx  # noqa: F401  (imported before quiet() so its loggers exist and are silenced)

    try:
        with quiet():
            program = torch.onnx.export(
                model,
                example.args,
                kwargs=dict(example.kwargs) or None,
                dynamo=True,
                dynamic_shapes=_dynamic_batch(model, example),
                input_names=signature.file_input_names("onnx", example),
                output_names=list(signature.output_names),
                verbose=False,
            )
            if signature.output_kind == "dict":
                program.model.metadata_props[ONNX_OUTPUT_KIND] = "dict"
            program.save(str(path), external_data=False)
    except Exception as exc:
        raise _cannot("onnx", exc, model, example, signature.output_kind) from None
    return "torch.onnx"


_WRITERS: dict[str, Callable[[nn.Module, Inputs, Path, Signature], str]] = {
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


def _capture_torchscript(model: nn.Module, example: Inputs, output_kind: str = "tensor") -> tuple[Any, str]:
    # strict=False lets the tracer record a list or dict output (TorchScript's dicts hold one value type)
    strict = output_kind == "tensor"
    with quiet() as caught:
        try:
            if example.kwargs:  # the tracer takes keyword inputs only all by name, none by position
                module = torch.jit.trace(model, example_kwarg_inputs=_by_name(model, example), check_trace=False,
                                         strict=strict)
            else:
                module = torch.jit.trace(model, example.args, check_trace=False, strict=strict)
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


def _by_name(model: nn.Module, example: Inputs) -> dict[str, torch.Tensor]:
    """Every input by its parameter name, for a tracer that takes keyword inputs only that way."""
    try:
        bound = inspect.signature(model.forward).bind(*example.args, **example.kwargs)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"the inputs do not fit the model's forward: {exc}") from None
    if any(not torch.is_tensor(v) for v in bound.arguments.values()):  # *args or **kwargs
        raise ExportError("format 'torchscript' traces keyword inputs by parameter name, and this forward takes "
                          "*args or **kwargs; give every input by position, or name the parameters")
    return dict(bound.arguments)


def _dynamic_batch(model: nn.Module, example: Inputs) -> tuple | dict:
    """torch.export's dynamic_shapes: one batch dimension, shared by every input. By position when the inputs
    are all positional (as etappe always passed them), else by the forward's parameter names."""
    batch = torch.export.Dim("batch")
    if not example.kwargs:
        return tuple({0: batch} for _ in example.args)
    bound = inspect.signature(model.forward).bind(*example.args, **example.kwargs)

    def spec(value: Any) -> Any:
        if torch.is_tensor(value):
            return {0: batch}
        if isinstance(value, Mapping):  # **kwargs
            return {k: spec(v) for k, v in value.items()}
        return tuple(spec(v) for v in value)  # *args

    return {name: spec(value) for name, value in bound.arguments.items()}


def _capture_program(model: nn.Module, example: Inputs) -> Any:
    with quiet():
        return torch.export.export(model, example.args, kwargs=dict(example.kwargs) or None,
                                   dynamic_shapes=_dynamic_batch(model, example))


def _cannot(fmt: str, exc: BaseException, model: nn.Module, example: Inputs, output_kind: str) -> ExportError:
    """The one-line error of a model a format cannot capture; a Ctrl-C or a file-system error that torch's exporter
    wrapped is raised as itself: neither says anything of the model."""
    e: BaseException | None = exc
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        if isinstance(e, KeyboardInterrupt) or (isinstance(e, OSError) and e.errno is not None):
            raise e  # (an OSError without errno is inspect's "could not get source code": scripting's failure)
        e = e.__cause__ or e.__context__
    return ExportError(f"format {fmt!r} cannot capture this model: {_reason(exc)}; "
                       f"{_what_works(model, example, fmt, output_kind)}")


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


def _what_works(model: nn.Module, example: Inputs, failed: str, output_kind: str) -> str:
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
            works.append(f"torchscript ({_capture_torchscript(model, example, output_kind)[1]})")
        except Exception:
            pass
    return f"formats that capture it: {', '.join(works + ['state-dict', 'safetensors'])}"


def _warning_text(w: warnings.WarningMessage) -> str:
    first = str(w.message).split(". ")[0].strip().rstrip(".")
    return f"{first} at {Path(w.filename).name}:{w.lineno}"
