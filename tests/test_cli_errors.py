"""Every command of the CLI given malformed arguments and files: one ``etappe: error:`` line, no traceback, exit 2
for bad input and 1 otherwise, and nothing written for a config that does not validate.

Most cases call ``etappe.cli.main`` in this process (torch is imported once); a few run ``python -m etappe`` in
a real subprocess, one per command at least, to see what a user's terminal sees.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etappe.cli import main
from etappe.config import TrainConfig
from etappe.errors import UsageError
from tests.conftest import run_cli


def cli(capsys, *args) -> tuple[int, str, str]:
    """``etappe ARGS`` in this process: (exit code, stdout, stderr). Any exception that escapes fails the test."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse exits; what it printed is what a user sees
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error(code: int, err: str, expected_code: int, *fragments: str) -> str:
    """The error output is exactly one ``etappe: error:`` line (warning lines aside) and the exit code fits."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("etappe: warning: ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("etappe: error: "), err
    assert code == expected_code, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A finished 2-epoch run and the malformed files the cases use, in one folder."""
    root = tmp_path_factory.mktemp("cli-errors")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(["train", "--epochs", "2", "--batch-size", "64", "--run-dir", str(root / "run"), "--quiet"])
    assert code == 0, err.getvalue()
    (root / "garbage.pt2").write_bytes(os.urandom(300))
    (root / "garbage.onnx").write_bytes(os.urandom(300))
    (root / "garbage.pt").write_bytes(os.urandom(300))
    with zipfile.ZipFile(root / "whole.pt2", "w") as z:  # a zip archive, as a .pt2 is, cut short
        z.writestr("model/archive_format", "pt2")
        z.writestr("model/data.bin", os.urandom(4000))
    (root / "truncated.pt2").write_bytes((root / "whole.pt2").read_bytes()[:1500])
    torch.save({"w": torch.randn(64, 64)}, root / "whole.pt")
    (root / "truncated.pt").write_bytes((root / "whole.pt").read_bytes()[:2000])
    onnx_bytes = b"\x08\x07\x12\x07pytorch" + os.urandom(64)  # a protobuf's start, then noise
    (root / "truncated.onnx").write_bytes(onnx_bytes)
    np.save(root / "input.npy", np.zeros((1, 1, 8, 8), dtype=np.float32))
    toml = {
        "epochs-string": 'epochs = "three"\n',
        "lr-string": 'lr = "0.01"\n',
        "batch-float": "batch_size = 3.5\n",
        "epochs-bool": "epochs = true\n",
        "deterministic-int": "deterministic = 1\n",
        "step-size-zero": 'scheduler = "step"\nstep_size = 0\n',
        "gamma-negative": 'scheduler = "exponential"\ngamma = -0.5\n',
        "keep-negative": "keep_last = -1\n",
        "keep-float": "keep_best = 1.5\n",
        "monitor-unknown": 'monitor = "val_f1"\n',
        "patience-zero": "patience = 0\n",
        "clip-string": 'clip_grad_norm = "1.0"\n',
        "data-number": "data = 3\n",
        "kwargs-string": 'model_kwargs = "hidden=3"\n',
        "kwargs-date": "[model_kwargs]\nwhen = 1979-05-27\n",
        "lr-nan": "lr = nan\n",
        "seed-negative": "seed = -1\n",
        "not-toml": "epochs = = 3\n",
        "unknown-key": "epoch = 3\n",
    }
    for name, text in toml.items():
        (root / f"{name}.toml").write_text(text)
    (root / "userfactories.py").write_text(textwrap.dedent("""
        from torch import nn
        class NoArgs(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(64, 10)
        class Positional(nn.Module):
            def __init__(self, in_features, classes):
                super().__init__()
                self.fc = nn.Linear(in_features, classes)
        def not_a_module(input_shape, num_outputs):
            return "a string"
    """))
    return root


# ----------------------------------------------------------------------------- bad flags and bad configs: exit 2


@pytest.mark.parametrize("args,fragments", [
    (["--lr", "abc"], ["argument --lr: invalid float value: 'abc'"]),
    (["--epochs", "3.5"], ["argument --epochs: invalid int value: '3.5'"]),
    (["--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
    (["--optimizer", "rmsprop"], ["unknown optimizer 'rmsprop'"]),
    (["--epochs", "0"], ["--epochs 0 is not valid"]),
    (["--scheduler", "step", "--step-size", "0"], ["--step-size 0 is not valid", "positive integer"]),
    (["--scheduler", "step", "--gamma", "0"], ["--gamma 0.0 is not valid", "positive number"]),
    (["--monitor", "val_f1"], ["unknown monitor 'val_f1'", "val_loss", "val_accuracy"]),
    (["--data", "sine", "--model", "sine-mlp", "--monitor", "val_accuracy"], ["--monitor val_accuracy", "sine"]),
    (["--keep-last", "-1"], ["--keep-last -1 is not valid"]),
    (["--momentum", "-0.5"], ["--momentum -0.5 is not valid"]),
    (["--lr", "nan"], ["--lr nan is not valid"]),
    (["--lr", "inf"], ["--lr inf is not valid"]),
    (["--patience", "0"], ["--patience 0 is not valid"]),
    (["--save-every-seconds", "-1"], ["--save-every-seconds -1.0 is not valid"]),
    (["--model-arg", "noequals"], ["--model-arg expects KEY=VALUE"]),
    (["--model", "cnn", "--model-arg", "hidden=3"], ["model 'cnn'", "'hidden'"]),
    (["--device", "tpu"], ["unknown device 'tpu'"]),
])
def test_train_bad_flags_give_one_line_exit_2_and_write_nothing(capsys, tmp_path, args, fragments):
    epochs = [] if "--epochs" in args else ["--epochs", "1"]
    code, _, err = cli(capsys, "train", *args, *epochs, "--run-dir", tmp_path / "run")
    one_error(code, err, 2, *fragments)
    assert not (tmp_path / "run").exists()


def test_the_largest_seed_that_validates_also_trains_with_workers(capsys, tmp_path):
    code, _, err = cli(capsys, "train", "--data", "linear", "--model", "linear", "--seed", 2**32 - 1, "--num-workers",
                       "1", "--epochs", "1", "--run-dir", tmp_path / "run", "--quiet")
    assert code == 0, err
    code, _, err = cli(capsys, "train", "--seed", 2**32, "--run-dir", tmp_path / "other")
    one_error(code, err, 2, "--seed 4294967296 is not valid")


def test_bad_flag_value_is_one_line_with_a_pointer_to_help(capsys, tmp_path):
    code, _, err = cli(capsys, "train", "--lr", "abc")
    line = one_error(code, err, 2)
    assert line.startswith("etappe: error: argument --lr: invalid float value: 'abc'")
    assert "etappe train --help" in line and "usage:" not in err


@pytest.mark.parametrize("name,fragments", [
    ("epochs-string", ["epochs = 'three' is not valid", "positive integer"]),
    ("lr-string", ["lr = '0.01' is not valid", "without quotes"]),
    ("batch-float", ["batch_size = 3.5 is not valid", "positive integer"]),
    ("epochs-bool", ["epochs = True is not valid"]),
    ("deterministic-int", ["deterministic = 1 is not valid", "true or false"]),
    ("step-size-zero", ["step_size = 0 is not valid"]),
    ("gamma-negative", ["gamma = -0.5 is not valid"]),
    ("keep-negative", ["keep_last = -1 is not valid"]),
    ("keep-float", ["keep_best = 1.5 is not valid"]),
    ("monitor-unknown", ["unknown monitor 'val_f1'"]),
    ("patience-zero", ["patience = 0 is not valid"]),
    ("clip-string", ["clip_grad_norm = '1.0' is not valid"]),
    ("data-number", ["data = 3 is not valid"]),
    ("kwargs-string", ["model_kwargs = 'hidden=3' is not valid"]),
    ("kwargs-date", ["model_kwargs", "is not valid"]),
    ("lr-nan", ["lr = nan is not valid"]),
    ("seed-negative", ["seed = -1 is not valid"]),
    ("not-toml", ["is not valid TOML"]),
    ("unknown-key", ["unknown keys epoch"]),
])
def test_train_bad_toml_config_gives_one_line_exit_2_and_no_run_folder(capsys, files, tmp_path, name, fragments):
    code, _, err = cli(capsys, "train", "--config", files / f"{name}.toml", "--run-dir", tmp_path / "run")
    line = one_error(code, err, 2, *fragments)
    assert f"{name}.toml" in line  # the file that holds the bad value is named
    assert not (tmp_path / "run").exists()


def test_a_bad_toml_value_in_the_default_run_folder_leaves_no_folder(capsys, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "train", "--config", files / "batch-float.toml")
    one_error(code, err, 2, "batch_size = 3.5")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("factory,fragments", [
    ("NoArgs", ["userfactories:NoArgs", "input_shape=", "num_outputs="]),
    ("Positional", ["userfactories:Positional", "input_shape=", "num_outputs="]),
    ("not_a_module", ["userfactories:not_a_module", "torch.nn.Module", "str", "input_shape="]),
])
def test_a_user_model_that_does_not_take_etappes_arguments_says_how_it_is_called(capsys, files, tmp_path, monkeypatch,
                                                                                  factory, fragments):
    monkeypatch.syspath_prepend(str(files))
    code, _, err = cli(capsys, "train", "--model", f"userfactories:{factory}", "--run-dir", tmp_path / "run")
    one_error(code, err, 2, *fragments)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- resume


def test_resume_refusals_are_one_line_and_leave_the_run_as_it_was(capsys, files, tmp_path):
    run = files / "run"
    before = (run / "config.json").read_bytes()
    code, _, err = cli(capsys, "resume", run, "--batch-size", "32")
    one_error(code, err, 2, "batch_size: 64 -> 32", "--allow-config-change")
    code, _, err = cli(capsys, "resume", run, "--lr", "abc")
    one_error(code, err, 2, "argument --lr: invalid float value: 'abc'", "etappe resume --help")
    code, _, err = cli(capsys, "train", "--run-dir", run, "--epochs", "1")  # the run has 2 epochs done
    one_error(code, err, 2, "2 epochs done", "epochs=1", "fewer")
    code, _, err = cli(capsys, "resume", tmp_path)
    one_error(code, err, 2, "is not a run folder")
    assert (run / "config.json").read_bytes() == before


@pytest.mark.parametrize("content,fragments", [
    ("{not json", ["config.json", "not valid JSON"]),
    ("[1, 2]", ["config.json", "JSON object"]),
    ('{"data": "digits", "model": "cnn", "batch_size": 3.5}', ["config.json", "batch_size = 3.5 is not valid"]),
])
def test_resume_of_a_damaged_config_json_is_one_line_exit_1(capsys, files, tmp_path, content, fragments):
    run = tmp_path / "run"
    shutil.copytree(files / "run", run)
    (run / "config.json").write_text(content)
    code, _, err = cli(capsys, "resume", run)
    one_error(code, err, 1, *fragments)
    code, _, err = cli(capsys, "train", "--run-dir", run)
    one_error(code, err, 1, *fragments)


# ----------------------------------------------------------------------------- the other commands


@pytest.mark.parametrize("args,code,fragments", [
    (["eval", "{root}/missing"], 2, ["missing"]),
    (["eval", "{root}/run", "--checkpoint", "newest"], 2, ["argument --checkpoint: invalid choice"]),
    (["eval", "{root}/run", "--device", "cuda:99"], 2, ["cuda:99"]),
    (["plot", "{root}/missing"], 1, ["metrics.jsonl does not exist"]),
    (["inspect", "{root}/missing"], 1, ["missing"]),
    (["verify", "{root}/missing"], 1, ["missing"]),
    (["export", "{root}/run"], 2, ["the following arguments are required: --format"]),
    (["export", "{root}/run", "--format", "tflite"], 2, ["argument --format: invalid choice: 'tflite'"]),
    (["export", "{root}/run", "--format", "onnx", "--atol", "abc"], 2, ["argument --atol: invalid float value"]),
    (["export", "{root}/run", "--format", "onnx", "--input-shape", "0,1"], 2, ["argument --input-shape"]),
    (["predict", "{root}/run"], 2, ["the following arguments are required: INPUT"]),
    (["predict", "{root}/run", "{root}/input.npy", "--top", "many"], 2, ["argument --top: invalid int value"]),
    (["predict", "{root}/run", "{root}/missing.npy"], 2, ["missing.npy"]),
    (["frobnicate"], 2, ["invalid choice: 'frobnicate'"]),
])
def test_other_commands_bad_arguments(capsys, files, args, code, fragments):
    got, _, err = cli(capsys, *[a.format(root=files) for a in args])
    one_error(got, err, code, *fragments)


@pytest.mark.parametrize("args", [
    ["predict", "{root}/garbage.pt2", "{root}/input.npy"],
    ["predict", "{root}/truncated.pt2", "{root}/input.npy"],
    ["predict", "{root}/garbage.onnx", "{root}/input.npy"],
    ["predict", "{root}/truncated.onnx", "{root}/input.npy"],
    ["eval", "{root}/garbage.pt2", "--data", "digits"],
    ["eval", "{root}/truncated.onnx", "--data", "digits"],
    ["eval", "{root}/truncated.pt", "--data", "digits"],
    ["inspect", "{root}/garbage.pt"],
    ["inspect", "{root}/truncated.pt"],
    ["inspect", "{root}/truncated.pt2"],
])
def test_garbage_and_truncated_model_files_are_one_line_exit_1(capsys, files, args):
    code, _, err = cli(capsys, *[a.format(root=files) for a in args])
    one_error(code, err, 1)


@pytest.mark.parametrize("name", ["garbage.pt", "truncated.pt", "truncated.pt2"])
def test_verify_of_a_bad_file_reports_it_as_verify_reports_and_exits_1(capsys, files, name):
    code, out, err = cli(capsys, "verify", files / name)
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert code == 1 and len(fails) == 1 and name in fails[0] and not err.strip(), (out, err)


def test_plot_of_garbage_metrics_is_one_line_exit_1(capsys, files, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 0.5}\n{"epoch": 2, "train_lo\n')
    code, _, err = cli(capsys, "plot", run)
    one_error(code, err, 1, "metrics.jsonl", "line 2")


# ----------------------------------------------------------------------------- warnings


def test_a_warning_is_one_etappe_warning_line(capsys, files, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(files / "run", run)
    newest = sorted((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    state = newest / "state.json"
    state.write_bytes(b"x" + state.read_bytes()[1:])  # the checksum no longer matches: the store skips it
    code, out, err = cli(capsys, "inspect", run)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith("etappe: warning: ") for line in lines), err
    assert any("skipping checkpoint" in line and newest.name in line for line in lines), err
    assert ".py:" not in err and "warnings.warn" not in err


# ----------------------------------------------------------------------------- where the CLI writes: exit 1


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str):
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@contextlib.contextmanager
def read_only_copy(src: Path, dst: Path):
    """A copy of ``src`` that cannot be written: a read-only mount for root (who ignores file modes), else modes."""
    if os.geteuid() == 0:
        with mounted_tmpfs(dst, "64m"):
            shutil.copytree(src, dst, dirs_exist_ok=True)
            subprocess.run(["mount", "-o", "remount,ro", str(dst)], check=True)
            yield dst
    else:
        shutil.copytree(src, dst)
        for p in [dst, *dst.rglob("*")]:
            p.chmod(p.stat().st_mode & 0o555)
        try:
            yield dst
        finally:
            for p in [dst, *dst.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o700)


def test_plot_into_a_read_only_run_folder_is_one_line_exit_1(capsys, files, tmp_path):
    with read_only_copy(files / "run", tmp_path / "ro") as run:
        code, _, err = cli(capsys, "plot", run)
        one_error(code, err, 1, "curves.png")


def test_export_into_a_read_only_run_folder_is_one_line_exit_1(capsys, files, tmp_path):
    with read_only_copy(files / "run", tmp_path / "ro") as run:
        code, _, err = cli(capsys, "export", run, "--format", "safetensors")
        one_error(code, err, 1, str(run))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small file system needs root")
def test_a_full_disk_at_train_start_is_one_line_exit_1_and_nothing_half_written(capsys, tmp_path):
    with mounted_tmpfs(tmp_path / "small", "256k") as disk:
        fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):  # fill it to the last block
            while True:
                os.write(fd, b"\0" * 4096)
        os.close(fd)
        code, _, err = cli(capsys, "train", "--epochs", "1", "--run-dir", disk / "run")
        line = one_error(code, err, 1, str(disk / "run"))
        assert "No space left on device" in line
        assert not (disk / "run" / "config.json").exists()
        assert not [p for p in disk.rglob("*") if p.name.startswith(".tmp-")]


# ----------------------------------------------------------------------------- what a terminal sees


@pytest.mark.parametrize("args,code,fragments", [
    (["train", "--lr", "abc"], 2, ["argument --lr: invalid float value: 'abc'"]),
    (["train", "--config", "{root}/batch-float.toml", "--run-dir", "{tmp}/new"], 2, ["batch_size = 3.5"]),
    (["resume", "{root}/run", "--batch-size", "32"], 2, ["batch_size: 64 -> 32"]),
    (["eval", "{root}/garbage.pt2", "--data", "digits"], 1, []),
    (["inspect", "{root}/garbage.pt"], 1, []),
    (["verify", "{tmp}/missing"], 1, ["missing"]),
    (["export", "{root}/run", "--format", "tflite"], 2, ["invalid choice: 'tflite'"]),
    (["predict", "{root}/garbage.onnx", "{root}/input.npy"], 1, []),
    (["plot", "{tmp}/missing"], 1, ["metrics.jsonl does not exist"]),
])
def test_in_a_real_process(files, tmp_path, args, code, fragments):
    result = run_cli(*[a.format(root=files, tmp=tmp_path) for a in args], cwd=tmp_path)
    one_error(result.returncode, result.stderr, code, *fragments)
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- the config's rule, over random values

FIELDS = [f for f in TrainConfig.__dataclass_fields__]
ANY_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-3, 3), st.floats(), st.text(max_size=8),
              st.sampled_from(["digits", "cnn", "sgd", "adam", "step", "val_loss", "epoch", "auto", "0.01", "3"]),
              st.datetimes(), st.dates()),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3),
                            st.tuples(inner, inner)),
    max_leaves=6,
)


NAMES = ["digits", "sine", "cnn", "mlp", "sgd", "adam", "adamw", "none", "step", "cosine", "exponential", "epoch",
         "val_loss", "val_accuracy", "train_loss", "val_f1", "auto", "cpu", "mse", "ddp", "fsdp", "runs/x", ""]


def plausible(name: str):
    """Values of the field's own kind, valid or just out of range, so that many drawn configs validate."""
    default = TrainConfig.__dataclass_fields__[name].default
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(-2, 40)
    if isinstance(default, float):
        return st.floats(-1, 2)
    if isinstance(default, str):
        return st.sampled_from([default, *NAMES])
    if default is None:
        return st.none() | st.booleans() | st.integers(-1, 5) | st.floats(-1, 5) | st.sampled_from(NAMES)
    return st.dictionaries(st.text(max_size=3), st.integers() | st.text(max_size=3) | st.tuples(st.integers()),
                           max_size=2)


CONFIG_DICTS = st.lists(st.sampled_from(FIELDS + ["epoch"]), unique=True, max_size=8).flatmap(
    lambda keys: st.fixed_dictionaries({k: (plausible(k) if k in FIELDS else st.none()) | ANY_VALUE for k in keys}))


def test_every_config_field_has_a_rule_and_a_rule_normalizes_what_json_would_change():
    from etappe.config import _CHECKS

    assert set(_CHECKS) == set(FIELDS)
    config = TrainConfig(lr=1, run_dir=Path("runs/x"), model_kwargs={"sizes": (32, 16)})
    assert (config.lr, config.run_dir, config.model_kwargs) == (1.0, "runs/x", {"sizes": [32, 16]})
    assert type(config.lr) is float


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CONFIG_DICTS)
def test_any_toml_like_dict_is_a_valid_config_or_a_usage_error(values):
    try:
        config = TrainConfig.from_dict(values)
    except UsageError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    again = TrainConfig.from_dict(config.to_dict())
    assert again == config
    through_json = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict(), allow_nan=False)))
    assert through_json == config


# ------------------------------------------------------------------- the attacker's findings (issue 11)

def copy_run(files: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(files / "run", dst, symlinks=True)
    return dst


def test_a_symlinked_tensorboard_folder_is_refused_and_nothing_is_written_outside(capsys, files, tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    run = copy_run(files, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / "tensorboard").symlink_to(outside, target_is_directory=True)
    code, _, err = cli(capsys, "train", "--run-dir", run, "--epochs", "3", "--tensorboard", "--quiet")
    one_error(code, err, 1, "tensorboard", "symbolic link")
    assert list(outside.iterdir()) == []


def test_a_symlinked_config_json_is_not_read(capsys, files, tmp_path):
    run = copy_run(files, tmp_path)
    outside = tmp_path / "cfg.json"
    outside.write_bytes((run / "config.json").read_bytes())
    (run / "config.json").unlink()
    (run / "config.json").symlink_to(outside)
    code, _, err = cli(capsys, "train", "--run-dir", run, "--epochs", "3", "--quiet")
    one_error(code, err, 1, "config.json", "symbolic link")
    code, _, err = cli(capsys, "resume", run, "--epochs", "3", "--quiet")
    one_error(code, err, 1, "config.json", "symbolic link")


def test_a_symlinked_metrics_jsonl_is_not_plotted(capsys, files, tmp_path):
    run = copy_run(files, tmp_path)
    outside = tmp_path / "m.jsonl"
    outside.write_bytes((run / "metrics.jsonl").read_bytes())
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(outside)
    code, _, err = cli(capsys, "plot", run, "--out", tmp_path / "c.png")
    one_error(code, err, 1, "metrics.jsonl", "symbolic link")
    assert not (tmp_path / "c.png").exists()


def test_bce_on_class_labels_is_refused_with_what_to_use(capsys, tmp_path):
    code, _, err = cli(capsys, "train", "--loss", "bce", "--run-dir", tmp_path / "r", "--epochs", "1", "--quiet")
    one_error(code, err, 2, "bce", "class label", "cross-entropy")


def test_eval_on_a_data_set_of_another_input_shape_names_both(capsys, files):
    code, _, err = cli(capsys, "eval", files / "run", "--data", "sine")
    one_error(code, err, 2, "sine", "(1, 8, 8)")


def test_a_change_of_optimizer_type_is_refused_even_when_changes_are_allowed(capsys, files, tmp_path):
    run = copy_run(files, tmp_path)
    before = (run / "config.json").read_bytes()
    code, _, err = cli(capsys, "resume", run, "--optimizer", "sgd", "--allow-config-change", "--epochs", "3", "--quiet")
    one_error(code, err, 2, "adam", "sgd", "new run folder")
    assert (run / "config.json").read_bytes() == before


def test_a_deeply_nested_config_json_is_one_line(capsys, files, tmp_path):
    run = copy_run(files, tmp_path)
    (run / "config.json").unlink()
    (run / "config.json").write_text("[" * 100000 + "]" * 100000)
    code, _, err = cli(capsys, "resume", run, "--epochs", "3", "--quiet")
    one_error(code, err, 1, "config.json")


@pytest.mark.parametrize("args,fragment", [
    (["export", "RUN", "--format", "state-dict", "--atol", "-1"], "--atol"),
    (["export", "RUN", "--format", "state-dict", "--atol", "0"], "--atol"),
    (["export", "RUN", "--format", "state-dict", "--atol", "nan"], "--atol"),
    (["export", "RUN", "--format", "state-dict", "--atol", "inf"], "--atol"),
    (["predict", "RUN", "INPUT", "--top", "0"], "argument --top"),
    (["predict", "RUN", "INPUT", "--top", "-3"], "argument --top"),
])
def test_non_positive_numeric_flags_are_refused_at_parse_time(capsys, files, tmp_path, args, fragment):
    args = [str(files / "run") if a == "RUN" else str(files / "input.npy") if a == "INPUT" else a for a in args]
    out = tmp_path / "out"
    if args[0] == "export":
        args += ["--out", str(out / "m.pt")]
    code, _, err = cli(capsys, *args)
    one_error(code, err, 2, fragment)
    assert not out.exists()


# ----------------------------------------------------------------------------- how the process ends

def test_main_in_a_callers_process_group_trains_and_leaves_the_group_to_the_caller(capsys, tmp_path):
    """``main`` called from Python inside the caller's own process group: it trains in it, returns its code, and
    neither destroys the group nor ends the process (only the ``etappe`` command's entry point may)."""
    import torch.distributed as dist

    from etappe import distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        code, _, err = cli(capsys, "train", "--epochs", "1", "--batch-size", "128", "--run-dir", tmp_path / "run",
                           "--quiet")
        assert code == 0, err
        assert dist.is_initialized() and not distributed.left_a_group()
    finally:
        dist.destroy_process_group()


def test_a_reader_that_goes_away_ends_the_command_quietly(files, tmp_path):
    """``etappe inspect RUN --json | head -c 0``: the write meets a closed pipe; exit 0, nothing on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "etappe", "inspect", str(files / "run"), "--json"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the command writes anything
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and err == "", err
