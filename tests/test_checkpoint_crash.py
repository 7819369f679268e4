"""Crash safety with real processes, real signals and a real full disk: a writer SIGKILLed mid-save leaves the
old checkpoint or the new one, never a mixture; retention survives crashes; a save that does not fit fails
cleanly."""

from __future__ import annotations

import math
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
        store.lock()  # a restarted trainer becomes the run's one writer, which sweeps what a killed save left
        latest = store.latest()
        store.close()
    assert latest is not None and no_temps(root)
    saved = ck.load(latest)
    value = saved["value"]
    tensors = [*saved["model"].values(), *(s["exp_avg"] for s in saved["optimizer"]["state"].values())]
    assert len(tensors) == 8
    for t in tensors:
        assert t.shape == (8_000_000,) and bool((t == value).all()), f"{latest}: a tensor holds another state than {value}"
    assert saved["optimizer"]["param_groups"][0]["lr"] == value
    return int(latest.name.removeprefix("step-")), value


# Importing torch takes seconds; a zygote imports it once and forks one real writer process per round.
# It never computes before forking, so the children start with no OpenMP pool to inherit.
WRITER_ZYGOTE = HOLDER + '''
import os, sys, time
import torch
from etappe.checkpoint import CheckpointStore

print("ready", flush=True)
for line in sys.stdin:
    root, step, value = line.split()
    step, value = int(step), float(value)
    pid = os.fork()
    if pid == 0:
        n = 8_000_000  # 32 MB a tensor, 256 MB in all
        model = Holder({f"layer{i}.weight": torch.full((n,), value) for i in range(4)})
        optimizer = Holder({"state": {i: {"exp_avg": torch.full((n,), value)} for i in range(4)},
                            "param_groups": [{"lr": value, "params": [0, 1, 2, 3]}]})
        store = CheckpointStore(root, keep_last=1)
        print("saving", flush=True)
        start = time.perf_counter()
        store.save(step, {"model": model, "optimizer": optimizer, "value": value}, {"loss": 1 / value})
        print("saved", time.perf_counter() - start, flush=True)
        os._exit(0)
    print(pid, flush=True)
    sys.stdin.readline()  # reap only when told: until then the pid cannot be reused, so the kill hits our child
    _, status = os.waitpid(pid, 0)
    print("killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9 else f"exit {status}", flush=True)
'''


class Writers:
    """Writer processes on demand: ``save(root, step, value, kill_after)`` runs one, SIGKILLs it after
    ``kill_after`` seconds of saving (None: let it finish), and says whether it finished."""

    def __init__(self, script: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def save(self, root: Path, step: int, value: float, kill_after: float | None) -> tuple[bool, float]:
        self.proc.stdin.write(f"{root} {step} {value}\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        assert self.proc.stdout.readline().strip() == "saving"
        if kill_after is not None:
            time.sleep(kill_after)
            os.kill(pid, signal.SIGKILL)  # a child that already finished is a zombie: the kill does nothing
        self.proc.stdin.write("reap\n")
        self.proc.stdin.flush()
        lines = [self.proc.stdout.readline().strip()]
        if lines[0].startswith("saved"):
            lines.append(self.proc.stdout.readline().strip())
        finished = lines[0].startswith("saved")
        assert lines[-1] == ("exit 0" if finished else "killed"), lines
        return finished, float(lines[0].split()[1]) if finished else math.nan

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def test_sigkill_at_random_moments_of_a_save_leaves_the_old_or_the_new_checkpoint(tmp_path, scratch):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    script = tmp_path / "writers.py"
    script.write_text(WRITER_ZYGOTE)
    writers = Writers(script)
    root = scratch / "run"
    try:
        finished, save_seconds = writers.save(root, 1, 1.0, kill_after=None)
        assert finished
        step, value = committed_value(root)
        assert (step, value) == (1, 1.0)
        killed_mid_save, rounds = 0, 0
        while killed_mid_save < 20:
            rounds += 1
            assert rounds <= 60, f"only {killed_mid_save} kills landed inside a save (seed {seed})"
            new_step = rng.choice([step, step + 1])  # overwrite the same step in place, or commit a new folder
            finished, seconds = writers.save(root, new_step, value + 1, kill_after=rng.uniform(0, save_seconds * 1.1))
            if finished:
                save_seconds = seconds
            killed_mid_save += not finished
            old = (step, value)
            step, value = committed_value(root)
            assert (step, value) in (old, (new_step, old[1] + 1)), f"seed {seed}: {old} -> {(step, value)}"
            if finished:
                assert (step, value) == (new_step, old[1] + 1)
            assert [p.name for p in root.iterdir()] == [f"step-{step:08d}"]  # keep_last=1, nothing half-deleted
    finally:
        writers.close()


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
        kill_after = last + rng.randint(1, 8)  # past 40: the writer finishes first
        for line in proc.stdout:
            if line.startswith("saved") and int(line.split()[1]) >= kill_after:
                break
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
        store = CheckpointStore(root, keep_last=2, keep_best=2, monitor="loss", mode="min", keep_every=5)
        store.lock()  # a restarted trainer becomes the run's one writer, which sweeps what a killed save left
        assert no_temps(root)
        latest = store.latest()
        last = store.load()["step"]
        assert latest == store.path_for(last)
        kept = {c.step for c in store.checkpoints()}
        # all of the policy after the last committed save, at most what it held before plus that save
        assert policy(range(1, last + 1)) <= kept <= policy(range(1, last)) | {last}, f"seed {seed}, crash {crash}"
        for c in store.checkpoints():
            ck.verify(c.path)
        store.close()  # the next writer is the restarted process
    # One more save after the last crash, which may have struck between a commit and its pruning: retention is
    # applied by saves, so the store is exact again after the next one.
    proc = start(script, root, 41)
    assert proc.stdout.read().strip().endswith("done")  # not communicate(timeout=...): it skips buffered lines
    assert proc.wait(timeout=120) == 0
    store = CheckpointStore(root)
    assert {c.step for c in store.checkpoints()} == policy(range(1, 42))
    assert policy(range(1, 42)) == {40, 41} | set(sorted(range(1, 42), key=loss)[:2]) | set(range(5, 42, 5))
    assert sorted(p.name for p in root.iterdir()) == sorted(store.path_for(s).name for s in policy(range(1, 42)))


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
    store.close()  # lets go of the writer lock, an open folder that would keep the disk from being unmounted
