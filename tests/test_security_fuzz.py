"""Property tests of the store (issue 11): retention over random saves, metrics, policies, crashes and restarts
keeps exactly what the policy says; and random mutations of a real checkpoint's manifest, state and safetensors
headers (checksums recomputed, so the parsers see them) give a CheckpointError or a clean load, never another
exception, from every reader (load, verify, verify_tree, inspect and format_inspection), while the store falls
back past them to the older good checkpoint."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import etappe.checkpoint as ck
from etappe.checkpoint import CheckpointError, CheckpointStore, CheckpointWarning, manifest
from etappe.checkpoint.errors import NewerFormatError

SELF = b'"manifest_checksum": "'
DEAD_PID = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)


@contextmanager
def scratch_dir():
    """A fresh folder, in memory where /dev/shm allows."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=base, prefix="etappe-fuzz-") as tmp:
        yield Path(tmp)


def seal(text: bytes | bytearray) -> bytes:
    data = bytearray(text)
    at = data.rindex(SELF) + len(SELF)
    data[at : at + 32] = b"0" * 32
    data[at : at + 32] = ck.checksum(data).encode()
    return bytes(data)


# ------------------------------------------------------------------ retention, as a property


def oracle(alive: dict[int, float | None], newest: int, keep_last, keep_best, keep_every, mode) -> dict:
    """What the policy keeps of ``alive`` ({step: metric or None}) right after ``newest`` was saved: each
    checkpoint kept by a rule, plus the newest, and nothing else. Counted, not sliced or sorted."""
    if keep_last is None and keep_best is None and keep_every is None:
        return dict(alive)

    def usable(m):
        return m is not None and not math.isnan(m)

    def better(a_step, a, b_step, b):  # is (a_step, a) ranked before (b_step, b)? ties: the later step first
        return (a < b if mode == "min" else a > b) or (a == b and a_step > b_step)

    def kept(s: int) -> bool:
        if s == newest:
            return True
        if keep_last is not None and sum(t > s for t in alive) < keep_last:
            return True
        if keep_every is not None and s % keep_every == 0:
            return True
        m = alive[s]
        if keep_best is not None and usable(m):
            ahead = sum(1 for t, n in alive.items() if t != s and usable(n) and better(t, n, s, m))
            return ahead < keep_best
        return False

    return {s: m for s, m in alive.items() if kept(s)}


METRIC = st.one_of(st.sampled_from([0.1, 0.5, 0.9, math.nan, None]), st.floats(-1, 1, width=16))
EVENT = st.tuples(
    st.sampled_from(["save", "save", "save", "resave", "restart", "crash_mid_save", "crash_mid_prune"]),
    METRIC,
    st.integers(1, 3),  # steps to the next save
    st.integers(0, 2**16),  # which of the victims a crash mid-prune had deleted, as bits
)


def on_disk(root: Path) -> dict[str, list[str]]:
    names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    return {"steps": [n for n in names if n.startswith("step-")], "temps": [n for n in names if n.startswith(".tmp-")]}


def real_leftover(root: Path, like: Path | None, step: int) -> None:
    """What a save killed before its commit leaves: a temporary folder with some files, no manifest, no lock."""
    tmp = root / f".tmp-step-{step:08d}-{DEAD_PID}-{os.urandom(4).hex()}"
    tmp.mkdir(parents=True)
    if like is not None:
        for p in sorted(like.iterdir())[:2]:
            if p.name != "manifest.json":
                (tmp / p.name).write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keep_last=st.none() | st.integers(0, 6),
    keep_best=st.none() | st.integers(0, 3),
    keep_every=st.none() | st.integers(1, 4),
    mode=st.sampled_from(["min", "max"]),
    async_save=st.booleans(),
    events=st.lists(EVENT, min_size=2, max_size=20),
)
def test_retention_keeps_exactly_what_the_policy_says(keep_last, keep_best, keep_every, mode, async_save, events):
    policy = {"keep_last": keep_last, "keep_best": keep_best, "keep_every": keep_every}

    def open_store():
        return CheckpointStore(root, **policy, monitor="loss", mode=mode, async_save=async_save)

    def save(store, step, metric):
        store.save(step, {"w": torch.full((3,), float(step)), "step": step}, {} if metric is None else {"loss": metric})
        store.wait()

    def check(store, after_restart):
        found = {c.step: c.metrics.get("loss") for c in store.checkpoints()}
        assert sorted(found) == sorted(alive), f"kept {sorted(found)}, the policy says {sorted(alive)}"
        for s, m in alive.items():  # each holds what was saved at its step
            assert (found[s] is None and m is None) or (math.isnan(found[s]) and math.isnan(m)) or found[s] == m
        disk = on_disk(root)
        assert disk["steps"] == [f"step-{s:08d}" for s in sorted(alive)]
        if after_restart:
            assert disk["temps"] == [], "the writer's first save sweeps what crashed saves left"
        assert store.load()["step"] == max(alive)

    with scratch_dir() as tmp:
        root = tmp / "run"
        alive: dict[int, float | None] = {}
        last = 0
        store = open_store()
        restarted = True
        for kind, metric, gap, deleted in events:
            if kind == "resave" and alive:  # resumed at the newest checkpoint and saved again at its step
                step = max(alive)
            else:
                step = last + gap
            if kind == "restart":
                store.close()
                store = open_store()
                last = max(alive, default=0)  # a restarted trainer continues from its newest checkpoint
                restarted = True
                continue
            if kind == "crash_mid_save":
                store.close()  # the process dies; its locks go with it
                real_leftover(root, store.path_for(max(alive)) if alive else None, step)
                store = open_store()
                last = max(alive, default=0)
                restarted = True
                continue
            if kind == "crash_mid_prune":
                store.close()
                keeper = CheckpointStore(root)  # commits and never prunes: the save, killed right after its commit
                save(keeper, step, metric)
                keeper.close()
                alive[step] = metric
                victims = sorted(set(alive) - set(oracle(alive, step, **policy, mode=mode)))
                for i, victim in enumerate(victims):
                    if deleted >> i & 1:  # this one had been renamed out of sight, and partly removed
                        doomed = root / f".tmp-step-{victim:08d}-{DEAD_PID}-{i:08x}"
                        os.rename(root / f"step-{victim:08d}", doomed)
                        (doomed / "manifest.json").unlink()
                        del alive[victim]
                store = open_store()
                last = step
                restarted = True
                assert sorted(c.step for c in store.checkpoints()) == sorted(alive)
                continue
            save(store, step, metric)
            alive[step] = metric
            alive = oracle(alive, step, **policy, mode=mode)
            last = step
            check(store, restarted)
            restarted = False
        store.close()


# ------------------------------------------------------------------ the readers, fuzzed


class Holder:
    """A Stateful whose state is whatever it is given: plain values of every kind the codec tags."""

    def __init__(self, state=None):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def blank() -> tuple[nn.Module, torch.optim.Optimizer]:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    return net, torch.optim.Adam(net.parameters())


def state(step: int) -> dict:
    torch.manual_seed(step)
    net, opt = blank()
    net(torch.randn(5, 3)).sum().backward()
    opt.step()
    extra = Holder({"t": (1, 2.5, "x"), "nan": math.nan, "b": b"\x00\xff", "a": np.arange(3, dtype=np.int16),
                    "i": {3: "int key"}, "c": torch.tensor([1 + 2j]), "e": torch.zeros(0, 2)})
    return {"model": net, "optimizer": opt, "extra": extra, "step": step}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz") / "run"
    store = CheckpointStore(root)
    store.save(1, state(1), {"loss": 0.5})
    store.save(2, state(2), {"loss": 0.4})
    store.close()
    return root


NEST = "\x00nest\x00"
LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8), st.sampled_from([-1, 0, 2**63, 2**64, "", "a" * 300, "\x00", "F32", "BOOL", "C64",
                                          "tensor", "float", "nan", "state.json", "step-00000002"]),
)
TAGGED = st.sampled_from(["tensor", "float", "tuple", "bytes", "ndarray", "dict", "x"])  # codec's tags, and one more
JSON = st.recursive(
    LEAF,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    | st.fixed_dictionaries({"$type": TAGGED}, optional={k: inner for k in ("name", "value", "items", "base64",
                                                                            "tensor", "fields")}),
    max_leaves=6,
)


def places(tree, path=()):
    yield path
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from places(v, path + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from places(v, path + (i,))


def mutated(tree, data, protect=()):
    """``tree`` with one random change at a random place: a new value, a deleted or added key, another type, a
    deep nesting (the placeholder NEST, expanded after serializing)."""
    spots = [p for p in places(tree) if not (p and p[0] in protect)]
    path = data.draw(st.sampled_from(spots), label="where")
    op = data.draw(st.sampled_from(["replace", "delete", "insert", "nest", "retype"]), label="how")
    if not path and op in ("delete", "retype"):
        op = "replace"
    parent = tree
    for k in path[:-1]:
        parent = parent[k]
    here = parent[path[-1]] if path else tree
    if op == "replace":
        new = data.draw(JSON, label="value")
    elif op == "nest":
        new = NEST
    elif op == "retype":
        new = {"list": [here], "text": json.dumps(here)[:20], "dict": {"v": here}, "int": 7}[
            data.draw(st.sampled_from(["list", "text", "dict", "int"]), label="type")]
    elif op == "insert":
        if isinstance(here, dict):
            here[data.draw(st.text(max_size=6), label="key")] = data.draw(JSON, label="value")
            return tree
        new = [here, data.draw(JSON, label="value")]
    else:  # delete
        del parent[path[-1]]
        return tree
    if not path:
        return new
    parent[path[-1]] = new
    return tree


def dumps(tree, data, **kw) -> str:
    text = json.dumps(tree, **kw)
    if json.dumps(NEST) in text:
        depth = data.draw(st.sampled_from([3, 200, 900, 5000, 200_000]), label="depth")
        text = text.replace(json.dumps(NEST), "[" * depth + "]" * depth)
    return text


def reseal_manifest(bad: Path, body, data) -> None:
    if not isinstance(body, dict):  # the checksum field then sits in an object inside
        body = [body, {}]
        text = dumps(body, data)
        text = text[: text.rindex("}")] + '"manifest_checksum": "' + "0" * 32 + '"}]\n'
        (bad / "manifest.json").write_bytes(seal(text.encode()))
        return
    body.pop("manifest_checksum", None)
    text = dumps(body, data, indent=1)
    text = text[: text.rindex("}")].rstrip() + (",\n" if body else "") + ' "manifest_checksum": "' + "0" * 32 + '"\n}\n'
    (bad / "manifest.json").write_bytes(seal(text.encode()))


def relist(bad: Path, name: str, blob: bytes) -> None:
    (bad / name).write_bytes(blob)
    body = json.loads((bad / "manifest.json").read_bytes())
    body["files"][name] = {"size": len(blob), "checksum": ck.checksum(blob)}
    reseal_manifest(bad, body, None)


def mutate_checkpoint(bad: Path, data) -> None:
    target = data.draw(st.sampled_from(["manifest", "state", "model.safetensors", "optimizer.safetensors",
                                        "extra.safetensors", "length"]), label="target")
    if target == "manifest":
        body = json.loads((bad / "manifest.json").read_bytes())
        reseal_manifest(bad, mutated(body, data, protect=("manifest_checksum",)), data)
    elif target == "state":
        tree = json.loads((bad / "state.json").read_bytes())
        relist(bad, "state.json", dumps(mutated(tree, data), data).encode())
    else:
        name = "model.safetensors" if target == "length" else target
        blob = (bad / name).read_bytes()
        n = int.from_bytes(blob[:8], "little")
        header, rest = json.loads(blob[8 : 8 + n]), blob[8 + n :]
        if target == "length":
            text = json.dumps(header).encode()
            length = data.draw(st.sampled_from([0, 1, len(text) - 1, len(text) + 1, len(text) + 8, 2**31, 2**63,
                                                2**64 - 1, 100_000_001]), label="length")
        else:
            text = dumps(mutated(header, data), data).encode()
            length = len(text)
        relist(bad, name, length.to_bytes(8, "little") + text + rest)


def newer(bad: Path) -> bool:
    """Whether the manifest now reads as one of a newer format (which must stop readers, not be skipped)."""
    try:
        body = json.loads((bad / "manifest.json").read_bytes())
    except (ValueError, RecursionError):
        return False
    if not isinstance(body, dict):
        return False
    version = body.get("format_version")  # anything but a whole number <= ours: newer (or damaged), never skipped
    if body.get("format") != manifest.FORMAT or (
            isinstance(version, int) and not isinstance(version, bool) and version <= manifest.FORMAT_VERSION):
        return False
    recorded = body.get("manifest_checksum")  # ... unless its checksum is one of ours that fails: corrupt
    if not (isinstance(recorded, str) and re.fullmatch("[0-9a-f]{32}", recorded)):
        return True
    data = bytearray((bad / "manifest.json").read_bytes())
    at = data.rindex(b'"manifest_checksum": "') + len(b'"manifest_checksum": "')
    data[at : at + 32] = b"0" * 32
    return manifest.checksum(data) == recorded


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_checkpoints_fail_cleanly_and_the_store_falls_back(template, data):
    with scratch_dir() as tmp:
        root = tmp / "run"
        shutil.copytree(template, root)
        bad = root / "step-00000002"
        mutate_checkpoint(bad, data)
        is_newer = newer(bad)

        try:
            ck.load(bad)
            # a store's step folder must also hold its step
            good_for_the_store = json.loads((bad / "manifest.json").read_bytes()).get("step") == 2
        except NewerFormatError:
            assert is_newer
            good_for_the_store = False
        except CheckpointError as e:
            assert not is_newer and "\n" not in str(e)
            good_for_the_store = False
        for attempt in (lambda: ck.verify(bad), lambda: ck.load(bad, **dict(zip(("model", "optimizer"), blank()))),
                        lambda: json.dumps(ck.inspect(bad), allow_nan=False),  # headers and JSON only, JSON-able
                        lambda: ck.format_inspection(ck.inspect(bad))):
            try:
                attempt()
            except CheckpointError as e:
                assert "\n" not in str(e)
        # the run as `etappe verify RUN` sees it: the good checkpoint verifies, the bad one is one line of report
        report = dict(ck.verify_tree(root))
        assert report[root / "step-00000001"] is None
        if good_for_the_store:
            assert report[bad] is None
        else:
            assert report[bad] and "\n" not in report[bad]

        store = CheckpointStore(root, monitor="loss")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            if is_newer:
                with pytest.raises(NewerFormatError):
                    store.latest()
                with pytest.raises(NewerFormatError):
                    store.load()
                return
            latest = store.latest()
            assert latest == (bad if good_for_the_store else root / "step-00000001")
            assert store.best() in (bad, root / "step-00000001")
            if good_for_the_store:
                store.load()
            else:
                net, opt = blank()
                values = store.load(model=net, optimizer=opt)
                assert values["step"] == 1
                expected = state(1)["model"].state_dict()
                assert all(torch.equal(expected[k], v) for k, v in net.state_dict().items())


def edit_state(bad: Path, change) -> None:
    tree = json.loads((bad / "state.json").read_bytes())
    relist(bad, "state.json", (change(tree) or json.dumps(tree)).encode())


def unlist(bad: Path, name: str) -> None:
    body = json.loads((bad / "manifest.json").read_bytes())
    del body["files"][name]
    reseal_manifest(bad, body, None)


# the cases the fuzz found first, each a raw exception from inspect or format_inspection before
MALFORMED = {
    "a tensor file the manifest does not list": lambda bad: unlist(bad, "optimizer.safetensors"),
    "entries as a list": lambda bad: edit_state(bad, lambda t: t.update(entries=list(t["entries"]))),
    "a type that is not a name": lambda bad: edit_state(bad, lambda t: t["entries"]["model"].update(type=7)),
    "parameters as text": lambda bad: edit_state(bad, lambda t: t["entries"]["model"].update(parameters="many")),
    "a model state that is a list": lambda bad: edit_state(bad, lambda t: t["entries"]["model"].update(data=[1])),
    "param_groups as a number": lambda bad: edit_state(
        bad, lambda t: t["entries"]["optimizer"]["data"].update(param_groups=3)),
    "an optimizer state that is a list": lambda bad: edit_state(
        bad, lambda t: t["entries"]["optimizer"]["data"].update(state=[])),
    "state nested 100,000 deep": lambda bad: edit_state(bad, lambda t: json.dumps(t).replace(
        '"data": 2', '"data": ' + "[" * 100_000 + "]" * 100_000)),
    "state nested 900 deep": lambda bad: edit_state(bad, lambda t: json.dumps(t).replace(
        '"data": 2', '"data": ' + "[" * 900 + "]" * 900)),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_inspecting_a_malformed_checkpoint_is_one_clear_error(template, tmp_path, case):
    bad = tmp_path / "step-00000002"
    shutil.copytree(template / bad.name, bad)
    MALFORMED[case](bad)
    with pytest.raises(CheckpointError, match="step-00000002") as e:
        ck.format_inspection(ck.inspect(bad))
    assert "\n" not in str(e.value)


def test_inspecting_a_value_that_looks_like_a_described_tensor(tmp_path):
    ck.save(tmp_path / "c", a={"tensor": 1}, b={"tensor": {"shape": "s", "dtype": 2, "bytes": "x"}})
    text = ck.format_inspection(ck.inspect(tmp_path / "c"))
    assert 'a: {"tensor": 1}' in text and '"bytes": "x"' in text
