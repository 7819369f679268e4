"""Exports that prove themselves: every built-in model in every format, loaded back without its class (in a
fresh process, in onnxruntime), eval-mode behaviour, dynamic batch, clear errors for what a format cannot hold."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from etappe import models
from etappe.data import load_dataset
from etappe.errors import EtappeError, UsageError
from etappe.export import (
    FORMATS,
    ExportError,
    export,
    export_all,
    load_model,
    parity_process,
    read_sidecar,
    to_exported_program,
    to_onnx,
    to_state_dict,
    to_torchscript,
)
from tests.conftest import run_cli

FRESH = ("torchscript", "export", "onnx")


def train_briefly(model: nn.Module, data, steps: int = 40, seed: int = 0) -> nn.Module:
    """A few Adam steps with plain torch, so the exported weights are trained ones, not the initial ones."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss() if data.spec.num_classes else nn.MSELoss()
    model.train()
    for _ in range(steps):
        x, y = data.train.batch(torch.randint(len(data.train), (64,), generator=g))
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module", autouse=True)
def one_check_process():
    """The exports of this module share one parity-check process (the CLI tests run the one-per-export path)."""
    with parity_process():
        yield


@pytest.fixture(scope="module")
def builtin_exports(tmp_path_factory, digits):
    """Each built-in model, trained briefly, exported in every format with real test-set parity inputs."""
    sine = load_dataset("sine")
    out = {}
    for name in models.MODELS:
        data = sine if name == "sine-mlp" else digits
        model = train_briefly(models.build(name, data.spec.input_shape, data.spec.num_outputs), data)
        inputs, _ = data.test.batch(torch.arange(64))
        directory = tmp_path_factory.mktemp(name)
        exported = export_all(model, inputs[:2], directory, inputs=inputs, spec=data.spec, model_name=name)
        out[name] = (model, inputs, {e.format: e for e in exported})
    return out


# ------------------------------------------------------------------ acceptance 1: every model, every format


@pytest.mark.parametrize("name", list(models.MODELS))
def test_every_builtin_model_exports_in_every_format_within_1e_5(builtin_exports, name):
    _, inputs, exported = builtin_exports[name]
    assert sorted(exported) == sorted(FORMATS)
    for fmt, e in exported.items():
        assert e.path.is_file() and e.path.name.endswith(FORMATS[fmt])
        assert e.max_abs_diff <= 1e-5 and e.atol == 1e-5 and e.samples == len(inputs) == 64
        side = read_sidecar(e.path)
        assert side["format"] == fmt and side["model"] == name
        assert side["parity"]["max_abs_diff"] == e.max_abs_diff and side["parity"]["example_batch"] == 2
        assert side["data_spec"]["input_shape"] == list(inputs.shape[1:])
        if fmt in FRESH:
            assert "fresh process without etappe" in e.loaded_in


def test_exported_files_load_in_a_fresh_process_that_cannot_import_etappe(builtin_exports, tmp_path):
    """Independent of the built-in check: one plain script, with etappe made unimportable, runs every file."""
    files = {}
    for name, (_, inputs, exported) in builtin_exports.items():
        np.save(tmp_path / f"{name}.npy", inputs.numpy())
        files[name] = {fmt: str(exported[fmt].path) for fmt in FRESH}
    script = textwrap.dedent(f"""
        import sys, json
        sys.modules["etappe"] = None  # any import of etappe now fails
        import numpy as np, torch, onnxruntime
        outs = {{}}
        for name, paths in {files!r}.items():
            x = np.load({str(tmp_path)!r} + "/" + name + ".npy")
            outs[name + "/torchscript"] = torch.jit.load(paths["torchscript"])(torch.from_numpy(x)).detach().numpy()
            outs[name + "/export"] = torch.export.load(paths["export"]).module()(torch.from_numpy(x)).detach().numpy()
            s = onnxruntime.InferenceSession(paths["onnx"], providers=["CPUExecutionProvider"])
            outs[name + "/onnx"] = s.run(None, {{s.get_inputs()[0].name: x}})[0]
        np.savez({str(tmp_path / "out.npz")!r}, **outs)
        print(json.dumps([m for m in sys.modules if m.startswith("etappe")]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["etappe"]  # only the None placeholder
    got = np.load(tmp_path / "out.npz")
    for name, (model, inputs, _) in builtin_exports.items():
        with torch.no_grad():
            expected = model(inputs).numpy()
        for fmt in FRESH:
            assert np.abs(got[f"{name}/{fmt}"] - expected).max() <= 1e-5, (name, fmt)


def test_state_dict_files_load_with_plain_torch(builtin_exports):
    model, inputs, exported = builtin_exports["cnn"]
    from safetensors.torch import load_file

    for state in (torch.load(exported["state-dict"].path, weights_only=True), load_file(exported["safetensors"].path)):
        fresh = models.build("cnn", (1, 8, 8), 10)
        fresh.load_state_dict(state)  # strict: every name present, none extra
        with torch.no_grad():
            assert torch.equal(fresh.eval()(inputs), model(inputs))


def test_load_model_reads_every_exported_format(builtin_exports):
    model, inputs, exported = builtin_exports["cnn"]
    with torch.no_grad():
        expected = model(inputs)
        for fmt, e in exported.items():
            loaded, config = load_model(e.path, trusted=fmt in ("torchscript", "export"))  # programs: our own files
            assert config["format"] == fmt and config["data_spec"]["num_classes"] == 10
            assert (loaded(inputs) - expected).abs().max() <= 1e-5, fmt


# ------------------------------------------------------------------ acceptance 2: eval-mode behaviour


class DropoutBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5),
                                 nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_dropout_and_batchnorm_export_eval_behaviour_and_the_modes_come_back(tmp_path):
    torch.manual_seed(0)
    model = DropoutBatchNorm()
    bn = model.net[2]
    with torch.no_grad():  # running statistics far from any batch's own, so train and eval modes disagree
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(0.25)
    model.train()
    model.net[1].eval()  # a submodule in its own mode must get that mode back too
    x = torch.rand(16, 1, 8, 8)
    exported = export_all(model, x[:4], tmp_path, formats=FRESH)
    assert model.training and bn.training and not model.net[1].training
    model.eval()
    with torch.no_grad():
        eval_out = model(x)
        model.train()
        train_out = model(x)
    assert (train_out - eval_out).abs().max() > 1.0  # a train-mode export could not pass the checks below
    files = {e.format: e.path for e in exported}
    with torch.no_grad():
        outs = {
            "torchscript": torch.jit.load(files["torchscript"])(x),
            "export": torch.export.load(files["export"]).module()(x),
        }
    import onnxruntime

    s = onnxruntime.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
    outs["onnx"] = torch.from_numpy(s.run(None, {"input": x.numpy()})[0])
    for fmt, out in outs.items():
        assert (out - eval_out).abs().max() <= 1e-5, fmt
        assert torch.equal(out, out), fmt


# ------------------------------------------------------------------ acceptance 3: onnxruntime, dynamic batch


def test_onnx_runs_in_onnxruntime_with_any_batch_size(builtin_exports):
    import onnxruntime

    model, inputs, exported = builtin_exports["cnn"]
    session = onnxruntime.InferenceSession(str(exported["onnx"].path), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # symbolic batch dimension
    for n in (1, 7, 64):
        got = session.run(None, {session.get_inputs()[0].name: inputs[:n].numpy()})[0]
        with torch.no_grad():
            assert np.abs(got - model(inputs[:n]).numpy()).max() <= 1e-5


def test_pt2_accepts_batch_sizes_other_than_the_example(builtin_exports):
    model, inputs, exported = builtin_exports["mlp"]
    program = torch.export.load(exported["export"].path).module()
    for n in (1, 3, 64):  # the example had 2 rows
        with torch.no_grad():
            assert (program(inputs[:n]) - model(inputs[:n])).abs().max() <= 1e-5


# ------------------------------------------------------------------ acceptance 5: what a format cannot hold


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.linear(x)
        return -self.linear(x) * 2


@pytest.mark.parametrize("fmt, writer", [("export", to_exported_program), ("onnx", to_onnx)])
def test_data_dependent_control_flow_gets_a_clear_error_naming_what_works(tmp_path, fmt, writer):
    path = tmp_path / f"m{FORMATS[fmt]}"
    with pytest.raises(ExportError) as err:
        writer(DataDependent(), torch.randn(2, 4), path)
    message = str(err.value)
    assert "\n" not in message
    assert f"format {fmt!r} cannot capture this model: data-dependent control flow" in message
    assert "test_export.py" in message and "if x.sum() > 0:" in message
    assert "formats that capture it: torchscript (script), state-dict" in message
    assert not path.exists() and not path.with_name(path.name + ".json").exists()


def test_data_dependent_control_flow_works_scripted_and_keeps_both_branches(tmp_path):
    torch.manual_seed(0)
    model = DataDependent().eval()
    e = to_torchscript(model, torch.randn(2, 4), tmp_path / "m.torchscript.pt")
    assert e.method == "script"
    loaded = torch.jit.load(e.path)
    positive, negative = torch.ones(3, 4), -torch.ones(3, 4)
    with torch.no_grad():
        assert torch.allclose(loaded(positive), model(positive)) and torch.allclose(loaded(negative), model(negative))
    assert to_state_dict(model, positive, tmp_path / "m.pt").max_abs_diff == 0.0


class Bessel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.bessel_j0(x)


def test_an_operator_onnx_lacks_names_the_operator_and_the_formats_that_work(tmp_path):
    with pytest.raises(ExportError, match=r"format 'onnx' cannot capture this model: operator \S*bessel_j0 has no "
                       r"ONNX translation; formats that capture it: export, torchscript \(trace\), state-dict"):
        to_onnx(Bessel(), torch.randn(2, 4), tmp_path / "b.onnx")
    assert not (tmp_path / "b.onnx").exists()


class Noisy(nn.Module):
    """Different output on every call: no file can reproduce it, so the parity check must fail."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + torch.rand_like(x[:, :2])


def test_a_file_that_does_not_match_is_removed_with_the_figure_in_the_error(tmp_path):
    path = tmp_path / "noisy.pt"
    with pytest.raises(ExportError, match=r"format 'state-dict': .*noisy.pt does not compute what the model does: "
                       r"max abs diff \S+ > atol 1e-05 on 17 seeded random inputs .*; not written"):
        export(Noisy(), torch.randn(16, 4), path)
    assert not path.exists() and not (tmp_path / "noisy.pt.json").exists()
    assert export(Noisy(), torch.randn(16, 4), path, atol=10.0).max_abs_diff <= 10.0  # --atol loosens it


class Interrupted(nn.Linear):
    """Ctrl-C while the file is being written (state_dict is what the state-dict writer calls first)."""

    def state_dict(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        raise KeyboardInterrupt


@pytest.mark.parametrize("fmt, failing, raises", [
    ("state-dict", Noisy, ExportError),  # parity fails, checked in this process
    ("torchscript", Noisy, ExportError),  # parity fails, checked in the fresh process
    ("onnx", Bessel, ExportError),  # the writer fails
    ("state-dict", Interrupted, KeyboardInterrupt),  # interrupted mid-write
])
def test_a_failed_export_keeps_the_previous_file_and_its_sidecar(tmp_path, fmt, failing, raises):
    torch.manual_seed(0)
    path = tmp_path / f"m{FORMATS[fmt]}"
    good = export(nn.Linear(4, 2), torch.randn(3, 4), path)
    before = {p.name: p.read_bytes() for p in (path, good.sidecar)}
    failing = failing(4, 2) if failing is Interrupted else failing()
    with pytest.raises(raises):
        export(failing, torch.randn(3, 4), path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # byte for byte, and no temporary file
    assert read_sidecar(path)["file"] == path.name  # the final name, not the temporary one that was checked


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown export format 'tflite'; choose one of: state-dict, safetensors"):
        export(nn.Linear(2, 2), torch.randn(2, 2), tmp_path / "m.tflite", format="tflite")
    with pytest.raises(UsageError, match=r"cannot tell the format from the file name 'm.bin2'"):
        export(nn.Linear(2, 2), torch.randn(2, 2), tmp_path / "m.bin2")
    with pytest.raises(UsageError, match=r"parity inputs shaped \(3,\) .* do not match the example's \(2,\)"):
        export(nn.Linear(2, 2), torch.randn(2, 2), tmp_path / "m.pt", inputs=torch.randn(5, 3))
    with pytest.raises(UsageError, match="does not exist; expected a run folder"):
        load_model(tmp_path / "missing.pt")
    torch.save(models.build("linear", (1, 8, 8), 10).state_dict(), tmp_path / "weights.pt")
    with pytest.raises(UsageError, match="holds weights only; to rebuild the model pass --model NAME and --input"):
        load_model(tmp_path / "weights.pt")
    loaded, config = load_model(tmp_path / "weights.pt", model="linear", input_shape=(1, 8, 8))
    assert config["num_outputs"] == 10  # read off the last weight
    with pytest.raises(UsageError, match=r"does not fit model 'cnn' with input shape \(1, 8, 8\)"):
        load_model(tmp_path / "weights.pt", model="cnn", input_shape=(1, 8, 8))


def test_a_damaged_config_json_beside_weights_is_a_one_line_error_not_ignored(tmp_path):
    torch.save(models.build("linear", (1, 8, 8), 10).state_dict(), tmp_path / "weights.pt")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EtappeError, match=r"config.json is not valid JSON .*; restore it") as err:
        load_model(tmp_path / "weights.pt", model="linear", input_shape=(1, 8, 8))
    assert "\n" not in str(err.value)


def test_a_model_on_another_device_or_wrapped_is_exported_unwrapped(tmp_path):
    model = torch.compile(nn.Linear(3, 2))
    e = to_state_dict(model, torch.randn(2, 3), tmp_path / "m.pt")
    assert sorted(torch.load(e.path, weights_only=True)) == ["bias", "weight"]  # no _orig_mod. prefix


# ------------------------------------------------------------------ from a run, through the CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")
    result = run_cli("train", "--data", "digits", "--model", "cnn", "--epochs", "1", "--run-dir", "run", "--quiet",
                     cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "run"


def test_load_model_reads_a_run_a_checkpoint_and_the_final_weights(run_dir, digits):
    from etappe.loop import evaluate

    results = set()
    checkpoint = sorted(p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))[-1]
    for path in (run_dir, checkpoint, run_dir / "model.safetensors"):
        model, config = load_model(path, which="latest")
        assert config["model"] == "cnn" and config["data_spec"]["name"] == "digits"
        results.add(round(evaluate(model, digits.test, nn.CrossEntropyLoss())["loss"], 6))
    assert len(results) == 1  # the last checkpoint holds the final weights


def test_cli_export_all_prints_the_parity_figures_and_writes_sidecars(run_dir):
    result = run_cli("export", str(run_dir), "--format", "all")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(FORMATS)
    for fmt, line in zip(FORMATS, lines):
        assert line.startswith(fmt) and "max abs diff" in line and "on 64 given inputs" in line
        path = run_dir / "export" / ("model" + FORMATS[fmt])
        side = json.loads(path.with_name(path.name + ".json").read_text())
        assert side["parity"]["max_abs_diff"] <= 1e-5 and side["data_spec"]["name"] == "digits"


def test_cli_export_errors_are_one_line(run_dir, tmp_path):
    result = run_cli("export", str(tmp_path / "nothing"), "--format", "onnx")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"etappe: error: {tmp_path / 'nothing'} does not exist; expected a run folder, a " \
                                    "checkpoint folder or a model file"
    result = run_cli("export", str(run_dir / "model.safetensors"), "--format", "onnx", "--input-shape", "1,16,16")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "does not fit model 'cnn' with input shape (1, 16, 16)" in result.stderr


def test_a_write_error_during_an_onnx_export_is_the_os_error_not_a_capture_failure(tmp_path):
    """torch's exporter wraps what went wrong; a full disk (here a real RLIMIT_FSIZE) is not the model's failure,
    and nothing is left beside the target."""
    pytest.importorskip("onnx")
    script = tmp_path / "efbig.py"
    script.write_text(
        "import resource, signal, sys, torch\n"
        "from torch import nn\n"
        "import etappe.export as ex\n"
        "from etappe.export.writers import ExportError\n"
        "m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)).eval()\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    ex.export(m, torch.randn(2, 64), sys.argv[1])\n"
        "    print('no error')\n"
        "except ExportError as e:\n"
        "    print('ExportError', e)\n"
        "except OSError as e:\n"
        "    print('OSError', e.errno)\n"
    )
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "out" / "m.onnx")], capture_output=True,
                         text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == f"OSError {errno.EFBIG}", out.stdout + out.stderr
    assert list((tmp_path / "out").iterdir()) == []
