"""predict on real files: PNGs drawn from the digits test set, IDX, .npy and CSV inputs, every model format,
and the one-line errors for inputs that do not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from etappe import models
from etappe.data import TensorData, load_dataset, write_idx
from etappe.errors import EtappeError, UsageError
from etappe.export import export_all
from etappe.loop import evaluate
from etappe.predict import format_results, predict, read_inputs
from tests.conftest import run_cli

N = 24  # test-set samples drawn as PNGs


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits):
    """A CNN trained on digits with plain torch, exported in every format with the digits data spec."""
    torch.manual_seed(0)
    model = models.build("cnn", (1, 8, 8), 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        x, y = digits.train.batch(torch.randint(len(digits.train), (64,), generator=g))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    directory = tmp_path_factory.mktemp("models")
    inputs, _ = digits.test.batch(torch.arange(64))
    exported = export_all(model, inputs[:2], directory, inputs=inputs, spec=digits.spec, model_name="cnn")
    return model, {e.format: e.path for e in exported}


@pytest.fixture(scope="module")
def pngs(tmp_path_factory, digits):
    """The first N digits test images as 8-bit greyscale PNGs, drawn as a user would: 0..16 stretched to 0..255."""
    directory = tmp_path_factory.mktemp("pngs")
    paths = []
    for i in range(N):
        raw = digits.test.x[i, 0].numpy().astype(np.float64)
        path = directory / f"digit{i:02d}.png"
        Image.fromarray(np.round(raw * 255 / 16).astype(np.uint8), mode="L").save(path)
        paths.append(path)
    return paths


def test_predict_on_pngs_gives_the_classes_evaluate_scores(trained, pngs, digits):
    model, files = trained
    x, y = digits.test.batch(torch.arange(N))
    with torch.no_grad():
        eager = model(x).argmax(1).tolist()  # the classes evaluate() counts as right or wrong
    results = predict(files["onnx"], pngs)
    assert [r["input"] for r in results] == [str(p) for p in pngs]
    assert [r["class"] for r in results] == eager
    subset = TensorData(digits.test.x[:N], digits.test.y[:N], digits.test.input_scale)
    accuracy = evaluate(model, subset)["accuracy"]
    assert accuracy == sum(r["class"] == label for r, label in zip(results, y.tolist())) / N
    assert accuracy >= 0.75  # the model learned something, so the classes are not all one guess
    assert all(0 < r["probability"] <= 1 for r in results)


@pytest.mark.parametrize("fmt", ["state-dict", "safetensors", "torchscript", "export"])
def test_every_format_predicts_the_same_as_onnx(trained, pngs, fmt):
    _, files = trained
    reference = predict(files["onnx"], pngs)
    got = predict(files[fmt], pngs, trusted=fmt in ("torchscript", "export"))  # programs, but our own files
    assert [r["class"] for r in got] == [r["class"] for r in reference]
    assert np.allclose([r["probability"] for r in got], [r["probability"] for r in reference], atol=1e-5)


def test_top_k_is_sorted_and_starts_with_the_class(trained, pngs):
    _, files = trained
    for r in predict(files["export"], pngs[:5], top=3, trusted=True):
        probs = [t["probability"] for t in r["top"]]
        assert len(r["top"]) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert r["top"][0] == {"class": r["class"], "probability": r["probability"]}
        assert len({t["class"] for t in r["top"]}) == 3


def test_idx_npy_and_csv_inputs_give_the_eager_classes(trained, digits, tmp_path):
    model, files = trained
    raw = digits.test.x[:N, 0].numpy()  # uint8 0..16: raw values, scaled like the data set
    x, _ = digits.test.batch(torch.arange(N))
    with torch.no_grad():
        eager = model(x).argmax(1).tolist()
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", raw)
    np.save(tmp_path / "raw.npy", raw)
    np.save(tmp_path / "floats.npy", x.numpy())
    np.save(tmp_path / "one.npy", x[3].numpy())
    rows = "\n".join(",".join(f"{v:.9g}" for v in sample) for sample in x.flatten(1).tolist())
    (tmp_path / "rows.csv").write_text(",".join(f"p{i}" for i in range(64)) + "\n" + rows + "\n")
    for name in ("t10k-images-idx3-ubyte.gz", "raw.npy", "floats.npy", "rows.csv"):
        results = predict(files["torchscript"], [tmp_path / name], trusted=True)
        assert [r["class"] for r in results] == eager, name
    assert [r["input"] for r in predict(files["torchscript"], [tmp_path / "rows.csv"], trusted=True)][:2] == [
        f"{tmp_path / 'rows.csv'}:2", f"{tmp_path / 'rows.csv'}:3"]  # line numbers, after the header
    one = predict(files["torchscript"], [tmp_path / "one.npy"], trusted=True)
    assert [r["input"] for r in one] == [str(tmp_path / "one.npy")] and one[0]["class"] == eager[3]


def test_checkpoints_and_run_folders_predict_too(tmp_path, digits, pngs):
    from etappe.checkpoint import CheckpointStore

    torch.manual_seed(1)
    model = models.build("mlp", (1, 8, 8), 10, hidden=32).eval()
    config = {"model": "mlp", "model_kwargs": {"hidden": 32}, "data": "digits", "data_spec": digits.spec.to_dict()}
    path = CheckpointStore(tmp_path / "run" / "checkpoints").save(7, {"model": model, "config": config})
    x = torch.from_numpy(read_inputs(pngs, (1, 8, 8))[0])
    with torch.no_grad():
        eager = model(x).argmax(1).tolist()
    for where in (path, tmp_path / "run"):
        assert [r["class"] for r in predict(where, pngs)] == eager


def test_regression_prints_values(tmp_path):
    sine = load_dataset("sine")
    torch.manual_seed(0)
    model = models.build("sine-mlp", (1,), 1).eval()
    (e,) = export_all(model, sine.test.x[:4], tmp_path, formats=["onnx"], spec=sine.spec, model_name="sine-mlp")
    (tmp_path / "x.csv").write_text("x\n0.5\n-1.25\n")
    results = predict(e.path, [tmp_path / "x.csv"])
    with torch.no_grad():
        expected = model(torch.tensor([[0.5], [-1.25]]))[:, 0].tolist()
    assert [set(r) for r in results] == [{"input", "value"}] * 2
    assert np.allclose([r["value"] for r in results], expected, atol=1e-5)


# ------------------------------------------------------------------ bad input


def test_an_image_of_the_wrong_size_or_channels_says_both_shapes_unless_resize(trained, tmp_path):
    _, files = trained
    big = tmp_path / "big.png"
    Image.fromarray(np.full((28, 28), 200, np.uint8), mode="L").save(big)
    rgb = tmp_path / "rgb.jpg"
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8), mode="RGB").save(rgb)
    with pytest.raises(UsageError) as err:
        predict(files["onnx"], [big])
    assert str(err.value) == (f"{big}: image is 1x28x28 (channels x height x width, mode L), the model expects 1x8x8; "
                              "pass --resize to convert and resize it")
    with pytest.raises(UsageError, match=r"rgb.jpg: image is 3x8x8 \(channels x height x width, mode RGB\), the "
                                         r"model expects 1x8x8"):
        predict(files["onnx"], [rgb])
    results = predict(files["onnx"], [big, rgb], resize=True)
    assert len(results) == 2 and all(0 <= r["class"] < 10 for r in results)


def test_unknown_types_and_misfit_arrays_are_one_line_errors(trained, tmp_path):
    _, files = trained
    (tmp_path / "notes.txt").write_text("3\n")
    with pytest.raises(UsageError) as err:
        predict(files["onnx"], [tmp_path / "notes.txt"])
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'notes.txt'}: unknown input type '.txt'; predict reads images (.png")
    assert "IDX files" in message and ".npy" in message and ".csv" in message and "\n" not in message
    np.save(tmp_path / "wrong.npy", np.zeros((5, 7), np.float32))
    with pytest.raises(UsageError, match=r"wrong.npy: array shaped 5x7 does not fit the model, which expects one "
                                         r"sample shaped 1x8x8 or a batch N x 1x8x8"):
        predict(files["onnx"], [tmp_path / "wrong.npy"])
    (tmp_path / "short.csv").write_text("1,2,3\n")
    with pytest.raises(UsageError, match=r"short.csv:1: expected 64 values per row \(one sample shaped 1x8x8\), "
                                         r"found 3"):
        predict(files["onnx"], [tmp_path / "short.csv"])
    with pytest.raises(UsageError, match="no such file"):
        predict(files["onnx"], [tmp_path / "missing.png"])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(EtappeError, match="broken.png: cannot read the image"):
        predict(files["onnx"], [tmp_path / "broken.png"])
    with pytest.raises(EtappeError, match="bad IDX magic number"):
        (tmp_path / "bad-ubyte").write_bytes(b"\x01\x02\x03\x04")
        predict(files["onnx"], [tmp_path / "bad-ubyte"])


# ------------------------------------------------------------------ the CLI


def test_cli_predict_prints_json_and_people_get_one_line_per_input(trained, pngs):
    model, files = trained
    result = run_cli("predict", str(files["export"]), *map(str, pngs[:3]), "--top", "2", "--json", "--trust")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data == predict(files["export"], pngs[:3], top=2, trusted=True)
    lines = format_results(data).splitlines()
    first, second = data[0]["top"]
    assert len(lines) == 3 and lines[0] == (f"{pngs[0]}: class {first['class']} (p={first['probability']:.3f})  "
                                            f"then {second['class']} ({second['probability']:.3f})")


def test_cli_predict_bad_input_is_one_line_exit_2(trained, tmp_path):
    _, files = trained
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((28, 28), np.uint8), mode="L").save(big)
    result = run_cli("predict", str(files["onnx"]), str(big))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"etappe: error: {big}: image is 1x28x28 (channels x height x width, mode L), the model expects 1x8x8; "
        "pass --resize to convert and resize it"]
