"""DDP through torchrun, on CPU with gloo, two real processes: accuracy, one set of logs, exact resume after a
rank is killed, and checkpoints that move between world sizes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from etappe import models
from etappe.checkpoint import CheckpointStore, CheckpointWarning, load
from tests.conftest import run_cli
from tests.test_resume import assert_same_run, committed, final_state, wait_for

ARGS = ["--data", "digits", "--model", "cnn", "--batch-size", "32", "--lr", "5e-3"]


# A worker that crashes inside torch prints every thread's Python stack (faulthandler), so a failure says where.
def worker_env() -> dict[str, str]:
    return {**os.environ, "PYTHONFAULTHANDLER": "1"}


def torchrun(*args: str, cwd: Path, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(nproc, args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=worker_env())


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


def rank_of(pid: int) -> int:
    environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=")[1])


def accuracy(stdout: str) -> float:
    return float(stdout.strip().splitlines()[-1].split("test accuracy ")[1].split("%")[0])


def eight_epochs_on_two_ranks(tmp_path_factory, name: str, args: list[str]):
    """A finished 2-rank run (checkpoints every 9 steps) in a new folder: (that folder, torchrun's result)."""
    cwd = tmp_path_factory.mktemp(name)
    result = torchrun(*args, "--epochs", "8", "--run-dir", "run", "--save-every", "9", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, result


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    return eight_epochs_on_two_ranks(tmp_path_factory, "ddp", ARGS)


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


def kill_a_rank_and_resume(args: list[str], rank: int, cwd: Path) -> Path:
    """Start the 2-rank run, SIGKILL ``rank`` once two checkpoints are committed, resume on 2 ranks; the run dir."""
    proc = subprocess.Popen(torchrun_cmd(2, args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=worker_env())
    run_dir = cwd / "run"
    assert wait_for(lambda: len(committed(run_dir)) >= 2, proc, timeout=300)
    time.sleep(0.3)
    workers = {rank_of(pid): pid for pid in children(proc.pid)}
    assert sorted(workers) == [0, 1], workers
    os.kill(workers[rank], signal.SIGKILL)  # one rank dies; torchrun takes the job down
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    resumed = torchrun(*args, cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming" in resumed.stdout
    return run_dir


def test_killed_rank_then_resume_on_two_ranks_is_bit_exact(two_rank_run, tmp_path):
    run_dir = kill_a_rank_and_resume([*ARGS, "--epochs", "8", "--run-dir", "run", "--save-every", "9"], 1, tmp_path)
    assert_same_run(final_state(run_dir), final_state(two_rank_run[0] / "run"))


def eval_export_and_resume_in_one_process(run, tmp_path: Path) -> list[dict]:
    """A 2-rank run's checkpoint in one process: eval gives the run's own test accuracy, export works, training
    resumes (saying it is not bit-exact) for a 9th epoch. Returns the resumed run's metric rows."""
    cwd, result = run
    out = run_cli("eval", str(cwd / "run"), "--checkpoint", "latest", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert round(100 * json.loads(out.stdout)["accuracy"], 2) == accuracy(result.stdout)
    exported = run_cli("export", str(cwd / "run"), "--format", "torchscript", "--out", str(tmp_path / "m.pt"),
                       cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    copy = tmp_path / "run"
    shutil.copytree(cwd / "run", copy)
    resumed = run_cli("train", "--run-dir", str(copy), "--epochs", "9", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "not bit-exact" in resumed.stderr
    return [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]


def test_two_rank_checkpoint_is_evaluated_exported_and_resumed_by_one_process(two_rank_run, tmp_path):
    assert len(eval_export_and_resume_in_one_process(two_rank_run, tmp_path)) == 9


def test_one_process_checkpoint_is_resumed_on_two_ranks(tmp_path):
    assert run_cli("train", *ARGS, "--epochs", "2", "--run-dir", "run", "--quiet", cwd=tmp_path).returncode == 0
    resumed = torchrun(*ARGS, "--epochs", "3", "--run-dir", "run", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming" in resumed.stdout and resumed.stderr.count("not bit-exact") == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[2]["train_loss"] < rows[0]["train_loss"]


# ---------------------------------------------------------------- FSDP2: sharded state through DCP

FSDP = [*ARGS, "--strategy", "fsdp"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    return eight_epochs_on_two_ranks(tmp_path_factory, "fsdp", FSDP)


def test_fsdp_trains_like_ddp_and_writes_every_ranks_shards_into_the_checkpoint(fsdp_run, two_rank_run, tmp_path):
    cwd, result = fsdp_run
    assert abs(accuracy(result.stdout) - accuracy(two_rank_run[1].stdout)) <= 1.0, (result.stdout, two_rank_run[1].stdout)
    assert result.stdout.count("Test loss") == 1 and result.stdout.count("Epoch 8/8") == 1
    latest = CheckpointStore(cwd / "run" / "checkpoints").latest()
    listed = json.loads((latest / "manifest.json").read_text())["files"]
    shard_files = sorted(name.split("/")[1] for name in listed if name.startswith("shards-"))
    assert shard_files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert len(list(latest.glob("shards-*"))) == 1  # an overwritten step keeps only its new shards
    state = final_state(cwd / "run")  # read whole, in this process alone
    plain = models.build("cnn", (1, 8, 8), 10)
    assert {k: v.shape for k, v in state["model"].items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert set(state["optimizer"]["state"]) == set(dict(plain.named_parameters()))
    weights = load_file(str(cwd / "run" / "model.safetensors"))  # gathered from the shards at the end
    assert all(torch.equal(weights[k], state["model"][k]) for k in weights)
    shown = run_cli("inspect", str(latest), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert f"model: CNN state_dict, {sum(p.numel() for p in plain.parameters()):,} parameters" in shown.stdout
    assert "optimizer: Adam, state for 6 params (18 tensors" in shown.stdout and "conv1.weight\t[8, 1, 3, 3]" in shown.stdout

    copy = tmp_path / "run"
    shutil.copytree(cwd / "run", copy)
    bad = next((copy / "checkpoints" / latest.name).glob("shards-*/__1_0.distcp"))
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 1
    bad.write_bytes(bytes(data))
    out = run_cli("verify", str(copy), cwd=tmp_path)
    assert out.returncode != 0 and "__1_0.distcp" in out.stdout + out.stderr
    with pytest.warns(CheckpointWarning, match="checksum mismatch"):
        assert CheckpointStore(copy / "checkpoints").latest().name < latest.name  # falls back to the one before


def test_fsdp_killed_rank_then_resume_on_two_ranks_is_bit_exact(fsdp_run, tmp_path):
    # rank 0, the one that commits
    run_dir = kill_a_rank_and_resume([*FSDP, "--epochs", "8", "--run-dir", "run", "--save-every", "9"], 0, tmp_path)
    assert_same_run(final_state(run_dir), final_state(fsdp_run[0] / "run"))


def test_fsdp_checkpoint_reshards_into_one_process_for_eval_export_and_resume(fsdp_run, tmp_path):
    rows = eval_export_and_resume_in_one_process(fsdp_run, tmp_path)
    assert len(rows) == 9 and rows[8]["train_loss"] < rows[7]["train_loss"] * 1.5

    # into a plain model and Adam: the same numbers as the shards hold, the optimizer state by position
    latest = CheckpointStore(fsdp_run[0] / "run" / "checkpoints").latest()
    whole = load(latest)
    model = models.build("cnn", (1, 8, 8), 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    load(latest, model=model, optimizer=optimizer)
    for k, v in model.state_dict().items():
        assert torch.equal(v, whole["model"][k]), k
    for i, (name, _) in enumerate(model.named_parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state_dict()["state"][i][key], whole["optimizer"]["state"][name][key])


def test_one_process_checkpoint_resumes_sharded_on_two_ranks(tmp_path):
    assert run_cli("train", *FSDP, "--epochs", "2", "--run-dir", "run", "--quiet", cwd=tmp_path).returncode == 0
    before = final_state(tmp_path / "run")
    resumed = torchrun(*FSDP, "--epochs", "3", "--run-dir", "run", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming" in resumed.stdout and resumed.stderr.count("not bit-exact") == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[2]["train_loss"] < rows[1]["train_loss"]
    after = final_state(tmp_path / "run")
    assert list((CheckpointStore(tmp_path / "run" / "checkpoints").latest()).glob("shards-*"))
    # Adam continued from the saved moments: its step count went on from there, it did not start again
    steps = {float(s["step"]) for s in after["optimizer"]["state"].values()}
    assert steps == {float(before["optimizer"]["state"][0]["step"]) + after["progress"]["step"] - before["progress"]["step"]}
