"""The ``etappe`` command: train, resume, eval, plot, inspect, verify, export, predict.

Handlers import torch and the rest lazily, so ``etappe --help`` and errors for bad flags answer at once.
Expected failures print one ``etappe: error:`` line and exit with their code: EtappeError (2 for bad input, 1
otherwise), a bad flag (argparse's, 2), and an OSError from the file system (a read-only folder, a full disk:
1). Nothing else is caught. A warning is one ``etappe: warning:`` line.
"""

from __future__ import annotations

import argparse
import errno
import sys
import warnings
from contextlib import contextmanager
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Iterator, NoReturn, Sequence

from etappe import rundir
from etappe.config import LOSSES, METRICS, OPTIMIZERS, SCHEDULERS, ConfigValueError, TrainConfig, read_toml
from etappe.errors import EtappeError, UsageError

HELP = {
    "data": "data set: digits (default, embedded), mnist, fashion-mnist, linear, sine, or idx:DIR",
    "model": "model: cnn (default), mlp, linear, sine-mlp, or module:factory for your own",
    "epochs": "epochs in all (on an existing run: train until this many are done)",
    "batch_size": "samples per mini-batch",
    "lr": "learning rate",
    "optimizer": f"optimizer: {', '.join(OPTIMIZERS)}",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay",
    "loss": f"loss: {', '.join(LOSSES)}; default cross-entropy for classes, mse for regression",
    "scheduler": f"LR scheduler: {', '.join(SCHEDULERS)}",
    "scheduler_interval": "step the scheduler per 'epoch' (default) or per 'step'",
    "step_size": "StepLR: epochs (or steps) between decays",
    "gamma": "StepLR/ExponentialLR decay factor",
    "clip_grad_norm": "clip the gradient norm to this value",
    "precision": "32, bf16-mixed (bf16 autocast: faster on CPUs with AMX/AVX-512 BF16 and on GPUs) or 16-mixed "
                 "(fp16 autocast with a gradient scaler; CUDA only)",
    "accumulate": "micro-batches per optimizer step (gradient accumulation); --batch-size is the micro-batch, so "
                  "a step sees accumulate x batch-size samples",
    "compile": "torch.compile the model for training (off by default: slower than eager for small models on CPU)",
    "ema": "keep an exponential moving average of the weights with this decay (e.g. 0.999), validate with it, and "
           "save it (eval/export --weights ema)",
    "warmup_steps": "linear learning-rate warm-up over this many optimizer steps (its factor multiplies a "
                    "--scheduler's)",
    "seed": "random seed (weights, data order, dropout)",
    "device": "auto (CUDA when present, else CPU), cpu, cuda, cuda:N",
    "deterministic": "use deterministic algorithms (default: on for CPU)",
    "channels_last": "keep a model with 2-d convolutions in channels-last memory format (faster convolutions, "
                     "results equal up to rounding; default: on for etappe's own models, off for module:factory)",
    "data_dir": "folder holding data set files (also $ETAPPE_DATA)",
    "num_workers": "DataLoader worker processes (0: batches by indexing, fastest on small machines)",
    "run_dir": "run folder (default runs/<data>-<model>; an existing folder is resumed)",
    "save_every": "also save a checkpoint every N optimizer steps",
    "save_every_seconds": "also save a checkpoint every T seconds",
    "async_save": "write checkpoints in a background thread",
    "strategy": "under torchrun: ddp (replicate the model) or fsdp (shard model and optimizer state, FSDP2)",
    "keep_last": "checkpoints to keep, newest first",
    "keep_best": "checkpoints to keep, best by --monitor",
    "monitor": f"metric for best checkpoints and early stopping: {', '.join(METRICS)}",
    "patience": "stop after this many epochs without improvement of --monitor",
    "quiet": "print only the final result",
    "tensorboard": "also write TensorBoard event files (needs tensorboard)",
}


TRUST_HELP = "load files that run code (TorchScript, .pt2) and import a module:factory named in a file"


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    for f in fields(TrainConfig):
        if f.name == "model_kwargs":
            parser.add_argument("--model-arg", dest="model_kwargs", action="append", metavar="KEY=VALUE",
                                default=argparse.SUPPRESS, help="keyword argument for the model factory (repeatable)")
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        if f.type.startswith("bool"):  # the annotation, a string: "bool", "bool | None"
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=HELP.get(f.name))
        else:
            kind = float if f.type.startswith("float") else int if f.type.startswith("int") else str
            parser.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS,
                                help=f"{HELP.get(f.name, '')} (default: {default})")


def _parse_model_args(pairs: list[str]) -> dict:
    import json

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--model-arg expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _config_from_args(args: argparse.Namespace, base: dict | None = None) -> tuple[TrainConfig, set[str]]:
    """Defaults, then the saved run's config (``base``), then --config FILE, then flags. Returns the config and
    the keys the user set explicitly."""
    values: dict[str, Any] = dict(base or {})
    from_file: dict[str, Any] = {}
    if getattr(args, "config", None):
        from_file = read_toml(args.config)
        values.update(from_file)
    names = {f.name for f in fields(TrainConfig)}
    flags = {name for name in names if name in vars(args)}
    for name in flags:
        value = getattr(args, name)
        values[name] = _parse_model_args(value) if name == "model_kwargs" else value
    values = {k: v for k, v in values.items() if k in names}
    try:
        return TrainConfig.from_dict(values), set(from_file) | flags
    except ConfigValueError as exc:
        if exc.name in from_file and exc.name not in flags:  # the file holds the bad value: name it, as it is written
            raise UsageError(exc.describe(args.config)) from None
        raise


def _saved_config(run_dir: Path | str) -> dict | None:
    """The run's config.json, read without following a link and bounded in size; None if there is none."""
    from etappe.checkpoint.reading import read_json

    if rundir.is_url(run_dir):
        return rundir.read_json(rundir.join(run_dir, "config.json"), "a JSON object of config keys",
                                "restore it, or start a new run with another --run-dir")
    if not run_dir.is_dir():
        return None
    return read_json(run_dir, "config.json", "a JSON object of config keys",
                     "restore it, or start a new run with another --run-dir")


def cmd_train(args: argparse.Namespace) -> int:
    config, explicit = _config_from_args(args)
    run_dir = config.resolved_run_dir()
    if "run_dir" not in explicit and run_dir.exists():
        # A default run folder that exists belongs to an earlier run: start a new one beside it.
        n = 2
        while Path(f"{run_dir}-{n}").exists():
            n += 1
        config = config.replace(run_dir=f"{run_dir}-{n}")
    elif (rundir.is_url(run_dir) or run_dir.exists()) and _saved_config(run_dir) is not None:
        return _resume(run_dir, args)
    return _train(config, allow_config_change=args.allow_config_change)


def cmd_resume(args: argparse.Namespace) -> int:
    run_dir = rundir.location(args.run)
    if _saved_config(run_dir) is None:
        if rundir.has_checkpoints(run_dir):  # made in Python (etappe.fit, Trainer) from objects the CLI cannot rebuild
            raise UsageError(
                f"{run_dir} was trained in Python with a model or data the command line cannot rebuild (no config.json); "
                f"resume it in Python: call the same etappe.fit(..., run_dir={str(run_dir)!r}) (or Trainer.fit) again")
        raise UsageError(f"{run_dir} is not a run folder (no config.json); start one with: etappe train --run-dir {run_dir}")
    return _resume(run_dir, args)


def _resume(run_dir: Path, args: argparse.Namespace) -> int:
    """Continue the run in ``run_dir`` with its saved config, changed only by the flags given."""
    from etappe.config import as_trained, check_resume

    saved = _saved_config(run_dir)
    saved.pop("data_spec", None)
    saved.pop("quiet", None)  # how much to print is this invocation's choice, not the run's
    saved["run_dir"] = str(run_dir)
    saved = as_trained(saved)  # keys an older etappe did not save, as they were then
    try:
        TrainConfig.from_dict(saved, source=rundir.join(run_dir, "config.json"))
    except UsageError as exc:  # a file of the run's, not this command's input
        raise EtappeError(f"{exc}; restore the file, or start a new run with another --run-dir") from None
    config, _ = _config_from_args(args, base=saved)
    if config.model == saved.get("model"):  # the name comes from the run's file: a built-in, or trusted, or named
        from etappe import models

        models.from_file(config.model, str(run_dir), trusted=args.trust, named=vars(args).get("model"), python=False)
    check_resume(run_dir, saved, config.to_dict(), allow=args.allow_config_change)
    return _train(config, allow_config_change=args.allow_config_change)


def _train(config: TrainConfig, allow_config_change: bool) -> int:
    import json
    import time

    start = time.perf_counter()
    from etappe.build import build_run, make_trainer
    from etappe.checkpoint.sharded import full_state_dict
    from etappe.loop import evaluate

    run = build_run(config)
    trainer = make_trainer(run, allow_config_change=allow_config_change)
    run_dir = config.resolved_run_dir()
    # A checkpoint that would make this a different run, or that is past the epochs asked, is refused here,
    # before config.json is rewritten.
    trainer.resume(epochs=config.epochs)
    if trainer.main:
        with _writing(rundir.join(run_dir, "config.json")):
            rundir.write_bytes(rundir.join(run_dir, "config.json"), (json.dumps(run.saved_config(), indent=2) + "\n").encode())
        if not config.quiet:
            print(f"Training {config.model} on {config.data} ({len(run.data.train)} train / {len(run.data.test)} test "
                  f"samples) on {trainer.device}; run folder {run_dir}", flush=True)
    from etappe import distributed

    clean = False
    try:
        trainer.fit(config.epochs)
        if trainer.main or trainer.sharded:  # a sharded model computes with every rank
            model = trainer.models["model"]
            result = evaluate(model, run.data.test, run.loss_fn)
            state = full_state_dict(model)
        if trainer.main:
            weights = rundir.join(run_dir, "model.safetensors")
            with _writing(weights):
                _save_weights(state, weights)
            acc = f" | test accuracy {100 * result['accuracy']:.2f}%" if "accuracy" in result else ""
            if config.ema is not None:
                acc += " (raw weights; EMA weights: etappe eval RUN --weights ema)"
            print(f"Test loss {result['loss']:.4f}{acc} ({result['samples']} samples) | weights {weights} | "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
        clean = True
    finally:
        distributed.shutdown(clean)
    return 0


def _save_weights(state: dict, path: Path | str) -> None:
    from safetensors.torch import save as st_save

    from etappe.checkpoint import tied

    rundir.write_bytes(path, st_save(tied.untied({k: v.cpu() for k, v in state.items()})))  # every name its own tensor, as any reader expects


def _on_copy(handler: Any, args: argparse.Namespace, attr: str, which: str = "latest") -> int:
    """``handler`` run on a temporary local copy of the run or checkpoint that the URL ``args.<attr>`` names
    (etappe.rundir.fetched); what it prints and its errors name the URL, never the copy."""
    import io
    from contextlib import redirect_stdout

    url = rundir.location(getattr(args, attr), "path")
    out = io.StringIO()
    with rundir.fetched(url, which) as copy:
        try:
            with redirect_stdout(out):
                return handler(argparse.Namespace(**{**vars(args), attr: str(copy.path)}))
        finally:
            sys.stdout.write(copy.shown(out.getvalue()))
            sys.stdout.flush()


def cmd_eval(args: argparse.Namespace) -> int:
    if rundir.looks_like_url(args.path):
        return _on_copy(cmd_eval, args, "path", args.checkpoint)
    from etappe.build import make_loss
    from etappe.data import load_dataset
    from etappe.export import load_model
    from etappe.loop import evaluate

    model, config = load_model(args.path, which=args.checkpoint, model=args.model, trusted=args.trust,
                               weights=args.weights, strict=not args.non_strict, input_shape=args.input_shape)
    data_name = args.data or config.get("data")
    if not data_name:
        raise UsageError(f"{args.path} does not record its data set; pass --data NAME")
    data = load_dataset(data_name, data_dir=args.data_dir or config.get("data_dir"), seed=config.get("seed", 0))
    _check_input_shape(args.path, config, data_name, tuple(data.spec.input_shape))
    _check_one_input_one_output(args.path, config, model, data)
    loss_fn = make_loss(config.get("loss", "auto"), data)
    result = evaluate(model, data.test, loss_fn, device=args.device)
    if config.get("weights") in ("raw", "ema"):  # which weights of a run were evaluated
        result["weights"] = config["weights"]
    if args.json:
        import json

        print(json.dumps(result))
    else:
        acc = f" | accuracy {100 * result['accuracy']:.2f}%" if "accuracy" in result else ""
        which = " (ema weights)" if result.get("weights") == "ema" else ""
        print(f"{data_name} test{which}: loss {result['loss']:.4f}{acc} ({result['samples']} samples)")
    return 0


def _check_one_input_one_output(path: str, config: dict, model: Any, data: Any) -> None:
    """eval feeds a data set's input to the model and scores one output against its target: a model with several
    inputs or outputs (an export's sidecar records them; a run's model is asked, on two test samples) is refused
    with what to do, rather than scored on a guess."""
    import torch

    from etappe.export.writers import flatten_outputs

    inputs = config.get("inputs")
    if isinstance(inputs, list) and len(inputs) > 1:
        names = ", ".join(str(i.get("name")) if isinstance(i, dict) else "?" for i in inputs)
        raise UsageError(f"{path} takes {len(inputs)} inputs ({names}); etappe eval feeds it one, the data set's: "
                         "evaluate it in Python with etappe.evaluate and data that yields what it takes")
    x, _ = data.test.batch(torch.arange(min(2, len(data.test))))
    with torch.no_grad():
        out = model(x)
    if not torch.is_tensor(out):
        names = flatten_outputs(out, str(path))[0]
        raise UsageError(f"{path} returns {len(names)} outputs ({', '.join(names)}); etappe eval scores one against "
                         "the data set's targets: wrap the model in an nn.Module that returns the one to score and "
                         "pass it to etappe.evaluate, or etappe predict to see every output")


def _check_input_shape(path: str, config: dict, data_name: str, found: tuple[int, ...]) -> None:
    """A data set whose samples are not shaped as the run's were is refused before the model sees them."""
    spec = config.get("data_spec")
    recorded = spec.get("input_shape") if isinstance(spec, dict) else None
    recorded = recorded if recorded is not None else config.get("input_shape")
    if not isinstance(recorded, (list, tuple)) or not all(isinstance(d, int) for d in recorded):
        return  # nothing recorded: the model itself will say
    if tuple(recorded) != found:
        trained = f" ({config['data']})" if isinstance(config.get("data"), str) else ""
        raise UsageError(f"{path} takes samples of shape {tuple(recorded)}{trained}; data set {data_name!r} has "
                         f"samples of shape {found}: evaluate it on a data set shaped like the one it was trained on")


def cmd_plot(args: argparse.Namespace) -> int:
    from etappe.log import read_history
    from etappe.plots import plot_history

    if rundir.looks_like_url(args.run) or rundir.looks_like_url(args.out):
        return _plot_remote(args)

    rows = read_history(Path(args.run))
    if not rows:
        raise EtappeError(f"{args.run}/metrics.jsonl holds no epochs yet; nothing to plot")
    out = Path(args.out) if args.out else Path(args.run) / "curves.png"
    with _writing(out, "--out"):
        plot_history(rows, out)
    print(f"wrote {out}")
    return 0


def _plot_remote(args: argparse.Namespace) -> int:
    """``etappe plot`` of a run on an object store (or into one): metrics.jsonl read, curves.png written, as one
    object each."""
    import tempfile

    from etappe.log import read_history
    from etappe.plots import plot_history, render

    if rundir.looks_like_url(args.run):
        url = rundir.location(args.run)
        data = rundir.read_object(rundir.join(url, "metrics.jsonl"))
        if data is None:
            raise EtappeError(f"{url}/metrics.jsonl does not exist; expected a run folder written by etappe train")
        with tempfile.TemporaryDirectory(prefix="etappe-plot-") as tmp:  # read by the same rules as a local run's
            Path(tmp, "metrics.jsonl").write_bytes(data)
            try:
                rows = read_history(Path(tmp))
            except EtappeError as exc:
                raise EtappeError(str(exc).replace(tmp, url)) from None
    else:
        rows = read_history(Path(args.run))
    if not rows:
        raise EtappeError(f"{args.run}/metrics.jsonl holds no epochs yet; nothing to plot")
    out = rundir.location(args.out, "--out") if args.out else rundir.join(rundir.location(args.run), "curves.png")
    if rundir.is_url(out):
        kind = out.rsplit(".", 1)[-1].lower() if "." in out.rsplit("/", 1)[-1] else "png"
        rundir.write_bytes(out, render(rows, kind))
    else:
        with _writing(out, "--out"):
            plot_history(rows, out)
    print(f"wrote {out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    if rundir.looks_like_url(args.path):
        return _on_copy(cmd_inspect, args, "path")
    from etappe.checkpoint import CheckpointStore, format_inspection, inspect

    path = Path(args.path)
    if (path / "checkpoints").is_dir():  # a run folder: its newest valid checkpoint
        latest = CheckpointStore(path / "checkpoints").latest()
        if latest is None:
            raise EtappeError(f"{path} holds no valid checkpoint; check it with: etappe verify {path}")
        path = latest
    info = inspect(path, trusted=args.trust)
    if args.json:
        import json

        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_inspection(info))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from etappe.comparison import diff

    for side in ("a", "b"):  # each URL compared through a local copy of its latest checkpoint
        if rundir.looks_like_url(getattr(args, side)):
            try:
                return _on_copy(cmd_diff, args, side)
            except EtappeError as exc:
                if isinstance(exc, UsageError):
                    raise
                raise UsageError(str(exc)) from None  # diff: every failure exits 2

    try:
        result = diff(args.a, args.b, atol=args.atol, trusted=args.trust)
    except EtappeError as exc:  # 1 says "they differ", so every failure exits 2, as diff(1) and cmp(1) do
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(_os_error_line(exc, writing=False)) from None
    if args.json:
        import json

        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.summary())
    return result.exit_code


def cmd_verify(args: argparse.Namespace) -> int:
    from etappe.checkpoint import CheckpointError, hf, verify_tree

    if rundir.looks_like_url(args.path):  # every checkpoint of a run or store on an object store, by its URL
        from etappe.checkpoint.objectstore import verify_url

        url = rundir.location(args.path, "path")
        results = verify_url(url)
        if not results:
            raise EtappeError(f"{url}: no checkpoint found (expected a checkpoint, a store or a run on the store)")
        return _print_verified(results)

    if hf.is_folder(Path(args.path)):  # model.safetensors or shards with their index: no manifest, no checksums
        try:
            print(f"ok    {args.path}: {hf.verify(Path(args.path))}")
        except CheckpointError as exc:
            print(f"FAIL  {' '.join(str(exc).split())}")
            return 1
        return 0
    if Path(args.path).is_file():  # a plain file: its own checksums, if it has any, and what loading it needs
        from etappe.checkpoint import torchsave

        try:
            print(f"ok    {args.path}: {torchsave.verify(Path(args.path))}")
        except CheckpointError as exc:
            print(f"FAIL  {' '.join(str(exc).split())}")
            return 1
        return 0
    results = verify_tree(args.path)
    if not results:
        raise EtappeError(f"{args.path}: no checkpoint found (expected a checkpoint folder or a run folder)")
    return _print_verified(results)


def _print_verified(results: list[tuple[Any, str | None]]) -> int:
    bad = 0
    for path, error in results:
        if error is None:
            print(f"ok    {path}")
        else:
            bad += 1
            print(f"FAIL  {error}")
    print(f"{len(results) - bad} of {len(results)} checkpoints verify")
    return 1 if bad else 0


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"expected positive sizes like 1,28,28, got {text!r}")
    return shape


def _positive(kind: type, what: str, example: str) -> Any:
    """An argparse type: a number of ``kind`` (int or float) that is positive and finite."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not (value > 0 and value != float("inf")):  # nan compares false
            raise argparse.ArgumentTypeError(f"expected a positive {what} like {example}, got {text!r}")
        return value

    return parse


def cmd_export(args: argparse.Namespace) -> int:
    from etappe.export import FORMATS, ExportError, export_path

    if rundir.looks_like_url(args.out):
        return _export_to_store(args)
    if rundir.looks_like_url(args.path):
        if args.out is None:  # RUN/export/ of a run on a store is on the store too
            return _export_to_store(argparse.Namespace(**{**vars(args), "out": _default_export_url(args)}))
        return _on_copy(cmd_export, args, "path", args.checkpoint)

    formats = list(FORMATS) if args.format == "all" else [args.format]
    try:
        with _writing(Path(args.out) if args.out else Path(args.path), "--out"):
            exported = export_path(args.path, formats, out=args.out, atol=args.atol, input_shapes=args.input_shape,
                                   which=args.checkpoint, model=args.model, data_dir=args.data_dir,
                                   trusted=args.trust, weights=args.weights, strict=not args.non_strict)
    except ExportError as exc:
        for e in exc.exported:
            print(e.summary())
        raise
    for e in exported:
        print(e.summary())
    return 0


def _default_export_url(args: argparse.Namespace) -> str:
    """RUN/export/model.<suffix> (RUN/export/ for several formats) of a run, or of the run a checkpoint is in."""
    from etappe.export import FORMATS

    url = rundir.location(args.path, "path")
    if _saved_config(url) is None and "/checkpoints/" in url:
        url = url.rsplit("/checkpoints/", 1)[0]
    folder = rundir.join(url, "export")
    return folder + "/" if args.format == "all" else rundir.join(folder, "model" + FORMATS[args.format])


def _export_to_store(args: argparse.Namespace) -> int:
    """Export into a temporary folder, then upload each file that passed (and its sidecar), one object each, to
    ``--out`` on the store: a file for one format, a folder (a URL ending in /) for several."""
    import io
    import tempfile
    from contextlib import redirect_stdout

    folder = args.out.endswith("/") or args.format == "all"
    out = rundir.location(args.out, "--out")
    with tempfile.TemporaryDirectory(prefix="etappe-export-") as tmp:
        local = Path(tmp) if folder else Path(tmp, out.rsplit("/", 1)[-1])
        printed = io.StringIO()
        try:
            with redirect_stdout(printed):
                code = cmd_export(argparse.Namespace(**{**vars(args), "out": str(local)}))
        finally:
            sys.stdout.write(printed.getvalue().replace(str(local), out))
        for path in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):  # the files that passed, sidecars too
            rundir.write_bytes(out + str(path)[len(str(local)):], path.read_bytes())
    return code


def cmd_predict(args: argparse.Namespace) -> int:
    if rundir.looks_like_url(args.model):
        return _on_copy(cmd_predict, args, "model", args.checkpoint)
    from etappe.predict import format_results, predict

    results = predict(args.model, args.inputs, top=args.top, resize=args.resize, which=args.checkpoint,
                      input_shape=args.input_shape, model_name=args.model_name, trusted=args.trust,
                      weights=args.weights, scale=args.scale, strict=not args.non_strict)
    if args.json:
        import json

        print(json.dumps(results))
    else:
        print(format_results(results))
    return 0


def _add_weights_flag(parser: argparse.ArgumentParser) -> None:
    """--weights and --non-strict, for the commands that load a run's model: eval, export, predict."""
    parser.add_argument("--weights", choices=("raw", "ema"), default="raw",
                        help="of a run or checkpoint: raw (default), the model's own weights, or ema, the averaged "
                             "weights a run trained with --ema saves")
    parser.add_argument("--non-strict", action="store_true",
                        help="load the weights that fit the model by name and shape, and list the ones left out "
                             "(default: every weight must fit)")


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag or value reported as one line and a pointer to --help, not the usage block."""

    def error(self, message: str) -> NoReturn:
        _usage_error(message, self.prog)


def _usage_error(message: str, prog: str) -> NoReturn:
    if _is_main_process():
        print(f"etappe: error: {message}; see {prog} --help", file=sys.stderr)
    raise SystemExit(2)


def _add_training_flags(parser: argparse.ArgumentParser, config_help: str, trust_help: str) -> None:
    """The flags `train` and `resume` share: --config, --allow-config-change, the config's flags, --trust."""
    parser.add_argument("--config", metavar="FILE.toml", help=config_help)
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even if the run-defining config changed")
    _add_config_flags(parser)
    parser.add_argument("--trust", action="store_true", help=trust_help)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("etappe")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="etappe", description="Train, evaluate, checkpoint, resume and export "
                                     "PyTorch models. With no command, trains the CNN on the embedded digits set.")
    parser.add_argument("--version", action="version", version=f"etappe {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train a model (resumes an existing --run-dir)")
    _add_training_flags(train, "TOML file with the same keys as the flags",
                        "on an existing run: import a module:factory its config.json names (runs that module's code)")
    train.set_defaults(handler=cmd_train)

    resume = sub.add_parser("resume", help="resume a run folder from its newest valid checkpoint")
    resume.add_argument("run", metavar="RUN")
    _add_training_flags(resume, argparse.SUPPRESS,
                        "import a module:factory the run's config.json names (runs that module's code)")
    resume.set_defaults(handler=cmd_resume)

    ev = sub.add_parser("eval", help="evaluate a run, checkpoint or weights file on a data set's test split")
    ev.add_argument("path", metavar="RUN_OR_FILE")
    ev.add_argument("--data", help="data set (default: the one the run was trained on)")
    ev.add_argument("--data-dir")
    ev.add_argument("--checkpoint", choices=("best", "latest"), default="best", help="which checkpoint of a run")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.add_argument("--model", help="registry name (or module:factory) to rebuild the weights into")
    ev.add_argument("--input-shape", type=_shape, metavar="C,H,W", help="one sample's shape, if not recorded")
    ev.add_argument("--trust", action="store_true", help=TRUST_HELP)
    _add_weights_flag(ev)
    ev.set_defaults(handler=cmd_eval)

    plot = sub.add_parser("plot", help="redraw a run's loss and accuracy curves")
    plot.add_argument("run", metavar="RUN")
    plot.add_argument("--out", help="image file (default RUN/curves.png)")
    plot.set_defaults(handler=cmd_plot)

    ins = sub.add_parser("inspect", help="list a checkpoint's or torch.save file's tensors, optimizer and counters, "
                                         "or a TorchScript, .pt2 or ONNX file's inputs, outputs and weights")
    ins.add_argument("path", metavar="PATH")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.add_argument("--trust", action="store_true",
                     help="allow full unpickling of torch.save files (runs code from the file!); TorchScript, .pt2 "
                          "and ONNX files are described without running them, with or without it")
    ins.set_defaults(handler=cmd_inspect)

    ver = sub.add_parser("verify", help="check sizes and checksums of a checkpoint or every checkpoint of a run")
    ver.add_argument("path", metavar="PATH")
    ver.set_defaults(handler=cmd_verify)

    dif = sub.add_parser("diff", help="compare two checkpoints or weights files tensor by tensor (exit 0: equal, "
                                      "1: they differ, 2: bad input)")
    dif.add_argument("a", metavar="A", help="run, checkpoint or Hugging Face style folder, or a torch.save, "
                                            ".safetensors, TorchScript, .pt2 or ONNX file (read as data, never run)")
    dif.add_argument("b", metavar="B", help="the same kinds as A")
    dif.add_argument("--atol", type=float, metavar="TOL",
                     help="call differences up to TOL (max abs) close, and exit 0 when every difference is close")
    dif.add_argument("--json", action="store_true", help="print every tensor and value compared, as JSON")
    dif.add_argument("--trust", action="store_true",
                     help="also read files that run code when opened (a whole pickled model, a TorchScript module "
                          "with its own __setstate__)")
    dif.set_defaults(handler=cmd_diff)

    exp = sub.add_parser("export", help="export for inference, then prove the file matches the model (parity check)")
    exp.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="run folder, checkpoint folder or weights file")
    exp.add_argument("--format", required=True,
                     choices=("state-dict", "safetensors", "torchscript", "export", "onnx", "all"),
                     help="state-dict (.pt), safetensors, torchscript, export (torch.export .pt2), onnx, or all")
    exp.add_argument("--out", help="output file (a folder with --format all; default RUN/export/model.<suffix>)")
    exp.add_argument("--atol", type=_positive(float, "finite number", "1e-5"), help="largest max abs difference allowed (default 1e-5 for float32)")
    exp.add_argument("--input-shape", type=_shape, metavar="C,H,W", action="append",
                     help="one sample's shape, if not recorded; once per input for a model with several inputs (a "
                          "module:factory gets the first as input_shape=; parity then runs on seeded random inputs)")
    exp.add_argument("--model", help="registry name (or module:factory) for a weights file without config")
    exp.add_argument("--checkpoint", choices=("best", "latest"), default="best", help="which checkpoint of a run")
    exp.add_argument("--data-dir", help="folder holding the data set (parity runs on its test inputs)")
    exp.add_argument("--trust", action="store_true", help=TRUST_HELP)
    _add_weights_flag(exp)
    exp.set_defaults(handler=cmd_export)

    pre = sub.add_parser("predict", help="run a checkpoint or exported model on images, IDX, .npy or CSV files")
    pre.add_argument("model", metavar="MODEL", help="run or checkpoint folder, or an exported file")
    pre.add_argument("inputs", metavar="INPUT", nargs="+",
                     help="images, IDX files, .npy arrays, CSV rows. A model with one input runs every file, each "
                          "one sample or a batch. A model with several inputs takes one file per input, in the "
                          "model's input order (as its export sidecar or ONNX file lists them, or as --input-shape "
                          "is given), or as NAME=FILE; every file must hold the same number of samples")
    pre.add_argument("--scale", default="auto", metavar="auto|none|N",
                     help="how file values become model inputs. auto (default): as the model was trained: images "
                          "/ 255 (16-bit: / 65535), integer arrays scaled like its data set (digits / 16, MNIST / "
                          "255), floating arrays and CSV as they are; none: every value as the file holds it; a "
                          "number N: every value / N (e.g. 16 for digits saved as floats 0..16). A warning says "
                          "when the inputs are far outside the range the model was trained on")
    pre.add_argument("--top", type=_positive(int, "whole number", "5"), default=1, metavar="K", help="show the K most probable classes")
    pre.add_argument("--json", action="store_true", help="print JSON")
    pre.add_argument("--resize", action="store_true", help="resize and convert images to the model's input shape")
    pre.add_argument("--input-shape", type=_shape, metavar="C,H,W", action="append",
                     help="one sample's shape, if not recorded; once per input, in order, for a model with several "
                          "(--model module:factory is built with the first)")
    pre.add_argument("--checkpoint", choices=("best", "latest"), default="best", help="which checkpoint of a run")
    pre.add_argument("--model", dest="model_name", help="registry name (or module:factory) to rebuild weights into")
    pre.add_argument("--trust", action="store_true", help=TRUST_HELP)
    _add_weights_flag(pre)
    pre.set_defaults(handler=cmd_predict)
    return parser


def _is_main_process() -> bool:
    """Under torchrun, only rank 0 reports (every rank meets the same expected failure)."""
    import os

    return os.environ.get("RANK", "0") == "0"


@contextmanager
def _writing(path: Path, flag: str = "--run-dir") -> Iterator[None]:
    """Around a write of the CLI's: an OSError of the file system (a read-only folder, a full disk, no permission)
    becomes one line naming the path and the reason. Every file is written atomically: nothing is half-written."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _WRITE_ERRORS:  # others (a file not found) say their own
            raise
        raise EtappeError(_os_error_line(exc, path, flag)) from None


_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


def _os_error_line(exc: OSError, path: Path | str | None = None, flag: str = "--run-dir", writing: bool = True) -> str:
    where = exc.filename or path
    if path is not None and Path(str(where)).name.startswith(".tmp-"):  # an atomic write's temporary file
        where = path
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "free some space and run it again (nothing was half-written)"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = f"choose a folder you can write with {flag}"
    else:
        hint = "check the path"
    if not where:
        return f"{reason}; {hint}"
    return f"cannot write {where}: {reason}; {hint}" if writing else f"{where}: {reason}; {hint}"


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """A warning is one ``etappe: warning:`` line, without the source file and line that raised it."""
    if _is_main_process():
        print(f"etappe: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["train", *argv]
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            _usage_error(f"unrecognized arguments: {' '.join(extra)}",
                         f"etappe {args.command}" if getattr(args, "command", None) else "etappe")
    except SystemExit as exc:  # --help (0) or a bad flag (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(args)


def entry() -> NoReturn:
    """The ``etappe`` command and ``python -m etappe``: ``main``, then the process ends. A torchrun worker whose
    process group etappe joined and left ends without the interpreter's teardown (``_exit_now``); ``main`` itself
    never ends the process, so calling it from Python is safe."""
    from etappe import distributed

    try:
        code = main()
    except Exception:
        if not distributed.left_a_group():
            raise
        import traceback

        traceback.print_exc()
        code = 1
    if distributed.left_a_group():
        _exit_now(code)
    sys.exit(code)


def _exit_now(code: int) -> NoReturn:
    """End a torchrun worker that has left its process group without the interpreter's teardown. Objects that
    outlive the group (FSDP's module state, gloo's work records holding tensors) are freed during finalization
    by C++ threads that then need the GIL, and a worker could abort with SIGABRT ("terminate called without an
    active exception", torch.distributed with gloo) after everything was saved, which torchrun reports as the
    run failing. Every file was written and closed, and every background save waited for, before this point."""
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed (a broken pipe) or gone: nothing more can be said anyway
            pass
    os._exit(code)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.handler(args)
    except EtappeError as exc:
        if _is_main_process():
            print(f"etappe: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # the reader went away (| head): nothing more to say
        sys.stderr.close()
        return 0
    except OSError as exc:  # the file system refused (outside the writes wrapped above): still an expected failure
        if _is_main_process():
            print(f"etappe: error: {_os_error_line(exc, writing=False)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("etappe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    entry()
