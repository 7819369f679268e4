"""Issue 13's options resume exactly: bf16 autocast, gradient accumulation (killed inside a window too), EMA,
warm-up and torch.compile, each killed with SIGKILL at random moments or stopped by SIGTERM mid-window, or trained
in two stages, and ending bit-identical to a run never interrupted. Real subprocesses, real signals, real files."""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from etappe import Trainer
from etappe.checkpoint import CheckpointStore, load
from etappe.data.sets import digits
from etappe.errors import UsageError
from tests.conftest import run_cli
from tests.test_resume import TIMING_KEYS, assert_same_run, committed, final_state, kill_all, start, wait_for

BATCH, ACCUMULATE = 64, 4
BATCHES = math.ceil(len(digits().train) / BATCH)  # per epoch: 23, so an epoch ends in a short window of 3
# The built-in MLP with a hook that counts its training forwards in a file, and pauses 2 s at the one the test
# chose: the test then knows which micro-batch of which window a run is in, and signals it there.
COUNTED = ["--data", "digits", "--batch-size", str(BATCH), "--model", "counted:counted_mlp"]
COUNTED_MODULE = textwrap.dedent('''
    import os
    import time
    from etappe.models import mlp

    def counted_mlp(input_shape, num_outputs):
        model = mlp(input_shape, num_outputs)
        path, pause_at = os.environ.get("FORWARDS_FILE"), int(os.environ.get("FORWARDS_PAUSE_AT", "0"))
        if path:
            fd, seen = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), [0]

            def count(module, args):
                if module.training:
                    os.write(fd, b".")  # unbuffered: what a SIGKILL leaves is what ran
                    seen[0] += 1
                    if seen[0] == pause_at:
                        time.sleep(2)

            model.register_forward_pre_hook(count)
        return model
''')
ACC = ["--accumulate", str(ACCUMULATE)]
CASES = {
    "bf16": [*COUNTED, "--precision", "bf16-mixed", "--save-every", "5"],
    "accumulate4": [*COUNTED, *ACC, "--save-every", "2"],
    "accumulate4-bf16-ema-warmup": [*COUNTED, *ACC, "--precision", "bf16-mixed", "--ema", "0.9", "--warmup-steps", "5",
                                    "--scheduler", "step", "--save-every", "2"],
    "compile": [*COUNTED, "--compile", "--save-every", "5"],
}
# compared by assert_same_run, or (config: the epochs asked for) allowed to differ
ENTRIES = {"model", "optimizer", "progress", "history", "per_rank", "config"}


def workdir(path: Path) -> Path:
    """A folder to run in, holding the counting model's module (``python -m`` imports from the current folder)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "counted.py").write_text(COUNTED_MODULE)
    return path


def assert_same_modern_run(a: dict, b: dict) -> None:
    """assert_same_run, and every other entry of the checkpoints as well: the schedulers (etappe's warm-up among
    them), the EMA weights, the gradient scaler; tensors bit for bit."""
    assert_same_run(a, b)
    assert set(a) == set(b), f"entries in one checkpoint only: {sorted(set(a) ^ set(b))}"
    for name in sorted(set(a) - ENTRIES):
        assert set(a[name]) == set(b[name]), name
        for key, x in a[name].items():
            y = b[name][key]
            if torch.is_tensor(x):
                assert torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y), f"{name}.{key}"
            else:
                assert x == y, f"{name}.{key}: {x!r} != {y!r}"


def compared(state: dict) -> dict:
    """What assert_same_modern_run compares of a checkpoint, as one nested value."""
    progress = ("epoch", "step", "batches_done_in_epoch", "best_metric", "epochs_without_improvement")
    return {"model": state["model"], "optimizer": state["optimizer"],
            "progress": {key: state["progress"][key] for key in progress},
            "history": [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in state["history"]["epochs"]],
            "per_rank": [{**{k: v for k, v in rank.items() if k != "rng"}, "rng": rank["rng"]["torch"]}
                         for rank in state["per_rank"]["ranks"]],
            **{name: state[name] for name in set(state) - ENTRIES}}


def assert_same_but_float_values(x, y, where: str = "") -> None:
    """assert_equal, except that floating-point values may differ (tensors by dtype and shape, Python floats by
    type): all that a rounding difference can change. Keys, lengths, counters, random states and every other
    value equal."""
    if torch.is_tensor(x):
        assert torch.is_tensor(y) and x.dtype == y.dtype and x.shape == y.shape, where
        assert x.is_floating_point() or torch.equal(x, y), where
    elif isinstance(x, float):
        assert isinstance(y, float), f"{where}: {x!r} != {y!r}"
    elif isinstance(x, dict):
        assert isinstance(y, dict) and set(x) == set(y), f"{where}: keys in one only: {sorted(set(x) ^ set(y))}"
        for k in x:
            assert_same_but_float_values(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert isinstance(y, (list, tuple)) and len(x) == len(y), f"{where}: lengths differ"
        for i, (u, v) in enumerate(zip(x, y)):
            assert_same_but_float_values(u, v, f"{where}[{i}]")
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A case's uninterrupted run of 3 or 6 epochs, made when a test first asks for it, and checked to hold what
    its options promise (so that two runs are not equal for want of the option). Returns (state, cwd)."""
    done: dict[tuple[str, int], tuple[dict, Path]] = {}

    def get(case: str, epochs: int, *, again: bool = False) -> tuple[dict, Path]:
        if (case, epochs) not in done or again:  # again: one more uninterrupted run, kept if it disagrees
            cwd = workdir(tmp_path_factory.mktemp(f"ref-{case}-{epochs}"))
            result = run_cli("train", *CASES[case], "--epochs", str(epochs), "--run-dir", "run", "--quiet", cwd=cwd)
            assert result.returncode == 0, result.stderr
            state, args = final_state(cwd / "run"), CASES[case]
            assert ("ema" in state) == ("--ema" in args) and ("warmup" in state) == ("--warmup-steps" in args)
            assert not any(k.startswith("_orig_mod.") for k in state["model"])
            if "--ema" in args:
                assert {r["val_weights"] for r in state["history"]["epochs"]} == {"ema"}
                assert not all(torch.equal(state["ema"][k], v) for k, v in state["model"].items())
            if again:
                return state, cwd
            done[case, epochs] = state, cwd
        return done[case, epochs]

    get.replace = lambda case, epochs, run: done.__setitem__((case, epochs), run)
    return get


def assert_same_as_straight(state: dict, reference, case: str, epochs: int) -> None:
    """assert_same_modern_run against the case's uninterrupted run. When they differ, one more uninterrupted run
    tells the two causes apart: equal to the first, the resumed run went wrong (fail); equal to the resumed one,
    the first uninterrupted run was a process that took another rounding path on a busy CPU (README: not yet
    promised), and the new one stands as the reference from then on. Two uninterrupted runs that differ fail too.
    bf16-mixed cases (issue 13's open question): a difference the third run cannot explain is reported as an
    expected failure, and only that; every other check of the test still fails it."""
    first = reference(case, epochs)[0]
    try:
        assert_same_modern_run(state, first)
    except AssertionError as difference:
        again_run = reference(case, epochs, again=True)
        again = again_run[0]
        try:
            assert_same_modern_run(again, first)
        except AssertionError:
            straight_runs_agree = False
        else:
            straight_runs_agree = True
        if straight_runs_agree:
            _unexplained(case, f"two uninterrupted runs agree; the resumed one does not: {difference}", difference,
                         state, [first])
        try:
            assert_same_modern_run(state, again)
        except AssertionError:
            _unexplained(case, f"two uninterrupted runs of {case} differ, and the resumed run equals neither: "
                               f"{difference}", difference, state, [first, again])
        reference.replace(case, epochs, again_run)
        warnings.warn(f"an uninterrupted {case} run took another rounding path (busy CPU, README); the resumed run "
                      "equals a second uninterrupted run", stacklevel=2)


def _unexplained(case: str, message: str, difference: AssertionError, state: dict, references: list[dict]) -> None:
    """Fail; or, for a bf16-mixed case whose runs differ in floating-point values only (every key, counter, random
    state and integer equal), report the expected failure of issue 13's open question."""
    if "--precision" in CASES[case] and "bf16-mixed" in CASES[case]:
        for ref in references:
            assert_same_but_float_values(compared(state), compared(ref), "resumed vs uninterrupted")
        pytest.xfail(f"bf16-mixed on this CPU, issue 13 open: {message}")
    raise AssertionError(message) from difference


def size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def resume_point(run_dir: Path) -> int:
    """The batch, counted from the run's first, that a run started now begins with."""
    if CheckpointStore(run_dir / "checkpoints").latest() is None:
        return 0
    p = final_state(run_dir)["progress"]
    return p["epoch"] * BATCHES + p["batches_done_in_epoch"]


def inside_window(batch: int) -> bool:
    """Whether a run whose last forward begun was that of ``batch`` (counted from the run's first) holds accumulated
    gradients whose optimizer step is not taken: one micro-batch of its window at least is done, and it is not the
    window's last."""
    i = batch % BATCHES
    return 0 < i % ACCUMULATE < ACCUMULATE - 1 and i < BATCHES - 1


def window_end(batch: int) -> tuple[int, int]:
    """(epoch, batches_done_in_epoch) once the window holding ``batch`` has had its optimizer step."""
    epoch, i = divmod(batch, BATCHES)
    return epoch, min((i // ACCUMULATE + 1) * ACCUMULATE, BATCHES)


def kill_once(moment: str, args: list[str], cwd: Path, rng: random.Random, monkeypatch) -> tuple[bool, bool]:
    """Start (or resume) the run in ``cwd`` and SIGKILL it, with all it started, at ``moment``: "window", paused at
    a random micro-batch inside a window two to five windows on, the gradients of the window's earlier micro-batches
    accumulated; "commit", a random moment up to 0.5 s after it committed a checkpoint; "write", while it writes one
    (or just after, if the write was too quick to see); "epoch", when it has written an epoch's metrics row.
    Returns whether the kill landed before the run finished, and whether it landed at the window chosen."""
    run_dir = cwd / "run"
    folder, metrics, rows = run_dir / "checkpoints", run_dir / "metrics.jsonl", lines(run_dir / "metrics.jsonl")
    before = {p.name for p in committed(run_dir)}
    forwards = cwd / f"forwards-{len(list(cwd.glob('forwards-*')))}"
    monkeypatch.setenv("FORWARDS_FILE", str(forwards))
    first = resume_point(run_dir)
    accumulating = "--accumulate" in args  # else any forward: the kill falls between a forward and its backward
    target = rng.choice([n for n in range(2 * ACCUMULATE + 1, 5 * ACCUMULATE + 1)
                         if not accumulating or inside_window(first + n - 1)])
    monkeypatch.setenv("FORWARDS_PAUSE_AT", str(target if moment == "window" else 0))

    def new_commit() -> bool:
        return bool({p.name for p in committed(run_dir)} - before)

    ready, delay = {
        "window": (lambda: size(forwards) >= target, 0.0),
        "commit": (new_commit, 0.5),
        "write": (lambda: new_commit() or folder.is_dir() and any(p.name.startswith(".tmp-") for p in folder.iterdir()),
                  0.0),
        "epoch": (lambda: lines(metrics) > rows, 0.0),
    }[moment]
    proc = start(args, cwd)
    try:
        hit = wait_for(ready, proc)
        time.sleep(rng.uniform(0, delay))
    finally:
        kill_all(proc)
        proc.communicate()
    killed = hit and proc.returncode == -signal.SIGKILL
    return killed, killed and moment == "window" and size(forwards) == target


# bf16-mixed on this CPU (oneDNN, AMX): most runs resume bit-exact, but some processes have taken another, equally
# deterministic rounding path for the first layer's weights (2 of 8 runs with --async-save in one attack pass on a
# loaded machine; none of about 80 on 2026-12-02). Issue 13 stays open on it: in these cases only a difference of
# the final weights that one more uninterrupted run cannot explain is an expected failure (_unexplained).
@pytest.mark.parametrize("case", ["bf16", "accumulate4", "accumulate4-bf16-ema-warmup",
                                  pytest.param("compile", marks=pytest.mark.slow)])  # compiles in every process
def test_sigkill_at_random_moments_then_resume_is_bit_exact(case, reference, scratch, monkeypatch):
    cwd = workdir(scratch)
    rng = random.Random(f"{case}-{os.getpid()}")
    args = [*CASES[case], "--epochs", "3", "--run-dir", "run"]
    moments = ["window", "window", "write", "window", "commit", "epoch"]  # a pause at a chosen forward lands
    landed = [(moment, *kill_once(moment, args, cwd, rng, monkeypatch)) for moment in moments]
    print(f"kills (moment, landed, inside its window): {landed}")
    monkeypatch.delenv("FORWARDS_FILE")
    finished = run_cli("train", *args, "--quiet", cwd=cwd)
    assert finished.returncode == 0, finished.stderr
    assert sum(killed for _, killed, _ in landed) >= 5, f"too few kills landed before the run finished: {landed}"
    assert all(inside for moment, killed, inside in landed if moment == "window" and killed), \
        f"a kill missed its window: {landed}"
    assert_same_as_straight(final_state(cwd / "run"), reference, case, 3)


def test_sigterm_mid_window_finishes_the_window_saves_and_resumes_exactly(reference, scratch, monkeypatch):
    cwd = workdir(scratch)
    forwards = cwd / "forwards"
    target = random.Random(os.getpid()).choice([n for n in range(BATCHES, 2 * BATCHES) if inside_window(n - 1)])
    monkeypatch.setenv("FORWARDS_FILE", str(forwards))
    monkeypatch.setenv("FORWARDS_PAUSE_AT", str(target))  # it waits there 2 s, inside a window, for the signal
    args = [*CASES["accumulate4"], "--epochs", "3", "--run-dir", "run"]
    proc = start(args, cwd)
    assert wait_for(lambda: size(forwards) >= target, proc)
    proc.send_signal(signal.SIGTERM)
    signalled_at = size(forwards) - 1  # the batch whose forward had begun when the signal was sent
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    assert "resume with: etappe resume" in stderr and "Traceback" not in stderr
    assert signalled_at == target - 1 and inside_window(signalled_at)
    p = load(CheckpointStore(cwd / "run" / "checkpoints").latest())["progress"]
    assert (p["epoch"], p["batches_done_in_epoch"]) == window_end(signalled_at)  # the window's step, then the save
    assert p["batches_done_in_epoch"] % ACCUMULATE == 0 or p["batches_done_in_epoch"] == BATCHES
    assert size(forwards) == p["epoch"] * BATCHES + p["batches_done_in_epoch"]  # and not one forward more
    monkeypatch.delenv("FORWARDS_FILE")
    resumed = run_cli("resume", "run", "--trust", "--quiet", cwd=cwd)  # --trust: the config names counted.py's model
    assert resumed.returncode == 0, resumed.stderr
    assert_same_as_straight(final_state(cwd / "run"), reference, "accumulate4", 3)


@pytest.mark.parametrize("case, command", [
    # every option but compile at once, to keep the default run short
    ("accumulate4-bf16-ema-warmup", "train"),
    ("compile", "resume"),
    pytest.param("bf16", "resume", marks=pytest.mark.slow),
    pytest.param("accumulate4", "train"),  # the same options in fp32, where the promise holds
])
def test_three_epochs_then_six_equals_six_straight(case, command, reference, scratch):
    shutil.copytree(reference(case, 3)[1] / "run", scratch / "staged")  # stage one: the three-epoch reference run
    cwd = workdir(scratch)
    # resume: --trust, since the run's config names the test's counting model (counted.py)
    more = ["train", *CASES[case], "--run-dir", "staged"] if command == "train" else ["resume", "staged", "--trust"]
    second = run_cli(*more, "--epochs", "6", "--quiet", cwd=cwd)
    assert second.returncode == 0, second.stderr
    staged = final_state(cwd / "staged")
    assert [r["epoch"] for r in staged["history"]["epochs"]] == [1, 2, 3, 4, 5, 6]
    assert_same_as_straight(staged, reference, case, 6)


def test_python_api_refuses_fp16_on_cpu_and_a_step_fn_with_accumulation():
    model = nn.Linear(4, 2)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), train_data=data,
                      precision="16-mixed", device="cpu", quiet=True)
    with pytest.raises(UsageError) as fp16:
        trainer.fit(1)
    assert "bf16-mixed" in str(fp16.value) and "\n" not in str(fp16.value)
    with pytest.raises(UsageError) as accumulating:
        Trainer(model, train_data=data, step_fn=lambda batch: {"loss": 0.0}, accumulate=2, quiet=True)
    assert "accumulate" in str(accumulating.value) and "\n" not in str(accumulating.value)


@pytest.mark.parametrize("flag, value", [("--ema", "1.5"), ("--accumulate", "0"), ("--precision", "fp8")])
def test_a_bad_option_value_is_a_one_line_error(flag, value, tmp_path):
    result = run_cli("train", "--data", "digits", "--epochs", "1", "--run-dir", "run", flag, value, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and value in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_the_expected_failure_rule_excuses_floating_point_values_and_nothing_else():
    """The rule behind bf16's expected failure (assert_same_but_float_values): runs that differ in a float tensor's
    values or a float metric pass it; a key, a counter, a random state, an integer tensor, a dtype or a shape
    that differs fails it."""
    state = {"model": {"w": torch.ones(2, 3), "n": torch.tensor([1, 2])}, "progress": {"step": 5, "loss": 0.25},
             "rng": torch.zeros(4, dtype=torch.uint8), "rows": [{"epoch": 1, "loss": 0.5}]}

    def changed(path, value):
        other = {k: (dict(v) if isinstance(v, dict) else v) for k, v in state.items()}
        other["rows"] = [dict(r) for r in state["rows"]]
        where = other
        for key in path[:-1]:
            where = where[key]
        where[path[-1]] = value
        return other

    for path, value in [(("model", "w"), torch.full((2, 3), 1.5)), (("progress", "loss"), 0.26),
                        (("rows", 0, "loss"), 0.0)]:
        assert_same_but_float_values(state, changed(path, value))
    for path, value in [(("model", "n"), torch.tensor([1, 3])), (("progress", "step"), 6), (("rng",), torch.ones(4, dtype=torch.uint8)),
                        (("model", "w"), torch.ones(3, 2)), (("model", "w"), torch.ones(2, 3, dtype=torch.float64)),
                        (("rows", 0, "epoch"), 2), (("progress", "extra"), 1), (("rows",), [])]:
        with pytest.raises(AssertionError):
            assert_same_but_float_values(state, changed(path, value))
