"""Async save: what a background write commits is the state at the call, bit for bit, whatever the trainer does
next; saves queue one behind the other; a process killed mid-write keeps its last committed checkpoint; a failed
write is reported, never lost."""

from __future__ import annotations

import math
import os
import random
import resource
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import etappe.checkpoint as ck
from etappe.checkpoint import CheckpointError, CheckpointStore
from tests.test_checkpoint import assert_same


class Trainer:
    """A small model mid-training: Adam with state, a scheduler, and plain values that change as it trains."""

    def __init__(self, width: int = 256, layers: int = 6) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)], nn.LayerNorm(width))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=2, gamma=0.5)
        self.x = torch.randn(32, width)
        self.history = {"loss": [], "best": math.inf, "tag": ("run", 1), "raw": b"\x00\xff"}
        self.counts = np.arange(12, dtype=np.int64).reshape(3, 4)
        # tensors whose bytes are laid out unlike float32's: 16-byte elements, 1-byte ones, none, a 0-d one,
        # a conjugate view and a strided one
        z = torch.randn(5, dtype=torch.complex128)
        self.odd = {"z": z, "mask": torch.rand(7) > 0.5, "none": torch.empty(0, 3), "half": torch.randn(3).half(),
                    "zero_d": torch.tensor(2.5, dtype=torch.float64), "conj": torch.randn(4, dtype=torch.complex64).conj(),
                    "strided": torch.randn(6, 4)[:, ::2]}
        for _ in range(3):
            self.step()

    def step(self) -> None:
        loss = self.model(self.x).square().mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.history["loss"].append(loss.item())
        self.history["best"] = min(self.history["best"], loss.item())
        self.counts += 1

    def objects(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "history": self.history, "counts": self.counts, "odd": self.odd, "epoch": len(self.history["loss"])}


def written(path: Path) -> dict[str, bytes]:
    """Every file of a checkpoint but the manifest (which records its creation time)."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "manifest.json"}


def test_an_async_save_writes_exactly_what_a_sync_save_writes(tmp_path):
    trainer = Trainer()
    sync = CheckpointStore(tmp_path / "sync").save(7, trainer.objects(), {"loss": 0.25})
    store = CheckpointStore(tmp_path / "async", async_save=True)
    path = store.save(7, trainer.objects(), {"loss": 0.25})
    assert path == store.path_for(7)
    assert store.wait() == path
    ck.verify(path)
    assert written(path) == written(sync)  # the same bytes in the same files
    loaded = ck.load(path)
    assert_same(loaded, ck.load(sync))
    assert torch.equal(loaded["odd"]["z"] * 2, trainer.odd["z"] * 2)  # 16-byte elements usable, not just comparable
    assert store.checkpoints()[0].metrics == {"loss": 0.25}
    # and it restores into live objects like any checkpoint
    fresh = Trainer()
    fresh.step()  # one step further than what was saved
    rest = store.load(model=fresh.model, optimizer=fresh.optimizer, scheduler=fresh.scheduler)
    assert_same(fresh.model.state_dict(), trainer.model.state_dict())
    assert_same(fresh.optimizer.state_dict(), trainer.optimizer.state_dict())
    assert rest["epoch"] == 3 and rest["history"]["tag"] == ("run", 1)


def test_training_on_right_after_save_returns_does_not_change_what_is_written(tmp_path):
    trainer = Trainer(width=512, layers=8)  # 8 MB of weights, 24 MB with Adam: the write outlasts the steps below
    expected = ck.save(tmp_path / "expected", **trainer.objects())
    store = CheckpointStore(tmp_path / "run", async_save=True)
    for round in range(3):  # the first save allocates the pool, later ones reuse it
        store.save(round, trainer.objects())
        trainer.step()  # optimizer step, scheduler step, plain values appended and replaced, numpy in place
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.mul_(-1.5).add_(3.0)
        trainer.history["tag"] = ("changed", 2)
        trainer.odd["z"].mul_(2j)
        trainer.odd["mask"].logical_not_()
        store.wait()
        assert_same(ck.load(store.path_for(round)), ck.load(expected), f"step {round}")
        expected = ck.save(tmp_path / "expected", **trainer.objects())


def retained(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    alive: set[int] = set()
    for s in steps:
        alive.add(s)
        alive = {s} | set(sorted(alive)[-keep_last:]) | {x for x in alive if x % keep_every == 0}
    return alive


def test_back_to_back_saves_queue_one_behind_the_other_and_retention_stays_exact(tmp_path):
    store = CheckpointStore(tmp_path / "run", keep_last=2, keep_every=3, async_save=True)
    state = {"model": {"w": torch.zeros(2_000_000)}, "step": 0}  # 8 MB: each write takes a while
    for s in range(1, 9):
        state["model"]["w"].fill_(s)
        state["step"] = s
        assert store.save(s, state) == store.path_for(s)
        # the save that returned first waited for the one before it: that one is committed and pruned after
        before, after = retained(list(range(1, s)), 2, 3), retained(list(range(1, s + 1)), 2, 3)
        committed = {c.step for c in store.checkpoints()}
        assert before & after <= committed <= before | {s} and (s == 1 or s - 1 in committed), (s, committed)
        assert s == 1 or store.latest() in (store.path_for(s - 1), store.path_for(s))
    assert store.wait() == store.path_for(8)
    assert store.wait() == store.path_for(8)  # nothing in flight: returns at once
    assert {c.step for c in store.checkpoints()} == retained(list(range(1, 9)), 2, 3) == {3, 6, 7, 8}
    for c in store.checkpoints():
        saved = ck.load(c.path)
        assert saved["step"] == c.step and bool((saved["model"]["w"] == c.step).all())
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [f"step-{s:08d}" for s in (3, 6, 7, 8)]
    assert store.close() == store.path_for(8)


# A trainer process that saves in the background and trains on: the parent SIGKILLs it at a random moment.
# Importing torch takes seconds; a zygote imports it once and forks one trainer per round (it never computes
# before forking, so the children start with no OpenMP pool to inherit).
TRAINER_ZYGOTE = '''
import os, sys, threading, time
import torch
from etappe.checkpoint import CheckpointStore

class Holder:
    def __init__(self, state):
        self.state = state
    def state_dict(self):
        return self.state
    def load_state_dict(self, state):
        self.state = state

print("ready", flush=True)
for line in sys.stdin:
    root, step, value = line.split()
    step, value = int(step), float(value)
    pid = os.fork()
    if pid == 0:
        n = 8_000_000  # 32 MB a tensor, 256 MB in all
        weights = [torch.full((n,), value) for _ in range(4)]
        exp_avg = [torch.full((n,), value) for _ in range(4)]
        group = {"lr": value, "params": [0, 1, 2, 3]}
        model = Holder({f"layer{i}.weight": w for i, w in enumerate(weights)})
        optimizer = Holder({"state": {i: {"exp_avg": t} for i, t in enumerate(exp_avg)}, "param_groups": [group]})
        store = CheckpointStore(root, keep_last=1, async_save=True)
        store.save(step, {"model": model, "optimizer": optimizer, "value": value}, {"loss": 1 / value})
        start = time.perf_counter()
        print("returned", flush=True)

        def committed():  # how long the background write took after save() returned
            store.wait()
            print("committed", time.perf_counter() - start, flush=True)

        threading.Thread(target=committed, daemon=True).start()
        for k in range(1, 10**6):  # train on: every value changes in place while the write is in flight
            for t in weights + exp_avg:
                t.add_(1.0)
            group["lr"] = value + k
            time.sleep(0.002)
    print(pid, flush=True)
    sys.stdin.readline()  # reap only when told: until then the pid cannot be reused, so the kill hits our child
    _, status = os.waitpid(pid, 0)
    print("killed", flush=True)
'''


def committed_value(root: Path) -> tuple[int, float]:
    """Open the store as a restarted trainer would; its latest checkpoint must verify and hold one state whole."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint that needs skipping would be a protocol failure
        store = CheckpointStore(root, keep_last=1)
        store.lock()  # a restarted trainer becomes the run's one writer, which sweeps what a killed save left
        latest = store.latest()
        store.close()
    assert latest is not None
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp-")], "temporary folders left after opening"
    saved = ck.load(latest)
    value = saved["value"]
    tensors = [*saved["model"].values(), *(s["exp_avg"] for s in saved["optimizer"]["state"].values())]
    assert len(tensors) == 8
    for t in tensors:
        assert t.shape == (8_000_000,) and bool((t == value).all()), f"{latest}: a tensor holds another state than {value}"
    assert saved["optimizer"]["param_groups"][0]["lr"] == value
    return int(latest.name.removeprefix("step-")), value


def test_sigkill_during_a_background_write_keeps_the_old_or_the_new_checkpoint_never_a_mixture(tmp_path, scratch):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    script = tmp_path / "trainers.py"
    script.write_text(TRAINER_ZYGOTE)
    zygote = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert zygote.stdout.readline().strip() == "ready"

    def run(step: int, value: float, kill_after: float | None) -> float | None:
        """One trainer: save (step, value), train on, be killed ``kill_after`` s after save() returned (None:
        after the write committed). Returns how long the write took after save() returned (kill_after None)."""
        zygote.stdin.write(f"{scratch / 'run'} {step} {value}\n")
        zygote.stdin.flush()
        pid = int(zygote.stdout.readline())
        assert zygote.stdout.readline().strip() == "returned"
        seconds = None
        if kill_after is None:
            line = zygote.stdout.readline().split()
            assert line[0] == "committed", line
            seconds = float(line[1])
        else:
            time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
        zygote.stdin.write("reap\n")
        zygote.stdin.flush()
        for line in zygote.stdout:  # a "committed" line may come before the kill landed
            if line.strip() == "killed":
                return seconds
            assert line.startswith("committed"), line
        raise AssertionError("the zygote ended")

    try:
        durations = [run(1, 1.0, kill_after=None)]
        step, value = committed_value(scratch / "run")
        assert (step, value) == (1, 1.0)
        mid_write, rounds = 0, 0
        while mid_write < 6:
            rounds += 1
            assert rounds <= 40, f"only {mid_write} kills landed inside a background write (seed {seed})"
            new = (rng.choice([step, step + 1]), value + 1)  # overwrite the same step in place, or a new folder
            if rounds % 4 == 0:  # a write left to commit: its duration, as the machine's load is now
                durations = [*durations[-2:], run(*new, kill_after=None)]
            else:  # a kill at a random moment of the write (one after the commit is checked too, not counted)
                run(*new, kill_after=rng.uniform(0, 1.1 * sorted(durations)[len(durations) // 2]))
            old = (step, value)
            step, value = committed_value(scratch / "run")
            assert (step, value) in (old, new), f"seed {seed}: {old} -> {(step, value)}, saving {new}"
            if rounds % 4 == 0:
                assert (step, value) == new, f"seed {seed}: a write left alone did not commit"
            else:
                mid_write += (step, value) == old
        run(step + 1, value + 1, kill_after=None)  # and the store takes new saves after all that
        assert committed_value(scratch / "run") == (step + 1, value + 1)
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=60)


class FileSizeLimit:
    """Files of this process cannot grow past ``limit`` bytes while inside: a write beyond fails with EFBIG, as
    a full disk fails with ENOSPC (SIGXFSZ, which would kill the process, is ignored meanwhile)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __enter__(self) -> None:
        self.old = resource.getrlimit(resource.RLIMIT_FSIZE)
        self.handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.old[1]))

    def __exit__(self, *exc) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, self.old)
        signal.signal(signal.SIGXFSZ, self.handler)


def test_a_failed_background_write_is_raised_by_wait_and_by_the_next_save_and_keeps_the_previous(tmp_path):
    root = tmp_path / "run"
    store = CheckpointStore(root, keep_last=1, async_save=True)
    small = {"model": {"w": torch.full((100_000,), 1.0)}, "epoch": 1}  # 400 KB
    big = {"model": {"w": torch.full((5_000_000,), 2.0)}, "epoch": 2}  # 20 MB
    store.save(1, small)
    store.wait()
    with FileSizeLimit(4 << 20):
        assert store.save(2, big) == store.path_for(2)  # returns: the failure comes in the background
        with pytest.raises(CheckpointError) as first:
            store.wait()
    msg = str(first.value)
    assert "background save failed" in msg and "step-00000002" in msg and "File too large" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match="File too large"):
        store.wait()  # raised again: no one has saved since
    assert store.latest() == store.path_for(1) and ck.load(store.path_for(1))["epoch"] == 1
    assert [p.name for p in root.iterdir()] == ["step-00000001"]  # the failed write cleaned up after itself
    with pytest.raises(CheckpointError, match="File too large"):
        store.save(3, small)  # the next save reports it instead of saving ...
    assert store.latest() == store.path_for(1)
    store.save(3, {**small, "epoch": 3})  # ... and the one after that saves
    assert store.wait() == store.path_for(3)
    assert ck.load(store.latest())["epoch"] == 3
    assert [p.name for p in root.iterdir()] == ["step-00000003"]


def test_a_sync_store_has_nothing_to_wait_for(tmp_path):
    store = CheckpointStore(tmp_path / "run")
    assert store.wait() is None
    store.save(1, {"epoch": 1})
    assert store.wait() is None and store.close() is None and store.latest() == store.path_for(1)
