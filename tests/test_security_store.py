"""The store and the checkpoint readers against hostile and unlucky inputs (issue 11): retention that keeps what it
promises, a newer format that stops instead of being overwritten, saves in progress that no reader deletes, one
writer per run folder, no write or read through symlinks out of the run, bounded and validated headers and
manifests, malformed manifests and states that are fallen back past, and step folders that must match their step.

Each test reproduces a way the promise broke before the fix; symlink tests check that an outside folder's
inventory (names and contents) is unchanged."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import etappe.checkpoint as ck
from etappe.checkpoint import CheckpointError, CheckpointStore, CheckpointWarning, manifest

SELF = b'"manifest_checksum": "'


def inventory(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (links as their target, files as their bytes, folders as a marker)."""
    out: dict[str, bytes | str] = {}
    for here, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(here, name)
            rel = str(p.relative_to(folder))
            out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else ("<dir>" if p.is_dir() else p.read_bytes())
    return out


def seal(text: bytes | bytearray) -> bytes:
    """A manifest's text with its self-checksum recomputed (the checksum is not a signature)."""
    data = bytearray(text)
    at = data.rindex(SELF) + len(SELF)
    data[at : at + 32] = b"0" * 32
    data[at : at + 32] = ck.checksum(data).encode()
    return bytes(data)


def rewrite_manifest(folder: Path, change) -> None:
    """Apply ``change(body)`` to a checkpoint's manifest and write it back with its self-checksum recomputed."""
    body = json.loads((folder / "manifest.json").read_bytes())
    change(body)
    body.pop("manifest_checksum", None)
    body["manifest_checksum"] = "0" * 32
    (folder / "manifest.json").write_bytes(seal((json.dumps(body, indent=1) + "\n").encode()))


def rewrite_file(folder: Path, name: str, data: bytes) -> None:
    """Replace a listed file and record its new size and checksum in the manifest, as a forger would."""
    (folder / name).write_bytes(data)

    def change(body):
        body["files"][name] = {"size": len(data), "checksum": ck.checksum(data)}

    rewrite_manifest(folder, change)


def save_steps(store: CheckpointStore, steps, loss=lambda s: 1.0 / (s + 1)) -> None:
    for s in steps:
        store.save(s, {"w": torch.full((4,), float(s)), "step": s}, metrics={"loss": loss(s)})


def two_steps(root: Path) -> CheckpointStore:
    store = CheckpointStore(root, monitor="loss")
    save_steps(store, [1, 2], loss={1: 0.9, 2: 0.1}.get)  # step 2 is the latest and the best
    store.close()
    return store


def assert_falls_back_to_step_1(root: Path) -> None:
    """Every reader of the store skips the bad step 2 with a warning (or quietly), never raising."""
    store = CheckpointStore(root, monitor="loss")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        assert store.latest() == store.path_for(1)
        assert store.best() == store.path_for(1)
        assert store.load()["step"] == 1
        assert [c.step for c in store.checkpoints()] in ([1], [1, 2])
    report = dict(ck.verify_tree(root))
    assert report[store.path_for(1)] is None and report[store.path_for(2)]
    with pytest.raises(CheckpointError):
        ck.load(store.path_for(2))


# ------------------------------------------------------------------ 1. retention keeps what it is asked to


@pytest.mark.parametrize("keep_last", [3, 4])
def test_keep_last_keeps_that_many_while_fewer_exist(scratch, keep_last):
    store = CheckpointStore(scratch, keep_last=keep_last)
    for s in range(1, 7):
        save_steps(store, [s])
        assert [c.step for c in store.checkpoints()] == list(range(max(1, s - keep_last + 1), s + 1))


# ------------------------------------------------------------------ 2. a newer format stops, is never overwritten


def test_a_newer_format_stops_every_reader_and_is_never_overwritten(scratch):
    store = two_steps(scratch)
    rewrite_manifest(store.path_for(2), lambda body: body.update(format_version=manifest.FORMAT_VERSION + 1))
    before = inventory(store.path_for(2))
    newer = f"format {manifest.FORMAT_VERSION + 1}"
    store = CheckpointStore(scratch, keep_last=1, monitor="loss")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # never skipped as corrupt
        for read in (store.latest, store.best, store.load, store.checkpoints):
            with pytest.raises(CheckpointError, match="newer etappe") as err:
                read()
            assert newer in str(err.value) and "upgrade etappe" in str(err.value) and "\n" not in str(err.value)
            assert type(err.value).__name__ == "NewerFormatError"
        with pytest.raises(CheckpointError, match="newer etappe"):
            store.save(2, {"w": torch.zeros(4), "step": 2})  # overwriting it would destroy it
        with pytest.raises(CheckpointError, match="newer etappe"):
            ck.save(store.path_for(2), w=torch.zeros(4))
    assert inventory(store.path_for(2)) == before
    store.save(3, {"w": torch.zeros(4), "step": 3})  # retention keeps what it cannot read
    assert inventory(store.path_for(2)) == before


# ------------------------------------------------------------------ 3. a reader never deletes a save in progress

HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys
    from pathlib import Path
    from etappe.checkpoint import fsio

    root, dead_pid = Path(sys.argv[1]), sys.argv[2]
    # a writer in another pid namespace: its pid in the name is not alive here, but it holds the folder's lock
    foreign = root / f".tmp-step-00000007-{dead_pid}-0badc0de"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"half written")
    fd = os.open(foreign, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # and a save in progress made by etappe's own code path
    with fsio.temp_folder(root / "step-00000008") as tmp:
        (tmp / "state.json").write_bytes(b"{}")
        print(foreign.name, tmp.name, flush=True)
        sys.stdin.read()
    """
)


def test_readers_never_sweep_and_the_writer_keeps_saves_still_in_progress(scratch):
    root = scratch / "run"
    store = CheckpointStore(root)
    save_steps(store, [1])
    store.close()
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True).stdout)
    stale = root / f".tmp-step-00000002-{dead_pid}-0badc0de"  # a crashed save: nobody holds its lock
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), str(dead_pid)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        names = holder.stdout.readline().split()
        assert len(names) == 2, "the holder did not start"
        in_progress = [root / n for n in names]
        before = {n: inventory(root / n) for n in names}

        reader = CheckpointStore(root, keep_last=1)  # a reader: opening and reading delete nothing
        assert reader.latest() == reader.path_for(1) and reader.load()["step"] == 1
        assert [c.step for c in reader.checkpoints()] == [1] and reader.best() == reader.path_for(1)
        ck.verify_tree(root)
        assert stale.exists() and all(p.exists() for p in in_progress)

        writer = CheckpointStore(root, keep_last=1)
        save_steps(writer, [3])  # the writer sweeps: the crashed save goes, the ones in progress stay
        ck.save(root / "step-00000008", x=1)  # etappe.save's own sweep of leftovers for this name, too
        assert not stale.exists()
        assert {n: inventory(root / n) for n in names} == before
        writer.close()
    finally:
        holder.communicate("")
    writer = CheckpointStore(root, keep_last=1)
    save_steps(writer, [4])  # the holder is gone: its folders are leftovers now
    writer.close()
    assert not any(p.exists() for p in in_progress)


# ------------------------------------------------------------------ 4. one writer per run folder

WRITER = textwrap.dedent(
    """
    import sys, torch
    from etappe.checkpoint import CheckpointStore

    store = CheckpointStore(sys.argv[1], keep_last=1)
    store.save(1, {"w": torch.ones(4), "step": 1})
    print("saved", flush=True)
    sys.stdin.readline()
    store.close()
    print("closed", flush=True)
    sys.stdin.readline()
    """
)


def test_a_second_writer_is_refused_with_who_holds_the_run(scratch):
    root = scratch / "run"
    first = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "saved"
        second = CheckpointStore(root, keep_last=1)
        with pytest.raises(CheckpointError) as err:
            save_steps(second, [2])
        msg = str(err.value)
        assert f"{root} is being written by another process (pid {first.pid} on {socket.gethostname()})" in msg
        assert "one writer per run folder" in msg and "\n" not in msg
        assert [c.step for c in second.checkpoints()] == [1]  # nothing of the refused save was written
        first.stdin.write("\n")
        first.stdin.flush()
        assert first.stdout.readline().strip() == "closed"
        save_steps(second, [2])  # close() let the run go
        assert [c.step for c in second.checkpoints()] == [2]
        third = CheckpointStore(root, keep_last=1)  # a second writer in this process is one too many as well
        with pytest.raises(CheckpointError, match="another CheckpointStore of this process.*close"):
            save_steps(third, [3])
        second.close()
        save_steps(third, [3])
        third.close()
    finally:
        first.communicate("\n")


TRAINER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from etappe import Trainer
    from etappe.data import TensorData

    HOLD = []  # in the first process: the 5th step waits, mid-training, with the run's writer lock taken


    def loss(pred, y):
        if HOLD:
            HOLD.append(1)
            if len(HOLD) == 6:
                print("training", flush=True)
                sys.stdin.readline()
        return nn.functional.mse_loss(pred, y)


    def trainer(run_dir):
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), loss, run_dir=run_dir,
                       train_data=TensorData(torch.randn(64, 3), torch.randn(64, 1)), batch_size=8, save_every=2,
                       monitor="train_loss", progress=False, quiet=True)


    if __name__ == "__main__":
        HOLD.append(0)
        trainer(sys.argv[1]).fit(2)
        print("done", flush=True)
    """
)


def test_a_second_trainer_on_a_run_stops_before_training(scratch):
    run = scratch / "run"
    (scratch / "trainer_script.py").write_text(TRAINER)
    first = subprocess.Popen([sys.executable, str(scratch / "trainer_script.py"), str(run)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=scratch)
    try:
        assert first.stdout.readline().strip() == "training"
        sys.path.insert(0, str(scratch))
        try:
            from trainer_script import trainer
        finally:
            sys.path.remove(str(scratch))
        with pytest.raises(CheckpointError, match=f"pid {first.pid} .*one writer per run folder"):
            trainer(run).fit(2)
        out, _ = first.communicate("\n", timeout=120)
        assert first.returncode == 0 and out.strip() == "done"
    finally:
        if first.poll() is None:
            first.kill()


PRUNER = textwrap.dedent(
    """
    import sys, torch
    from etappe.checkpoint import CheckpointStore

    store = CheckpointStore(sys.argv[1], keep_last=1, keep_best=1, monitor="loss")
    for step in range(1, int(sys.argv[2]) + 1):
        store.save(step, {"w": torch.full((64,), float(step)), "step": step}, {"loss": 1.0 / step})
        if step == 1:
            print("started", flush=True)
    store.close()
    print("done", flush=True)
    """
)


def test_readers_tolerate_checkpoints_pruned_under_them(scratch):
    root = scratch / "run"
    writer = subprocess.Popen([sys.executable, "-c", PRUNER, str(root), "300"], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "started"
        reader = CheckpointStore(root, monitor="loss")
        rounds = 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a checkpoint pruned meanwhile is not a bad checkpoint
            while writer.poll() is None or rounds < 3:
                latest = reader.latest()
                assert latest is not None
                assert reader.best() is not None
                assert reader.load()["step"] >= 1
                assert all(c.step >= 1 for c in reader.checkpoints())
                assert [msg for _, msg in ck.verify_tree(root) if msg] == []
                rounds += 1
    finally:
        out, _ = writer.communicate(timeout=120)
    assert writer.returncode == 0 and "done" in out


# ------------------------------------------------------------------ 8. symlinks out of the run


@pytest.fixture
def outside(scratch) -> Path:
    """A folder outside the run holding a valid checkpoint and a file of the user's."""
    there = scratch / "outside"
    ck.save(there / "ckpt", w=torch.ones(4), step=99)
    (there / "ckpt" / "notes.txt").write_text("the user's")
    (there / "precious.bin").write_bytes(b"\x01\x02")
    return there


def test_saving_at_a_symlinked_step_folder_is_refused(scratch, outside):
    before = inventory(outside)
    store = CheckpointStore(scratch / "run", keep_last=1)
    save_steps(store, [1])
    store.path_for(2).symlink_to(outside / "ckpt")
    with pytest.raises(CheckpointError, match="symbolic link"):
        save_steps(store, [2])
    (scratch / "run" / "step-00000003").symlink_to(outside)  # a link to a folder without a manifest
    with pytest.raises(CheckpointError, match="symbolic link"):
        save_steps(store, [3])
    save_steps(store, [4, 5])  # pruning passes the links by: they are not the run's checkpoints
    assert store.latest() == store.path_for(5) and [c.step for c in store.checkpoints()] == [5]
    store.close()
    (scratch / "link").symlink_to(outside / "ckpt")
    with pytest.raises(CheckpointError, match="symbolic link"):
        ck.save(scratch / "link", w=torch.zeros(4))
    assert inventory(outside) == before


def test_pruning_never_follows_a_symlinked_step_folder(scratch, outside):
    before = inventory(outside)
    root = scratch / "run"
    root.mkdir()
    (root / "step-00000001").symlink_to(outside / "ckpt")
    store = CheckpointStore(root, keep_last=1)
    save_steps(store, [2, 3, 4])
    assert [c.step for c in store.checkpoints()] == [4]
    store.close()
    assert inventory(outside) == before


def test_files_of_a_checkpoint_that_are_symlinks_are_not_read(scratch, outside):
    before = inventory(outside)
    for name in ("w.safetensors", "state.json", "manifest.json"):
        root = scratch / name / "run"
        two_steps(root)
        bad = root / "step-00000002"
        copy = outside / f"copy-of-{name}"
        shutil.copyfile(bad / name, copy)  # identical bytes: only the link itself can give it away
        (bad / name).unlink()
        (bad / name).symlink_to(copy)
        with pytest.raises(CheckpointError, match="symbolic link"):
            ck.verify(bad)
        assert_falls_back_to_step_1(root)
        before[copy.name] = copy.read_bytes()
    assert inventory(outside) == before


def test_a_symlinked_step_folder_is_not_read_by_the_store(scratch, outside):
    root = scratch / "run"
    store = CheckpointStore(root)
    save_steps(store, [1])
    store.close()
    shutil.copytree(store.path_for(1), outside / "step-copy")
    rewrite_manifest(outside / "step-copy", lambda body: body.update(step=5))
    store.path_for(5).symlink_to(outside / "step-copy")
    assert store.latest() == store.path_for(1) and [c.step for c in store.checkpoints()] == [1]
    assert store.load()["step"] == 1
    assert "symbolic link" in dict(ck.verify_tree(root))[store.path_for(5)]


# ------------------------------------------------------------------ 11. bounded, validated headers and manifests


def safetensors_file(header: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    return (len(header) if length is None else length).to_bytes(8, "little") + header + data


BAD_TENSOR_FILES = {
    "huge length": safetensors_file(b"{}", length=2**63),
    "nested": safetensors_file(b"[" * 100_000 + b"]" * 100_000),
    "nested header value": safetensors_file(b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "string shape": safetensors_file(b'{"w":{"dtype":"F32","shape":"abcd","data_offsets":[0,16]}}', bytes(16)),
    "negative shape": safetensors_file(b'{"w":{"dtype":"F32","shape":[-2,-2],"data_offsets":[0,16]}}', bytes(16)),
    "float offsets": safetensors_file(b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0.0,16]}}', bytes(16)),
    "not a dict": safetensors_file(b'{"w":[1,2,3]}'),
    "list header": safetensors_file(b"[1, 2]"),
    "bad metadata": safetensors_file(b'{"__metadata__":{"etappe.raw":7}}'),
    "bad raw": safetensors_file(b'{"__metadata__":{"etappe.raw":"{\\"w\\": 5}"},'
                                b'"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}', bytes(4)),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSOR_FILES))
def test_malformed_safetensors_headers_are_corrupt_files(scratch, case):
    root = scratch / "run"
    two_steps(root)
    rewrite_file(root / "step-00000002", "w.safetensors", BAD_TENSOR_FILES[case])
    with pytest.raises(CheckpointError, match="w.safetensors"):
        ck.load(root / "step-00000002")
    assert_falls_back_to_step_1(root)


def test_a_header_over_the_safetensors_limit_is_refused_unread(scratch):
    root = scratch / "run"
    two_steps(root)
    bad = root / "step-00000002" / "w.safetensors"
    n = 150_000_000  # safetensors refuses headers over 100 MB
    with open(bad, "wb") as f:
        f.write(n.to_bytes(8, "little"))
        f.truncate(8 + n)  # sparse
    size = bad.stat().st_size
    hasher = manifest.new_hasher()
    with open(bad, "rb") as f:
        while chunk := f.read(1 << 24):
            hasher.update(chunk)
    rewrite_manifest(root / "step-00000002",
                     lambda body: body["files"].update({"w.safetensors": {"size": size,
                                                                          "checksum": hasher.hexdigest()}}))
    with pytest.raises(CheckpointError, match="100000000"):
        ck.load(root / "step-00000002")
    assert_falls_back_to_step_1(root)


def test_huge_and_deeply_nested_manifests_are_corrupt(scratch):
    for case in ("huge", "nested"):
        root = scratch / case / "run"
        two_steps(root)
        path = root / "step-00000002" / "manifest.json"
        text = path.read_bytes()
        at = text.rindex(SELF)
        value = b'"' + b"a" * (17 << 20) + b'"' if case == "huge" else b"[" * 100_000 + b"]" * 100_000
        filler = b'"x": ' + value + b",\n "
        path.write_bytes(seal(text[:at] + filler + text[at:]))
        with pytest.raises(CheckpointError, match="manifest.json"):
            ck.verify(root / "step-00000002")
        assert_falls_back_to_step_1(root)


# ------------------------------------------------------------------ 12. malformed manifests and states fall back

BAD_MANIFESTS = {
    "metrics list": lambda b: b.update(metrics=[1, 2]),
    "metric text": lambda b: b.update(metrics={"loss": "low"}),
    "metric bool": lambda b: b.update(metrics={"loss": True}),
    "metric unknown tag": lambda b: b.update(metrics={"loss": {"$type": "weird"}}),
    "metric bad float": lambda b: b.update(metrics={"loss": {"$type": "float", "value": "abc"}}),
    "state list": lambda b: b.update(state=["state.json"]),
    "state missing": lambda b: b.pop("state"),
    "files list": lambda b: b.update(files=["state.json"]),
    "size text": lambda b: b["files"]["state.json"].update(size="12"),
    "size negative": lambda b: b["files"]["state.json"].update(size=-1),
    "size bool": lambda b: b["files"]["state.json"].update(size=True),
    "checksum number": lambda b: b["files"]["state.json"].update(checksum=12),
    "nul name": lambda b: b["files"].update({"a\x00b": {"size": 1, "checksum": "0" * 32}}),
    "long name": lambda b: b["files"].update({"a" * 300: {"size": 1, "checksum": "0" * 32}}),
    "dot name": lambda b: b["files"].update({"..": {"size": 1, "checksum": "0" * 32}}),
    "step text": lambda b: b.update(step="2"),
    "step bool": lambda b: b.update(step=True),
    "version zero": lambda b: b.update(format_version=0),  # not a version (True, "1": see the newer-format test)
    "checksum kind": lambda b: b.update(checksum="md5"),
    "created number": lambda b: b.update(created=5),
    "body list": None,
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_malformed_manifests_are_fallen_back_past_by_every_reader(scratch, case):
    root = scratch / "run"
    two_steps(root)
    bad = root / "step-00000002"
    if BAD_MANIFESTS[case] is None:
        (bad / "manifest.json").write_bytes(seal(b'[1, {"manifest_checksum": "' + b"0" * 32 + b'"}]\n'))
    else:
        rewrite_manifest(bad, BAD_MANIFESTS[case])
    with pytest.raises(CheckpointError, match="manifest.json"):
        ck.verify(bad)
    assert_falls_back_to_step_1(root)
    store = CheckpointStore(root, keep_last=1, keep_best=1, monitor="loss")  # pruning, as `etappe train` does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        save_steps(store, [3])
        assert store.latest() == store.path_for(3)
    store.close()


def deep(n: int) -> str:
    return "[" * n + "]" * n


BAD_STATES = {
    "garbage": b"not json",
    "entries list": b'{"entries": []}',
    "entry text": b'{"entries": {"step": "x"}}',
    "unknown tag": b'{"entries": {"step": {"kind": "value", "data": {"$type": "weird"}}}}',
    "bad base64": b'{"entries": {"step": {"kind": "value", "data": {"$type": "bytes", "base64": 5}}}}',
    "bad float": b'{"entries": {"step": {"kind": "value", "data": {"$type": "float", "value": [1]}}}}',
    "unhashable key": b'{"entries": {"step": {"kind": "value", "data": {"$type": "dict", "items": [[[1], 2]]}}}}',
    "missing tensor": b'{"entries": {"step": {"kind": "value", "data": {"$type": "tensor", "name": "nope"}}}}',
    "unlisted tensors": b'{"entries": {"w": {"kind": "value", "tensors": "x.safetensors", "data": 1}}}',
    "tensors list": b'{"entries": {"w": {"kind": "value", "tensors": ["w.safetensors"], "data": 1}}}',
    "nested json": ('{"entries": {"step": {"kind": "value", "data": %s}}}' % deep(100_000)).encode(),
    "nested decode": ('{"entries": {"step": {"kind": "value", "data": %s}}}' % deep(700)).encode(),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_a_state_that_verifies_but_does_not_parse_is_fallen_back_past(scratch, case):
    root = scratch / "run"
    two_steps(root)
    bad = root / "step-00000002"
    rewrite_file(bad, "state.json", BAD_STATES[case])
    for name, entry in json.loads((bad / "manifest.json").read_bytes())["files"].items():
        manifest.verify_file(bad, name, entry)  # every checksum holds
    with pytest.raises(CheckpointError, match="state.json"):
        ck.load(bad)
    with pytest.raises(CheckpointError, match="state.json"):
        ck.verify(bad)  # what does not parse does not verify: eval and resume then fall back too
    assert_falls_back_to_step_1(root)


# ------------------------------------------------------------------ 15. a step folder and its manifest agree


def test_step_folders_swapped_between_names_do_not_load_as_each_other(scratch):
    root = scratch / "run"
    store = CheckpointStore(root)
    save_steps(store, [1, 2, 3])
    store.close()
    two, three = store.path_for(2), store.path_for(3)
    two.rename(root / "swap")
    three.rename(two)
    (root / "swap").rename(three)
    with pytest.warns(CheckpointWarning, match="step"):
        assert store.latest() == store.path_for(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        assert store.load()["step"] == 1
        assert [c.step for c in store.checkpoints()] == [1]
        assert CheckpointStore(root, monitor="loss").best() == store.path_for(1)
    report = dict(ck.verify_tree(root))
    assert report[store.path_for(1)] is None and "step 2" in report[three] and "step 3" in report[two]


# ------------------------------------------------------------------ review of 2026-12 (issue 11, item 6)


def test_a_store_root_that_is_a_symlink_is_neither_read_nor_written(scratch, outside):
    run = scratch / "run"
    store = CheckpointStore(run / "checkpoints", keep_last=1)
    save_steps(store, [1, 2])
    store.close()
    shutil.move(run / "checkpoints", outside / "ckd")
    (run / "checkpoints").symlink_to(outside / "ckd")
    before = inventory(outside)
    linked = CheckpointStore(run / "checkpoints", keep_last=1, keep_best=1, monitor="loss")
    for use in (linked.lock, lambda: save_steps(linked, [3]), linked.latest, linked.best, linked.checkpoints,
                linked.load):
        with pytest.raises(CheckpointError, match="symbolic link") as err:
            use()
        assert "\n" not in str(err.value) and str(run / "checkpoints") in str(err.value)
    linked.close()
    assert inventory(outside) == before
    report = dict(ck.verify_tree(run))
    assert "symbolic link" in report[run / "checkpoints"]
    assert "symbolic link" in dict(ck.verify_tree(run / "checkpoints"))[run / "checkpoints"]


def test_a_state_json_larger_than_any_state_is_corrupt_and_fallen_back_past(scratch):
    store = two_steps(scratch)
    bad = store.path_for(2)
    state = json.loads((bad / "state.json").read_bytes())
    state["entries"]["padding"] = {"kind": "value", "data": "x" * (33 << 20)}
    rewrite_file(bad, "state.json", json.dumps(state).encode())
    with pytest.raises(CheckpointError, match="state"):
        ck.verify(bad)
    assert_falls_back_to_step_1(scratch)


def test_a_large_legit_state_is_far_below_the_bound(scratch):
    import random

    import numpy as np

    net = torch.nn.Linear(8, 4)
    opt = torch.optim.Adam(net.parameters())
    net(torch.zeros(2, 8)).sum().backward()
    opt.step()
    history = [{"epoch": e, "train_loss": random.random(), "val_loss": random.random(), "val_acc": random.random(),
                "lr": random.random(), "seconds": random.random()} for e in range(10_000)]
    path = ck.save(scratch / "big", model=net, optimizer=opt, history=history, python_rng=random.getstate(),
                   numpy_rng=np.random.get_state(), torch_rng=torch.get_rng_state())
    size = (path / "state.json").stat().st_size
    assert size * 8 < 32 << 20, size


@pytest.mark.parametrize("version", [2, "2", 2.0, None, [2], {"major": 2}, "missing", True])
@pytest.mark.parametrize("checksum", ["valid", "sha256:abcd"])
def test_a_newer_or_unknown_format_version_stops_whatever_its_checksum(scratch, version, checksum):
    store = two_steps(scratch)
    bad = store.path_for(2)

    def change(body):
        if version == "missing":
            del body["format_version"]
        else:
            body["format_version"] = version

    rewrite_manifest(bad, change)
    if checksum != "valid":
        text = (bad / "manifest.json").read_bytes()
        at = text.rindex(SELF) + len(SELF)
        (bad / "manifest.json").write_bytes(text[:at] + b'sha256:abcd"\n}\n')
    before = inventory(bad)
    store = CheckpointStore(scratch, keep_last=1, monitor="loss")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        for read in (store.latest, store.load, store.checkpoints):
            with pytest.raises(CheckpointError, match="newer etappe") as err:
                read()
            assert type(err.value).__name__ == "NewerFormatError" and "\n" not in str(err.value)
            assert "upgrade etappe" in str(err.value) and "(format 1)" in str(err.value)
        with pytest.raises(CheckpointError, match="newer etappe"):
            store.save(2, {"w": torch.zeros(4), "step": 2})
    store.save(3, {"w": torch.zeros(4), "step": 3})
    store.close()
    assert inventory(bad) == before


def test_a_newer_version_under_a_failing_checksum_of_ours_is_corrupt(scratch):
    store = two_steps(scratch)
    text = (store.path_for(2) / "manifest.json").read_bytes()
    (store.path_for(2) / "manifest.json").write_bytes(text.replace(b'"format_version": 1', b'"format_version": 3'))
    assert_falls_back_to_step_1(scratch)  # one flipped bit (0x31 -> 0x33) is the likelier story


def test_a_checksum_mismatch_shows_only_the_recorded_value(scratch):
    store = two_steps(scratch)
    bad = store.path_for(2)
    text = (bad / "manifest.json").read_bytes()
    at = text.rindex(SELF) + len(SELF)
    (bad / "manifest.json").write_bytes(text[:at] + b'sha256:abcd"\n}\n')
    with pytest.raises(CheckpointError, match="checksum mismatch") as err:
        manifest.read(bad)
    assert "recorded 'sha256:abcd', content" in str(err.value) and '"' not in str(err.value).split("recorded")[1]
    (bad / "manifest.json").write_bytes(text[:at] + b'0123"{]garbage' + text[at + 14 :])  # not JSON any more
    with pytest.raises(CheckpointError) as err:
        manifest.read(bad)
    assert type(err.value).__name__ == "CheckpointError" and "{]" not in str(err.value)
    assert_falls_back_to_step_1(scratch)


LOADER_PRUNER = textwrap.dedent(
    """
    import sys, torch
    from etappe.checkpoint import CheckpointStore

    torch.manual_seed(0)
    net = torch.nn.Linear(16, 4)
    store = CheckpointStore(sys.argv[1], keep_last=1, keep_best=0, monitor="loss")
    for step in range(1, int(sys.argv[2]) + 1):
        store.save(step, {"model": net, "step": step}, {"loss": 1.0 / step})
        if step == 1:
            print("started", flush=True)
    store.close()
    print("done", flush=True)
    """
)


def test_load_without_a_path_passes_over_checkpoints_pruned_under_it(scratch):
    root = scratch / "run"
    writer = subprocess.Popen([sys.executable, "-c", LOADER_PRUNER, str(root), "400"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline().strip() == "started"
        reader = CheckpointStore(root)
        net = torch.nn.Linear(16, 4)
        rounds = 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            while writer.poll() is None or rounds < 3:
                assert reader.load(model=net)["step"] >= 1
                rounds += 1
    finally:
        out, _ = writer.communicate(timeout=120)
    assert writer.returncode == 0 and "done" in out


def test_loading_an_explicit_path_that_was_pruned_says_it_is_gone(scratch):
    store = CheckpointStore(scratch, keep_last=1)
    save_steps(store, [1])
    listed = store.latest()
    save_steps(store, [2])  # prunes step 1
    store.close()
    with pytest.raises(CheckpointError) as err:
        CheckpointStore(scratch).load(listed)
    assert str(err.value) == (f"{listed}: gone (removed by the run's writer since it was listed?); call store.load() "
                              "without a path to load the newest checkpoint")


@pytest.mark.parametrize("value", ["abc", "0.5", None, [1.0], {"x": 1}])
def test_a_metric_that_is_not_a_number_is_a_usage_error(scratch, value):
    from etappe.errors import UsageError

    store = CheckpointStore(scratch)
    with pytest.raises(UsageError, match="val_loss") as err:
        store.save(1, {"step": 1}, metrics={"val_loss": value})
    assert "number" in str(err.value)
    store.close()
    assert store.latest() is None


@pytest.mark.parametrize("name", ["step-180", "best", "step-0000000180"])
def test_a_step_folder_under_another_name_fails_verify_and_is_warned_about(scratch, name):
    store = CheckpointStore(scratch)
    save_steps(store, [90, 180])
    store.close()
    store.path_for(180).rename(scratch / name)
    report = dict(ck.verify_tree(scratch))
    assert report[store.path_for(90)] is None
    assert report[scratch / name] == (f"{scratch / name}: the manifest says step 180, but the folder is named {name}; "
                                      "a store reads it only as step-00000180")
    reader = CheckpointStore(scratch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert reader.latest() == store.path_for(90)
        assert reader.load()["step"] == 90
        assert reader.latest() == store.path_for(90)
    said = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert len(said) == 1 and name in said[0] and "step 180" in said[0] and "\n" not in said[0]
