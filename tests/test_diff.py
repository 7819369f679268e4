"""etappe diff: two checkpoints or weights files compared tensor by tensor, across every kind etappe reads."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import etappe
from etappe.checkpoint import CheckpointStore, kinds
from etappe.checkpoint.errors import TrustError
from etappe.comparison import (CLOSE, DIFFERS, DTYPE, EQUAL, ONLY_A, ONLY_B, SHAPE, compare_leaves, leaves,
                               pair_entries, wrapper_prefixes)
from etappe.errors import UsageError
from etappe.cli import main
from tests.conftest import run_cli


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A net and an Adam that took two steps, so the optimizer has state to compare."""
    net = make_net(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(5, 1, 8, 8)).square().mean().backward()
        opt.step()
    return net, opt


def differing(result) -> list[tuple[str, str]]:
    return [(i.name, i.status) for i in result.differences]


def test_equal_checkpoints(tmp_path):
    net, opt = trained()
    etappe.save(tmp_path / "a", model=net, optimizer=opt, epoch=3, loss=0.25)
    etappe.save(tmp_path / "b", model=net, optimizer=opt, epoch=3, loss=0.25)
    result = etappe.diff(tmp_path / "a", tmp_path / "b")
    assert result.equal and result.exit_code == 0 and result.differences == []
    n_model = len(net.state_dict())
    n_opt = sum(len(s) for s in opt.state_dict()["state"].values())
    assert sum(i.tensor for i in result.items) == n_model + n_opt
    assert result.summary().splitlines()[-1] == f"equal: {n_model + n_opt} tensors, " \
                                                 f"{sum(not i.tensor for i in result.items)} values"


def test_one_tensor_changed_reports_the_change_made(tmp_path):
    net, opt = trained()
    etappe.save(tmp_path / "a", model=net, optimizer=opt, epoch=3)
    before = net[3].weight[2, 17].item()
    with torch.no_grad():
        net[3].weight[2, 17] -= 0.375
    change = abs(net[3].weight[2, 17].item() - before)  # what float32 rounding made of it
    etappe.save(tmp_path / "b", model=net, optimizer=opt, epoch=3)
    result = etappe.diff(tmp_path / "a", tmp_path / "b")
    assert differing(result) == [("model/3.weight", DIFFERS)]
    assert result.differences[0].max_abs == change
    assert result.exit_code == 1
    assert "model/3.weight" in result.summary() and "max abs diff 0.375" in result.summary()


def test_renamed_key_is_only_in_a_and_only_in_b(tmp_path):
    sd = make_net().state_dict()
    renamed = {("head.weight" if k == "3.weight" else k): v for k, v in sd.items()}
    safetensors.torch.save_file(dict(sd), tmp_path / "a.safetensors")
    safetensors.torch.save_file(renamed, tmp_path / "b.safetensors")
    result = etappe.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert differing(result) == [("model/3.weight", ONLY_A), ("model/head.weight", ONLY_B)]
    assert result.differences[0].a == "[3, 144] float32" and result.differences[1].b == "[3, 144] float32"


def test_dtype_and_shape_changes(tmp_path):
    sd = make_net().state_dict()
    changed = dict(sd, **{"0.weight": sd["0.weight"].double(), "3.bias": torch.zeros(4)})
    torch.save(sd, tmp_path / "a.pt")
    torch.save(changed, tmp_path / "b.pt")
    result = etappe.diff(tmp_path / "a.pt", tmp_path / "b.pt")
    assert differing(result) == [("model/3.bias", SHAPE), ("model/0.weight", DTYPE)]
    dtype_item = result.differences[1]
    assert (dtype_item.a, dtype_item.b, dtype_item.max_abs) == ("[4, 1, 3, 3] float32", "[4, 1, 3, 3] float64", 0.0)


def test_checkpoint_against_plain_torch_save_of_the_same_weights(tmp_path):
    net, opt = trained()
    etappe.save(tmp_path / "ckpt", model=net, optimizer=opt, epoch=4, loss=0.5)
    torch.save(net.state_dict(), tmp_path / "weights.pt")  # a bare state dict: only the model is compared
    result = etappe.diff(tmp_path / "ckpt", tmp_path / "weights.pt")
    assert result.equal and result.pairs == [("model", "model")]
    assert "B holds only a model: A's other entries not compared (optimizer, epoch, loss)" in result.notes
    # the tutorials' layout: its entries answer to etappe's names
    torch.save({"model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict(), "epoch": 4,
                "loss": 0.5}, tmp_path / "tutorial.tar")
    result = etappe.diff(tmp_path / "tutorial.tar", tmp_path / "ckpt")
    assert result.equal, result.summary()
    assert sorted(result.pairs) == [("epoch", "epoch"), ("loss", "loss"), ("model_state_dict", "model"),
                                    ("optimizer_state_dict", "optimizer")]
    assert "compared A's 'model_state_dict' with B's 'model'" in result.notes


def test_bare_state_dict_lines_up_with_a_differently_named_model(tmp_path):
    net = make_net()
    etappe.save(tmp_path / "gan", netG=net, step=7)
    safetensors.torch.save_file(dict(net.state_dict()), tmp_path / "g.safetensors")
    result = etappe.diff(tmp_path / "g.safetensors", tmp_path / "gan")
    assert result.equal and result.pairs == [("model", "netG")]
    assert "compared A's 'model' with B's 'netG'" in result.notes


def test_optimizer_state_difference(tmp_path):
    net, opt = trained()
    etappe.save(tmp_path / "a", model=net, optimizer=opt)
    state = opt.state_dict()
    state["state"][1]["exp_avg_sq"][0] += 1.0
    state["param_groups"][0]["lr"] = 5e-4
    torch.save({"model": net.state_dict(), "optimizer": state}, tmp_path / "b.pt")
    result = etappe.diff(tmp_path / "a", tmp_path / "b.pt")
    assert differing(result) == [("optimizer/state/1/exp_avg_sq", DIFFERS), ("optimizer/param_groups/0/lr", DIFFERS)]
    lr = result.differences[1]
    assert (lr.a, lr.b) == ("0.001", "0.0005")


def test_plain_value_difference_and_config_fields(tmp_path):
    net = make_net()
    etappe.save(tmp_path / "a", model=net, epoch=5, loss=0.4, config={"lr": 0.1, "batch_size": 32})
    etappe.save(tmp_path / "b", model=net, epoch=6, loss=0.4, config={"lr": 0.1, "batch_size": 64})
    result = etappe.diff(tmp_path / "a", tmp_path / "b")
    assert sorted(differing(result)) == [("config/batch_size", DIFFERS), ("epoch", DIFFERS)]
    assert {i.name: (i.a, i.b) for i in result.differences} == {"epoch": ("5", "6"), "config/batch_size": ("32", "64")}


def test_wrapper_prefixes_are_matched_and_said(tmp_path):
    sd = make_net().state_dict()
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pt")
    torch.save({f"_orig_mod.{k}": v for k, v in sd.items()}, tmp_path / "compiled.pt")
    result = etappe.diff(tmp_path / "ddp.pt", tmp_path / "compiled.pt")
    assert result.equal, result.summary()
    assert "A's 'model' keys carry the prefix 'module.' and B's do not: matched without it" in result.notes
    assert "B's 'model' keys carry the prefix '_orig_mod.' and A's do not: matched without it" in result.notes
    assert {i.name for i in result.items} == {f"model/{k}" for k in sd}


def test_nan_in_the_same_places_is_equal_elsewhere_not(tmp_path):
    t = torch.tensor([1.0, float("nan"), float("inf"), -0.0])
    safetensors.torch.save_file({"w": t}, tmp_path / "a.safetensors")
    safetensors.torch.save_file({"w": t.clone()}, tmp_path / "b.safetensors")
    safetensors.torch.save_file({"w": torch.tensor([1.0, 2.0, float("inf"), 0.0])}, tmp_path / "c.safetensors")
    assert etappe.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors").equal
    result = etappe.diff(tmp_path / "a.safetensors", tmp_path / "c.safetensors")
    assert differing(result) == [("model/w", DIFFERS)] and math.isnan(result.differences[0].max_abs)



def test_a_zero_of_the_other_sign_is_not_equal_but_within_any_atol(tmp_path):
    """Equal is bit-equal: -0.0 and 0.0 differ in a bit (and in 1 / x), so they are not equal; their largest
    absolute difference is 0, so with --atol they are close."""
    safetensors.torch.save_file({"w": torch.zeros(3)}, tmp_path / "z.safetensors")
    safetensors.torch.save_file({"w": -torch.zeros(3)}, tmp_path / "nz.safetensors")
    result = etappe.diff(tmp_path / "z.safetensors", tmp_path / "nz.safetensors")
    assert differing(result) == [("model/w", DIFFERS)] and result.differences[0].max_abs == 0
    assert result.exit_code == 1 and "bits differ" in result.summary()
    assert etappe.diff(tmp_path / "z.safetensors", tmp_path / "nz.safetensors", atol=0.0).exit_code == 0

def test_atol_calls_small_differences_close(tmp_path):
    sd = make_net().state_dict()
    bumped = {k: (v + 1e-4 if v.is_floating_point() else v) for k, v in sd.items()}
    torch.save(sd, tmp_path / "a.pt")
    torch.save(bumped, tmp_path / "b.pt")
    strict = etappe.diff(tmp_path / "a.pt", tmp_path / "b.pt")
    assert not strict.equal and strict.exit_code == 1
    loose = etappe.diff(tmp_path / "a.pt", tmp_path / "b.pt", atol=1e-3)
    assert not loose.equal and loose.close and loose.exit_code == 0
    assert {i.status for i in loose.differences} == {CLOSE}
    tight = etappe.diff(tmp_path / "a.pt", tmp_path / "b.pt", atol=1e-5)
    assert not tight.close and tight.exit_code == 1


def test_run_folder_is_its_newest_checkpoint(tmp_path):
    net, opt = trained()
    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    store.save(1, {"model": make_net(1), "optimizer": opt})
    store.save(2, {"model": net, "optimizer": opt})
    store.close()
    safetensors.torch.save_file(dict(net.state_dict()), tmp_path / "final.safetensors")
    result = etappe.diff(tmp_path / "run", tmp_path / "final.safetensors")
    assert result.equal and result.a_format == "etappe checkpoint"
    assert f"A is run {tmp_path / 'run'}'s newest valid checkpoint, {store.latest().name}" in result.notes
    assert store.latest().name.endswith("2")


def test_onnx_initializers_and_pt2_weights_are_read_as_data(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    sd = make_net().state_dict()
    inits = [numpy_helper.from_array(v.numpy(), name=k) for k, v in sd.items() if k.startswith("3.")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])], initializer=inits)
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    torch.save(sd, tmp_path / "sd.pt")
    result = etappe.diff(tmp_path / "m.onnx", tmp_path / "sd.pt")
    assert result.a_format == "ONNX model"
    assert {(n, s) for n, s in differing(result)} == {(f"model/{k}", ONLY_B) for k in sd if not k.startswith("3.")}
    assert [i.name for i in result.items if i.status == EQUAL] == ["model/3.weight", "model/3.bias"]

    net = make_net().eval()
    torch.export.save(torch.export.export(net, (torch.randn(2, 1, 8, 8),)), tmp_path / "m.pt2")
    result = etappe.diff(tmp_path / "m.pt2", tmp_path / "sd.pt")
    assert result.a_format == "torch.export program" and result.equal, result.summary()



def test_an_onnx_graphs_integer_constants_are_not_weights_and_damaged_initializers_are_one_error(tmp_path, capsys):
    """An exporter keeps a reshape's shape as an int64 initializer: not a weight, so a model against its ONNX file
    is equal on the weights alone. An initializer whose data does not fit its dims is one error line, exit 2."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    sd = {k: v for k, v in make_net().state_dict().items() if k.startswith("3.")}
    inits = [numpy_helper.from_array(v.numpy(), name=k) for k, v in sd.items()]
    inits.append(numpy_helper.from_array(np.array([2, -1], dtype=np.int64), name="val_7"))
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "val_7"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2])], initializer=inits)
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    torch.save(sd, tmp_path / "sd.pt")
    assert etappe.diff(tmp_path / "m.onnx", tmp_path / "sd.pt").equal

    bad = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[2**30, 2**30], raw_data=b"\0" * 4)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])], initializer=[bad])
    onnx.save(helper.make_model(graph), str(tmp_path / "huge.onnx"))
    assert main(["diff", str(tmp_path / "huge.onnx"), str(tmp_path / "huge.onnx")]) == 2
    err = capsys.readouterr().err
    assert "initializer 'w' cannot be read" in err and "Traceback" not in err


def test_a_safetensors_header_listing_more_tensors_than_a_model_writes_is_refused_before_parsing(tmp_path):
    """A header within safetensors' 100 MB limit can list over a million empty tensors, each of which then costs
    every reader; past tensorfile.MAX_TENSORS the file is refused, by diff, inspect and load alike."""
    import json
    import struct

    from etappe.checkpoint import CheckpointError, tensorfile
    from etappe.checkpoint.inspection import inspect

    entries = {f"k{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(tensorfile.MAX_TENSORS + 1)}
    header = json.dumps(entries).encode()
    (tmp_path / "many.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    for read in (lambda p: etappe.diff(p, p), inspect, etappe.load):
        with pytest.raises(CheckpointError, match="more than the 200000 tensors"):
            read(tmp_path / "many.safetensors")

def test_torchscript_weights_are_read_as_data(tmp_path):
    net = make_net().eval()
    torch.jit.save(torch.jit.script(net), tmp_path / "m.pt")  # a program, whatever its name says
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    result = etappe.diff(tmp_path / "m.pt", tmp_path / "sd.pt")
    assert result.a_format == "TorchScript archive" and result.equal, result.summary()
    assert {i.name for i in result.items} == {f"model/{k}" for k in net.state_dict()}
    with torch.no_grad():
        net[0].weight[0, 0, 1, 1] += 2.0
    torch.jit.save(torch.jit.script(net), tmp_path / "changed.pt")
    assert differing(etappe.diff(tmp_path / "changed.pt", tmp_path / "sd.pt")) == [("model/0.weight", DIFFERS)]


def test_torchscript_with_its_own_setstate_needs_trust(tmp_path):
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", torch.ones(3))

        @torch.jit.export
        def __getstate__(self) -> tuple[torch.Tensor, bool]:
            return self.w, self.training

        @torch.jit.export
        def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
            self.w = state[0] * 2  # what loading runs: the file's code
            self.training = state[1]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w

    torch.jit.save(torch.jit.script(Holder()), tmp_path / "own.pt")
    safetensors.torch.save_file({"w": torch.full((3,), 2.0)}, tmp_path / "w.safetensors")
    with pytest.raises(TrustError, match="own __setstate__.*--trust"):
        etappe.diff(tmp_path / "own.pt", tmp_path / "w.safetensors")
    assert etappe.diff(tmp_path / "own.pt", tmp_path / "w.safetensors", trusted=True).equal  # ran: w doubled


def test_summary_is_short_and_says_how_many_more(tmp_path):
    a = {f"layer{i}.weight": torch.full((3,), float(i)) for i in range(60)}
    b = {f"layer{i}.weight": torch.full((3,), float(i) + (i % 7)) for i in range(30)}
    b.update({f"other{i}.weight": torch.zeros(3) for i in range(30)})
    safetensors.torch.save_file(a, tmp_path / "a.safetensors")
    safetensors.torch.save_file(b, tmp_path / "b.safetensors")
    result = etappe.diff(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    lines = result.summary().splitlines()
    assert len(lines) <= 28  # the two sides, the verdict, ~20 lines of differences, the rest counted
    assert lines[-2].startswith("... and ") and lines[-2].split()[2].isdigit()
    shown = [line.split()[0] for line in lines if line.startswith("  ")]
    hidden = int(lines[-2].split()[2])
    assert len(shown) + hidden == len(result.differences)
    values = [line for line in lines if "max abs diff" in line]
    assert [float(v.rsplit(" ", 1)[1]) for v in values] == sorted((float(v.rsplit(" ", 1)[1]) for v in values),
                                                                  reverse=True)  # largest first


def test_bad_input_is_one_usage_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not weights\n")
    torch.save(make_net().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(UsageError, match="no such file or folder"):
        etappe.diff(tmp_path / "missing.pt", tmp_path / "sd.pt")
    with pytest.raises(etappe.EtappeError, match="not a readable torch.save file"):
        etappe.diff(tmp_path / "notes.txt", tmp_path / "sd.pt")
    with pytest.raises(UsageError, match="neither an etappe checkpoint"):
        etappe.diff(tmp_path, tmp_path / "sd.pt")


@pytest.fixture
def cli_files(tmp_path):
    """A checkpoint ``a``, the same weights as a torch.save file, ``b`` with one bias changed by 1e-3, a text file."""
    net, opt = trained()
    etappe.save(tmp_path / "a", model=net, optimizer=opt, epoch=1)
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}, tmp_path / "same.pt")
    expected_items = len(list(leaves(net.state_dict()))) + len(list(leaves(opt.state_dict()))) + 1
    with torch.no_grad():
        net[0].bias[0] += 1e-3
    etappe.save(tmp_path / "b", model=net, optimizer=opt, epoch=1)
    (tmp_path / "notes.txt").write_text("not weights\n")
    return tmp_path, expected_items


def _one_error_line(out) -> None:
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.startswith("etappe: error: ") and len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.slow  # three CLI processes, each importing torch
def test_cli_exit_codes(cli_files):
    tmp_path, _ = cli_files
    same = run_cli("diff", str(tmp_path / "a"), str(tmp_path / "same.pt"))
    assert same.returncode == 0, same.stderr
    assert same.stdout.splitlines()[-1].startswith("equal: ")
    changed = run_cli("diff", str(tmp_path / "a"), str(tmp_path / "b"))
    assert changed.returncode == 1, changed.stderr
    assert "values differ (1):" in changed.stdout and "model/0.bias" in changed.stdout
    _one_error_line(run_cli("diff", str(tmp_path / "missing"), str(tmp_path / "a")))


@pytest.mark.slow  # three CLI processes, each importing torch
def test_cli_json_atol_and_unreadable_input(cli_files):
    tmp_path, expected_items = cli_files
    close = run_cli("diff", str(tmp_path / "a"), str(tmp_path / "b"), "--atol", "1e-2", "--json")
    assert close.returncode == 0, close.stderr
    report = json.loads(close.stdout)
    assert not report["equal"] and report["close"]
    assert [(d["name"], d["status"]) for d in report["differences"]] == [("model/0.bias", CLOSE)]
    assert len(report["items"]) == expected_items
    _one_error_line(run_cli("diff", str(tmp_path / "notes.txt"), str(tmp_path / "a")))
    _one_error_line(run_cli("diff", str(tmp_path / "a"), str(tmp_path / "b"), "--atol", "-1"))


# --- the rules, over random inputs ------------------------------------------------------------------------------

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8]
names = st.lists(st.text("abcdef", min_size=1, max_size=3), min_size=1, max_size=3).map(".".join)


@st.composite
def state_dicts(draw):
    keys = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    out = {}
    for k in keys:
        shape = draw(st.lists(st.integers(1, 4), max_size=3))
        dtype = draw(st.sampled_from(_DTYPES))
        seed = draw(st.integers(0, 2**16))
        g = torch.Generator().manual_seed(seed)
        t = torch.randn(shape, generator=g) if dtype.is_floating_point else torch.randint(0, 100, shape, generator=g)
        if dtype.is_floating_point and draw(st.booleans()):
            t.reshape(-1)[0] = float("nan")  # the same NaN on both sides is equal
        out[k] = t.to(dtype)
    return out


@st.composite
def edits(draw, sd):
    """One edit of ``sd`` and what diff must report: [(name, status)], plus the max abs diff of a changed value."""
    kind = draw(st.sampled_from(["change", "rename", "drop", "retype", "none"]))
    key = draw(st.sampled_from(sorted(sd)))
    edited = dict(sd)
    if kind == "change":
        t = sd[key].clone().reshape(-1)
        i = draw(st.integers(0, t.numel() - 1))
        new = draw(st.integers(0, 255)) if not t.dtype.is_floating_point else draw(
            st.floats(-1e3, 1e3, width=16) | st.just(math.nan))
        old = t[i].item()
        if old == new or (math.isnan(old) and math.isnan(new)):
            return edited, [], None
        wide = abs(torch.tensor(new, dtype=t.dtype).double().item() - t[i].double().item())  # NaN against a number
        t[i] = new
        edited[key] = t.reshape(sd[key].shape)
        if wide == 0:  # the new value rounds to the old one in this dtype
            return edited, [], None
        return edited, [(f"model/{key}", DIFFERS)], wide
    if kind == "rename":
        new = key + ".x"
        if new in sd:
            return edited, [], None
        edited = {(new if k == key else k): v for k, v in sd.items()}
        return edited, [(f"model/{key}", ONLY_A), (f"model/{new}", ONLY_B)], None
    if kind == "drop":
        if len(sd) == 1:
            return edited, [], None
        del edited[key]
        return edited, [(f"model/{key}", ONLY_A)], None
    if kind == "retype":
        dtype = draw(st.sampled_from([d for d in _DTYPES if d != sd[key].dtype]))
        edited[key] = sd[key].to(dtype)
        return edited, [(f"model/{key}", DTYPE)], None
    return edited, [], None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_diff_reports_exactly_the_edit_made(data):
    sd = data.draw(state_dicts())
    edited, expected, wide = data.draw(edits(sd))
    fmt_a, fmt_b = data.draw(st.sampled_from(["etappe", "torch", "safetensors"])), \
        data.draw(st.sampled_from(["etappe", "torch", "safetensors"]))
    with tempfile.TemporaryDirectory() as tmp:
        a, b = _write(Path(tmp), "a", sd, fmt_a), _write(Path(tmp), "b", edited, fmt_b)
        result = etappe.diff(a, b)
    assert sorted(differing(result)) == sorted(expected), result.summary()
    assert result.equal == (not expected) and result.exit_code == (1 if expected else 0)
    if wide is not None:
        got = result.differences[0].max_abs
        assert got == wide or (math.isnan(got) and math.isnan(wide))
    assert len([i for i in result.items if i.status == EQUAL]) == len(result.items) - len(expected)


def _write(folder: Path, name: str, sd: dict, fmt: str) -> Path:
    if fmt == "etappe":
        return etappe.save(folder / name, model=_Holder(sd))
    if fmt == "torch":
        torch.save(sd, folder / f"{name}.pt")
        return folder / f"{name}.pt"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, folder / f"{name}.safetensors")
    return folder / f"{name}.safetensors"


class _Holder(nn.Module):
    """A module whose state_dict is a given dict (names with dots and all)."""

    def __init__(self, sd: dict) -> None:
        super().__init__()
        self.sd = sd

    def state_dict(self, *args, **kwargs):  # noqa: ARG002
        return dict(self.sd)


prefix_chains = st.lists(st.sampled_from(kinds.WRAPPER_PREFIXES), max_size=3)


@settings(max_examples=300, deadline=None)
@given(keys=st.lists(names, min_size=1, max_size=6, unique=True), chain_a=prefix_chains, chain_b=prefix_chains)
def test_wrapper_prefixes_rule(keys, chain_a, chain_b):
    """Keys that differ only by wrapper prefixes line up after stripping; a side stops losing prefixes only where
    the other side carries the same one next."""
    pa, pb = "".join(chain_a), "".join(chain_b)
    strip_a, strip_b = wrapper_prefixes([pa + k for k in keys], [pb + k for k in keys])
    assert pa.startswith(strip_a) and pb.startswith(strip_b)
    rest_a, rest_b = pa[len(strip_a):], pb[len(strip_b):]
    assert rest_a == rest_b or rest_a.split(".")[0] == rest_b.split(".")[0]
    if pa == pb:
        assert (strip_a, strip_b) == ("", "")
    if not set(chain_a) & set(chain_b):  # nothing in common (one side plain, say): every prefix comes off
        assert (strip_a, strip_b) == (pa, pb)


@settings(max_examples=100, deadline=None)
@given(a=st.lists(names, min_size=1, max_size=5, unique=True), b=st.lists(names, min_size=1, max_size=5, unique=True),
       prefix=st.sampled_from(kinds.WRAPPER_PREFIXES))
def test_wrapper_prefixes_only_when_every_key_carries_it(a, b, prefix):
    """A prefix on only some of a side's keys is a name, not a wrapper: nothing is stripped."""
    mixed = [prefix + a[0], *a[1:], "plain"]
    assert wrapper_prefixes(mixed, b) == ("", "")


entry_kinds = st.sampled_from([kinds.MODULE, kinds.OPTIMIZER, kinds.SCHEDULER, kinds.VALUE])
entry_names = st.sampled_from(["model", "model_state_dict", "netG", "ema", "optimizer", "optim", "scheduler",
                               "epoch", "loss", "step"])


@settings(max_examples=500, deadline=None)
@given(a=st.dictionaries(entry_names, entry_kinds, min_size=1, max_size=5),
       b=st.dictionaries(entry_names, entry_kinds, min_size=1, max_size=5))
def test_pair_entries_rule(a, b):
    pairs, only_a, only_b, notes = pair_entries(a, b)
    paired_a, paired_b = [x for x, _ in pairs], [y for _, y in pairs]
    assert len(set(paired_a)) == len(paired_a) and len(set(paired_b)) == len(paired_b)  # each entry used once
    assert set(paired_a).isdisjoint(only_a) and set(paired_b).isdisjoint(only_b)
    bare = any(len(s) == 1 and kinds.MODULE in s.values() for s in (a, b)) and len(pairs) == 1 \
        and not (only_a or only_b)
    if not bare:
        assert set(paired_a) | set(only_a) == set(a) and set(paired_b) | set(only_b) == set(b)
        assert all((x, x) in pairs for x in set(a) & set(b))  # the same name is always the same entry
    for x, y in pairs:
        if x != y:
            assert f"compared A's {x!r} with B's {y!r}" in notes
            assert a[x] == b[y] == kinds.MODULE or x.removesuffix("_state_dict") == y.removesuffix("_state_dict") \
                or {x, y} == {"optim", "optimizer"}
    left_models_a = [x for x in only_a if a[x] == kinds.MODULE]
    left_models_b = [y for y in only_b if b[y] == kinds.MODULE]
    assert not (len(left_models_a) == 1 == len(left_models_b))  # one model left on each side: compared together


nested = st.recursive(
    st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=3), st.none(),
              st.integers(1, 3).map(lambda n: torch.arange(n, dtype=torch.float32))),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text("xyz", min_size=1, max_size=2),
                                                                           inner, max_size=3)),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(value=nested)
def test_leaves_cover_every_tensor_and_compare_equal_to_a_copy(value):
    found = dict(leaves(value))
    copy = dict(leaves(_copied(value)))
    assert len(found) == len(list(leaves(value)))  # every path names one leaf
    assert sum(isinstance(v, torch.Tensor) for v in found.values()) == _count_tensors(value)
    items = compare_leaves(found, copy)
    assert all(i.status == EQUAL for i in items), [i for i in items if i.status != EQUAL]


def _copied(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, dict):
        return {k: _copied(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copied(x) for x in v]
    return v


def _count_tensors(v) -> int:
    if isinstance(v, torch.Tensor):
        return 1
    if isinstance(v, dict):
        return sum(map(_count_tensors, v.values()))
    if isinstance(v, list):
        return sum(map(_count_tensors, v))
    return 0


def test_numpy_arrays_compare_as_tensors():
    items = compare_leaves({"rng": np.arange(4, dtype=np.uint32)}, {"rng": np.array([0, 1, 2, 5], dtype=np.uint32)})
    assert [(i.name, i.status, i.max_abs) for i in items] == [("rng", DIFFERS, 2.0)]


def test_hugging_face_folder(tmp_path):
    from etappe.checkpoint import hf

    net = make_net()
    sd = net.state_dict()
    folder = tmp_path / "hf"
    folder.mkdir()
    keys = list(sd)
    safetensors.torch.save_file({k: sd[k] for k in keys[:3]}, folder / "model-00001-of-00002.safetensors")
    safetensors.torch.save_file({k: sd[k] for k in keys[3:]}, folder / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 + (i >= 3)}-of-00002.safetensors"
                                            for i, k in enumerate(keys)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 4}))
    torch.save(sd, tmp_path / "sd.pt")
    result = etappe.diff(folder, tmp_path / "sd.pt")
    assert result.a_format == hf.FORMAT and result.equal, result.summary()
    assert "B holds only a model: A's other entries not compared (config)" in result.notes
    etappe.save(tmp_path / "ckpt", model=net, config={"model_type": "toy", "hidden_size": 8})
    result = etappe.diff(folder, tmp_path / "ckpt")
    assert differing(result) == [("config/hidden_size", DIFFERS)]


# ----------------------------------------------------------------- safetensors: the library's header rule, and size

def _safetensors_bytes(entries: list[tuple[str, int, int, int]], data_size: int) -> bytes:
    """A safetensors file of U8 tensors: (name, start, end, numel) each, in the header's JSON text in that order
    (a name may come twice), then ``data_size`` bytes of data."""
    items = [f'"{name}": {{"dtype": "U8", "shape": [{numel}], "data_offsets": [{start}, {end}]}}'
             for name, start, end, numel in entries]
    text = ("{" + ", ".join(items) + "}").encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + bytes(range(256)) * (data_size // 256) + bytes(data_size % 256)


@st.composite
def headers(draw):
    """Tensors laid end to end (the rule), then perhaps one thing changed: an overlap, a gap, bytes after them,
    a length that is not the numel's, or a name given twice (the same entry again, or one for bytes after)."""
    sizes = draw(st.lists(st.integers(0, 6), min_size=1, max_size=4))
    entries, at = [], 0
    for i, size in enumerate(sizes):
        entries.append([f"t{i}", at, at + size, size])
        at += size
    data_size = at
    change = draw(st.sampled_from(["none", "shift", "grow", "tail", "numel", "twice", "twice-after"]))
    i = draw(st.integers(0, len(entries) - 1))
    if change == "shift":  # a range moved: it overlaps its neighbour or leaves a gap
        d = draw(st.integers(-3, 3).filter(bool))
        entries[i][1] = max(0, entries[i][1] + d)
        entries[i][2] = max(entries[i][1], entries[i][2] + d)
        entries[i][3] = entries[i][2] - entries[i][1]
        data_size = max(data_size, entries[i][2])
    elif change == "grow":  # one range longer, the data too: it overlaps the next one's bytes
        entries[i][2] += 1
        entries[i][3] += 1
        data_size = max(data_size, entries[i][2])
    elif change == "tail":
        data_size += draw(st.integers(1, 9))
    elif change == "numel":
        entries[i][3] += 1
    elif change == "twice":
        entries.append(list(entries[i]))
    elif change == "twice-after":  # the last one counts: the first one's bytes are left unused (unless empty)
        size = draw(st.integers(0, 3))
        entries.append([f"t{i}", data_size, data_size + size, size])
        data_size += size
    return [tuple(e) for e in entries], data_size


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=headers())
def test_a_safetensors_header_etappe_reads_is_one_the_safetensors_library_reads(tmp_path, header):
    """diff, load and the async images read safetensors files with etappe's own parser (tensorfile.parse): it
    takes exactly the files the safetensors library takes (no overlapping tensors, no unused bytes; of a name
    given twice, the last), and the same tensors."""
    from etappe.checkpoint import CheckpointError, tensorfile

    entries, data_size = header
    raw = _safetensors_bytes(list(entries), data_size)
    try:
        theirs = safetensors.torch.load(raw)
    except Exception:  # noqa: BLE001 - the library's errors are of several kinds: refused is what counts
        theirs = None
    try:
        ours = tensorfile.parse(bytearray(raw), tmp_path / "x.safetensors")
    except CheckpointError:
        ours = None
    assert (ours is None) == (theirs is None), (entries, data_size, theirs is None)
    if ours is not None:
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_diff_refuses_overlapping_tensors_and_a_name_given_twice_as_inspect_does(tmp_path, capsys):
    overlap = tmp_path / "overlap.safetensors"
    overlap.write_bytes(_safetensors_bytes([("a", 0, 4, 4), ("b", 0, 4, 4)], 4))
    twice = tmp_path / "twice.safetensors"  # the second 'a' counts: bytes 0..4 belong to no tensor
    twice.write_bytes(_safetensors_bytes([("a", 0, 4, 4), ("a", 4, 8, 4)], 8))
    for path, said in ((overlap, "overlaps the tensor before it"), (twice, "leaves bytes 0..4 unused")):
        assert main(["diff", str(path), str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("etappe: error: ") and said in err and len(err.strip().splitlines()) == 1, err
        assert main(["inspect", str(path)]) == 1  # refused by both, as by the library
        capsys.readouterr()


def test_a_file_larger_than_the_memory_a_process_may_use_is_one_error_line(tmp_path):
    """A sparse 17 GB safetensors file whose header is valid, diffed by a process limited to 8 GB of address
    space: mapping it fails, and reading it instead would fail too; one line, no traceback (it was a MemoryError)."""
    import resource
    import subprocess
    import sys

    big = tmp_path / "big.safetensors"
    numel = 4 * 2**30
    text = json.dumps({"w": {"dtype": "F32", "shape": [numel], "data_offsets": [0, 4 * numel]}}).encode()
    text += b" " * (-len(text) % 8)
    with open(big, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + 4 * numel)  # sparse: no disk used
    small = tmp_path / "small.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, small)

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))

    out = subprocess.run([sys.executable, "-m", "etappe", "diff", str(big), str(small)], capture_output=True,
                         text=True, timeout=300, preexec_fn=limited)
    _one_error_line(out)
    assert "do not fit in this process's memory" in out.stderr
