"""predict with several inputs and outputs, and explicit input scaling: models written here (two inputs, three
outputs, a dict output), weights in safetensors and torch.save files, ONNX and TorchScript files made with torch,
the CLI in real subprocesses, and property tests of the rules (files to inputs, --scale, the range check)."""

from __future__ import annotations

import json
import math
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from etappe import cli, models
from etappe.data import load_dataset
from etappe.errors import UsageError
from etappe.export import export_all
from etappe.predict import (
    assign_files,
    format_results,
    parse_scale,
    predict,
    range_warning,
    split_named,
    trained_range,
)
from tests.conftest import run_cli

MODULE = "predict_io_models"
SOURCE = '''
import math
import torch
from torch import nn


class TwoInputs(nn.Module):
    """An image and a 3-vector in, one score per output."""

    def __init__(self, input_shape, num_outputs):
        super().__init__()
        self.image = nn.Linear(math.prod(input_shape), num_outputs)
        self.extra = nn.Linear(3, num_outputs)

    def forward(self, image, extra):
        return self.image(image.flatten(1)) + self.extra(extra)


class Detector(nn.Module):
    """A face detector's three outputs per input: a box, a probability, five landmarks."""

    def __init__(self, input_shape, num_outputs=10):
        super().__init__()
        self.body = nn.Linear(math.prod(input_shape), 16)
        self.box = nn.Linear(16, 4)
        self.prob = nn.Linear(16, 1)
        self.landmarks = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.body(x.flatten(1)))
        return self.box(h), torch.sigmoid(self.prob(h))[:, 0], self.landmarks(h).reshape(-1, 5, 2)


class Gaussian(nn.Module):
    """A dict output: mean and log-variance."""

    def __init__(self, input_shape, num_outputs=2):
        super().__init__()
        self.mean = nn.Linear(math.prod(input_shape), 2)
        self.logvar = nn.Linear(math.prod(input_shape), 2)

    def forward(self, x):
        return {"mean": self.mean(x.flatten(1)), "logvar": self.logvar(x.flatten(1))}


class Voice(nn.Module):
    """A voice-activity detector's inputs: audio, and its sample rate as an integer."""

    def __init__(self, input_shape, num_outputs=1):
        super().__init__()
        self.score = nn.Linear(math.prod(input_shape), 1)

    def forward(self, audio, sr):
        assert sr.dtype == torch.int64
        return self.score(audio)[:, 0] * sr / 16000


def voice(input_shape, num_outputs):
    return Voice(input_shape)


def two_inputs(input_shape, num_outputs):
    return TwoInputs(input_shape, num_outputs)


def detector(input_shape, num_outputs):
    return Detector(input_shape)


def gaussian(input_shape, num_outputs):
    return Gaussian(input_shape)
'''


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The models module, importable (sys.path here, PYTHONPATH for the CLI), and one seeded model of each."""
    folder = tmp_path_factory.mktemp("zoo")
    (folder / f"{MODULE}.py").write_text(SOURCE)
    sys.path.insert(0, str(folder))
    try:
        torch.manual_seed(0)
        built = {name: models.build(f"{MODULE}:{name}", shape, 2).eval()
                 for name, shape in (("two_inputs", (1, 8, 8)), ("detector", (1, 8, 8)), ("gaussian", (4,)))}
        env = {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}
        yield folder, built, env
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(MODULE, None)


def eager(model, *xs):
    with torch.no_grad():
        return model(*(torch.from_numpy(x) for x in xs))


def close(got, want, atol=1e-6):
    return np.allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64), atol=atol)


def quiet_predict(*args, **kwargs):
    """predict, with the "no data spec" warning of a bare weights file expected and checked."""
    with pytest.warns(UserWarning, match="class names and input scaling are unknown"):
        return predict(*args, **kwargs)


# ------------------------------------------------------------------ several inputs


@pytest.fixture(scope="module")
def two(zoo, tmp_path_factory):
    """The two-input model as bare safetensors weights (no sidecar), and two inputs of five samples each."""
    _, built, _ = zoo
    folder = tmp_path_factory.mktemp("two")
    save_file(built["two_inputs"].state_dict(), folder / "two.safetensors")
    g = np.random.default_rng(0)
    a, b = g.random((5, 1, 8, 8), dtype=np.float32), g.random((5, 3), dtype=np.float32)
    np.save(folder / "a.npy", a)
    np.save(folder / "b.npy", b)
    np.save(folder / "b3.npy", b[:3])
    return folder, a, b


TWO = {"model_name": f"{MODULE}:two_inputs", "input_shape": [(1, 8, 8), (3,)]}


def test_two_inputs_take_one_file_each_in_order_or_by_name(zoo, two):
    _, built, _ = zoo
    folder, a, b = two
    expected = eager(built["two_inputs"], a, b).tolist()
    path = folder / "two.safetensors"
    in_order = quiet_predict(path, [folder / "a.npy", folder / "b.npy"], **TWO)
    assert close([r["value"] for r in in_order], expected)
    assert all(r["raw"] for r in in_order)
    assert in_order[2]["input"] == f"{folder / 'a.npy'}[2], {folder / 'b.npy'}[2]"
    by_name = quiet_predict(path, [f"extra={folder / 'b.npy'}", f"image={folder / 'a.npy'}"], **TWO)
    assert [r["value"] for r in by_name] == [r["value"] for r in in_order]
    mixed = quiet_predict(path, [f"extra={folder / 'b.npy'}", str(folder / "a.npy")], **TWO)
    assert [r["value"] for r in mixed] == [r["value"] for r in in_order]
    # Python: a tuple of arrays, a dict by name, a list of groups (one sample each here)
    assert [r["value"] for r in quiet_predict(path, (a, b), **TWO)] == [r["value"] for r in in_order]
    assert [r["value"] for r in quiet_predict(path, {"extra": b, "image": a}, **TWO)] == [
        r["value"] for r in in_order]
    groups = quiet_predict(path, [(a[i], b[i]) for i in range(5)], **TWO)
    assert [r["value"] for r in groups] == [r["value"] for r in in_order]
    assert groups[0]["input"] == "image[0], extra[0]"


def test_two_inputs_with_different_batch_sizes_or_file_counts_are_one_line_errors(zoo, two):
    folder, a, b = two
    path = folder / "two.safetensors"
    with pytest.raises(UsageError, match=r"different numbers of samples: image 5 \(.*a\.npy\), extra 3 \(.*b3\.npy\); "
                                         "give every input the same number"):
        predict(path, [folder / "a.npy", folder / "b3.npy"], **TWO)
    with pytest.raises(UsageError, match=r"the model takes 2 inputs \(image, extra\), one file or array each"):
        predict(path, [folder / "a.npy"], **TWO)
    with pytest.raises(UsageError, match="input 'image' is given twice"):
        predict(path, [f"image={folder / 'a.npy'}", f"image={folder / 'b.npy'}"], **TWO)
    with pytest.raises(UsageError, match=r"forward takes 2 inputs \(image, extra\); give --input-shape once per "
                                         "input"):
        predict(path, [folder / "a.npy", folder / "b.npy"], model_name=TWO["model_name"], input_shape=(1, 8, 8))


def test_cli_two_inputs_json_and_errors(zoo, two):
    _, built, env = zoo
    folder, a, b = two
    args = ["predict", str(folder / "two.safetensors"), "--model", TWO["model_name"], "--input-shape", "1,8,8",
            "--input-shape", "3", "--json"]
    result = run_cli(*args, str(folder / "a.npy"), f"extra={folder / 'b.npy'}", env=env)
    assert result.returncode == 0, result.stderr
    assert close([r["value"] for r in json.loads(result.stdout)], eager(built["two_inputs"], a, b))
    assert "etappe: warning:" in result.stderr and "class names and input scaling are unknown" in result.stderr
    bad = run_cli(*args, str(folder / "a.npy"), str(folder / "b3.npy"), env=env)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert lines[-1].startswith("etappe: error: the inputs hold different numbers of samples")

def test_predict_help_says_how_files_map_to_inputs_and_what_scale_does(capsys):
    assert cli.main(["predict", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "A model with several inputs takes one file per input, in the model's input order" in text
    assert "or as NAME=FILE" in text and "every file must hold the same number of samples" in text
    assert "auto (default): as the model was trained: images / 255" in text and "none: every value as" in text


def test_a_torchscript_file_with_two_inputs_names_them_from_its_schema(zoo, two, tmp_path):
    _, built, _ = zoo
    folder, a, b = two
    traced = torch.jit.trace(built["two_inputs"], (torch.from_numpy(a), torch.from_numpy(b)))
    traced.save(str(tmp_path / "two.ts.pt"))
    results = quiet_predict(tmp_path / "two.ts.pt", [f"extra={folder / 'b.npy'}", f"image={folder / 'a.npy'}"],
                            input_shape=[(1, 8, 8), (3,)], trusted=True)
    assert close([r["value"] for r in results], eager(built["two_inputs"], a, b))


def test_an_onnx_file_with_two_inputs_takes_their_names_and_shapes_from_the_file(zoo, two, tmp_path):
    _, built, _ = zoo
    folder, a, b = two
    batch = torch.export.Dim("batch")
    torch.onnx.export(built["two_inputs"], (torch.from_numpy(a), torch.from_numpy(b)), str(tmp_path / "two.onnx"),
                      dynamo=True, external_data=False, verbose=False, input_names=["image", "extra"],
                      dynamic_shapes=({0: batch}, {0: batch}))
    results = quiet_predict(tmp_path / "two.onnx", [f"extra={folder / 'b.npy'}", str(folder / "a.npy")])
    assert close([r["value"] for r in results], eager(built["two_inputs"], a, b), atol=1e-5)


def test_an_integer_input_goes_in_as_recorded_and_is_never_scaled(zoo, tmp_path):
    torch.manual_seed(2)
    model = models.build(f"{MODULE}:voice", (16,), 1).eval()
    torch.save(model.state_dict(), tmp_path / "vad.pt")
    (tmp_path / "vad.pt.json").write_text(json.dumps({
        "format": "state-dict", "model": f"{MODULE}:voice", "input_shape": [16],
        "data_spec": {"name": "speech", "input_shape": [16], "num_classes": None, "num_outputs": 1},
        "inputs": [{"name": "audio", "shape": [16], "dtype": "float32"}, {"name": "sr", "shape": [], "dtype": "int64"}],
        "outputs": [{"name": "speech", "shape": []}]}))
    audio = np.random.default_rng(3).standard_normal((3, 16)).astype(np.float32)
    sr = np.array([16000, 8000, 16000])
    with torch.no_grad():
        expected = model(torch.from_numpy(audio) / 2, torch.from_numpy(sr)).tolist()
    results = predict(tmp_path / "vad.pt", (audio, sr), model_name=f"{MODULE}:voice", scale=2)
    assert close([r["value"] for r in results], expected)
    with pytest.raises(UsageError, match="input 'sr' takes whole numbers"):
        predict(tmp_path / "vad.pt", {"audio": audio, "sr": sr + 0.5}, model_name=f"{MODULE}:voice")


# ------------------------------------------------------------------ several outputs


@pytest.fixture(scope="module")
def faces(zoo, tmp_path_factory):
    """The detector as weights with a sidecar in the export schema (inputs, outputs) and a digits data spec, the
    same weights bare, and four inputs."""
    _, built, _ = zoo
    folder = tmp_path_factory.mktemp("faces")
    torch.save(built["detector"].state_dict(), folder / "det.pt")
    save_file(built["detector"].state_dict(), folder / "bare.safetensors")
    spec = load_dataset("digits").spec.to_dict()
    (folder / "det.pt.json").write_text(json.dumps({
        "format": "state-dict", "model": f"{MODULE}:detector", "input_shape": [1, 8, 8], "data_spec": spec,
        "inputs": [{"name": "x", "shape": [1, 8, 8], "dtype": "float32"}],
        "outputs": [{"name": "box", "shape": [4]}, {"name": "probability", "shape": []},
                    {"name": "landmarks", "shape": [5, 2]}]}))
    x = np.random.default_rng(1).random((4, 1, 8, 8), dtype=np.float32)
    np.save(folder / "x.npy", x)
    return folder, x


def test_three_outputs_all_come_back_named_from_the_sidecar(zoo, faces):
    _, built, _ = zoo
    folder, x = faces
    box, prob, landmarks = eager(built["detector"], x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recorded data spec: nothing unknown, inputs inside 0..1
        results = predict(folder / "det.pt", [folder / "x.npy"], model_name=f"{MODULE}:detector")
    assert [list(r) for r in results] == [["input", "outputs"]] * 4  # no class: three outputs, though 10 classes
    for i, r in enumerate(results):
        assert list(r["outputs"]) == ["box", "probability", "landmarks"]
        assert r["outputs"]["box"] == pytest.approx(box[i].tolist(), abs=1e-6)
        assert r["outputs"]["probability"] == pytest.approx(prob[i].item(), abs=1e-6)
        assert np.asarray(r["outputs"]["landmarks"]).shape == (5, 2)
        assert np.allclose(r["outputs"]["landmarks"], landmarks[i].numpy(), atol=1e-6)
    line = format_results(results).splitlines()[0]
    assert line.startswith(f"{folder / 'x.npy'}[0]: box=[") and "  probability=" in line and "  landmarks=[[" in line


def test_three_outputs_without_names_are_output0_to_2_and_raw(zoo, faces):
    _, built, _ = zoo
    folder, x = faces
    results = quiet_predict(folder / "bare.safetensors", [folder / "x.npy"], model_name=f"{MODULE}:detector",
                            input_shape=(1, 8, 8))
    assert list(results[0]["outputs"]) == ["output0", "output1", "output2"] and results[0]["raw"] is True
    assert format_results(results).splitlines()[0].startswith(f"{folder / 'x.npy'}[0]: raw outputs output0=[")


def test_an_onnx_detector_names_its_outputs_and_the_cli_prints_every_one(zoo, faces, tmp_path, capsys):
    _, built, env = zoo
    folder, x = faces
    torch.onnx.export(built["detector"], (torch.from_numpy(x),), str(tmp_path / "det.onnx"), dynamo=True,
                      external_data=False, verbose=False, input_names=["x"],
                      output_names=["box", "probability", "landmarks"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    box, prob, landmarks = eager(built["detector"], x)
    result = run_cli("predict", str(tmp_path / "det.onnx"), str(folder / "x.npy"), "--json", env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [list(r["outputs"]) for r in data] == [["box", "probability", "landmarks"]] * 4
    assert np.allclose([r["outputs"]["box"] for r in data], box.numpy(), atol=1e-5)
    assert np.allclose([r["outputs"]["probability"] for r in data], prob.numpy(), atol=1e-5)
    assert np.allclose([r["outputs"]["landmarks"] for r in data], landmarks.numpy(), atol=1e-5)
    assert cli.main(["predict", str(tmp_path / "det.onnx"), str(folder / "x.npy")]) == 0  # in this process: faster
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines == format_results(data).splitlines()
    assert all("box=" in ln and "probability=" in ln and "landmarks=" in ln for ln in lines)


def test_a_dict_output_is_named_by_its_keys(zoo, tmp_path):
    _, built, _ = zoo
    torch.save(built["gaussian"].state_dict(), tmp_path / "g.pt")
    (tmp_path / "rows.csv").write_text("0.1,0.2,0.3,0.4\n0.5,0.6,0.7,0.8\n")
    results = quiet_predict(tmp_path / "g.pt", [tmp_path / "rows.csv"], model_name=f"{MODULE}:gaussian",
                            input_shape=(4,))
    out = eager(built["gaussian"], np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]], np.float32))
    assert [list(r["outputs"]) for r in results] == [["mean", "logvar"]] * 2
    assert close([r["outputs"]["mean"] for r in results], out["mean"])
    assert close([r["outputs"]["logvar"] for r in results], out["logvar"])


# ------------------------------------------------------------------ scaling


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """An MLP trained on digits with plain torch, exported as ONNX with the digits data spec, and the first 40
    test images as uint8 (0..16, as stored) and as float32 0..16 (the issue's misread file)."""
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = models.build("mlp", (1, 8, 8), 10, hidden=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        x, y = data.train.batch(torch.randint(len(data.train), (64,), generator=g))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    folder = tmp_path_factory.mktemp("digits")
    x, y = data.test.batch(torch.arange(40))
    (onnx,) = export_all(model, x[:2], folder, formats=["onnx"], inputs=x, spec=data.spec, model_name="mlp",
                         model_kwargs={"hidden": 64})
    raw = data.test.x[:40].numpy()
    np.save(folder / "ints.npy", raw)
    np.save(folder / "floats.npy", raw.astype(np.float32))
    with torch.no_grad():
        classes = model(x).argmax(1).tolist()
    assert sum(c == t for c, t in zip(classes, y.tolist())) >= 30  # it learned: classes are not one guess
    return onnx.path, folder, classes


def test_the_spec_records_the_trained_range_in_checkpoints_and_sidecars(digits_model):
    path, _, _ = digits_model
    assert load_dataset("digits").spec.to_dict()["input_range"] == [0.0, 1.0]
    assert load_dataset("sine").spec.input_range == (-2.0, 2.0)
    sidecar = json.loads(path.with_name(path.name + ".json").read_text())
    assert sidecar["data_spec"]["input_range"] == [0.0, 1.0]
    assert trained_range(sidecar["data_spec"]) == (0.0, 1.0)
    old = {k: v for k, v in sidecar["data_spec"].items() if k != "input_range"}  # a spec from before
    assert trained_range(old) == (0.0, 1.0) and trained_range({"name": "x", "input_scale": 1.0}) is None


def test_floats_0_to_16_warn_and_scale_16_gives_the_classes_of_the_integers(digits_model):
    path, folder, classes = digits_model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ints = predict(path, [folder / "ints.npy"])  # integers: scaled like the data set, / 16
        scaled = predict(path, [folder / "floats.npy"], scale=16)
    assert [r["class"] for r in ints] == classes == [r["class"] for r in scaled]
    with pytest.warns(UserWarning) as caught:
        misread = predict(path, [folder / "floats.npy"])  # floats: taken as they are, 0..16
    messages = [str(w.message) for w in caught]
    assert messages == [f"{folder / 'floats.npy'}: input values 0..16 but the model was trained on 0..1; pass "
                        "--scale 16 (Python: scale=16) to divide them by 16"]
    assert [r["class"] for r in misread] != classes
    with pytest.warns(UserWarning, match="input values 0..16 but the model was trained on 0..1; pass --scale 16"):
        predict(path, [folder / "ints.npy"], scale="none")


def test_cli_scale_flag_and_its_warning_line(digits_model, capsys):
    path, folder, classes = digits_model
    warned = run_cli("predict", str(path), str(folder / "floats.npy"), "--json")
    assert warned.returncode == 0
    assert warned.stderr.strip().splitlines() == [
        f"etappe: warning: {folder / 'floats.npy'}: input values 0..16 but the model was trained on 0..1; pass "
        "--scale 16 (Python: scale=16) to divide them by 16"]
    fixed = run_cli("predict", str(path), str(folder / "floats.npy"), "--json", "--scale", "16")
    assert fixed.returncode == 0 and fixed.stderr == ""
    assert [r["class"] for r in json.loads(fixed.stdout)] == classes
    assert cli.main(["predict", str(path), str(folder / "floats.npy"), "--scale", "zero"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "etappe: error: --scale: expected auto, none or a positive number to divide inputs by (e.g. 16 or 255), got "
        "'zero'"]


# ------------------------------------------------------------------ the rules, over random inputs

NAMES = st.lists(st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=6),
                 min_size=1, max_size=5, unique=True)


@settings(max_examples=200, deadline=None)
@given(NAMES, st.data())
def test_every_input_gets_its_file_whether_named_or_in_order(names, data):
    files = [f"{name}_file.npy" for name in names]
    named = data.draw(st.lists(st.booleans(), min_size=len(names), max_size=len(names)))
    positional = [f for f, n in zip(files, named) if not n]
    by_name = [f"{name}={f}" for name, f, n in zip(names, files, named) if n]
    # named ones anywhere, the others keeping their order
    order = data.draw(st.permutations(["p"] * len(positional) + ["n"] * len(by_name)))
    p, n, items = iter(positional), iter(data.draw(st.permutations(by_name))), []
    for kind in order:
        items.append(next(p) if kind == "p" else next(n))
    assert assign_files(items, names) == files


@settings(max_examples=200, deadline=None)
@given(NAMES, st.integers(0, 8))
def test_a_wrong_count_of_files_is_always_refused(names, count):
    items = [f"f{i}.npy" for i in range(count)]
    if count == len(names):
        assert assign_files(items, names) == items
    else:
        with pytest.raises(UsageError, match=f"the model takes {len(names)} inputs"):
            assign_files(items, names)


@settings(max_examples=100, deadline=None)
@given(NAMES, st.text(max_size=12))
def test_name_equals_splits_only_on_a_known_input_name(names, rest):
    for name in names:
        assert split_named(f"{name}={rest}", names) == (name, rest)
    unknown = "zz" + "".join(names)  # longer than any name, so none of them
    assert split_named(f"{unknown}={rest}", names) == (None, f"{unknown}={rest}")
    with pytest.raises(UsageError, match="given twice"):
        assign_files([f"{names[0]}=a", f"{names[0]}=b"] + [f"f{i}" for i in range(len(names) - 2)], names)


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=1e-30, max_value=1e30, allow_nan=False))
def test_scale_parses_every_positive_number_as_its_divisor(number):
    assert parse_scale(number) == number
    assert parse_scale(repr(number)) == number
    assert parse_scale(f"  {number!r} ") == number


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=10), st.floats(), st.integers(-5, 0), st.booleans(), st.none()))
def test_scale_refuses_everything_but_auto_none_and_positive_numbers(value):
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("auto", "none"):
        assert parse_scale(value) == (None if text == "auto" else 1.0)
        return
    try:
        number = float(value) if not isinstance(value, bool) and value is not None else math.nan
    except ValueError:
        number = math.nan
    if 0 < number < math.inf:
        assert parse_scale(value) == number
    else:
        with pytest.raises(UsageError, match="--scale: expected auto, none or a positive number"):
            parse_scale(value)


BOUNDS = st.tuples(st.floats(-1e3, 1e3), st.floats(1e-3, 1e3)).map(lambda t: (t[0], t[0] + t[1]))


@settings(max_examples=300, deadline=None)
@given(BOUNDS, st.floats(0, 1), st.floats(0, 1))
def test_values_inside_the_trained_range_never_warn(bounds, a, b):
    lo, hi = bounds
    found = sorted((lo + a * (hi - lo), lo + b * (hi - lo)))
    found = (max(found[0], lo), min(found[1], hi))  # rounding must not step outside
    assert range_warning(found, bounds) is None


@settings(max_examples=300, deadline=None)
@given(BOUNDS, st.floats(1, 1e6), st.booleans())
def test_values_far_outside_the_trained_range_always_warn(bounds, times, above):
    lo, hi = bounds
    width = hi - lo
    found = (lo, hi + times * width) if above else (lo - times * width, hi)
    message = range_warning(found, bounds)
    assert message is not None and message.startswith("input values ")
    assert f"trained on {lo:.4g}..{hi:.4g}" in message
    if above and hi > 0:
        assert "pass --scale " in message
