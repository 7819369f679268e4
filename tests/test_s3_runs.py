"""Runs on s3:// (moto's S3 emulator as a real subprocess): trained, killed with SIGKILL at random moments, resumed
bit-identical to the same run on a local disk; eval, inspect, verify and export on such a run; and every URL etappe
cannot honour refused in one line, before anything is created."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etappe import cli, rundir
from etappe.checkpoint import load
from etappe.errors import UsageError
from tests.conftest import run_cli
from tests.test_resume import assert_same_run, kill_all, wait_for

# The smallest run that still means something: a linear model on digits, 23 steps an epoch, a checkpoint every 3
# optimizer steps, so uploads are frequent and a random kill often lands in one.
ARGS = ["--data", "digits", "--model", "linear", "--epochs", "3", "--batch-size", "64", "--save-every", "3",
        "--quiet"]
TWO_EPOCHS = [*ARGS, "--epochs", "2"]  # 46 steps: checkpoints 45 and 46 kept (keep_last 2)
# The run killed sixteen times: 12 epochs, 92 commits. A try can use several commits before its kill lands (the kill
# waits for an upload it can see, or sleeps after a commit), and a try that finds the run finished cannot land; with
# 3 epochs (23 commits) only 8 of 16 kills landed on a loaded machine.
LONG = [*ARGS, "--epochs", "12"]
REFUSED = ["gs://x/run", "http://example.com/run", "s3:/b/run", "s3://", "file:///tmp/run", " s3://b/run", "s3://b/run "]


# ---------------------------------------------------------------- the rule: what is a URL, what is a path


@settings(max_examples=300, deadline=None)
@given(scheme=st.from_regex(r"[a-z][a-z0-9+.\-]{1,8}", fullmatch=True),
       rest=st.from_regex(r"[a-z0-9][a-z0-9\-/]{0,20}", fullmatch=True))
def test_a_url_with_one_slash_is_refused_and_never_a_path(scheme, rest):
    with pytest.raises(UsageError, match="slash missing"):
        rundir.location(f"{scheme}:/{rest}")


@settings(max_examples=300, deadline=None)
@given(name=st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), min_size=1, max_size=30))
def test_a_string_that_is_no_url_stays_a_local_path(name):
    if rundir.looks_like_url(name.strip()):
        return  # covered by the URL tests (a URL with white space around it is refused)
    assert rundir.location(name) == Path(name)
    assert rundir.location(Path(name)) == Path(name)  # a Path is always a path, whatever its text


@settings(max_examples=200, deadline=None)
@given(bucket=st.from_regex(r"[a-z0-9][a-z0-9\-]{2,20}[a-z0-9]", fullmatch=True),
       parts=st.lists(st.from_regex(r"[A-Za-z0-9_\-]{1,12}", fullmatch=True), max_size=4),
       slash=st.booleans())
def test_an_s3_url_is_kept_as_text_and_joins_by_slashes(bucket, parts, slash):
    url = "/".join([f"s3://{bucket}", *parts]) + ("/" if slash and parts else "")
    loc = rundir.location(url)
    assert loc == url.rstrip("/") and rundir.is_url(loc)
    assert rundir.join(loc, "checkpoints", "x") == f"{loc}/checkpoints/x"


def test_windows_drives_and_plain_names_are_paths():
    for text in ("C:/runs/a", "C:\\runs", "runs/s3", "s3", "./s3:/b/run", "a:b"):
        assert rundir.location(text) == Path(text)


# ---------------------------------------------------------------- refusals, in one line, creating nothing


@pytest.mark.parametrize("url", REFUSED)
def test_urls_etappe_cannot_honour_are_refused_by_every_command_and_create_nothing(url, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in (["train", "--run-dir", url, "--epochs", "1"], ["resume", url], ["eval", url], ["inspect", url],
                 ["verify", url], ["export", url, "--format", "safetensors"], ["plot", url],
                 ["predict", url, "x.npy"]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("etappe: error:") and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert list(tmp_path.iterdir()) == []  # no folder named "gs:" or "s3:" appeared


@pytest.mark.parametrize("url", REFUSED)
def test_the_python_entry_points_refuse_them_too(url, tmp_path, monkeypatch):
    import torch

    import etappe

    monkeypatch.chdir(tmp_path)
    net = torch.nn.Linear(2, 1)
    calls = [lambda: etappe.TrainConfig(run_dir=url),
             lambda: etappe.Trainer(net, torch.optim.SGD(net.parameters(), 0.1), torch.nn.MSELoss(),
                                    train_data=etappe.TensorData(torch.zeros(4, 2), torch.zeros(4, 1)), run_dir=url),
             lambda: etappe.save(url + "/ckpt", model=net), lambda: etappe.load(url + "/ckpt", model=net),
             lambda: etappe.verify(url + "/ckpt"), lambda: etappe.inspect(url + "/ckpt"),
             lambda: etappe.CheckpointStore(url)]
    for call in calls:
        with pytest.raises(UsageError) as info:
            call()
        assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_url_exits_2_in_a_real_process_without_a_traceback(tmp_path):
    result = run_cli("train", "--run-dir", "s3:/b/run", "--epochs", "1", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("etappe: error:") and "s3://b/run" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_on_an_object_store_is_refused_before_training(s3, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", *ARGS, "--run-dir", s3.url("run"), "--tensorboard"]) == 2
    assert "--tensorboard" in capsys.readouterr().err
    assert s3.keys() == [] and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- an s3 run, read by the commands


def test_eval_inspect_verify_export_and_plot_of_an_s3_run_name_s3_urls(s3, tmp_path, monkeypatch, capsys):
    url = s3.url("runs/one")
    trained = run_cli("train", *TWO_EPOCHS, "--run-dir", url, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert f"weights {url}/model.safetensors" in trained.stdout
    assert list(tmp_path.iterdir()) == []  # nothing local: no "s3:" folder
    keys = s3.keys("runs/one/")
    for name in ("config.json", "metrics.jsonl", "metrics.csv", "curves.png", "model.safetensors"):
        assert f"runs/one/{name}" in keys
    assert any(k.startswith("runs/one/checkpoints/step-") and k.endswith("/manifest.json") for k in keys)

    monkeypatch.chdir(tmp_path)
    assert cli.main(["verify", url]) == 0
    out = capsys.readouterr().out
    assert out.count(f"ok    {url}/checkpoints/step-") == 2 and "2 of 2 checkpoints verify" in out

    assert cli.main(["inspect", url]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{url}/checkpoints/step-00000046.") and "etappe-fetch" not in out

    assert cli.main(["eval", url, "--json"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 360 and 0 < result["accuracy"] <= 1

    assert cli.main(["export", url, "--format", "safetensors"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"safetensors {url}/export/model.safetensors ") and "etappe-fetch" not in out and "etappe-export" not in out
    assert {"runs/one/export/model.safetensors", "runs/one/export/model.safetensors.json"} <= set(s3.keys("runs/one/"))

    assert cli.main(["export", url, "--format", "safetensors", "--out", "local.safetensors"]) == 0
    capsys.readouterr()
    assert (tmp_path / "local.safetensors").is_file()

    assert cli.main(["plot", url]) == 0
    assert capsys.readouterr().out == f"wrote {url}/curves.png\n"

    # a damaged object: verify names it by its URL and fails; the store falls back to the checkpoint before
    newest = max(k for k in s3.keys("runs/one/checkpoints/") if k.endswith("/model.safetensors"))
    s3.client().put_object(Bucket=s3.bucket, Key=newest, Body=b"not a tensor file")
    assert cli.main(["verify", url]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  {url}/checkpoints/step-00000046." in out and "1 of 2 checkpoints verify" in out
    assert cli.main(["inspect", url]) == 0
    assert capsys.readouterr().out.startswith(f"{url}/checkpoints/step-00000045.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.safetensors", "local.safetensors.json"]


# ---------------------------------------------------------------- acceptance 1: killed on s3, resumed bit-exact


def final_state(url: str) -> dict:
    path = rundir.open_store(url).latest()
    assert path is not None, f"no committed checkpoint under {url}"
    return load(path)


def _local_run(tmp_path_factory, args: list[str]) -> dict:
    """The run on a local disk, uninterrupted: its last checkpoint."""
    cwd = tmp_path_factory.mktemp("local-reference")
    result = run_cli("train", *args, "--run-dir", "run", cwd=cwd)
    assert result.returncode == 0, result.stderr
    from etappe.checkpoint import CheckpointStore

    return load(CheckpointStore(cwd / "run" / "checkpoints").latest())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _local_run(tmp_path_factory, ARGS)


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    return _local_run(tmp_path_factory, LONG)


def _attempts(s3, prefix: str) -> tuple[set[str], set[str]]:
    """The attempt prefixes under ``prefix``/checkpoints: (all, those with a manifest: committed)."""
    keys = [k for k in s3.keys(f"{prefix}/checkpoints/") if k.split("/")[-2].startswith("step-")]  # not the lease
    every = {k.split("/")[-2] for k in keys}
    return every, {k.split("/")[-2] for k in keys if k.endswith("/manifest.json")}


def kill_on_s3(moment: str, args: list[str], s3, prefix: str, cwd: Path, rng: random.Random) -> bool:
    """Start (or resume) the run and SIGKILL it at ``moment``; whether the kill landed before the run ended.
    during-upload: an attempt's data objects are up and its manifest is not (the commit not made yet)."""
    proc = subprocess.Popen([sys.executable, "-m", "etappe", "train", *args, "--run-dir", s3.url(prefix)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, before = _attempts(s3, prefix)
        if moment == "during-upload":
            def uploading() -> bool:
                every, done = _attempts(s3, prefix)
                return bool(every - done - before)
            hit = wait_for(uploading, proc)
        else:  # mid-run: a random moment after one more commit
            hit = wait_for(lambda: len(_attempts(s3, prefix)[1] - before) >= 1, proc)
            time.sleep(rng.uniform(0.0, 0.6))
        landed = hit and proc.poll() is None
        kill_all(proc)
        proc.wait()
    finally:
        kill_all(proc)
        proc.communicate()
    return landed and proc.returncode == -signal.SIGKILL


def _kill_and_resume(s3, reference, tmp_path, args: list[str], moments: list[str], seed: str) -> int:
    rng = random.Random(seed)
    prefix, landed, used = "killed", 0, []
    for moment in moments:
        _, before = _attempts(s3, prefix)
        landed += kill_on_s3(moment, args, s3, prefix, tmp_path, rng)
        used.append(len(_attempts(s3, prefix)[1] - before))
    print(f"commits made by each try: {used}")
    resumed = run_cli("train", *args, "--run-dir", s3.url(prefix), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert list(tmp_path.iterdir()) == []  # all of it on the store
    assert_same_run(final_state(s3.url(prefix)), reference)
    every, done = _attempts(s3, prefix)
    assert every == done  # the interrupted uploads' leftovers were swept by the writer that resumed
    return landed


def test_a_run_on_s3_killed_during_an_upload_resumes_bit_identical_to_a_local_run(s3, reference, tmp_path):
    landed = _kill_and_resume(s3, reference, tmp_path, ARGS, ["during-upload"], f"short-{os.getpid()}")
    assert landed >= 1


@pytest.mark.slow
def test_a_run_on_s3_killed_ten_times_and_more_resumes_bit_identical(s3, long_reference, tmp_path):
    # 16 tries for at least 10 kills: a kill can still miss (the run ended, or the try's process died otherwise)
    moments = ["during-upload", "mid-run"] * 8
    landed = _kill_and_resume(s3, long_reference, tmp_path, LONG, moments, f"long-{os.getpid()}")
    print(f"{landed} of {len(moments)} kills landed")
    assert landed >= 10, f"only {landed} of {len(moments)} kills landed before the run ended"
