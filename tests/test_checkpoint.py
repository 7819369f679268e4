"""Checkpoint folders and the store: bit-exact round-trips, atomic overwrite, retention, inspection, clear errors."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import etappe.checkpoint as ck
from etappe.checkpoint import CheckpointError, CheckpointStore, CheckpointWarning, fsio
from etappe.errors import EtappeError, UsageError


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes: comparing these is bit-identity (NaN payloads and -0.0 included)."""
    t = t.resolve_conj().resolve_neg().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def assert_same(a, b, where="value"):
    """Same types (tuple is not list), same keys in the same order, tensors equal bit for bit."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        assert torch.equal(bits(a), bits(b)), f"{where}: tensor bytes differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), f"{where}: {a} vs {b}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


class TiedNet(nn.Module):
    """Embedding and output layer share one weight, as language models tie them; BatchNorm adds buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.norm = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 11)
        self.out.weight = self.embed.weight

    def forward(self, x):
        return self.out(self.norm(self.embed(x)))


def trained(opt_cls, scaler=None, **kw):
    """A model, optimizer and scheduler after three real steps (through ``scaler``, if given)."""
    torch.manual_seed(0)
    net = TiedNet()
    opt = opt_cls(net.parameters(), **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(3):
        x = torch.randint(0, 11, (8,))
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(net(x), x)).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    return net, opt, sched


def fresh(opt_cls, **kw):
    torch.manual_seed(1)
    net = TiedNet()
    opt = opt_cls(net.parameters(), **kw)
    return net, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


OPTIMIZERS = [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (torch.optim.Adam, {"lr": 0.01}),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
]


@pytest.mark.parametrize("opt_cls,kw", OPTIMIZERS, ids=lambda o: getattr(o, "__name__", ""))
def test_model_optimizer_scheduler_round_trip_bit_for_bit(tmp_path, opt_cls, kw):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    net, opt, sched = trained(opt_cls, scaler=scaler, **kw)
    assert scaler.state_dict()["scale"] == 2048.0  # it grew: its state is not the default one
    ck.save(tmp_path / "ck", model=net, optimizer=opt, scheduler=sched, scaler=scaler, epoch=3, loss=0.25)

    net2, opt2, sched2 = fresh(opt_cls, **kw)
    scaler2 = torch.amp.GradScaler("cpu")
    rest = ck.load(tmp_path / "ck", model=net2, optimizer=opt2, scheduler=sched2, scaler=scaler2)

    assert rest == {"epoch": 3, "loss": 0.25}
    assert_same(net.state_dict(), net2.state_dict(), "model")
    assert_same(opt.state_dict(), opt2.state_dict(), "optimizer")
    assert_same(sched.state_dict(), sched2.state_dict(), "scheduler")
    assert_same(scaler.state_dict(), scaler2.state_dict(), "scaler")
    assert net2.out.weight is net2.embed.weight
    # the restored pair trains on exactly as the original does
    x = torch.randint(0, 11, (8,))
    for n, o in ((net, opt), (net2, opt2)):
        o.zero_grad()
        nn.functional.cross_entropy(n(x), x).backward()
        o.step()
    assert_same(net.state_dict(), net2.state_dict(), "model after one more step")


def test_tied_weights_are_stored_once_and_come_back_tied(tmp_path):
    net, opt, _ = trained(torch.optim.Adam, lr=0.01)
    ck.save(tmp_path / "ck", model=net)
    stored = safetensors.torch.load_file(tmp_path / "ck" / "model.safetensors")
    assert "out.weight" not in stored or "embed.weight" not in stored  # one copy on disk
    raw = ck.load(tmp_path / "ck")["model"]
    assert raw["embed.weight"] is raw["out.weight"]
    assert_same(dict(net.state_dict()), dict(raw), "raw model")
    net2 = TiedNet()
    net2.load_state_dict(raw)
    assert net2.out.weight is net2.embed.weight and torch.equal(net2.embed.weight, net.embed.weight)


def all_dtypes():
    names = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "uint16",
             "uint32", "uint64", "bool", "complex32", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2",
             "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"]
    return [getattr(torch, n) for n in names if hasattr(torch, n)]


def random_bits(shape, dtype, gen):
    n = math.prod(shape) * dtype.itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        return (raw % 2).view(torch.bool).reshape(shape)
    return raw.view(dtype).reshape(shape)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_every_dtype_and_odd_tensors_round_trip_bit_for_bit(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for dtype in all_dtypes():
        name = str(dtype).removeprefix("torch.")
        tensors[name] = random_bits((3, 5), dtype, gen)  # random bit patterns: NaNs, infs, subnormals included
        tensors[name + "_scalar"] = random_bits((), dtype, gen)
        tensors[name + "_empty"] = torch.empty((0, 4), dtype=dtype)
    base = torch.randn(6, 8, generator=gen)
    tensors.update({
        "transposed": base.T,
        "strided": base[::2, 1::3],
        "slice_of_big_storage": base[2],
        "expanded": torch.randn(3, 1, generator=gen).expand(3, 4),
        "negative_zero": torch.tensor([-0.0, 0.0]),
        "conj_view": torch.randn(4, dtype=torch.complex64, generator=gen).conj(),
        "neg_view": torch.randn(4, dtype=torch.complex64, generator=gen).conj().imag,
        "requires_grad": torch.randn(3, requires_grad=True, generator=gen),
        "parameter": nn.Parameter(torch.randn(2, generator=gen)),
    })
    ck.save(tmp_path / "ck", tensors=tensors, one=tensors["transposed"])
    back = ck.load(tmp_path / "ck")
    assert list(back["tensors"]) == list(tensors)
    for name, t in tensors.items():
        got = back["tensors"][name]
        assert isinstance(got, torch.Tensor) and not got.requires_grad, name
        assert_same(t.detach().resolve_conj().resolve_neg(), got, name)
    assert_same(tensors["transposed"], back["one"])
    safetensors.torch.load_file(tmp_path / "ck" / "tensors.safetensors")  # still a standard safetensors file


def test_plain_values_round_trip_with_their_types(tmp_path):
    random.seed(3)
    np.random.seed(3)
    values = {
        "ints": [0, -1, 2**70, -(2**63)],
        "floats": [0.1, -0.0, 1e308, 5e-324, math.inf, -math.inf, math.nan],
        "text": "Grüße, 世界 \"quoted\" \\ $type",
        "flags": (True, False, None),
        "nested": {"a": [1, (2, [3, {"b": ()}])], "tuple_in_list": [(1, 2)], "empty": {}},
        "int_keys": {0: "zero", 1: {"deep": 1.5}, -7: [None]},
        "mixed_keys": {1: "int", "1": "str", (2, 3): "tuple", None: "none", 2.5: "float"},
        "tag_collision": {"$type": "tensor", "name": "x"},
        "bytes": b"\x00\xffraw",
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "numpy_arrays": [np.arange(5, dtype=np.uint32), np.zeros((2, 0)), np.array(3.5)],
        "torch_rng": torch.get_rng_state(),
        "numpy_scalar": np.float32(1.5).item(),
    }
    ck.save(tmp_path / "ck", **{k: v for k, v in values.items()})
    back = ck.load(tmp_path / "ck")
    assert list(back) == list(values)
    for k, v in values.items():
        assert_same(v, back[k], k)
    random.setstate(back["python_rng"])
    np.random.set_state(back["numpy_rng"])
    torch.set_rng_state(back["torch_rng"])


def test_numpy_scalars_are_saved_as_python_numbers(tmp_path):
    ck.save(tmp_path / "ck", n=np.int64(7), x=np.float64(0.5), flag=np.bool_(True))
    assert_same(ck.load(tmp_path / "ck"), {"n": 7, "x": 0.5, "flag": True})


def test_stateful_objects_of_any_class_round_trip(tmp_path):
    class Counter:
        def __init__(self):
            self.state = {"step": 0, "seen": [1, 2]}

        def state_dict(self):
            return dict(self.state)

        def load_state_dict(self, state):
            self.state = state

    c = Counter()
    c.state["step"] = 41
    ck.save(tmp_path / "ck", progress=c, plateau=torch.optim.lr_scheduler.ReduceLROnPlateau(trained(torch.optim.SGD, lr=0.1)[1]))
    c2 = Counter()
    rest = ck.load(tmp_path / "ck", progress=c2)
    assert c2.state == {"step": 41, "seen": [1, 2]}
    assert rest["plateau"]["best"] == math.inf  # raw state_dict of an entry not passed in


def test_format_is_safetensors_plus_json_with_manifest_last_and_no_pickle(tmp_path):
    net, opt, sched = trained(torch.optim.Adam, lr=0.01)
    path = ck.save(tmp_path / "ck", model=net, optimizer=opt, scheduler=sched, epoch=2)
    names = sorted(p.name for p in path.iterdir())
    assert names == ["manifest.json", "model.safetensors", "optimizer.safetensors", "state.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["torch_version"] == torch.__version__
    assert sorted(manifest["files"]) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "checksum": ck.checksum(data)}
        assert b"\x80\x04" not in data[:2]  # not a pickle
    state = json.loads((path / "state.json").read_text())
    assert state["entries"]["optimizer"]["type"] == "torch.optim.adam.Adam"
    assert_same(safetensors.torch.load_file(path / "model.safetensors")["norm.running_mean"], net.norm.running_mean)


def test_overwrite_replaces_the_checkpoint_and_leaves_no_old_files(tmp_path):
    path = tmp_path / "ck"
    for i in range(5):
        ck.save(path, w=torch.full((100,), float(i)), step=i)
        assert ck.load(path)["step"] == i and torch.equal(ck.load(path)["w"], torch.full((100,), float(i)))
        listed = set(json.loads((path / "manifest.json").read_text())["files"])
        assert {p.name for p in path.iterdir()} == listed | {"manifest.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_save_into_empty_folder_but_not_over_foreign_data(tmp_path):
    (tmp_path / "empty").mkdir()
    ck.save(tmp_path / "empty", x=1)
    assert ck.load(tmp_path / "empty") == {"x": 1}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not an etappe checkpoint"):
        ck.save(tmp_path / "mine", x=1)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_load_restores_into_objects_only_after_all_names_check_out(tmp_path):
    net, opt, _ = trained(torch.optim.SGD, lr=0.1, momentum=0.9)
    ck.save(tmp_path / "ck", model=net, epoch=1)
    net2 = TiedNet()
    before = {k: v.clone() for k, v in net2.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"no entry 'optimizer'; it holds: model, epoch"):
        ck.load(tmp_path / "ck", model=net2, optimizer=opt)
    assert_same(before, dict(net2.state_dict()))
    with pytest.raises(UsageError, match="load_state_dict"):
        ck.load(tmp_path / "ck", epoch=5)


def test_shape_mismatch_is_one_clear_line(tmp_path):
    ck.save(tmp_path / "ck", model=nn.Linear(3, 4))
    with pytest.raises(CheckpointError) as err:
        ck.load(tmp_path / "ck", model=nn.Linear(3, 5))
    msg = str(err.value)
    assert "\n" not in msg and "entry 'model'" in msg and "size mismatch" in msg and "torch.Size([4, 3])" in msg


def test_unsupported_values_fail_before_touching_the_disk(tmp_path):
    ck.save(tmp_path / "ck", x=1)
    with pytest.raises(CheckpointError, match=r"'config'\['bad'\]\[0\]: a builtins.object is not"):
        ck.save(tmp_path / "ck", x=2, config={"bad": [object()]})
    with pytest.raises(CheckpointError, match="to_dense"):
        ck.save(tmp_path / "ck", x=2, s=torch.eye(3).to_sparse())
    with pytest.raises(UsageError, match="entry named"):
        ck.save(tmp_path / "ck", **{"bad.name": 1})
    assert ck.load(tmp_path / "ck") == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_an_exception_in_state_dict_leaves_the_previous_checkpoint(tmp_path):
    class Broken:
        def state_dict(self):
            raise RuntimeError("device lost")

        def load_state_dict(self, state):
            pass

    store = CheckpointStore(tmp_path)
    store.save(1, {"x": 1})
    with pytest.raises(RuntimeError, match="device lost"):
        store.save(2, {"x": 2, "broken": Broken()})
    assert store.latest() == store.path_for(1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]


def test_permission_error_is_clear_and_leaves_the_previous_checkpoint(tmp_path):
    store_dir = tmp_path / "run"
    CheckpointStore(store_dir).save(1, {"w": torch.ones(3)})
    store_dir.chmod(0o555)
    code = (
        "import sys, torch\n"
        "from etappe.checkpoint import CheckpointStore, CheckpointError\n"
        "try:\n"
        f"    CheckpointStore({str(store_dir)!r}).save(2, {{'w': torch.zeros(3)}})\n"
        "except CheckpointError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:  # root writes anywhere; drop the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv is missing, so a read-only folder cannot be made")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--", *cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        store_dir.chmod(0o755)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Permission denied" in proc.stdout and str(store_dir) in proc.stdout and "unchanged" in proc.stdout
    assert proc.stdout.count("\n") == 1
    ck.verify(store_dir / "step-00000001")
    assert [p.name for p in store_dir.iterdir()] == ["step-00000001"]


def test_atomic_write_bytes_replaces_whole_files(tmp_path):
    target = tmp_path / "config.json"
    fsio.atomic_write_bytes(target, b"old")
    fsio.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_exactly_one_os_replace_in_the_checkpoint_package():
    src = Path(ck.__file__).resolve().parent
    hits = [(p.name, line) for p in src.rglob("*.py") for line in p.read_text().splitlines()
            if "os.replace(" in line or "os.rename(" in line or ".rename(" in line]
    assert hits == [("fsio.py", "    os.replace(src, dst)")]


# ------------------------------------------------------------------ store


def save_steps(store, steps, loss=lambda s: 1.0 / (s + 1)):
    for s in steps:
        store.save(s, {"w": torch.full((4,), float(s)), "step": s}, metrics={"loss": loss(s), "acc": s / 100})


def test_store_latest_best_and_checkpoints(tmp_path):
    store = CheckpointStore(tmp_path / "run", monitor="loss", mode="min")
    assert store.latest() is None and store.best() is None and store.checkpoints() == []
    losses = {1: 0.9, 2: 0.3, 3: 0.5, 10: 0.4}
    save_steps(store, losses, loss=losses.get)
    assert store.latest() == store.path_for(10)
    assert store.best() == store.path_for(2)
    assert [(c.step, c.metrics["loss"]) for c in store.checkpoints()] == list(losses.items())
    assert store.load()["step"] == 10
    assert store.load(store.best())["step"] == 2
    assert CheckpointStore(tmp_path / "run", monitor="acc", mode="max").best() == store.path_for(10)
    assert CheckpointStore(tmp_path / "run").best() == store.path_for(10)  # no monitor: the latest


def test_store_skips_uncommitted_and_corrupt_checkpoints_with_a_warning(tmp_path):
    store = CheckpointStore(tmp_path, monitor="loss")
    save_steps(store, [1, 2, 3])
    (store.path_for(3) / "w.safetensors").write_bytes(b"garbage")
    shutil.copytree(store.path_for(2), store.path_for(4))
    (store.path_for(4) / "manifest.json").unlink()  # a folder without a manifest is not a checkpoint
    with pytest.warns(CheckpointWarning) as caught:
        assert store.latest() == store.path_for(2)
    assert any("step-00000003/w.safetensors" in str(w.message) for w in caught)
    with pytest.warns(CheckpointWarning):
        assert store.load()["step"] == 2
    with pytest.warns(CheckpointWarning):
        assert store.best() == store.path_for(2)  # 3 has the best loss, but does not verify
    assert [c.step for c in store.checkpoints()] == [1, 2, 3]
    report = dict(ck.verify_tree(tmp_path))
    assert report[store.path_for(1)] is None and report[store.path_for(2)] is None
    assert "w.safetensors" in report[store.path_for(3)] and "manifest.json" in report[store.path_for(4)]


def test_store_writer_sweeps_temporary_folders_of_ended_saves_only(tmp_path):
    # A save in progress holds a lock on its temporary folder (a pid would not tell: another pid namespace, a
    # reused pid); only the store's writer sweeps, and only folders whose lock it can take. Opening reads only.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".tmp-step-00000002-{dead_pid}-0badc0de"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    ours_before = tmp_path / f".tmp-step-00000003-{os.getpid()}-0badc0de"  # a crashed run that had our pid
    ours_before.mkdir()
    holder = (
        "import sys\nfrom pathlib import Path\nfrom etappe.checkpoint import fsio\n"
        "with fsio.temp_folder(Path(sys.argv[1])) as tmp:\n    print(tmp, flush=True)\n    sys.stdin.read()\n"
    )
    other = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / "step-00000005")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    others = Path(other.stdout.readline().strip())  # a save in progress in another process
    try:
        with fsio.temp_folder(tmp_path / "step-00000004") as live:  # a save in progress in this process
            CheckpointStore(tmp_path).latest()
            assert stale.exists() and ours_before.exists()  # a reader deletes nothing
            CheckpointStore(tmp_path).lock()
            assert not stale.exists() and not ours_before.exists() and live.exists() and others.exists()
    finally:
        other.communicate("")
    assert not live.exists()  # a block that did not commit removes its folder
    CheckpointStore(tmp_path).lock()
    assert not others.exists()


def expected_retained(saved_in_order, loss, keep_last, keep_best, keep_every):
    """The policy, simulated save by save."""
    alive = []
    for s in saved_in_order:
        alive = sorted(set(alive) | {s})
        keep = {s} | set(alive[-keep_last:]) | set(sorted(alive, key=lambda x: (loss(x), -x))[:keep_best])
        keep |= {x for x in alive if x % keep_every == 0}
        alive = sorted(keep)
    return alive


def test_retention_keeps_exactly_what_the_policy_says(tmp_path):
    loss = lambda s: ((s * 37) % 101) / 100  # noqa: E731  distinct, unordered
    store = CheckpointStore(tmp_path, keep_last=2, keep_best=2, monitor="loss", mode="min", keep_every=5)
    for s in range(1, 31):
        save_steps(store, [s], loss)
        assert [c.step for c in store.checkpoints()] == expected_retained(range(1, s + 1), loss, 2, 2, 5)
    final = {29, 30} | set(sorted(range(1, 31), key=loss)[:2]) | {5, 10, 15, 20, 25, 30}
    assert [c.step for c in store.checkpoints()] == sorted(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == [store.path_for(s).name for s in sorted(final)]


def test_retention_never_deletes_the_checkpoint_just_saved(tmp_path):
    store = CheckpointStore(tmp_path, keep_best=1, monitor="loss")
    store.save(1, {"x": 1}, {"loss": 0.1})
    store.save(2, {"x": 2}, {"loss": 0.9})
    assert [c.step for c in store.checkpoints()] == [1, 2]
    store.save(3, {"x": 3}, {"loss": 0.8})
    assert [c.step for c in store.checkpoints()] == [1, 3]
    store.save(4, {"x": 4}, {"loss": math.nan})
    assert [c.step for c in store.checkpoints()] == [1, 4]


def test_keep_last_zero_keeps_only_the_newest(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=0)
    save_steps(store, [1, 2, 3])
    assert [c.step for c in store.checkpoints()] == [3]


def test_store_overwrites_a_step_and_replaces_uncommitted_leftovers(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(5, {"x": 1})
    store.save(5, {"x": 2})
    assert store.load() == {"x": 2}
    (store.path_for(5) / "manifest.json").unlink()
    store.save(5, {"x": 3})
    assert store.load() == {"x": 3}


def test_store_rejects_bad_policies():
    with pytest.raises(UsageError, match="monitor"):
        CheckpointStore("x", keep_best=2)
    with pytest.raises(UsageError, match="mode"):
        CheckpointStore("x", mode="lowest")
    with pytest.raises(UsageError, match="keep_last"):
        CheckpointStore("x", keep_last=-1)
    with pytest.raises(UsageError, match="keep_every"):
        CheckpointStore("x", keep_every=0)
    assert issubclass(CheckpointError, EtappeError) and CheckpointError.exit_code == 1


# ------------------------------------------------------------------ inspection


def test_inspect_describes_tensors_models_optimizers_and_values(tmp_path):
    net, opt, sched = trained(torch.optim.AdamW, lr=0.01, weight_decay=0.1)
    path = CheckpointStore(tmp_path).save(7, {"model": net, "optimizer": opt, "scheduler": sched, "epoch": 2,
                                              "rng": {"python": random.getstate()}}, {"val_loss": 0.5})
    info = ck.inspect(path)
    json.dumps(info, allow_nan=False)
    assert info["step"] == 7 and info["metrics"] == {"val_loss": 0.5}
    model, optim, scheduler, epoch, rng = info["entries"]
    n_params = sum(p.numel() for p in net.parameters())
    assert model["kind"] == "module" and model["parameters"] == n_params == 11 * 6 + 6 + 6 + 11
    assert {"name": "norm.running_var", "shape": [6], "dtype": "float32", "bytes": 24} in model["tensors"]
    assert optim["type"] == "torch.optim.adamw.AdamW" and optim["param_groups"][0]["weight_decay"] == 0.1
    assert optim["param_groups"][0]["betas"] == [0.9, 0.999] and optim["state"]["params"] == len(list(net.parameters()))
    assert scheduler["kind"] == "scheduler" and scheduler["state"]["last_epoch"] == 3
    assert epoch == {"name": "epoch", "kind": "value", "value": 2}
    text = ck.format_inspection(info)
    assert "embed.weight\t[11, 6]\tfloat32\t264 B" in text and "AdamW" in text and "val_loss=0.5" in text
    assert "step 7" in text and "epoch: 2" in text


def test_inspect_and_load_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        ck.load(tmp_path / "nowhere")
    CheckpointStore(tmp_path / "run").save(1, {"x": 1})
    with pytest.raises(CheckpointError, match=r"manifest.json: missing.*run folder"):
        ck.inspect(tmp_path / "run")
    with pytest.raises(CheckpointError, match="no such file"):
        ck.verify_tree(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints"):
        ck.verify_tree(tmp_path / "empty")
    assert ck.verify_tree(tmp_path) == [(tmp_path / "run" / "step-00000001", None)]
