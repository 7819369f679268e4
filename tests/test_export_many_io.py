"""Exports of models with several inputs (positional and keyword), several outputs (tuples, nested ones, a dict),
and file names that do not say the format (issue 14, items 1, 2 and 8): every format writes, passes parity over
every output, records its inputs and outputs in the sidecar, and loads back returning every output."""

from __future__ import annotations

import json
import shutil
import string
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from etappe import _parity_worker
from etappe.checkpoint.errors import TrustError
from etappe.errors import UsageError
from etappe.export import (
    FORMATS,
    ExportError,
    detect_format,
    export,
    export_all,
    format_from_suffix,
    load_model,
    parity_process,
    read_sidecar,
)
from etappe.export.parity import PARITY_BATCH, parity_inputs
from etappe.export.writers import Inputs, Signature, ambiguous, as_inputs, flatten_outputs, input_names, write
from tests.conftest import run_cli

PROGRAMS = ("torchscript", "export")  # loading them back runs code: our own files here, so trusted


class Distance(nn.Module):
    """Two inputs, as a perceptual metric compares two images: one output per pair."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(6, 8), nn.Tanh())

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return (self.embed(left) - self.embed(right)).pow(2).sum(1, keepdim=True)


class Detector(nn.Module):
    """Three outputs, as a face detector's networks give a box, a probability and landmarks per input; the last
    two nested, so the flattening order shows."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 16)

    def forward(self, x: torch.Tensor) -> tuple:
        h = torch.relu(self.body(x))
        return h[:, :4], (torch.sigmoid(h[:, 4:5]), h[:, 6:16] * 2.0)


class Heads(nn.Module):
    """A dict output (names = its keys) and a keyword input."""

    def __init__(self, noisy: str | None = None) -> None:
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.noisy = noisy

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = self.body(x)
        if mask is not None:
            h = h * mask
        out = {"logits": h[:, :3], "score": h[:, 3:].sum(1), "landmarks": h[:, 1:5] * 3}
        if self.noisy:
            out[self.noisy] = out[self.noisy] + torch.rand_like(out[self.noisy])
        return out


def flat(out) -> list[torch.Tensor]:  # noqa: ANN001
    return flatten_outputs(out, "test")[1]


@pytest.fixture(scope="module", autouse=True)
def one_check_process():
    with parity_process():
        yield


def _export_all(model: nn.Module, example, directory: Path):  # noqa: ANN001
    torch.manual_seed(0)
    return {e.format: e for e in export_all(model.eval(), example, directory)}


@pytest.fixture(scope="module")
def distance(tmp_path_factory):
    torch.manual_seed(0)
    model = Distance().eval()
    example = (torch.randn(3, 6), torch.randn(3, 6))
    return model, _export_all(model, example, tmp_path_factory.mktemp("distance"))


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    torch.manual_seed(1)
    model = Detector().eval()
    return model, _export_all(model, torch.randn(3, 6), tmp_path_factory.mktemp("detector"))


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    torch.manual_seed(2)
    model = Heads().eval()
    example = ((torch.randn(3, 6),), {"mask": torch.rand(3, 5)})
    return model, _export_all(model, example, tmp_path_factory.mktemp("heads"))


# ------------------------------------------------------------------ several inputs


def test_a_model_with_two_inputs_exports_in_every_format_with_parity(distance):
    model, exported = distance
    assert sorted(exported) == sorted(FORMATS)
    left, right = torch.randn(7, 6), torch.randn(7, 6)  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        expected = model(left, right)
    for fmt, e in exported.items():
        assert e.max_abs_diff <= 1e-5 and e.samples == 16 and "seeded random" in e.inputs
        assert e.input_names == ("left", "right") and e.output_names == ("output",)
        side = read_sidecar(e.path)
        assert side["inputs"] == [{"name": "left", "shape": [6], "dtype": "float32"},
                                  {"name": "right", "shape": [6], "dtype": "float32"}]
        assert side["outputs"] == [{"name": "output", "shape": [1], "dtype": "float32"}]
        assert side["input_shape"] == [6]  # the first input's, for older readers
        if fmt in ("state-dict", "safetensors"):  # weights only: parity loaded them into the model, NaN-filled first
            continue
        loaded, _ = load_model(e.path, trusted=fmt in PROGRAMS, input_shape=(6,))
        with torch.no_grad():
            got = loaded(left, right)
        assert torch.is_tensor(got) and (got - expected).abs().max() <= 1e-5, fmt


def test_the_onnx_file_names_its_inputs_after_the_forward_and_any_batch_runs(distance):
    import onnxruntime

    model, exported = distance
    session = onnxruntime.InferenceSession(str(exported["onnx"].path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["left", "right"]
    assert all(isinstance(i.shape[0], str) for i in session.get_inputs())  # dynamic batch on every input
    for n in (1, 5):
        a, b = torch.randn(n, 6), torch.randn(n, 6)
        got = session.run(None, {"left": a.numpy(), "right": b.numpy()})[0]
        with torch.no_grad():
            assert np.abs(got - model(a, b).numpy()).max() <= 1e-5


def test_given_parity_inputs_cover_every_input(tmp_path):
    torch.manual_seed(0)
    a, b = torch.randn(20, 6), torch.randn(20, 6)
    e = export(Distance(), (a[:2], b[:2]), tmp_path / "d.pt2", inputs=(a, b))
    assert e.samples == 20 and e.inputs == "given inputs"
    with pytest.raises(UsageError, match=r"parity inputs shaped \(5,\) \(one sample\) \(input 1\) do not match the "
                       r"example's \(6,\)"):
        export(Distance(), (a[:2], b[:2]), tmp_path / "d.pt", inputs=(a, torch.randn(20, 5)))
    with pytest.raises(UsageError, match="the parity inputs are 1 positional input.*, the example's 2 positional"):
        export(Distance(), (a[:2], b[:2]), tmp_path / "d.pt", inputs=a)


def test_example_inputs_that_cannot_be_a_batch_are_one_line_errors(tmp_path):
    cases = [
        ((torch.randn(3, 6), torch.randn(4, 6)), r"every input needs the same batch size .* input 0 3, input 1 4"),
        ((torch.randn(3, 6), 2.0), r"its input 1 is not a tensor"),
        ("text", r"must be a tensor, a tuple of tensors, a dict of name -> tensor, or a tuple and a dict"),
        ((torch.randn(3, 6), torch.tensor(1.0)), r"must have a batch dimension, got a scalar for input 1"),
        ((), r"holds no tensor"),
    ]
    for example, message in cases:
        with pytest.raises(UsageError, match=message) as err:
            export(Distance(), example, tmp_path / "d.pt")
        assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


class TakesRate(nn.Module):
    """Audio and an integer sample rate per row, as a voice-activity detector takes them."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 2)

    def forward(self, audio: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
        return self.linear(audio) * (rate.unsqueeze(1).to(audio.dtype) / 16000.0)


def test_an_integer_input_gets_integer_parity_rows_in_every_format(tmp_path):
    torch.manual_seed(0)
    example = (torch.randn(2, 8), torch.tensor([8000, 16000]))
    exported = export_all(TakesRate().eval(), example, tmp_path)
    assert sorted(e.format for e in exported) == sorted(FORMATS)
    side = read_sidecar(tmp_path / "model.onnx")
    assert side["inputs"][1] == {"name": "rate", "shape": [], "dtype": "int64"}


# ------------------------------------------------------------------ several outputs


def test_three_outputs_nested_are_all_compared_and_all_come_back(detector):
    model, exported = detector
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = flat(model(x))
    assert [tuple(t.shape) for t in expected] == [(5, 4), (5, 1), (5, 10)]
    for fmt, e in exported.items():
        assert e.output_names == ("output0", "output1.0", "output1.1"), fmt
        assert [o["name"] for o in read_sidecar(e.path)["outputs"]] == list(e.output_names)
        assert [o["shape"] for o in read_sidecar(e.path)["outputs"]] == [[4], [1], [10]]
        if fmt in ("state-dict", "safetensors"):
            continue
        loaded, _ = load_model(e.path, trusted=fmt in PROGRAMS, input_shape=(6,))
        with torch.no_grad():
            got = loaded(x)
        assert isinstance(got, tuple), fmt
        got = flat(got)
        assert len(got) == 3 and all((g - t).abs().max() <= 1e-5 for g, t in zip(got, expected)), fmt


def test_a_dict_output_and_a_keyword_input_in_every_format(heads):
    model, exported = heads
    x, mask = torch.randn(4, 6), torch.rand(4, 5)
    with torch.no_grad():
        expected = model(x, mask=mask)
    for fmt, e in exported.items():
        assert e.max_abs_diff <= 1e-5
        assert e.input_names == ("x", "mask") and e.output_names == ("logits", "score", "landmarks")
        side = read_sidecar(e.path)
        assert [i["name"] for i in side["inputs"]] == ["x", "mask"]
        assert side["outputs"] == [{"name": "logits", "shape": [3], "dtype": "float32"},
                                   {"name": "score", "shape": [], "dtype": "float32"},
                                   {"name": "landmarks", "shape": [4], "dtype": "float32"}]
        if fmt in ("state-dict", "safetensors"):
            continue
        loaded, _ = load_model(e.path, trusted=fmt in PROGRAMS, input_shape=(6,))
        with torch.no_grad():
            got = loaded(x, mask=mask)
        assert isinstance(got, dict) and list(got) == ["logits", "score", "landmarks"], fmt
        for name in expected:
            assert (got[name] - expected[name]).abs().max() <= 1e-5, (fmt, name)


@pytest.mark.parametrize("fmt", ["state-dict", "torchscript", "onnx"])
def test_parity_names_the_output_that_failed_and_the_old_file_stays(tmp_path, fmt):
    torch.manual_seed(0)
    path = tmp_path / f"h{FORMATS[fmt]}"
    example = ((torch.randn(3, 6),), {"mask": torch.rand(3, 5)})
    good = export(Heads().eval(), example, path, format=fmt)
    before = {p.name: p.read_bytes() for p in (path, good.sidecar)}
    with pytest.raises(ExportError, match=rf"format {fmt!r}: .* does not compute what the model does: output "
                       r"'landmarks' max abs diff \S+ > atol 1e-05 on 16 seeded random inputs .*; not written"):
        export(Heads(noisy="landmarks").eval(), example, path, format=fmt)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_an_output_export_cannot_compare_is_a_one_line_error(tmp_path):
    class ReturnsNone(nn.Linear):
        def forward(self, x: torch.Tensor):  # noqa: ANN202
            return super().forward(x), None

    with pytest.raises(UsageError, match=r"the model returns NoneType at output 'output1'; export needs a tensor, "
                       r"tuples or lists of tensors, or a dict"):
        export(ReturnsNone(4, 2), torch.randn(2, 4), tmp_path / "n.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_dict_holding_a_tuple_is_beyond_torchscript_and_the_error_names_what_works(tmp_path):
    class Mixed(nn.Linear):
        def forward(self, x: torch.Tensor):  # noqa: ANN202
            h = super().forward(x)
            return {"h": h, "pair": (h.sum(1), h * 2)}

    with pytest.raises(ExportError, match=r"format 'torchscript' cannot capture this model: .*formats that capture "
                       r"it: export, state-dict, safetensors"):
        export(Mixed(4, 3), torch.randn(2, 4), tmp_path / "m.ts")
    e = export(Mixed(4, 3), torch.randn(2, 4), tmp_path / "m.pt2")
    assert e.output_names == ("h", "pair.0", "pair.1")


# ------------------------------------------------------------------ a single tensor, as before


def test_one_tensor_in_and_out_records_as_before(tmp_path):
    torch.manual_seed(0)
    e = export(nn.Linear(4, 2), torch.randn(3, 4), tmp_path / "m.onnx")
    side = read_sidecar(e.path)
    assert side["input_shape"] == [4] and side["input_dtype"] == "float32"
    assert side["inputs"] == [{"name": "input", "shape": [4], "dtype": "float32"}]  # ONNX's name, as ever
    assert side["outputs"] == [{"name": "output", "shape": [2], "dtype": "float32"}]
    loaded, _ = load_model(e.path)
    assert torch.is_tensor(loaded(torch.randn(5, 4)))


# ------------------------------------------------------------------ file names


def test_ts_and_torchscript_names_write_torchscript_and_pt_says_what_it_wrote(tmp_path):
    torch.manual_seed(0)
    for name in ("m.ts", "m.torchscript", "m.torchscript.pt"):
        e = export(nn.Linear(4, 2), torch.randn(3, 4), tmp_path / name)
        assert e.format == "torchscript" and detect_format(e.path) == "torchscript" and e.note == ""
    e = export(nn.Linear(4, 2), torch.randn(3, 4), tmp_path / "m.pt")
    assert e.format == "state-dict"
    assert e.note == "wrote a state dict (weights only) to m.pt; a TorchScript file: use --format torchscript or m.ts"
    assert e.note in e.summary()


def test_a_torchscript_file_named_pt_is_read_by_its_content_and_needs_trust(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    e = export(model, torch.randn(3, 4), tmp_path / "m.pt", format="torchscript")
    assert e.format == "torchscript" and "a TorchScript archive to m.pt" in e.note
    assert detect_format(e.path) == "torchscript"
    with pytest.raises(TrustError, match="a TorchScript archive, which is a program"):
        load_model(e.path)
    loaded, config = load_model(e.path, trusted=True)
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert config["format"] == "torchscript" and (loaded(x) - model(x)).abs().max() <= 1e-5
    np.save(tmp_path / "x.npy", x.numpy())
    refused = run_cli("predict", str(e.path), str(tmp_path / "x.npy"), "--json")
    assert refused.returncode != 0 and "--trust" in refused.stderr and "Traceback" not in refused.stderr
    result = run_cli("predict", str(e.path), str(tmp_path / "x.npy"), "--json", "--trust")
    assert result.returncode == 0, result.stderr
    values = [r["value"] for r in json.loads(result.stdout)]
    assert np.abs(np.array(values) - model(x).detach().numpy()).max() <= 1e-5


SUFFIXES = {".pt": "state-dict", ".pth": "state-dict", ".bin": "state-dict", ".safetensors": "safetensors",
            ".ts": "torchscript", ".torchscript": "torchscript", ".torchscript.pt": "torchscript", ".pt2": "export",
            ".onnx": "onnx"}


@pytest.fixture(scope="module")
def one_file_per_format(tmp_path_factory):
    """One small file of each format, written by etappe's writers (without the parity check: only the bytes
    matter here)."""
    folder = tmp_path_factory.mktemp("formats")
    model, example = nn.Linear(4, 2).eval(), Inputs((torch.randn(2, 4),), {})
    signature = Signature(("x",), ("output",), "tensor")
    files = {}
    for fmt in FORMATS:
        files[fmt] = folder / f"file-{fmt}"
        write(fmt, model, example, files[fmt], signature)
    return files


stems = st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stem=stems, suffix=st.sampled_from(sorted(SUFFIXES)), upper=st.booleans(), written=st.sampled_from(
    sorted(FORMATS)))
def test_names_choose_what_is_written_and_content_alone_what_is_read(one_file_per_format, stem, suffix, upper,
                                                                     written):
    """For any stem and known suffix: the name asks for the format the table says; a file of the format the name
    asks for is detected as that; and a file of any format under that name is detected as what it holds."""
    name = stem + (suffix.upper() if upper else suffix)
    asked = format_from_suffix(name)
    assert asked == SUFFIXES[suffix]
    assert ambiguous(name) == (suffix in (".pt", ".pth", ".bin"))  # the names a writer says more about
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        shutil.copyfile(one_file_per_format[asked], path)
        assert detect_format(path) == asked
        shutil.copyfile(one_file_per_format[written], path)
        assert detect_format(path) == written


# ------------------------------------------------------------------ the rules themselves, over random structures

leaf = st.builds(lambda n, v: torch.full((2, n), float(v)), st.integers(1, 4), st.integers(0, 10**6))
keys = st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=5)
outputs_tree = st.recursive(
    leaf,
    lambda inner: st.one_of(st.lists(inner, min_size=1, max_size=3).map(tuple), st.lists(inner, min_size=1, max_size=3),
                            st.dictionaries(keys, inner, min_size=1, max_size=3)),
    max_leaves=8,
)


def _leaves(value) -> list:  # noqa: ANN001
    """Depth first, dicts in their order: the order written out by hand, to check the rule against."""
    if torch.is_tensor(value):
        return [value]
    items = value.values() if isinstance(value, dict) else value
    return [t for v in items for t in _leaves(v)]


@settings(max_examples=150, deadline=None)
@given(out=outputs_tree)
def test_outputs_flatten_depth_first_with_unique_names_as_the_parity_process_does(out):
    names, tensors, kind = flatten_outputs(out, "the model")
    expected = _leaves(out)
    assert len(tensors) == len(names) == len(expected)
    assert all(a is b or torch.equal(a, b) for a, b in zip(tensors, expected))
    assert len(set(names)) == len(names)  # keys without dots: every path is its own name
    assert kind == ("tensor" if torch.is_tensor(out) else "dict" if isinstance(out, dict) else "tuple")
    if isinstance(out, dict):
        assert all(n.split(".")[0] in out for n in names)
    elif not torch.is_tensor(out):
        assert all(n.split(".")[0] in {f"output{i}" for i in range(len(out))} for n in names)
    worker = _parity_worker.flatten(out)  # the fresh process's own copy of the rule: the same order
    assert len(worker) == len(tensors) and all(a is b or torch.equal(a, b) for a, b in zip(worker, tensors))


@settings(max_examples=150, deadline=None)
@given(n_args=st.integers(0, 3), kw=st.lists(keys, unique=True, max_size=3), batch=st.integers(1, 4),
       layout=st.sampled_from(["flat", "nested", "list"]))
def test_inputs_are_read_in_one_order_positional_then_keywords(n_args, kw, batch, layout):
    args = [torch.full((batch, 2), float(i)) for i in range(n_args)]
    kwargs = {k: torch.full((batch, 3), float(10 + i)) for i, k in enumerate(kw)}
    if not args and not kwargs:
        with pytest.raises(UsageError, match="holds no tensor"):
            as_inputs(())
        return
    if not kwargs:
        example = args[0] if n_args == 1 and layout == "flat" else (list(args) if layout == "list" else tuple(args))
    elif not args:
        example = kwargs
    else:
        example = (tuple(args), kwargs) if layout == "nested" else (*args, kwargs)
    inputs = as_inputs(example)
    assert len(inputs.args) == n_args and list(inputs.kwargs) == kw and len(inputs) == batch
    assert len(inputs.tensors) == n_args + len(kw)
    assert all(a is b for a, b in zip(inputs.tensors, [*args, *kwargs.values()]))
    assert inputs.single == (n_args == 1 and not kw)

    class Takes(nn.Module):
        def forward(self, first, second=None, third=None):  # noqa: ANN001, ANN201
            return first

    names = input_names(Takes(), inputs)
    assert names == ["first", "second", "third"][:n_args] + kw


dtypes = st.sampled_from([torch.float32, torch.float64, torch.int64, torch.int32, torch.bool])
one_input = st.tuples(st.lists(st.integers(1, 3), max_size=3), dtypes)


@settings(max_examples=100, deadline=None)
@given(args=st.lists(one_input, max_size=3), kw=st.dictionaries(keys, one_input, max_size=2),
       batch=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_parity_rows_are_made_for_every_input_shaped_and_typed_like_it(args, kw, batch, seed):
    def make(spec):  # noqa: ANN001, ANN202
        shape, dtype = spec
        return torch.zeros((batch, *shape), dtype=dtype)

    if not args and not kw:
        return
    example = Inputs(tuple(make(a) for a in args), {k: make(v) for k, v in kw.items()})
    check, note = parity_inputs(example, None, seed)
    assert note == f"seeded random inputs (seed {seed})"
    assert len(check.args) == len(args) and list(check.kwargs) == list(kw)
    rows = {len(t) for t in check.tensors}
    assert rows == {PARITY_BATCH if batch != PARITY_BATCH else PARITY_BATCH + 1}  # never the example's batch size
    for made, like in zip(check.tensors, example.tensors):
        assert made.shape[1:] == like.shape[1:] and made.dtype == like.dtype
    again, _ = parity_inputs(example, None, seed)
    assert all(torch.equal(a, b) for a, b in zip(again.tensors, check.tensors))  # seeded: the same rows again


# ------------------------------------------------------------------ the command line


FACTORY = textwrap.dedent('''
    import torch
    from torch import nn

    class Pair(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.linear = nn.Linear(width, 3)

        def forward(self, a, b):
            return self.linear(a) + self.linear(b), (a - b).abs().sum(1)

    def make(input_shape, num_outputs):
        return Pair(input_shape[0])
''')


@pytest.mark.slow
def test_cli_exports_a_factory_model_with_two_inputs_given_one_input_shape_each(tmp_path):
    (tmp_path / "pairmodel.py").write_text(FACTORY)
    sys.path.insert(0, str(tmp_path))
    try:
        import pairmodel

        torch.save(pairmodel.make((5,), 3).state_dict(), tmp_path / "weights.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("pairmodel", None)
    env = {"PYTHONPATH": str(tmp_path)}
    result = run_cli("export", str(tmp_path / "weights.pt"), "--model", "pairmodel:make", "--input-shape", "5",
                     "--input-shape", "5", "--format", "all", "--out", str(tmp_path / "out"), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(FORMATS)
    for fmt, line in zip(FORMATS, lines):
        assert line.startswith(fmt) and "seeded random inputs" in line
        assert "inputs a, b -> outputs output0, output1" in line
        side = json.loads((tmp_path / "out" / f"weights{FORMATS[fmt]}.json").read_text())
        assert [i["shape"] for i in side["inputs"]] == [[5], [5]] and len(side["outputs"]) == 2
    assert "wrote a state dict (weights only) to weights.pt" in lines[0]
    # the sidecar now records both inputs: exporting that state dict again needs no --input-shape
    again = run_cli("export", str(tmp_path / "out" / "weights.pt"), "--model", "pairmodel:make", "--format", "onnx",
                    "--out", str(tmp_path / "again.onnx"), env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "inputs a, b -> outputs output0, output1" in again.stdout


def test_cli_eval_refuses_a_model_with_several_outputs_in_one_line(tmp_path):
    class DigitsHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor):  # noqa: ANN201
            h = self.linear(x.flatten(1))
            return h, h.softmax(1)

    e = export(DigitsHeads().eval(), torch.randn(2, 1, 8, 8), tmp_path / "heads.onnx")
    result = run_cli("eval", str(e.path), "--data", "digits")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1
    assert "returns 2 outputs (output0, output1); etappe eval scores one against the data set's targets" \
        in result.stderr
