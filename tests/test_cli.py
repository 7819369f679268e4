"""The CLI end to end, in real subprocesses: the default run, the flags, the files it writes, bad input."""

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from tests.conftest import ROOT, needs_fashion, run_cli


def one_line_error(result, code):
    assert result.returncode == code, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("etappe: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`etappe` with no arguments, as README's first command runs it."""
    cwd = tmp_path_factory.mktemp("default")
    start = time.perf_counter()
    result = run_cli(cwd=cwd)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    return cwd, result, seconds


def test_default_run_reaches_97_percent_on_digits(default_run):
    cwd, result, seconds = default_run
    final = result.stdout.strip().splitlines()[-1]
    assert final.startswith("Test loss") and "test accuracy" in final
    accuracy = float(final.split("test accuracy ")[1].split("%")[0])
    assert accuracy >= 97.0, final
    print(f"default run: {accuracy}% in {seconds:.1f} s")  # the figure, not an assertion on time


def test_default_run_prints_the_seeds_epoch_lines(default_run):
    _, result, _ = default_run
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("Epoch ")]
    assert len(epoch_lines) == 20
    assert epoch_lines[2].startswith("Epoch 3/20 | train loss ")
    assert " | val loss " in epoch_lines[2] and " | val acc " in epoch_lines[2] and epoch_lines[2].endswith(" s")


def test_default_run_writes_its_run_folder(default_run):
    cwd, _, _ = default_run
    run = cwd / "runs" / "digits-cnn"
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "model.safetensors", "curves.png"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 21))
    assert {"train_loss", "val_loss", "val_accuracy", "lr", "seconds", "samples_per_s"} <= set(rows[-1])
    csv_lines = (run / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,step,train_loss") and len(csv_lines) == 21
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "cnn" and config["data_spec"]["input_shape"] == [1, 8, 8]


def test_eval_of_the_run_matches_training(default_run):
    cwd, result, _ = default_run
    trained = float(result.stdout.strip().splitlines()[-1].split("test accuracy ")[1].split("%")[0])
    out = run_cli("eval", "runs/digits-cnn", "--checkpoint", "latest", "--json", cwd=cwd)
    assert out.returncode == 0, out.stderr
    assert round(100 * json.loads(out.stdout)["accuracy"], 2) == trained


def test_plot_redraws_the_curves(default_run):
    cwd, _, _ = default_run
    png = cwd / "runs" / "digits-cnn" / "curves.png"
    png.unlink()
    out = run_cli("plot", "runs/digits-cnn", cwd=cwd)
    assert out.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_default_run_does_not_touch_the_first(default_run):
    cwd, _, _ = default_run
    out = run_cli("--epochs", "1", "--quiet", cwd=cwd)
    assert out.returncode == 0, out.stderr
    assert (cwd / "runs" / "digits-cnn-2" / "metrics.jsonl").is_file()
    assert len((cwd / "runs" / "digits-cnn" / "metrics.jsonl").read_text().splitlines()) == 20


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--data", "cifar"], "unknown data set 'cifar'; choose one of: digits, mnist, fashion-mnist"),
        (["--model", "resnet"], "unknown model 'resnet'; choose one of: linear, sine-mlp, mlp, cnn"),
        (["--optimizer", "rmsprop"], "unknown optimizer 'rmsprop'; choose one of: sgd, adam, adamw"),
        (["--loss", "hinge"], "unknown loss 'hinge'; choose one of: cross-entropy, mse, l1, bce"),
        (["--batch-size", "0"], "--batch-size 0 is not valid; expected a positive integer"),
        (["--data", "linear", "--model", "cnn"], "model 'cnn' needs image data shaped (channels, height, width)"),
        (["--data", "linear", "--model", "linear", "--loss", "cross-entropy"], "needs a classification data set"),
    ],
)
def test_bad_names_and_values_give_one_line_and_exit_2(tmp_path, args, expected):
    line = one_line_error(run_cli(*args, "--run-dir", str(tmp_path / "run"), cwd=tmp_path), 2)
    assert expected in line


def test_bad_flag_is_argparse_usage_exit_2(tmp_path):
    out = run_cli("train", "--no-such-flag", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "unrecognized arguments" in out.stderr


def test_user_model_with_wrong_shapes_names_both(tmp_path):
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        from torch import nn
        def wrong_in(input_shape, num_outputs):
            return nn.Linear(10, num_outputs)
        def wrong_out(input_shape, num_outputs):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    """))
    env = {"PYTHONPATH": str(tmp_path)}
    line = one_line_error(run_cli("--model", "mymodels:wrong_in", "--run-dir", "r1", cwd=tmp_path, env=env), 2)
    assert "does not accept the data's input shape (1, 8, 8)" in line
    line = one_line_error(run_cli("--model", "mymodels:wrong_out", "--run-dir", "r2", cwd=tmp_path, env=env), 2)
    assert "output shape (3,)" in line and "needs (10,)" in line


def test_user_model_factory_trains(tmp_path):
    (tmp_path / "mine.py").write_text(textwrap.dedent("""
        from torch import nn
        def tiny(input_shape, num_outputs, hidden=32):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_outputs))
    """))
    out = run_cli("--model", "mine:tiny", "--model-arg", "hidden=16", "--epochs", "2", "--run-dir", "run",
                  "--quiet", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_kwargs"] == {"hidden": 16}


SEED_CNN = """
    import torch
    from torch import nn
    class Net(nn.Module):  # as the tutorials write it: .view() after the convolution
        def __init__(self, input_shape, num_outputs):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, num_outputs)
        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).view(-1, 4 * 8 * 8))
"""


def test_channels_last_is_on_for_etappes_cnn_and_off_for_a_users_model_unless_asked(tmp_path):
    from etappe.build import build_run
    from etappe.config import TrainConfig

    def conv_weight(**kw):
        return build_run(TrainConfig(**kw)).model.conv2.weight  # conv1 has 1 input channel: both layouts at once

    assert conv_weight().is_contiguous(memory_format=torch.channels_last) and not conv_weight().is_contiguous()
    assert conv_weight(channels_last=False).is_contiguous()
    (tmp_path / "seedcnn.py").write_text(textwrap.dedent(SEED_CNN))
    env = {"PYTHONPATH": str(tmp_path)}
    out = run_cli("--model", "seedcnn:Net", "--epochs", "1", "--run-dir", "r1", "--quiet", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr  # the default leaves a user's model as it is
    line = one_line_error(run_cli("--model", "seedcnn:Net", "--channels-last", "--epochs", "1", "--run-dir", "r2",
                                  cwd=tmp_path, env=env), 2)
    assert "--channels-last" in line and ".view()" in line and ".reshape()" in line


def test_unwritable_run_folder_fails_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    line = one_line_error(run_cli("--run-dir", str(tmp_path / "file" / "run"), cwd=tmp_path), 2)  # bad input
    assert "cannot write to the run folder" in line and "is a file" in line


def test_non_finite_loss_stops_and_keeps_the_saved_checkpoint(tmp_path):
    ok = run_cli("--data", "linear", "--model", "linear", "--optimizer", "sgd", "--lr", "0.1", "--epochs", "1",
                 "--run-dir", "run", "--quiet", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    verify_before = run_cli("verify", "run", cwd=tmp_path)
    weights_before = (tmp_path / "run" / "model.safetensors").read_bytes()
    bad = run_cli("--run-dir", "run", "--epochs", "3", "--lr", "1e30", "--allow-config-change", cwd=tmp_path)
    line = one_line_error(bad, 1)
    assert "loss became" in line and "at epoch 2, step" in line
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == weights_before
    verify_after = run_cli("verify", "run", cwd=tmp_path)
    assert verify_after.returncode == 0 and verify_after.stdout == verify_before.stdout


def test_toml_config_with_flags_overriding(tmp_path):
    (tmp_path / "run.toml").write_text('data = "sine"\nmodel = "sine-mlp"\nepochs = 2\nbatch-size = 50\nlr = 0.01\n')
    out = run_cli("--config", "run.toml", "--epochs", "1", "--run-dir", "run", "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["data"], config["epochs"], config["batch_size"], config["loss"]) == ("sine", 1, 50, "auto")
    bad = tmp_path / "bad.toml"
    bad.write_text("epoch = 3\n")
    assert "unknown keys epoch" in one_line_error(run_cli("--config", "bad.toml", cwd=tmp_path), 2)


def test_help_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "etappe", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    for command in ("train", "resume", "eval", "plot", "inspect", "verify"):
        assert command in out.stdout


@needs_fashion
def test_fashion_mnist_cnn_reaches_the_seed_level(tmp_path):
    out = run_cli("train", "--data", "fashion-mnist", "--model", "cnn", "--epochs", "3", "--batch-size", "64",
                  "--lr", "1e-3", "--optimizer", "adam", "--run-dir", "run", cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr
    accuracy = float(out.stdout.strip().splitlines()[-1].split("test accuracy ")[1].split("%")[0])
    assert accuracy >= 86.5, out.stdout


def test_version_prints_the_installed_version_and_trains_nothing(capsys, tmp_path, monkeypatch):
    from importlib.metadata import version

    from etappe.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"etappe {version('etappe')}\n"
    assert list(tmp_path.iterdir()) == []  # not taken for `etappe train --version`
