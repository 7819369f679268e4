"""Exact resume in your own loop: ResumableLoader's position, RandomState's generators, both through etappe.save,
and examples/own_loop.py killed with SIGKILL mid-epoch and run again, ending bit-identical."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

import etappe
from etappe.checkpoint import kinds
from etappe.errors import UsageError
from tests.conftest import ROOT
from tests.test_resume import assert_equal


def epoch_batches(loader: etappe.ResumableLoader) -> list[list[int]]:
    return [batch[0].tolist() for batch in loader]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 120), batch_size=st.integers(1, 40), seed=st.integers(-2**70, 2**70), shuffle=st.booleans(),
       epoch=st.integers(0, 5), data=st.data())
def test_loader_after_a_round_trip_yields_exactly_the_remaining_batches(n, batch_size, seed, shuffle, epoch, data):
    dataset = TensorDataset(torch.arange(n))
    straight = etappe.ResumableLoader(dataset, batch_size, shuffle=shuffle, seed=seed)
    straight.set_epoch(epoch)
    whole, following = epoch_batches(straight), epoch_batches(straight)
    stop = data.draw(st.integers(0, len(whole)), label="stop")

    interrupted = etappe.ResumableLoader(dataset, batch_size, shuffle=shuffle, seed=seed)
    interrupted.set_epoch(epoch)
    for i, _ in enumerate(interrupted):
        if i + 1 == stop:
            break
    state = interrupted.state_dict()
    resumed = etappe.ResumableLoader(dataset, batch_size, shuffle=shuffle, seed=seed)
    resumed.load_state_dict(state)
    resumed.set_epoch(epoch)  # what the loop does at the top of the epoch: the position stays
    assert len(resumed) == len(whole) - stop
    assert epoch_batches(resumed) == whole[stop:]
    assert epoch_batches(resumed) == following  # the epoch ran to its end: then the next one, as uninterrupted
    assert sorted(i for b in whole for i in b) == list(range(n))


def test_loader_state_goes_through_etappe_save_by_name(tmp_path):
    dataset = TensorDataset(torch.arange(50))
    loader = etappe.ResumableLoader(dataset, 8, seed=2**62 + 12345)  # a seed beyond 53 bits stays exact in JSON
    assert kinds.of_object(loader) == kinds.STATEFUL
    batches = iter(loader)
    taken = [next(batches)[0].tolist() for _ in range(3)]
    etappe.save(tmp_path / "ckpt", sampler=loader, step=3)

    fresh = etappe.ResumableLoader(dataset, 8, seed=2**62 + 12345)
    assert etappe.load(tmp_path / "ckpt", sampler=fresh) == {"step": 3}
    assert fresh.state_dict() == loader.state_dict()
    straight = etappe.ResumableLoader(dataset, 8, seed=2**62 + 12345)
    assert epoch_batches(fresh) == epoch_batches(straight)[3:]
    assert taken == epoch_batches(etappe.ResumableLoader(dataset, 8, seed=2**62 + 12345))[:3]


def test_loader_refuses_a_state_of_another_order():
    dataset = TensorDataset(torch.arange(50))
    state = etappe.ResumableLoader(dataset, 8, seed=1).state_dict()
    with pytest.raises(UsageError, match="batch_size 8 .this loader: 16"):
        etappe.ResumableLoader(dataset, 16, seed=1).load_state_dict(state)
    with pytest.raises(UsageError, match="chooses its own sampler"):
        etappe.ResumableLoader(dataset, 8, sampler=range(50))


class Recorded(torch.utils.data.Dataset):
    """Samples that leave a file behind when a worker reads them: what was read ahead can be counted."""

    def __init__(self, n: int, folder: Path) -> None:
        self.n, self.folder = n, folder

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        (self.folder / str(i)).touch()
        return torch.tensor(i)


def test_with_two_workers_the_position_counts_batches_handed_to_the_loop(tmp_path):
    """Workers read ahead; the position is what the loop received, so prefetched batches are read again after a
    resume, not lost."""
    (tmp_path / "read").mkdir()
    dataset = Recorded(100, tmp_path / "read")
    straight = [b.tolist() for b in etappe.ResumableLoader(dataset, 7, seed=5)]

    loader = etappe.ResumableLoader(dataset, 7, seed=5, num_workers=2)
    batches = iter(loader)
    for _ in range(5):
        next(batches)
    deadline = time.monotonic() + 10
    while len(list((tmp_path / "read").iterdir())) <= 5 * 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    read_ahead = len(list((tmp_path / "read").iterdir()))
    state = loader.state_dict()
    del batches  # the workers and what they prefetched go away, as in a killed process

    assert read_ahead > 5 * 7, "the workers should have read batches ahead of the loop"
    assert state["batches_done"] == 5
    resumed = etappe.ResumableLoader(dataset, 7, seed=5, num_workers=2)
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == straight[5:]


def test_random_state_restores_every_generator_through_save(tmp_path):
    g = torch.Generator().manual_seed(3)
    pcg = np.random.default_rng(2**100 + 7)  # PCG64: its state is two 128-bit integers
    mt = np.random.Generator(np.random.MT19937(4))  # uint32 keys
    py = random.Random(5)
    rng = etappe.RandomState(g, pcg, mt, py)
    assert kinds.of_object(rng) == kinds.STATEFUL

    def draw() -> list:
        return [torch.rand(4).tolist(), float(np.random.rand()), random.random(), torch.rand(2, generator=g).tolist(),
                pcg.integers(2**62), float(mt.random()), py.random(), float(np.random.randn())]

    draw()
    np.random.randn()  # a cached Gaussian is part of NumPy's state
    etappe.save(tmp_path / "ckpt", rng=rng)
    expected = draw()
    draw()
    etappe.load(tmp_path / "ckpt", rng=etappe.RandomState(g, pcg, mt, py))
    assert draw() == expected
    with pytest.raises(UsageError, match="holds 4 generator"):
        etappe.load(tmp_path / "ckpt", rng=etappe.RandomState(g))


def test_random_state_values_round_trip_exactly(tmp_path):
    pcg = np.random.default_rng(2**120 + 1)
    before = etappe.RandomState(pcg).state_dict()
    etappe.save(tmp_path / "ckpt", rng=etappe.RandomState(pcg))
    after = etappe.load(tmp_path / "ckpt")["rng"]
    assert after["generators"][0]["state"] == before["generators"][0]["state"]  # 128-bit ints, exact
    assert torch.equal(after["numpy"]["keys"], before["numpy"]["keys"]) and after["numpy"]["keys"].dtype == torch.int64
    assert after["python"] == before["python"]
    assert torch.equal(after["torch"], before["torch"])


# ---------------------------------------------------------------- the example, killed with SIGKILL and resumed

EXAMPLE = ROOT / "examples" / "own_loop.py"


def run_example(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(EXAMPLE), "--run-dir", str(run_dir), *args], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out


def kill_after_save(run_dir: Path, at_least: int, delay: float, *args: str) -> int:
    """Start the example, SIGKILL it ``delay`` seconds after it reports a checkpoint of step ``at_least`` or later;
    return that step."""
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), "--run-dir", str(run_dir), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in proc.stdout:
            if line.startswith("saved step ") and int(line.split()[2]) >= at_least:
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                return int(line.split()[2])
        raise AssertionError(f"the example ended before saving step {at_least}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def final_state(run_dir: Path) -> dict:
    return etappe.load(run_dir / "final")


@pytest.mark.slow
def test_own_loop_killed_mid_epoch_resumes_bit_identical(scratch):
    straight = scratch / "straight"
    run_example(straight)
    expected = final_state(straight)
    chooser = random.Random(int(time.time()))
    # a checkpoint inside the first, second and third epoch (not on an epoch's end), the last with workers
    cases = [(chooser.randrange(1, 8) * 5, ()), (chooser.randrange(10, 17) * 5, ()),
             (chooser.randrange(19, 26) * 5, ("--workers", "2"))]
    for i, (at_least, args) in enumerate(cases):
        for attempt in range(3):  # on a busy machine the line may be read after the run ended: try again, sooner
            run_dir = scratch / f"killed-{i}-{attempt}"
            delay = chooser.uniform(0, 0.3) if attempt == 0 else 0.0
            saved = kill_after_save(run_dir, at_least // (attempt + 1), delay, *args)
            if not (run_dir / "final").exists():
                break
        assert not (run_dir / "final").exists(), "killed too late three times: the run had finished"
        out = run_example(run_dir, *args)
        resumed_at = int(out.stdout.split("resumed at step ")[1].split()[0])
        assert resumed_at >= saved
        got = final_state(run_dir)
        assert_equal(got["model"], expected["model"], f"model after a kill at step >= {saved} (+{delay:.2f} s)")
        assert_equal(got["optimizer"], expected["optimizer"], f"optimizer after a kill at step >= {saved}")


def test_own_loop_stopped_at_a_checkpoint_and_resumed_equals_a_straight_run(scratch):
    """The same without a kill's timing: a run of one epoch (its last checkpoint taken at its last batch, before
    the scheduler's step), then extended to three."""
    straight, stopped = scratch / "straight", scratch / "stopped"
    run_example(straight)
    run_example(stopped, "--epochs", "1")
    out = run_example(stopped)
    assert "resumed at step 45 (epoch 1, batch 45)" in out.stdout
    assert_equal(final_state(stopped)["model"], final_state(straight)["model"])
    assert_equal(final_state(stopped)["optimizer"], final_state(straight)["optimizer"])


# ---------------------------------------------------------------- runs made by etappe.fit, used from the CLI

NET = '''
import math
from torch import nn


class Net(nn.Module):
    def __init__(self, input_shape, num_outputs, hidden=32):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                                  nn.Dropout(0.2), nn.Linear(hidden, num_outputs))

    def forward(self, x):
        return self.body(x)
'''

FIT = '''
import os, signal, sys, threading, time
from pathlib import Path

import torch
from torch import nn

import etappe
from etappe.data import load_dataset
from etappe.models import build

run, epochs, model_kind, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.manual_seed(0)
data = load_dataset("digits")
options = {}
if model_kind == "cnn":
    model = build("cnn", data.spec.input_shape, data.spec.num_outputs)
else:
    from mynet import Net
    model = Net(data.spec.input_shape, data.spec.num_outputs)
    if model_kind == "named":
        options["model_name"] = "mynet:Net"
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
if stop == "term":  # SIGTERM once the first checkpoint (mid-epoch: every 3 steps) has landed
    def send():
        while run is not None and not any(Path(run, "checkpoints").glob("step-*")):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
    if run == "none":
        run = None
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    else:
        threading.Thread(target=send, daemon=True).start()
try:
    history = etappe.fit(model, data, epochs=epochs, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss(),
                         batch_size=32, run_dir=run, progress=False, quiet=True, save_every=3, **options)
except etappe.Preempted as exc:
    print(exc)
    sys.exit(exc.exit_code)
print("val_loss", repr(history[-1]["val_loss"]))
'''


def fit_run(where: Path, run: str, epochs: int, model: str, stop: str = "no") -> subprocess.CompletedProcess:
    (where / "mynet.py").write_text(NET)
    (where / "fit_run.py").write_text(FIT)
    return subprocess.run([sys.executable, "fit_run.py", run, str(epochs), model, stop], cwd=where,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": f"{where}{os.pathsep}{ROOT / 'src'}"})


def cli(where: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "etappe", *args], cwd=where, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": f"{where}{os.pathsep}{ROOT / 'src'}"})


def latest_model(run_dir: Path) -> dict:
    return etappe.load(etappe.CheckpointStore(run_dir / "checkpoints").latest())["model"]


@pytest.mark.slow
def test_a_fit_run_of_a_registry_model_evaluates_and_resumes_from_the_cli(tmp_path):
    stopped = fit_run(tmp_path, "stopped", 2, "cnn", "term")
    assert stopped.returncode == 75, stopped.stderr
    assert stopped.stdout.strip().endswith("resume with: etappe resume stopped"), stopped.stdout
    assert (tmp_path / "stopped" / "config.json").is_file()

    evaluated = cli(tmp_path, "eval", "stopped", "--checkpoint", "latest", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert '"accuracy"' in evaluated.stdout
    resumed = cli(tmp_path, *stopped.stdout.strip().split("resume with: etappe ")[1].split())  # the command it named
    assert resumed.returncode == 0, resumed.stderr

    straight = fit_run(tmp_path, "straight", 2, "cnn")
    assert straight.returncode == 0, straight.stderr
    assert_equal(latest_model(tmp_path / "stopped"), latest_model(tmp_path / "straight"))
    final = cli(tmp_path, "eval", "stopped", "--json")
    assert final.returncode == 0 and repr(eval_json(final)["loss"]) in straight.stdout, (final.stdout, straight.stdout)


def eval_json(out: subprocess.CompletedProcess) -> dict:
    import json

    return json.loads(out.stdout)


@pytest.mark.slow
def test_a_fit_run_of_a_custom_module_gets_the_python_hint_and_its_eval_command_works(tmp_path):
    stopped = fit_run(tmp_path, "custom", 2, "custom", "term")
    assert stopped.returncode == 75, stopped.stderr
    message = stopped.stdout.strip()
    assert "resume in Python: call the same etappe.fit(..., run_dir='custom')" in message, message
    assert "resume with: etappe resume" not in message and "None" not in message
    assert not (tmp_path / "custom" / "config.json").exists()

    refused = cli(tmp_path, "resume", "custom")
    assert refused.returncode == 2 and "resume it in Python" in refused.stderr, refused.stderr
    evaluated = cli(tmp_path, "eval", "custom", "--model", "mynet:Net", "--input-shape", "1,8,8", "--data", "digits")
    assert evaluated.returncode == 0, evaluated.stderr
    resumed = fit_run(tmp_path, "custom", 2, "custom")  # what the hint says: the same call again
    assert resumed.returncode == 0, resumed.stderr
    straight = fit_run(tmp_path, "custom-straight", 2, "custom")
    assert_equal(latest_model(tmp_path / "custom"), latest_model(tmp_path / "custom-straight"))


@pytest.mark.slow
def test_a_fit_run_of_a_named_factory_resumes_from_the_cli_with_that_name(tmp_path):
    stopped = fit_run(tmp_path, "named", 2, "named", "term")
    assert stopped.returncode == 75, stopped.stderr
    assert stopped.stdout.strip().endswith("resume with: etappe resume named --model mynet:Net"), stopped.stdout
    resumed = cli(tmp_path, "resume", "named", "--model", "mynet:Net")
    assert resumed.returncode == 0, resumed.stderr
    straight = fit_run(tmp_path, "named-straight", 2, "named")
    assert_equal(latest_model(tmp_path / "named"), latest_model(tmp_path / "named-straight"))


def test_a_trainer_without_a_run_folder_stopped_by_sigterm_says_nothing_was_saved(tmp_path):
    stopped = fit_run(tmp_path, "none", 200, "cnn", "term")
    assert stopped.returncode == 75, stopped.stderr
    message = stopped.stdout.strip()
    assert "nothing was saved, as this Trainer has no run_dir" in message, message
    assert "None" not in message and "etappe resume" not in message


def test_fit_refuses_a_model_name_that_builds_other_layers(tmp_path):
    from etappe.data import load_dataset
    from etappe.models import build

    data = load_dataset("digits")
    model = build("mlp", data.spec.input_shape, data.spec.num_outputs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UsageError, match="model_name='cnn'.*other layers"):
        etappe.fit(model, data, epochs=1, optimizer=optimizer, loss_fn=torch.nn.CrossEntropyLoss(),
                   run_dir=str(tmp_path / "r"), model_name="cnn", progress=False, quiet=True)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(["linear", "sine-mlp", "mlp", "cnn"]), channels=st.integers(1, 3),
       side=st.integers(4, 12), outputs=st.integers(1, 12), hidden=st.integers(1, 600))
def test_fit_recognises_a_built_in_model_by_its_layers_and_nothing_else(name, channels, side, outputs, hidden):
    """The rule fit uses to name a model for config.json: a built-in model with its default arguments is known as
    that name (or a name that builds the very same layers); one with other arguments, or resized, is not."""
    from types import SimpleNamespace

    from etappe.loop import _builds
    from etappe.models import MODELS, build

    spec = SimpleNamespace(input_shape=(channels, side, side), num_outputs=outputs)
    model = build(name, spec.input_shape, outputs)
    recognised = [n for n in MODELS if _builds(n, spec, model)]
    assert name in recognised
    assert all(repr(build(n, spec.input_shape, outputs)) == repr(model) for n in recognised)
    other = build("mlp", spec.input_shape, outputs, hidden=hidden)
    assert _builds("mlp", spec, other) == (hidden == 512)
    resized = SimpleNamespace(input_shape=spec.input_shape, num_outputs=outputs + 1)
    assert not _builds(name, resized, model)


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(["cross-entropy", "mse", "l1", "bce"]), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_fit_takes_a_loss_as_the_clis_only_with_its_default_settings(kind, reduction):
    from etappe.build import LOSSES
    from etappe.loop import _default_like

    assert _default_like(LOSSES[kind]())
    assert _default_like(LOSSES[kind](reduction=reduction)) == (reduction == "mean")
