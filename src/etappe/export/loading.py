"""Loading a model for eval and predict: from a run or checkpoint folder, a state dict, TorchScript, a ``.pt2`` or an
ONNX file. What a file is, is read from its content (``detect_format``), never from its name or its sidecar;
programs (TorchScript, ``.pt2``) load only when trusted.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from etappe.checkpoint import kinds, reading
from etappe.checkpoint.errors import TrustError
from etappe.config import monitor_mode
from etappe.errors import EtappeError, UsageError, check_flag, first_line
from etappe.export.writers import FORMATS, ONNX_OUTPUT_KIND, quiet, require_onnx


def sidecar_path(path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``: the metadata and parity record beside an exported file."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_sidecar(path: str | Path) -> dict | None:
    """The sidecar of an exported file, or None when there is none."""
    side = sidecar_path(path)
    return reading.read_json(side.parent, side.name, "an export sidecar (a JSON object)", "delete it or export again")


class OnnxModule(nn.Module):
    """An ONNX file run by onnxruntime behind the ``nn.Module`` call, CPU only: tensors in (positional ones in the
    file's input order, keyword ones by input name), every output out: one tensor, a dict by output name when the
    model exported returned a dict, else a tuple (nested tuples come back flattened)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        require_onnx(f"reading {path}")
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_name = self.input_names[0] if self.input_names else None
        self.output_names = [o.name for o in self.session.get_outputs()]
        meta = self.session.get_modelmeta().custom_metadata_map
        self.returns_dict = meta.get(ONNX_OUTPUT_KIND) == "dict"

    def forward(self, *inputs: torch.Tensor, **named: torch.Tensor) -> Any:
        if len(inputs) > len(self.input_names):
            raise UsageError(f"the ONNX model takes {len(self.input_names)} input(s) ({', '.join(self.input_names)}),"
                             f" got {len(inputs)}")
        feed = dict(zip(self.input_names, inputs))
        for name, x in named.items():
            if name not in self.input_names or name in feed:
                raise UsageError(f"the ONNX model has no input {name!r} left to give by name; its inputs: "
                                 f"{', '.join(self.input_names)}")
            feed[name] = x
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise UsageError(f"the ONNX model needs input(s) {', '.join(missing)} too; its inputs: "
                             f"{', '.join(self.input_names)}")
        outs = self.session.run(None, {n: x.detach().cpu().numpy() for n, x in feed.items()})
        outs = [torch.from_numpy(o) for o in outs]
        if self.returns_dict:
            return dict(zip(self.output_names, outs))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def input_shape(self) -> tuple[int, ...] | None:
        """One sample's shape of the first input, when the file fixes it."""
        dims = self.session.get_inputs()[0].shape[1:]
        return tuple(dims) if all(isinstance(d, int) for d in dims) else None


class ProgramModule(nn.Module):
    """A loaded ``torch.export`` program behind a module that ``eval()`` can be called on (the program's own
    module refuses it; it is fixed in the mode it was exported from: eval). It takes the inputs the model took,
    by position and by name, and returns what the model returned (a tensor, tuples, a dict)."""

    def __init__(self, program: Any) -> None:
        super().__init__()
        object.__setattr__(self, "_run", program.module())  # not a submodule: eval() must not reach it

    def forward(self, *inputs: Any, **named: Any) -> Any:
        return self._run(*inputs, **named)


def load_model(
    path: str | Path,
    *,
    which: str = "best",
    model: str | None = None,
    input_shape: Sequence[int] | None = None,
    num_outputs: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    trusted: bool = False,
    weights: str = "raw",
    strict: bool = True,
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

    ``weights``: "raw" (the model's own weights, the checkpoint's ``model`` entry) or "ema" (the averaged weights a
    run trained with ``ema`` saves as its ``ema`` entry; of a file: its ``ema`` entry, or the file itself when its
    sidecar says it was exported from them). ``config["weights"]`` says which were loaded. A state dict saved from
    a compiled or DDP-wrapped model (``_orig_mod.``/``module.`` names) loads into the plain model. ``strict=False``
    loads the weights that fit by name and shape and warns, in one line, of the ones left out.
    """
    check_flag("trusted", trusted)
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist; expected a run folder, a checkpoint folder or a model file")
    if weights not in WEIGHTS:
        raise UsageError(f"weights: expected one of {', '.join(map(repr, WEIGHTS))}, got {weights!r}")
    overrides = {"model": model, "input_shape": input_shape, "num_outputs": num_outputs, "model_kwargs": model_kwargs,
                 "weights": weights, "strict": strict}
    if path.is_dir():
        module, config = _load_folder(path, which, overrides, trusted)
    else:
        module, config = _load_file(path, overrides, trusted)
    module.eval()
    return module, config


WEIGHTS = ("raw", "ema")  # which weights of a run: the model's own, or their exponential moving average


def _no_ema(path: Path, holds: str) -> UsageError:
    return UsageError(f"{path}: {holds}, so it has no EMA weights; use --weights raw (Python: weights='raw'), or "
                      "train with --ema DECAY")


def _load_folder(path: Path, which: str, overrides: dict, trusted: bool) -> tuple[nn.Module, dict]:
    if which not in ("best", "latest"):
        raise UsageError(f"which checkpoint: expected 'best' or 'latest', got {which!r}")
    if (path / "checkpoints").is_dir() or (path / "config.json").is_file():  # a run folder
        from etappe.checkpoint import CheckpointStore

        saved = _read_config(path) or {}
        monitor = saved.get("monitor")
        monitor = monitor if isinstance(monitor, str) and monitor else "val_loss"
        # ranked as the trainer ranks them; without a monitor, best() would be the latest
        store = CheckpointStore(path / "checkpoints", monitor=monitor, mode=monitor_mode(monitor))
        ckpt = store.best() if which == "best" else store.latest()
        if ckpt is None:
            if (path / "model.safetensors").is_file():
                if overrides["weights"] == "ema":
                    raise UsageError(f"{path}: no valid checkpoint under {path / 'checkpoints'}, and model.safetensors "
                                     "holds the raw weights only; use --weights raw, or check the checkpoints with "
                                     "etappe verify")
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
    weights = overrides["weights"]
    entry = "ema" if weights == "ema" else "model"
    state = values.get(entry)
    if not isinstance(state, Mapping):
        if weights == "ema" and isinstance(values.get("model"), Mapping):
            raise _no_ema(path, "the checkpoint holds no 'ema' entry: the run was not trained with --ema")
        raise EtappeError(f"{path}: the checkpoint holds no {entry!r} entry; it holds: {', '.join(values)}")
    module = _build(config, overrides, str(path), trusted, state)
    _load_state(module, state, path, config, strict=overrides.get("strict", True))
    config["checkpoint"] = str(path)
    config["weights"] = weights
    return module, config


def _read_config(folder: Path) -> dict | None:
    """The run's ``config.json`` in ``folder``, or None when there is none."""
    return reading.read_json(folder, "config.json", "a run's config (a JSON object of config keys)",
                          "restore it from the run's checkpoint or remove it")


def _load_state(module: nn.Module, state: Mapping, path: Path, config: dict,
                strict: bool = True) -> kinds.LoadReport | None:
    """Weights into the model built for them, by the rules of every load (``kinds.load_into``: a wrapper's or
    other consistent prefix taken off or put on, said in a warning; a tied weight stored once). ``strict=False``
    loads what fits and returns the report of what did not; strict, a difference is one UsageError."""
    import warnings

    from etappe.checkpoint.errors import CheckpointError, CheckpointWarning

    try:
        report = kinds.load_into(module, state, str(path), strict=strict,
                                 advice="--non-strict (Python: strict=False) loads the weights that fit and lists "
                                        "the rest")
    except CheckpointError as exc:
        said = str(exc).removeprefix(f"cannot restore {path} into {type(module).__name__}: ")
        raise UsageError(f"{path} does not fit model {config['model']!r} with input shape "
                         f"{tuple(config['input_shape'])}: {said}") from None
    if report is not None and not report.complete:  # non-strict: what was left out is said, in one line
        warnings.warn(CheckpointWarning(f"{path}: loaded what fits model {config['model']!r}; {report.summary}"))
    return report


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
        meta = _read_config(path.parent)  # weights beside their run's config
    config = dict(meta or {})
    spec = config.get("data_spec")
    if not isinstance(spec, Mapping):
        config.pop("data_spec", None)
    elif not config.get("data"):
        config["data"] = spec.get("name")
    config["format"] = fmt
    if overrides["weights"] == "ema" and config.get("weights") != "ema" and fmt not in ("state-dict", "safetensors"):
        raise _no_ema(path, f"no sidecar says this {fmt} file was exported with --weights ema")
    if fmt in _PROGRAMS and not check_flag("trusted", trusted):
        raise TrustError(_PROGRAMS[fmt].format(path=path))
    if fmt == "onnx":
        module: nn.Module = _opened(path, "ONNX file", lambda: OnnxModule(path))
        shape = module.input_shape()
        if shape and not config.get("input_shape"):
            config["input_shape"] = list(shape)
    elif fmt == "export":
        def load_program() -> tuple[nn.Module, Any]:
            with quiet():
                program = torch.export.load(str(path))
                return ProgramModule(program), program.example_inputs

        module, examples = _opened(path, ".pt2 (torch.export) file", load_program)
        if not config.get("input_shape") and examples and examples[0] and torch.is_tensor(examples[0][0]):
            config["input_shape"] = list(examples[0][0].shape[1:])
    elif fmt == "torchscript":
        module = _opened(path, "TorchScript archive", lambda: torch.jit.load(str(path), map_location="cpu"))
    else:
        state = _read_state(path, overrides["weights"], config.get("weights") == "ema")
        module = _build(config, overrides, str(path), trusted, state)
        _load_state(module, state, path, config, strict=overrides.get("strict", True))
    if overrides["weights"] == "ema":
        config["weights"] = "ema"
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
        raise EtappeError(f"{path}: not a valid {what} ({first_line(exc)})") from None


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
    if path.name.endswith(FORMATS["onnx"]) or head[0] == 0x08:  # ModelProto starts with its ir_version, field 1
        raise EtappeError(f"{path}: not a valid ONNX file ({problem})")
    raise EtappeError(f"{path}: not a model file etappe reads (it starts with 0x{head[:8].hex()}); {_EXPECTED}")


def _read_state(path: Path, weights: str, exported_ema: bool) -> dict:
    """The state dict a weights file holds: the file itself, or the one under a wrapper's key; with ``weights``
    "ema", its ``ema`` entry, or the whole file when its sidecar says it holds EMA weights (``exported_ema``)."""
    from etappe.checkpoint import torchsave

    state = torchsave.read(path)  # weights only: checked archive, no pickled objects, sparse tensors checked
    if weights == "ema" and isinstance(state, Mapping) and isinstance(state.get("ema"), Mapping):
        state = state["ema"]
    elif weights == "ema" and not exported_ema:
        raise _no_ema(path, "the file holds no 'ema' entry and no sidecar says it was exported with --weights ema")
    elif isinstance(state, Mapping):
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
        _check_fits(name, tuple(shape), int(outputs), kwargs, state, where, config, overrides.get("strict", True))
    module = models.build(name, tuple(shape), int(outputs), **kwargs)
    if config.get("channels_last"):  # the layout the run trained in: eval then computes exactly as training did
        from etappe.build import to_channels_last

        to_channels_last(module)
    return module


MAX_SAMPLE_VALUES = 2**26  # values in one input sample a model is built for (a 4096x4096 RGBA image is 2**26)
MAX_OUTPUTS = 2**24


def _check_fits(name: str, shape: tuple[int, ...], outputs: int, kwargs: dict, state: Mapping, where: str,
                config: dict, strict: bool = True) -> None:
    """Build the model on the meta device (no memory) and compare its parameter and buffer shapes with the
    weights': a config can size a model far beyond its weights, and building that for real could take gigabytes.
    Not ``strict``, only weights of which nothing fits are refused here (the load says what was left out)."""
    from etappe import models

    try:
        with torch.device("meta"):
            probe = models.build(name, shape, outputs, **kwargs)
    except EtappeError:
        raise
    except Exception:  # a factory that cannot run on the meta device: the real build reports its own failure
        return
    wanted = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in kinds.unprefixed(state, wanted).items() if torch.is_tensor(v)}
    missing = [k for k in wanted if k not in given]
    unexpected = [k for k in given if k not in wanted]
    differ = [k for k in wanted if k in given and wanted[k] != given[k]]
    if not strict:
        if any(k in given and wanted[k] == given[k] for k in wanted):
            return
        raise UsageError(f"{where} does not fit model {name!r} with input shape {shape}: none of its "
                         f"{len(given)} tensors has a name and shape of the model's")
    if differ:
        detail = f"{differ[0]} is {given[differ[0]]} in the weights, {wanted[differ[0]]} in the model"
    elif missing:
        detail = f"the weights lack {missing[0]}"
    elif unexpected:
        detail = f"the model has no {unexpected[0]}"
    else:
        return
    raise UsageError(f"{where} does not fit model {name!r} with input shape {shape}: {detail}; --non-strict (Python: "
                     "strict=False) loads the weights that fit and lists the rest")


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0
