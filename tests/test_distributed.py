"""DDP through torchrun, on CPU with gloo, two real processes: accuracy, one set of logs, exact resume after a
rank is killed, and checkpoints that move between world sizes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_resume import assert_same_run, committed, final_state, wait_for

ARGS = ["--data", "digits", "--model", "cnn", "--batch-size", "32", "--lr", "5e-3"]


def torchrun(*args: str, cwd: Path, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(nproc, args), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def torchrun_cmd(nproc: int, args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "etappe", "train", *args]


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def accuracy(stdout: str) -> float:
    return float(stdout.strip().splitlines()[-1].split("test accuracy ")[1].split("%")[0])


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ddp")
    result = torchrun(*ARGS, "--epochs", "8", "--run-dir", "run", "--save-every", "9", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result


def test_two_ranks_match_one_process_and_log_once(two_rank_run, tmp_path):
    cwd, result = two_rank_run
    single = run_cli("train", *ARGS, "--epochs", "8", "--run-dir", "single", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    assert abs(accuracy(result.stdout) - accuracy(single.stdout)) <= 1.0, (result.stdout, single.stdout)
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("Epoch ")]
    assert [line.split(" |")[0] for line in epoch_lines] == [f"Epoch {i}/8" for i in range(1, 9)]
    assert result.stdout.count("Test loss") == 1
    rows = (cwd / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 8
    assert not list(cwd.glob("run*/**/*rank1*"))


def test_checkpoint_has_no_ddp_prefix_and_every_ranks_random_state(two_rank_run):
    cwd, _ = two_rank_run
    state = final_state(cwd / "run")
    assert all(not name.startswith("module.") for name in state["model"])
    ranks = state["per_rank"]["ranks"]
    assert len(ranks) == 2
    for part in ranks:
        assert {"rng", "samples_in_epoch", "loss_sum_in_epoch"} <= set(part) and part["rng"]["torch"].numel() > 0


def test_killed_rank_then_resume_on_two_ranks_is_bit_exact(two_rank_run, tmp_path):
    ref_cwd, _ = two_rank_run
    args = [*ARGS, "--epochs", "8", "--run-dir", "run", "--save-every", "9"]
    proc = subprocess.Popen(torchrun_cmd(2, args), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    run_dir = tmp_path / "run"
    assert wait_for(lambda: len(committed(run_dir)) >= 2, proc, timeout=300)
    time.sleep(0.3)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)  # one rank dies; torchrun takes the job down
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    resumed = torchrun(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming" in resumed.stdout
    assert_same_run(final_state(run_dir), final_state(ref_cwd / "run"))


def test_two_rank_checkpoint_is_evaluated_exported_and_resumed_by_one_process(two_rank_run, tmp_path):
    cwd, result = two_rank_run
    out = run_cli("eval", str(cwd / "run"), "--checkpoint", "latest", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert round(100 * json.loads(out.stdout)["accuracy"], 2) == accuracy(result.stdout)
    exported = run_cli("export", str(cwd / "run"), "--format", "torchscript", "--out", str(tmp_path / "m.pt"),
                       cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(cwd / "run"), str(copy)], check=True)
    resumed = run_cli("train", "--run-dir", str(copy), "--epochs", "9", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "not bit-exact" in resumed.stderr
    assert len((copy / "metrics.jsonl").read_text().splitlines()) == 9


def test_one_process_checkpoint_is_resumed_on_two_ranks(tmp_path):
    assert run_cli("train", *ARGS, "--epochs", "2", "--run-dir", "run", "--quiet", cwd=tmp_path).returncode == 0
    resumed = torchrun(*ARGS, "--epochs", "3", "--run-dir", "run", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming" in resumed.stdout and resumed.stderr.count("not bit-exact") == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[2]["train_loss"] < rows[0]["train_loss"]
