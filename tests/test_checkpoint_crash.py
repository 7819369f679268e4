"""Crash safety with real processes, real signals and a real full disk: a writer SIGKILLed mid-save leaves the
old checkpoint or the new one, never a mixture; retention survives crashes; a save that does not fit fails
cleanly."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import etappe.checkpoint as ck
from etappe.checkpoint import CheckpointError, CheckpointStore

HOLDER = '''
class Holder:
    def __init__(self, state):
        self.state = state
    def state_dict(self):
        return self.state
    def load_state_dict(self, state):
        self.state = state
'''

BIG_WRITER = HOLDER + '''
import sys, time, torch
from etappe.checkpoint import CheckpointStore

root, step, value = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n = 8_000_000  # 32 MB a tensor, 256 MB in all
model = Holder({f"layer{i}.weight": torch.full((n,), value) for i in range(4)})
optimizer = Holder({"state": {i: {"exp_avg": torch.full((n,), value)} for i in range(4)},
                    "param_groups": [{"lr": value, "params": [0, 1, 2, 3]}]})
store = CheckpointStore(root, keep_last=1)
print("ready", flush=True)
start = time.perf_counter()
store.save(step, {"model": model, "optimizer": optimizer, "value": value}, {"loss": 1 / value})
print("saved", time.perf_counter() - start, flush=True)
'''


def start(script: Path, *args) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def no_temps(root: Path) -> bool:
    return not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def committed_value(root: Path) -> tuple[int, float]:
    """Open the store as a restarted trainer would; the latest checkpoint must verify and hold one state whole."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint that needs skipping would be a protocol failure
        store = CheckpointStore(root, keep_last=1)
        latest = store.latest()
    assert latest is not None and no_temps(root)
    ck.verify(latest)
    saved = ck.load(latest)
    value = saved["value"]
    tensors = [*saved["model"].values(), *(s["exp_avg"] for s in saved["optimizer"]["state"].values())]
    assert len(tensors) == 8
    for t in tensors:
        assert t.shape == (8_000_000,) and bool((t == value).all()), f"{latest}: a tensor holds another state than {value}"
    assert saved["optimizer"]["param_groups"][0]["lr"] == value
    return int(latest.name.removeprefix("step-")), value


def test_sigkill_at_random_moments_of_a_save_leaves_the_old_or_the_new_checkpoint(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    script = tmp_path / "writer.py"
    script.write_text(BIG_WRITER)
    root = tmp_path / "run"
    proc = start(script, root, 1, 1.0)
    out, _ = proc.communicate(timeout=300)
    save_seconds = float(out.split()[1])
    step, value = committed_value(root)
    assert (step, value) == (1, 1.0)

    killed_mid_save, rounds = 0, 0
    while killed_mid_save < 20:
        rounds += 1
        assert rounds <= 60, f"only {killed_mid_save} kills landed inside a save (seed {seed})"
        new_step = rng.choice([step, step + 1])  # overwrite the same step in place, or commit a new folder
        proc = start(script, root, new_step, value + 1)
        time.sleep(rng.uniform(0, save_seconds * 1.1))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
        finished = "saved" in out
        killed_mid_save += proc.returncode == -signal.SIGKILL and not finished
        old = (step, value)
        step, value = committed_value(root)
        assert (step, value) in (old, (new_step, old[1] + 1)), f"seed {seed}: {old} -> {(step, value)}"
        if finished:
            assert (step, value) == (new_step, old[1] + 1)
        assert [p.name for p in root.iterdir()] == [f"step-{step:08d}"]  # keep_last=1, nothing half-deleted


RETENTION_WRITER = HOLDER + '''
import sys, torch
from etappe.checkpoint import CheckpointStore

root, stop = sys.argv[1], int(sys.argv[2])
store = CheckpointStore(root, keep_last=2, keep_best=2, monitor="loss", mode="min", keep_every=5)
latest = store.latest()
first = 1 if latest is None else store.load()["step"] + 1
print("ready", flush=True)
for s in range(first, stop + 1):
    store.save(s, {"model": Holder({"w": torch.full((10_000,), float(s))}), "step": s}, {"loss": ((s * 37) % 101) / 100})
    print("saved", s, flush=True)
print("done", flush=True)
'''


def loss(step: int) -> float:
    return ((step * 37) % 101) / 100


def policy(steps) -> set[int]:
    """keep_last=2, keep_best=2 by loss (min), keep_every=5, applied after each save in turn."""
    alive: set[int] = set()
    for s in steps:
        alive.add(s)
        ordered = sorted(alive)
        alive = {s} | set(ordered[-2:]) | set(sorted(alive, key=loss)[:2]) | {x for x in alive if x % 5 == 0}
    return alive


def test_retention_keeps_exactly_the_policy_across_crashes_and_restarts(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    script = tmp_path / "writer.py"
    script.write_text(RETENTION_WRITER)
    root = tmp_path / "run"
    last = 0
    for crash in range(4):
        proc = start(script, root, 40)
        kill_after = last + rng.randint(1, 8)
        for line in proc.stdout:
            if line.startswith("saved") and int(line.split()[1]) >= kill_after:
                break
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        store = CheckpointStore(root, keep_last=2, keep_best=2, monitor="loss", mode="min", keep_every=5)
        assert no_temps(root)
        latest = store.latest()
        last = store.load()["step"]
        assert latest == store.path_for(last)
        kept = {c.step for c in store.checkpoints()}
        # all of the policy after the last committed save, at most what it held before plus that save
        assert policy(range(1, last + 1)) <= kept <= policy(range(1, last)) | {last}, f"seed {seed}, crash {crash}"
        for c in store.checkpoints():
            ck.verify(c.path)
    proc = start(script, root, 40)
    assert proc.communicate(timeout=120)[0].strip().endswith("done")
    store = CheckpointStore(root)
    assert {c.step for c in store.checkpoints()} == policy(range(1, 41))
    assert policy(range(1, 41)) == {39, 40} | set(sorted(range(1, 41), key=loss)[:2]) | set(range(5, 41, 5))
    assert sorted(p.name for p in root.iterdir()) == sorted(store.path_for(s).name for s in policy(range(1, 41)))


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs, mounted for the test (needs root)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs to fill needs root and mount(8)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_save_that_does_not_fit_fails_cleanly_and_keeps_the_previous_checkpoint(small_disk):
    store = CheckpointStore(small_disk / "run")
    small = {"model": {"w": torch.full((1_000_000,), 1.0)}, "epoch": 1}  # 4 MB
    big = {"model": {"w": torch.full((5_000_000,), 2.0)}, "epoch": 2}  # 20 MB: more than the disk holds
    store.save(1, small)
    with pytest.raises(CheckpointError) as err:
        store.save(2, big)
    msg = str(err.value)
    assert "No space left on device" in msg and "step-00000002" in msg and "unchanged" in msg and "\n" not in msg
    assert store.latest() == store.path_for(1) and ck.load(store.path_for(1))["epoch"] == 1
    assert [p.name for p in (small_disk / "run").iterdir()] == ["step-00000001"]

    # overwriting in place: the new files do not fit beside the old ones, and the old ones stay
    before = sorted(p.name for p in store.path_for(1).iterdir())
    with pytest.raises(CheckpointError, match="No space left on device"):
        ck.save(store.path_for(1), **big)
    assert sorted(p.name for p in store.path_for(1).iterdir()) == before
    ck.verify(store.path_for(1))
    assert torch.equal(ck.load(store.path_for(1))["model"]["w"], small["model"]["w"])
    # and once there is room again, saving works
    store.save(2, small)
    assert store.latest() == store.path_for(2)
