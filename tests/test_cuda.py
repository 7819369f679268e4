"""The CUDA paths (issue 13): fp16 autocast with a gradient scaler whose state is checkpointed and restored, bf16
autocast on CUDA, async save of CUDA tensors, and etappe's channels-last CNN on CUDA. Each resumes bit for bit
under --deterministic. Marked ``cuda`` and skipped where torch sees no GPU; benchmarks/gpu_check.sh runs them
(``pytest -m cuda``) on a machine with one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from etappe.checkpoint import CheckpointStore, load, verify
from etappe.data.sets import digits
from etappe.loop import Trainer
from tests.conftest import run_cli
from tests.test_checkpoint import assert_same
from tests.test_checkpoint_async import written
from tests.test_resume import assert_same_run, final_state

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

DIGITS = ["--data", "digits", "--batch-size", "64", "--device", "cuda", "--deterministic", "--quiet"]
FP16 = [*DIGITS, "--model", "mlp", "--precision", "16-mixed"]
BF16 = [*DIGITS, "--model", "mlp", "--precision", "bf16-mixed"]
CNN = [*DIGITS, "--model", "cnn"]  # etappe's conv models train channels-last by default


def train(tmp_path: Path, name: str, args: list[str], epochs: int) -> dict:
    result = run_cli("train", *args, "--epochs", str(epochs), "--run-dir", name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return final_state(tmp_path / name)


def two_stage_equals_straight(tmp_path: Path, args: list[str]) -> tuple[dict, dict]:
    """2 epochs then ``--epochs 4`` in the same run folder (a second process) against 4 straight."""
    straight = train(tmp_path, "straight", args, 4)
    train(tmp_path, "staged", args, 2)
    staged = train(tmp_path, "staged", args, 4)
    assert_same_run(staged, straight)
    assert [r["epoch"] for r in staged["history"]["epochs"]] == [1, 2, 3, 4]
    return staged, straight


def assert_same_entry(a: dict, b: dict, name: str) -> None:
    assert set(a[name]) == set(b[name]), name
    for key, x in a[name].items():
        y = b[name][key]
        same = torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y) if torch.is_tensor(x) else x == y
        assert same, f"{name}.{key}: {x!r} != {y!r}"


# ---------------------------------------------------------------- fp16 with a gradient scaler


def test_fp16_trains_and_its_scaler_state_is_in_the_checkpoint(tmp_path):
    state = train(tmp_path, "run", FP16, 3)
    losses = [r["train_loss"] for r in state["history"]["epochs"]]
    assert losses[-1] < losses[0], losses
    assert state["config"]["precision"] == "16-mixed"
    scaler = state["scaler"]
    assert {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"} <= set(scaler)
    assert float(scaler["scale"]) > 0
    assert all(v.dtype == torch.float32 for v in state["model"].values())  # autocast leaves the weights fp32
    assert state["history"]["epochs"][-1]["skipped_steps"] == state["progress"]["skipped_steps"]  # shown, counted


def test_fp16_two_stages_equal_one_straight_run_bit_for_bit_scaler_included(tmp_path):
    staged, straight = two_stage_equals_straight(tmp_path, FP16)
    assert_same_entry(staged, straight, "scaler")
    assert staged["progress"]["skipped_steps"] == straight["progress"]["skipped_steps"]


def test_the_scaler_is_restored_on_resume_not_started_afresh(tmp_path):
    def trainer() -> Trainer:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss(),
                       train_data=digits().train, batch_size=64, precision="16-mixed", device="cuda",
                       deterministic=True, run_dir=tmp_path / "run", progress=False, quiet=True)

    first = trainer()
    first.fit(1)
    saved = first.scaler.state_dict()
    assert saved["_growth_tracker"] > 0  # steps since the last change of scale: a fresh scaler holds 0
    second = trainer()
    second.resume()
    assert second.scaler.state_dict() == saved
    second.fit(2)
    assert second.progress.epoch == 2


class Overflow(torch.autograd.Function):
    """Identity forward; on the backward of the ``at``-th call, a non-finite gradient (what an fp16 overflow gives)."""

    calls, at = 0, None

    @staticmethod
    def forward(ctx, x):
        Overflow.calls += 1
        ctx.poison = Overflow.calls == Overflow.at
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf") if ctx.poison else grad


class OverflowAt(nn.Module):
    def forward(self, x):
        return Overflow.apply(x)


def skipped_run(run_dir: Path, at: int | None) -> Trainer:
    Overflow.calls, Overflow.at = 0, at
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), OverflowAt())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    t = Trainer(model, opt, nn.CrossEntropyLoss(), train_data=digits().train, batch_size=64, precision="16-mixed",
                device="cuda", deterministic=True, run_dir=run_dir, progress=False, quiet=True)
    t.fit(1)
    return t


def test_a_step_with_non_finite_fp16_gradients_is_skipped_and_counted_not_an_error(tmp_path):
    clean = skipped_run(tmp_path / "clean", None)
    poisoned = skipped_run(tmp_path / "poisoned", 5)  # a forward well inside the epoch (23 steps)
    n = poisoned.progress.skipped_steps
    assert n == clean.progress.skipped_steps + 1
    assert poisoned.history[-1]["skipped_steps"] == n
    assert poisoned.scaler.get_scale() == 65536.0 * 0.5 ** n  # halved per skipped step, not grown (interval 2000)
    saved = load(CheckpointStore(tmp_path / "poisoned" / "checkpoints").latest())
    assert saved["progress"]["skipped_steps"] == n and float(saved["scaler"]["scale"]) == poisoned.scaler.get_scale()


def test_gradient_clipping_under_fp16_clips_the_unscaled_gradients(tmp_path):
    # With the scale (65536) not taken out first, a clip at 1.0 would shrink every step ~65536x: the run would not
    # move. Unscaled first, it trains like an fp32 run clipped the same way.
    args = [*DIGITS, "--model", "mlp", "--clip-grad-norm", "1.0", "--lr", "0.01"]
    fp16 = train(tmp_path, "fp16", [*args, "--precision", "16-mixed"], 2)
    fp32 = train(tmp_path, "fp32", args, 2)
    a, b = fp16["history"]["epochs"][-1]["train_loss"], fp32["history"]["epochs"][-1]["train_loss"]
    assert abs(a - b) < 0.25 * b + 0.05, (a, b)


# ---------------------------------------------------------------- bf16 on CUDA


def test_bf16_on_cuda_trains_without_a_scaler_and_resumes_bit_for_bit(tmp_path):
    staged, straight = two_stage_equals_straight(tmp_path, BF16)
    assert "scaler" not in staged and staged["config"]["precision"] == "bf16-mixed"
    losses = [r["train_loss"] for r in staged["history"]["epochs"]]
    assert losses[-1] < losses[0], losses
    assert all(v.dtype == torch.float32 for v in staged["model"].values())


def test_bf16_autocast_runs_the_forward_in_bf16_on_cuda():
    from etappe.loop import autocast

    layer = nn.Linear(8, 4).cuda()
    with autocast(torch.device("cuda"), "bf16-mixed"):
        assert layer(torch.randn(2, 8, device="cuda")).dtype == torch.bfloat16
    with autocast(torch.device("cuda"), "16-mixed"):
        assert layer(torch.randn(2, 8, device="cuda")).dtype == torch.float16


# ---------------------------------------------------------------- async save of CUDA tensors


def cuda_state(width: int = 512, layers: int = 6):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)], nn.LayerNorm(width)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(64, width, device="cuda")
    for _ in range(3):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt, x


def test_async_save_of_cuda_tensors_writes_the_bytes_a_sync_save_writes(tmp_path):
    model, opt, x = cuda_state()
    objects = {"model": model, "optimizer": opt, "extra": {"half": torch.randn(5, device="cuda").half()}}
    store = CheckpointStore(tmp_path / "async", async_save=True)
    for step in range(3):  # the first save allocates the host buffers, later ones reuse them
        expected = CheckpointStore(tmp_path / f"sync{step}").save(step, objects)
        path = store.save(step, objects)
        # train on at once, on the GPU: what is written must be the state at the call
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1.5)
        objects["extra"]["half"].add_(1)
        store.wait()
        verify(path)
        assert written(path) == written(expected), f"step {step}"  # the same bytes in the same files
        assert_same(load(path), load(expected), f"step {step}")


def test_async_save_of_cuda_tensors_copies_into_pinned_memory_and_only_then_returns(tmp_path):
    """The pool's buffers are page-locked for a state on the GPU, the copies from it queued and waited for before
    save returns: the file written from fresh (zeroed) buffers at once in the background holds the state at the
    call, not zeros nor what the GPU did next. CPU states stay unpinned."""
    model, opt, x = cuda_state(width=1024)
    store = CheckpointStore(tmp_path / "async", async_save=True)
    path = store.save(1, {"model": model, "optimizer": opt})
    expected = {k: v.cpu().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    store.wait()
    images = list(store._pool._images.values())
    assert images and all(image.pinned for image in images)
    assert all(torch.frombuffer(image.buffer, dtype=torch.uint8).is_pinned() for image in images)
    assert_same(load(path)["model"], expected, "model")
    cpu = CheckpointStore(tmp_path / "cpu", async_save=True)
    cpu.save(1, {"model": nn.Linear(8, 8)})
    cpu.wait()
    assert not any(image.pinned for image in cpu._pool._images.values())


def test_an_async_save_cuda_run_equals_a_sync_run(tmp_path):
    sync = train(tmp_path, "sync", BF16, 2)
    background = train(tmp_path, "async", [*BF16, "--async-save"], 2)
    assert_same_run(background, sync)


# ---------------------------------------------------------------- channels-last CNN on CUDA


def test_the_channels_last_cnn_trains_on_cuda_and_resumes_bit_for_bit(tmp_path):
    staged, _ = two_stage_equals_straight(tmp_path, CNN)
    assert staged["config"]["channels_last"] is True
    losses = [r["train_loss"] for r in staged["history"]["epochs"]]
    assert losses[-1] < losses[0], losses


def test_channels_last_and_nchw_agree_on_cuda_up_to_rounding():
    from etappe import models

    torch.manual_seed(0)
    nchw = models.build("cnn", (1, 28, 28), 10).cuda()
    nhwc = models.build("cnn", (1, 28, 28), 10).cuda().to(memory_format=torch.channels_last)
    nhwc.load_state_dict(nchw.state_dict())
    x = torch.rand(32, 1, 28, 28, device="cuda")
    torch.testing.assert_close(nhwc(x.contiguous(memory_format=torch.channels_last)), nchw(x), rtol=1e-4, atol=1e-4)
