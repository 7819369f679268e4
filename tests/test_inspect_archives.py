"""`etappe inspect` on model files (issue 14, item 6): TorchScript archives (traced and scripted), torch.export .pt2
programs and ONNX models, each made here with torch from a small CNN with a BatchNorm, are told by their content and
described without running them: inputs, outputs, weights, the parameter count without buffers, the format version,
what running them needs. A TorchScript module whose __setstate__ writes a marker leaves none; damaged files of each
kind are one CheckpointError line; the detector, the TorchScript source reader and the restricted unpickler are
checked as rules over random inputs."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import etappe.checkpoint as ck
from etappe import cli
from etappe.checkpoint import modelfiles
from etappe.checkpoint.errors import CheckpointError
from tests.conftest import run_cli


class Net(nn.Module):
    """A small CNN with a BatchNorm (whose running statistics are buffers, not parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class TwoInTwoOut(nn.Module):
    """An MLP of two inputs (features and a per-sample scale) with two outputs (logits and the hidden layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(5, 7)
        self.norm = nn.BatchNorm1d(7)
        self.head = nn.Linear(7, 2)

    def forward(self, features: torch.Tensor, scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.norm(self.hidden(features))) * scale
        return self.head(h), h


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def buffers(model: nn.Module) -> int:
    return sum(b.numel() for b in model.buffers())


def _onnx(model: nn.Module, args: tuple, path: Path, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=True, external_data=False, verbose=False, **kwargs)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{name: path} of real model files, each under a name that says nothing true about it."""
    folder = tmp_path_factory.mktemp("modelfiles")
    torch.manual_seed(0)
    net, pair = Net().eval(), TwoInTwoOut().eval()
    x = torch.randn(2, 1, 8, 8)
    features, scale = torch.randn(3, 5), torch.rand(3, 1)
    made = {
        "traced": folder / "traced.onnx",  # a TorchScript archive named as an ONNX file
        "scripted": folder / "scripted.safetensors",
        "pt2": folder / "program.pt",
        "pt2_dynamic": folder / "dynamic.bin",
        "pt2_pair": folder / "pair.pt2",
        "onnx": folder / "model.pt",  # an ONNX file named like a torch.save file
        "onnx_folded": folder / "folded.onnx",
        "onnx_pair": folder / "pair.pth",
    }
    torch.jit.trace(net, x).save(str(made["traced"]))
    torch.jit.script(net).save(str(made["scripted"]))
    torch.export.save(torch.export.export(net, (x,)), str(made["pt2"]))
    batch = torch.export.Dim("batch", min=2, max=64)
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=({0: batch},)), str(made["pt2_dynamic"]))
    torch.export.save(torch.export.export(pair, (features, scale)), str(made["pt2_pair"]))
    # optimize=False keeps the BatchNorm as it is (the optimizer folds it into the convolution)
    _onnx(net, (x,), made["onnx"], input_names=["image"], output_names=["logits"], optimize=False)
    _onnx(net, (x,), made["onnx_folded"])
    _onnx(pair, (features, scale), made["onnx_pair"], input_names=["features", "scale"],
          output_names=["logits", "hidden"], optimize=False)
    return made, net, pair


# ------------------------------------------------------------------ each kind, described


def test_each_kind_is_told_by_its_content_not_its_name(files):
    made, _, _ = files
    expected = {"traced": "torchscript", "scripted": "torchscript", "pt2": "export", "pt2_dynamic": "export",
                "pt2_pair": "export", "onnx": "onnx", "onnx_folded": "onnx", "onnx_pair": "onnx"}
    for name, path in made.items():
        info = ck.inspect(path)
        assert info["kind"] == expected[name], (name, info["format"])
        assert info["format"] == modelfiles.FORMATS[expected[name]]


def test_torchscript_traced_and_scripted(files):
    made, net, _ = files
    state = net.state_dict()
    for name in ("traced", "scripted"):
        info = ck.inspect(made[name])
        assert info["parameters"] == parameters(net) and info["buffers"] == buffers(net), name
        assert info["format_version"].isdigit() and info["model_class"].endswith(".Net")
        assert [i["name"] for i in info["inputs"]] == ["x"] and info["inputs"][0]["type"] == "Tensor"
        assert info["outputs"] == [{"type": "Tensor"}]
        weights = {w["name"]: w for w in info["weights"]}
        assert set(weights) == set(state)
        for key, tensor in state.items():
            assert weights[key]["shape"] == list(tensor.shape)
            assert weights[key]["dtype"] == str(tensor.dtype).removeprefix("torch.")
            assert weights[key]["role"] == ("buffer" if key.startswith("bn.running") or "batches" in key
                                            else "parameter")
        assert "--trust" in info["next_step"] and "TorchScript code runs on load" in info["next_step"]
    assert ck.inspect(made["traced"])["inputs"][0]["example_shape"] == [2, 1, 8, 8]  # what trace recorded
    assert "example_shape" not in ck.inspect(made["scripted"])["inputs"][0]


def test_pt2_inputs_outputs_and_weights_come_from_its_json(files):
    made, net, pair = files
    info = ck.inspect(made["pt2"])
    assert info["parameters"] == parameters(net) and info["buffers"] == buffers(net)
    assert info["inputs"] == [{"name": "x", "shape": [2, 1, 8, 8], "dtype": "float32"}]
    assert len(info["outputs"]) == 1 and info["outputs"][0]["shape"] == [2, 3]
    assert info["torch_version"] == torch.__version__ and info["format_version"].count(".") == 1
    assert info["opset"].get("aten", 0) > 0
    roles = {w["name"]: w["role"] for w in info["weights"]}
    assert roles["bn.running_mean"] == "buffer" and roles["fc.weight"] == "parameter" and len(roles) == 9
    assert "--trust" in info["next_step"]

    dynamic = ck.inspect(made["pt2_dynamic"])
    symbol = dynamic["inputs"][0]["shape"][0]
    assert isinstance(symbol, str) and dynamic["inputs"][0]["shape"][1:] == [1, 8, 8]
    assert dynamic["outputs"][0]["shape"] == [symbol, 3] and dynamic["dynamic_sizes"][symbol] == [2, 64]

    two = ck.inspect(made["pt2_pair"])
    assert [(i["name"], i["shape"]) for i in two["inputs"]] == [("features", [3, 5]), ("scale", [3, 1])]
    assert [o["shape"] for o in two["outputs"]] == [[3, 2], [3, 7]]
    assert two["parameters"] == parameters(pair) and two["buffers"] == buffers(pair)


def test_onnx_inputs_outputs_initializers_and_opset(files):
    import onnx
    from onnx import numpy_helper

    made, net, pair = files
    info = ck.inspect(made["onnx"])
    assert info["inputs"] == [{"name": "image", "dtype": "float32", "shape": [2, 1, 8, 8]}]
    assert info["outputs"] == [{"name": "logits", "dtype": "float32", "shape": [2, 3]}]
    assert info["parameters"] == parameters(net)  # BatchNorm's running statistics are not counted
    assert info["buffers"] == net.bn.running_mean.numel() + net.bn.running_var.numel()
    assert info["opset"]["ai.onnx"] >= 18 and info["producer"].startswith("pytorch")
    assert info["format_version"] == onnx.load(str(made["onnx"])).ir_version
    assert "without --trust" in info["next_step"]

    folded = ck.inspect(made["onnx_folded"])  # the optimizer folded the BatchNorm into the convolution
    floats = [numpy_helper.to_array(i) for i in onnx.load(str(made["onnx_folded"])).graph.initializer]
    assert folded["parameters"] == sum(a.size for a in floats if a.dtype.kind == "f")
    assert folded["parameters"] < parameters(net)

    two = ck.inspect(made["onnx_pair"])
    assert [(i["name"], i["shape"]) for i in two["inputs"]] == [("features", [3, 5]), ("scale", [3, 1])]
    assert [(o["name"], o["shape"]) for o in two["outputs"]] == [("logits", [3, 2]), ("hidden", [3, 7])]
    assert two["parameters"] == parameters(pair)


class Tied(nn.Module):
    """An embedding and an output layer sharing one weight: model.parameters() yields it once."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


def test_a_tied_weight_is_counted_once(tmp_path):
    model, tokens = Tied().eval(), torch.tensor([[1, 2, 3]])
    torch.jit.trace(model, tokens).save(str(tmp_path / "tied.ts"))
    torch.export.save(torch.export.export(model, (tokens,)), str(tmp_path / "tied.pt2"))
    for name in ("tied.ts", "tied.pt2"):
        info = ck.inspect(tmp_path / name)
        assert info["parameters"] == parameters(model) == 40, (name, info["weights"])
        assert info["weights_bytes"] == 40 * 4


def test_inspect_json_and_text_for_each_kind(files, capsys):
    made, net, _ = files
    for name in ("traced", "scripted", "pt2", "onnx"):
        assert cli.main(["inspect", str(made[name]), "--json"]) == 0
        out = capsys.readouterr()
        info = json.loads(out.out)
        assert info == json.loads(json.dumps(ck.inspect(made[name])))
        assert info["parameters"] == parameters(net) and out.err == ""
        assert cli.main(["inspect", str(made[name])]) == 0
        text = capsys.readouterr().out
        assert text.splitlines()[0].startswith(f"{made[name]}: {info['format']}")
        assert f"{parameters(net):,} parameters" in text and "fc.weight\t[3, 144]\tfloat32" in text
        assert info["next_step"] in text


def test_onnx_without_the_onnx_package_names_the_extra(files):
    code = ("import sys; sys.modules['onnx'] = None\n"  # Python's own way to make an import fail
            "from etappe import cli; sys.exit(cli.main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "inspect", str(files[0]["onnx"])], capture_output=True,
                            text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "etappe[onnx]" in lines[0] and str(files[0]["onnx"]) in lines[0]


# ------------------------------------------------------------------ nothing runs


class Trigger(nn.Module):
    """A module whose __setstate__ creates a file: ``torch.from_file(path, shared=True)`` opens it with O_CREAT,
    so the marker exists exactly when the module's code ran."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.probe = torch.zeros(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.marker = state[0]
        self.training = state[1]
        self.probe = torch.from_file(state[0], True, 1)  # kept, so the call is not dropped as dead code


class Planted(nn.Module):
    """A model whose weights load as usual and whose submodule writes the marker when loaded."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.trigger = Trigger(marker)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trigger(self.linear(x))


def test_a_torchscript_setstate_that_writes_a_marker_does_not_run(tmp_path):
    marker = tmp_path / "CODE_RAN"
    path = tmp_path / "model.pt"
    model = Planted(str(marker))
    torch.jit.script(model).save(str(path))
    assert not marker.exists()
    info = ck.inspect(path, trusted=True)  # described as data, trusted or not
    assert info["kind"] == "torchscript" and info["parameters"] == parameters(model)
    assert [w["name"] for w in info["weights"]] == ["linear.weight", "linear.bias"]
    result = run_cli("inspect", str(path))  # a real process, as a user runs it
    assert result.returncode == 0 and "linear.weight" in result.stdout, result.stderr
    for argv in (["inspect", str(path), "--json"], ["inspect", str(path), "--trust"]):
        assert cli.main(argv) == 0
    assert not marker.exists()
    torch.jit.load(str(path))  # the control: loading runs __setstate__, which creates the marker
    assert marker.exists()


def test_a_torchscript_module_with_its_own_setstate_is_listed_not_counted(tmp_path):
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w

        @torch.jit.export
        def __getstate__(self) -> Tuple[torch.Tensor, bool]:
            return (self.w, self.training)

        @torch.jit.export
        def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
            self.w = state[0]
            self.training = state[1]

    path = tmp_path / "holder.pt"
    torch.jit.script(Holder()).save(str(path))
    info = ck.inspect(path)
    assert info["own_setstate"] == ["(the model)"] and info["parameters"] == 0
    assert [(w["name"], w["shape"], w["role"]) for w in info["weights"]] == [("__getstate__()[0]", [4], "state")]
    assert "own __setstate__" in ck.format_inspection(info)


# ------------------------------------------------------------------ damaged files: one line, never a traceback


def _damaged(data: bytes, cut: int | None, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data[:cut] if cut is not None else data)
    for at, bit in flips:
        if out:
            out[at % len(out)] ^= 1 << bit
    return bytes(out)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder for the property tests' files (hypothesis runs many examples in one test call)."""
    return tmp_path_factory.mktemp("damaged")


@pytest.mark.parametrize("name", ["traced", "scripted", "pt2", "onnx"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_or_flipped_files_are_one_checkpoint_error(files, name, data, capsys, workdir):
    original = files[0][name].read_bytes()
    truncate = data.draw(st.booleans())
    cut = data.draw(st.integers(0, len(original) - 1)) if truncate else None
    flips = [] if truncate else data.draw(st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 7)),
                                                   min_size=1, max_size=4))
    path = workdir / f"{name}-damaged"
    path.write_bytes(_damaged(original, cut, flips))
    try:
        info = ck.inspect(path)
    except CheckpointError as e:
        message = str(e)
        assert "\n" not in message and str(path) in message, message
    else:  # a flip in tensor data the description never reads, or an ONNX cut at a field's end: still described
        assert name == "onnx" or not truncate, "a truncated archive was described"
        json.dumps(info)
        ck.format_inspection(info)
    code = cli.main(["inspect", str(path)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert (code == 0 and not err) or (code in (1, 2) and len(err) == 1 and err[0].startswith("etappe: error: "))


@pytest.mark.parametrize("name, member", [("traced", "data.pkl"), ("scripted", "data.pkl"),
                                          ("scripted", "code/"), ("traced", "traced_inputs.pkl"),
                                          ("pt2", "models/model.json"), ("pt2", "_weights_config.json")])
@settings(max_examples=40, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 2**31)))
def test_a_member_damaged_under_a_valid_crc_is_one_checkpoint_error(files, name, member, flips, cut, workdir):
    """The parsers themselves (the unpickler, the source reader, the JSON reader) on damaged content: the archive
    is rewritten with the damaged member and valid CRCs, so nothing but the parser stands between them."""
    path = workdir / f"{name}-member.zip"
    with zipfile.ZipFile(files[0][name]) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            inner = info.filename.split("/", 1)[1]
            if inner.startswith(member) and not inner.endswith(".debug_pkl") or inner.endswith(member):
                data = bytearray(data[: cut % (len(data) + 1)] if cut is not None else data)
                for at, value in flips:
                    if data:
                        data[at % len(data)] = value
            dst.writestr(info, bytes(data))
    try:
        info = ck.inspect(path)
    except CheckpointError as e:
        assert "\n" not in str(e) and str(path) in str(e)
    else:
        json.dumps(info)
        ck.format_inspection(info)


@pytest.mark.slow
def test_a_damaged_file_is_one_line_in_a_real_process(files, tmp_path):
    for name in ("traced", "pt2", "onnx"):
        data = files[0][name].read_bytes()
        path = tmp_path / f"{name}.bin"
        path.write_bytes(data[: len(data) * 2 // 3])
        result = run_cli("inspect", str(path), timeout=120)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode in (1, 2) and len(lines) == 1 and lines[0].startswith("etappe: error: "), \
            result.stderr
        assert str(path) in lines[0]


# ------------------------------------------------------------------ the rules, over random inputs


@settings(max_examples=30, deadline=None)
@given(which=st.sampled_from(["traced", "scripted", "pt2", "onnx"]),
       name=st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=12),
       suffix=st.sampled_from(["", ".pt", ".pth", ".onnx", ".pt2", ".safetensors", ".ts", ".tar", ".json"]))
def test_the_kind_never_depends_on_the_name(files, which, name, suffix, workdir):
    path = workdir / f"{name}{suffix}"
    path.write_bytes(files[0][which].read_bytes())
    assert modelfiles.kind(path) == {"traced": "torchscript", "scripted": "torchscript", "pt2": "export",
                                     "onnx": "onnx"}[which]


_MEMBER = st.sampled_from(["data.pkl", "constants.pkl", "code/__torch__.py", "archive_format", "version",
                           "models/model.json", "data/0", "byteorder"])


@settings(max_examples=60, deadline=None)
@given(members=st.lists(_MEMBER, unique=True, max_size=6), fmt=st.sampled_from([b"pt2", b"pt3", b""]),
       roots=st.integers(1, 2))
def test_an_archive_is_what_its_members_say(members, fmt, roots, workdir):
    path = workdir / "members.zip"
    with zipfile.ZipFile(path, "w") as z:
        for i, member in enumerate(members):
            z.writestr(f"root{i % roots}/{member}", fmt if member == "archive_format" else b"x")
    inner = set(members)
    one_root = roots == 1 or len(members) < 2
    if one_root and "constants.pkl" in inner and "code/__torch__.py" in inner:
        expected = "torchscript"
    elif one_root and "archive_format" in inner and fmt == b"pt2":
        expected = "export"
    else:
        expected = None
    assert modelfiles.kind(path) == expected


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300), first=st.sampled_from([b"", b"\x08", b"PK", b"\x80"]))
def test_the_detector_on_random_bytes_says_a_kind_or_one_error(data, first, workdir):
    path = workdir / "random.bin"
    path.write_bytes(first + data)
    try:
        found = modelfiles.kind(path)
    except CheckpointError as e:
        assert "\n" not in str(e)
    else:
        assert found in (None, "onnx")  # random bytes are never a zip archive torch wrote
        if found:
            try:
                ck.inspect(path)
            except CheckpointError:
                pass


_NAME = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(lambda n: n not in ("if", "in", "is", "or",
                                                                                            "as", "def", "for"))


@settings(max_examples=60, deadline=None)
@given(params=st.lists(_NAME, unique=True, max_size=5), bufs=st.lists(_NAME, unique=True, max_size=5),
       args=st.lists(_NAME, unique=True, max_size=4), cls=st.from_regex(r"[A-Z][a-zA-Z0-9]{0,8}", fullmatch=True))
def test_the_torchscript_source_reader_finds_what_the_printer_writes(params, bufs, args, cls):
    quoted = lambda names: "[" + "".join(f'"{n}", ' for n in names) + "]"  # noqa: E731  # as torch prints them
    signature = ",\n    ".join([f"self: __torch__.m.{cls}"] + [f"{a}: Tensor" for a in args if a != "self"])
    source = (f"class {cls}(Module):\n  __parameters__ = {quoted(params)}\n  __buffers__ = {quoted(bufs)}\n"
              f"  training : bool\n  def forward({signature}) -> Tuple[Tensor, Tensor]:\n    return (x, x)\n")
    found = modelfiles._classes(source, "__torch__.m")[f"__torch__.m.{cls}"]
    assert found.parameters == params and found.buffers == bufs
    assert [i["name"] for i in found.inputs] == [a for a in args if a != "self"]
    assert found.output == "Tuple[Tensor, Tensor]"


@settings(max_examples=80, deadline=None)
@given(text=st.text(max_size=200))
def test_the_torchscript_source_reader_on_random_text_parses_or_says_so(text):
    try:
        modelfiles._classes(text, "__torch__.x")
    except modelfiles.Malformed:
        pass


@settings(max_examples=80, deadline=None)
@given(module=st.from_regex(r"etappe_probe_[a-z]{1,8}(\.[a-z]{1,6}){0,2}", fullmatch=True),
       name=st.from_regex(r"[A-Za-z_]{1,10}", fullmatch=True), torch_class=st.booleans())
def test_the_unpickler_builds_only_inert_stand_ins(module, name, torch_class):
    """A pickle naming any class: a ``__torch__`` one becomes an inert stand-in holding its state, anything else is
    refused, and no module is ever imported."""
    module = f"__torch__.{module}" if torch_class else module
    stream = (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n)\x81}X\x01\x00\x00\x00aK\x01sb.")
    before = set(sys.modules)
    try:
        obj = modelfiles.unpickle(stream, {}, "data.pkl")
    except modelfiles.Malformed as e:
        assert not torch_class and isinstance(e, modelfiles._Unsupported) and "does not build" in str(e)
    else:
        assert torch_class and obj.qualname == f"{module}.{name}" and obj.state == {"a": 1}
    assert set(sys.modules) == before


@settings(max_examples=80, deadline=None)
@given(data=st.binary(max_size=200))
def test_the_unpickler_on_random_bytes_returns_or_says_so(data):
    before = set(sys.modules)
    try:
        modelfiles.unpickle(b"\x80\x02" + data, {}, "data.pkl")
    except modelfiles.Malformed:
        pass
    assert set(sys.modules) == before


def _tensor_pickle(numel: int, size: tuple, stride: tuple) -> bytes:
    """The record TorchScript's data.pkl holds for a float tensor: _rebuild_tensor_v2 of a persistent storage id."""
    arg = lambda v: pickle.dumps(v, 2)[2:-1]  # noqa: E731  # one value's opcodes, without PROTO and STOP
    return (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(("
            + arg("storage") + b"ctorch\nFloatStorage\n" + arg("0") + arg("cpu") + arg(numel) + b"tQ"
            + arg(0) + arg(size) + arg(stride) + b"\x89ccollections\nOrderedDict\n)RtR.")


def test_the_unpickler_checks_storages_against_the_archive():
    t = modelfiles.unpickle(_tensor_pickle(6, (2, 3), (3, 1)), {"0": 24}, "data.pkl")
    assert t.shape == (2, 3) and t.stride == (3, 1) and t.storage.dtype == torch.float32
    for numel, size, have in ((6, (2, 3), 20), (6, (3, 3), 24), (6, (2, 3), None)):
        with pytest.raises(modelfiles.Malformed, match="storage|past"):
            modelfiles.unpickle(_tensor_pickle(numel, size, (3, 1)), {} if have is None else {"0": have},
                                 "data.pkl")
