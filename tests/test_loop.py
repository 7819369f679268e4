import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import etappe
from etappe.data import TensorData, load_dataset
from etappe.checkpoint.errors import CheckpointError
from etappe.errors import EtappeError, TrainingError, UsageError
from etappe.loop import Trainer, evaluate


def small_classification(n=40, features=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    return TensorData(x, x[:, :classes].argmax(1))


class ModeRecorder(nn.Module):
    """Records, for every forward pass, whether it ran in training mode and with grad enabled."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.calls = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        return self.linear(x)


def test_evaluate_weights_the_loss_by_samples():
    data = small_classification(n=5)
    model = nn.Linear(4, 3)
    result = evaluate(model, data, nn.CrossEntropyLoss(), batch_size=2)  # batches of 2, 2, 1
    full = nn.CrossEntropyLoss()(model(data.x), data.y).item()
    assert result["loss"] == pytest.approx(full, rel=1e-6)
    assert result["accuracy"] == pytest.approx((model(data.x).argmax(1) == data.y).float().mean().item())
    assert result["samples"] == 5


def test_evaluate_uses_eval_and_inference_mode_and_restores_the_mode():
    model = ModeRecorder()
    model.train()
    evaluate(model, small_classification(), nn.CrossEntropyLoss())
    assert model.calls and all(c == (False, False, True) for c in model.calls)
    assert model.training


def test_evaluate_accepts_a_dataloader_and_a_plain_dataset():
    data = small_classification()
    model = nn.Linear(4, 3)
    a = evaluate(model, data, nn.CrossEntropyLoss())
    b = evaluate(model, torch.utils.data.DataLoader(data, batch_size=7), nn.CrossEntropyLoss())
    c = evaluate(model, torch.utils.data.TensorDataset(data.x, data.y), nn.CrossEntropyLoss())
    assert a["loss"] == pytest.approx(b["loss"]) == pytest.approx(c["loss"])


def test_trainer_trains_in_train_mode_and_validates_in_eval_mode():
    model = ModeRecorder()
    data = small_classification()
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), train_data=data, val_data=data,
            batch_size=8, progress=False, quiet=True).fit(2)
    training = [c for c in model.calls if c[0]]
    evaluating = [c for c in model.calls if not c[0]]
    assert len(training) == 2 * 5 and all(c == (True, True, False) for c in training)
    assert evaluating and all(c == (False, False, True) for c in evaluating)


def test_fit_lowers_the_loss_and_records_history():
    torch.manual_seed(0)
    data = small_classification(n=200)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    history = etappe.fit(model, data, epochs=5, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                         loss_fn=nn.CrossEntropyLoss(), val_data=data, batch_size=16, progress=False, quiet=True)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4, 5]
    assert history[-1]["train_loss"] < history[0]["train_loss"] * 0.7
    for key in ("train_loss", "val_loss", "val_accuracy", "lr", "seconds", "samples_per_s"):
        assert key in history[-1]
    assert history[-1]["samples_per_s"] > 0


@pytest.mark.parametrize("interval,expected_lr", [("epoch", 0.1 * 0.5**3), ("step", 0.1 * 0.5**12)])
def test_scheduler_steps_per_epoch_or_per_step(interval, expected_lr):
    data = small_classification(n=16)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    Trainer(model, opt, nn.CrossEntropyLoss(), train_data=data, batch_size=4, scheduler=sched,
            scheduler_interval=interval, progress=False, quiet=True).fit(3)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected_lr)


def test_gradient_clipping_bounds_each_update():
    data = TensorData(torch.full((8, 1), 100.0), torch.zeros(8, 1))
    model = nn.Linear(1, 1)
    before = model.weight.detach().clone()
    Trainer(model, torch.optim.SGD(model.parameters(), lr=1.0), nn.MSELoss(), train_data=data, batch_size=8,
            clip_grad_norm=0.01, progress=False, quiet=True).fit(1)
    assert (model.weight.detach() - before).abs().item() <= 0.01 + 1e-6


def test_custom_step_for_two_models_and_two_optimizers():
    torch.manual_seed(0)
    data = TensorData(torch.randn(64, 2), torch.zeros(64))
    G, D = nn.Linear(3, 2), nn.Linear(2, 1)
    opt_G, opt_D = torch.optim.SGD(G.parameters(), lr=0.01), torch.optim.SGD(D.parameters(), lr=0.01)
    seen_modes = []

    def step(batch):
        x, _ = batch
        seen_modes.append((G.training, D.training))
        loss_D = D(x).mean() - D(G(torch.randn(len(x), 3)).detach()).mean()
        opt_D.zero_grad(); loss_D.backward(); opt_D.step()
        loss_G = -D(G(torch.randn(len(x), 3))).mean()
        opt_G.zero_grad(); loss_G.backward(); opt_G.step()
        return {"loss": loss_G, "loss_D": loss_D}

    g_before = G.weight.detach().clone()
    history = Trainer({"G": G, "D": D}, {"opt_G": opt_G, "opt_D": opt_D}, step_fn=step,
                      train_data=data, batch_size=16, progress=False, quiet=True).fit(2)
    assert len(seen_modes) == 8 and all(m == (True, True) for m in seen_modes)
    assert "train_loss_D" in history[-1] and math.isfinite(history[-1]["train_loss"])
    assert not torch.equal(G.weight, g_before)


def test_non_finite_loss_stops_with_epoch_and_step():
    data = TensorData(torch.ones(32, 1), torch.ones(32, 1))
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1e30)
    with pytest.raises(TrainingError, match=r"loss became inf at epoch 1, step 1"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=1.0), nn.MSELoss(), train_data=data, batch_size=8,
                progress=False, quiet=True).fit(1)


def test_shape_mismatch_names_both_shapes():
    data = load_dataset("digits")
    with pytest.raises(UsageError, match=r"does not accept the data's input shape \(1, 8, 8\)"):
        Trainer(nn.Linear(10, 10), torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), nn.CrossEntropyLoss(),
                train_data=data.train, num_outputs=10, progress=False, quiet=True)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    with pytest.raises(UsageError, match=r"output shape \(5,\) .* needs \(10,\)"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), train_data=data.train,
                num_outputs=10, progress=False, quiet=True)


def test_unwritable_run_folder_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model = nn.Linear(4, 3)
    with pytest.raises(EtappeError, match="cannot write to the run folder"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                train_data=small_classification(), run_dir=blocker / "run", progress=False, quiet=True).fit(1)


def test_early_stopping_stops_and_stays_stopped_on_resume(tmp_path):
    data = small_classification(n=32)

    def trainer():
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # nothing improves
        return Trainer(model, opt, nn.CrossEntropyLoss(), train_data=data, val_data=data, batch_size=8,
                       patience=2, run_dir=tmp_path / "run", progress=False, quiet=True)

    history = trainer().fit(10)
    assert len(history) == 3  # best at epoch 1, then two epochs without improvement
    again = trainer()
    assert len(again.fit(10)) == 3 and again.progress.stopped_early and again.progress.epochs_without_improvement == 2
    third = trainer()  # while `again` lives on (a notebook keeps it): it let go of the run folder
    assert len(third.fit(10)) == 3 and third.progress.stopped_early


def test_a_call_for_fewer_epochs_after_a_resume_lets_go_of_the_run_folder(tmp_path):
    data = small_classification(n=32)

    def trainer():
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), train_data=data,
                       batch_size=8, run_dir=tmp_path / "run", progress=False, quiet=True)

    trainer().fit(3)
    refused = trainer()
    refused.resume()  # the writer of the run folder from here
    with pytest.raises(UsageError, match="asks for fewer"):
        refused.fit(2)
    assert len(trainer().fit(4)) == 4  # while the refused one lives on


def test_close_lets_go_of_a_run_folder_that_resume_or_save_took(tmp_path):
    data = small_classification(n=32)

    def trainer(**kw):
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), train_data=data,
                       batch_size=8, run_dir=tmp_path / "run", progress=False, quiet=True, **kw)

    trainer().fit(1)
    first = trainer(async_save=True)
    first.resume()  # a notebook cell that resumed to look, then saved in the background
    first.save()
    with pytest.raises(CheckpointError, match=r"another CheckpointStore of this process .* the Trainer .* close\(\)"):
        trainer().resume()
    first.close()  # waits for the background save: it is committed, and the folder is free
    assert [c.step for c in first.store.checkpoints()][-1] == first.progress.step
    with trainer() as second:
        assert second.resume() is not None
        assert len(second.fit(2)) == 2
    with trainer() as third:
        third.resume()
    assert len(trainer().fit(3)) == 3  # every one of them let go
    first.close()  # closing twice is harmless


def test_a_background_save_failure_once_reported_does_not_stop_the_next_saves(tmp_path):
    # a real write failure in the background writer (a file-size limit: EFBIG, as a full disk fails with ENOSPC),
    # then room again: close() reports it; after that a second close() is quiet and the next fit saves afresh
    from tests.test_checkpoint_async import FileSizeLimit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 100_000), nn.Linear(100_000, 3))  # 3.2 MB of weights
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                      train_data=small_classification(n=32), batch_size=8, run_dir=tmp_path / "run",
                      async_save=True, progress=False, quiet=True)
    trainer.resume()
    with FileSizeLimit(1 << 20):
        trainer.save()
        with pytest.raises(TrainingError, match="File too large"):
            trainer.close()
    trainer.close()  # told once
    assert len(trainer.fit(2)) == 2
    assert [c.step for c in trainer.store.checkpoints()] == [4, 8]


def _trainer_on(run, data, lr=0.1, **kw):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=lr), nn.CrossEntropyLoss(), train_data=data,
                   batch_size=8, run_dir=run, progress=False, quiet=True, **kw)


@pytest.mark.parametrize("let_go", ["fit returned", "close"])
def test_a_trainer_whose_run_another_one_moved_on_is_refused_before_it_writes(tmp_path, let_go):
    # a notebook: cell 2's Trainer trains 2 epochs; cell 3 continues the run to 4; cell 2 run
    # again (t.fit(5)) would train from epoch 2 and overwrite steps 12-16 with no word: refused, nothing lost
    data, run = small_classification(n=32), tmp_path / "run"
    first = _trainer_on(run, data)
    first.fit(2)
    if let_go == "close":
        first.close()
    other = _trainer_on(run, data)
    other.fit(4)
    other.close()
    held = {c.step: (c.path / "manifest.json").read_bytes() for c in other.store.checkpoints()}
    assert max(held) == 16
    with pytest.raises(UsageError, match=r"moved on to step 16, past this Trainer.s step 8 .* resume\(\)"):
        first.fit(5)
    with pytest.raises(UsageError, match="moved on to step 16"):
        first.save()
    assert {c.step: (c.path / "manifest.json").read_bytes() for c in other.store.checkpoints()} == held
    assert first.resume() is not None and first.progress.step == 16  # what the refusal says to do
    assert len(first.fit(5)) == 5
    first.close()
    assert len(_trainer_on(run, data).fit(5)) == 5  # the folder was let go


def test_a_trainer_that_let_go_takes_its_run_folder_again_when_nobody_moved_it_on(tmp_path):
    data, run = small_classification(n=32), tmp_path / "run"
    t = _trainer_on(run, data)
    t.fit(1)
    t.close()
    t.fit(2)  # its own run, where it left it
    t.save()  # after fit let go: takes it again
    t.close()
    looked = _trainer_on(run, data)
    looked.resume()
    looked.close()  # another Trainer that only looked (moved nothing on)
    assert len(t.fit(3)) == 3
    straight = _trainer_on(tmp_path / "straight", data)
    straight.fit(3)
    assert torch.equal(t.models["model"].weight, straight.models["model"].weight)



class BreaksMidStep(nn.Module):
    """A linear model whose forward, armed, spoils its weights and raises: a step left half done (a second Ctrl-C
    in the middle of one)."""

    def __init__(self):
        super().__init__()
        self.linear, self.calls, self.break_at = nn.Linear(4, 3), 0, None

    def forward(self, x):
        self.calls += 1
        if self.calls == self.break_at:
            with torch.no_grad():
                self.linear.weight.add_(1.0)
            raise RuntimeError("stopped in the middle of a step")
        return self.linear(x)


def test_after_a_fit_that_failed_the_next_fit_resumes_from_the_checkpoint_not_a_half_done_step(tmp_path):
    data = small_classification(n=32)

    def trainer(run):
        torch.manual_seed(0)
        model = BreaksMidStep()
        return model, Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                              train_data=data, batch_size=8, run_dir=run, progress=False, quiet=True)

    trainer(tmp_path / "run")[1].fit(1)  # a run the next Trainer resumes (step 4)
    model, t = trainer(tmp_path / "run")
    t.resume()
    model.break_at = 3  # epoch 2's third batch
    with pytest.raises(RuntimeError, match="middle of a step"):
        t.fit(3)
    model.break_at = None
    t.fit(3)
    straight, s = trainer(tmp_path / "straight")
    s.fit(3)
    assert torch.equal(model.linear.weight, straight.linear.weight)

def test_resuming_another_runs_checkpoint_into_a_folder_holding_a_run_is_refused(tmp_path):
    data = small_classification(n=32)
    a, b = _trainer_on(tmp_path / "a", data), _trainer_on(tmp_path / "b", data)  # alike: no config tells them apart
    a.fit(2)
    b.fit(3)
    a.close(), b.close()
    held = {c.step: (c.path / "manifest.json").read_bytes() for c in a.store.checkpoints()}
    from_b = b.store.checkpoints()[0].path
    into_a = _trainer_on(tmp_path / "a", data)
    with pytest.raises(UsageError, match=r"holds a run \(checkpoints up to step 8\); resume\(.*\) would continue "):
        into_a.resume(from_b)
    assert {c.step: (c.path / "manifest.json").read_bytes() for c in a.store.checkpoints()} == held
    own = _trainer_on(tmp_path / "a", data)
    assert own.resume(a.store.checkpoints()[-1].path) is not None  # its own checkpoint, named: fine
    assert len(own.fit(3)) == 3
    own.close()
    fresh = _trainer_on(tmp_path / "c", data)
    assert fresh.resume(from_b) is not None  # into an empty folder: a new run starting from B's state
    assert len(fresh.fit(3)) == 3



def _weights_by_step(run) -> dict[int, bytes]:
    from etappe.checkpoint import CheckpointStore

    if not (run / "checkpoints").exists():
        return {}
    return {c.step: b"".join(t.numpy().tobytes() for t in etappe.load(c.path)["model"].values())
            for c in CheckpointStore(run / "checkpoints").checkpoints()}  # a reader: takes no lock


REFUSALS = ["being written by another", "moved on to step", "asks for fewer", "holds a run"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 1), st.sampled_from(["fit", "fit", "save", "close", "resume"]),
                          st.integers(1, 2)), min_size=1, max_size=10))
def test_trainers_sharing_a_run_folder_never_lose_a_checkpoint(tmp_path_factory, ops):
    # Two Trainers of a notebook, each with its own learning rate (another lineage of weights), in any order:
    # whatever each is refused, a checkpoint once committed keeps its weights (keep-all retention: none is pruned).
    data, run = small_classification(n=16), tmp_path_factory.mktemp("shared") / "run"
    trainers = [_trainer_on(run, data, lr=0.1 * (i + 1), allow_config_change=True, keep_last=1000) for i in range(2)]
    committed: dict[int, bytes] = {}
    for who, op, more in ops:
        t = trainers[who]
        try:
            if op == "fit":
                t.fit(t.progress.epoch + more)
            elif op == "save":
                t.save(wait=True)
            elif op == "close":
                t.close()
            else:
                t.resume()
        except (UsageError, CheckpointError, TrainingError) as refused:  # a refusal, or another Trainer holds it
            said = str(refused)
            assert "\n" not in said and any(w in said for w in REFUSALS), said
        now = _weights_by_step(run)
        assert {step: now.get(step) for step in committed} == committed, f"after trainer {who}'s {op}"
        committed = now
    for t in trainers:
        t.close()

# ------------------------------------------------------------------ options, one step path, setup in fit

from dataclasses import fields as _fields  # noqa: E402


from etappe.config import LoopOptions, SaveOptions, ShowOptions, TrainConfig  # noqa: E402
from etappe.loop import SupervisedStep  # noqa: E402

OPTION_VALUES = {
    "batch_size": st.integers(1, 64), "shuffle": st.booleans(), "seed": st.integers(0, 2**32 - 1),
    "num_workers": st.integers(0, 4), "clip_grad_norm": st.none() | st.floats(0.01, 10),
    "precision": st.sampled_from(["32", "bf16-mixed", "16-mixed"]), "accumulate": st.integers(1, 8),
    "compile": st.booleans(), "ema": st.none() | st.floats(0.01, 0.9999), "warmup_steps": st.integers(0, 50),
    "scheduler_interval": st.sampled_from(["epoch", "step"]), "device": st.sampled_from(["auto", "cpu"]),
    "deterministic": st.none() | st.booleans(), "monitor": st.sampled_from(["val_loss", "train_loss"]),
    "patience": st.none() | st.integers(1, 9), "run_dir": st.none() | st.sampled_from(["runs/a", "b"]),
    "save_every": st.none() | st.integers(1, 99), "save_every_seconds": st.none() | st.floats(0.5, 99),
    "keep_last": st.integers(0, 5), "keep_best": st.integers(0, 5), "async_save": st.booleans(),
    "progress": st.booleans(), "plot": st.booleans(), "quiet": st.booleans(), "tensorboard": st.booleans(),
}


def test_every_option_has_a_strategy_here_and_the_config_takes_its_defaults_from_the_options():
    names = {f.name for cls in (LoopOptions, SaveOptions, ShowOptions) for f in _fields(cls)}
    assert names == set(OPTION_VALUES)
    config = TrainConfig()
    for cls in (LoopOptions, SaveOptions, ShowOptions):
        assert config.options(cls) == cls()  # the CLI's defaults are the Trainer's


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=OPTION_VALUES))
def test_options_given_as_keywords_are_the_option_objects_with_those_fields(chosen):
    data = small_classification()
    model = nn.Linear(4, 3)
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), train_data=data,
                val_data=data, **chosen)

    def pick(cls):
        return cls(**{k: v for k, v in chosen.items() if k in {f.name for f in _fields(cls)}})

    assert (t.loop, t.saving, t.show) == (pick(LoopOptions), pick(SaveOptions), pick(ShowOptions))
    # on top of given option objects, the keywords win field by field
    base = LoopOptions(batch_size=3, seed=7)
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), train_data=data,
                val_data=data, loop=base, **chosen)
    loop_keys = {k: v for k, v in chosen.items() if k in {f.name for f in _fields(LoopOptions)}}
    assert t.loop == LoopOptions(**{**{"batch_size": 3, "seed": 7}, **loop_keys})


def test_unknown_and_bad_options_are_one_line_errors_naming_the_keyword():
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UsageError, match=r"unknown options batchsize; its options are: batch_size, "):
        Trainer(model, opt, nn.CrossEntropyLoss(), train_data=small_classification(), batchsize=8)
    with pytest.raises(UsageError, match=r"^keep_last=-1 is not valid; expected an integer, 0 or more$"):
        Trainer(model, opt, nn.CrossEntropyLoss(), train_data=small_classification(), keep_last=-1)
    with pytest.raises(UsageError, match=r"^batch_size=0 is not valid"):
        LoopOptions(batch_size=0)


def test_the_default_step_is_the_supervised_step_given_as_a_step_fn():
    data = small_classification(n=64)

    def trained(step_fn_given):
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        loss = nn.CrossEntropyLoss()
        step = SupervisedStep(model, opt, loss, clip_grad_norm=0.5) if step_fn_given else None
        Trainer(model, opt, loss, train_data=data, batch_size=8, clip_grad_norm=0.5, step_fn=step,
                progress=False, quiet=True).fit(3)
        return model.state_dict(), opt.state_dict()["state"]

    (w1, s1), (w2, s2) = trained(False), trained(True)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)


def test_constructing_a_trainer_writes_nothing_and_fit_sets_up_the_run(tmp_path):
    model = nn.Linear(4, 3)
    run = tmp_path / "deep" / "run"
    t = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                train_data=small_classification(), run_dir=run, progress=False, quiet=True)
    assert not (tmp_path / "deep").exists() and t.store is None
    t.fit(1)
    assert t.store is not None and t.store.latest() is not None and t.device == torch.device("cpu")


def test_the_readme_trainer_example_runs(tmp_path, monkeypatch):
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    api = readme[readme.index("## The Python API"):readme.index("## Examples")]
    blocks = re.findall(r"```python\n(.*?)```", api, re.S)
    assert any("LoopOptions(" in b for b in blocks)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block.replace("epochs=10", "epochs=1").replace("fit(10)", "fit(2)"), "README.md", "exec"),
             namespace)
    assert len(namespace["history"]) == 2 and (tmp_path / "runs" / "options" / "checkpoints").is_dir()


def test_arguments_of_the_wrong_kind_are_one_line_usage_errors():
    data = small_classification()
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.CrossEntropyLoss()
    cases = [
        (dict(model="cnn", optimizer=opt, loss_fn=loss, train_data=data), r"model 'model' is a str"),
        (dict(model=model, optimizer="adam", loss_fn=loss, train_data=data), r"optimizer 'optimizer' is a str"),
        (dict(model=model, optimizer=opt, loss_fn=loss, train_data=data, scheduler={"s": "x"}), r"scheduler 's'"),
        (dict(model=model, optimizer=opt, loss_fn=loss, train_data=None), r"train_data is a NoneType"),
        (dict(model=model, optimizer=opt, loss_fn=loss, train_data=data, loop={"batch_size": 3}),
         r"LoopOptions argument is a dict"),
        (dict(model=model, optimizer=opt, loss_fn=loss, train_data=data, loop=SaveOptions()),
         r"LoopOptions argument is a SaveOptions"),
        (dict(model=model, optimizer=torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), loss_fn=loss,
              train_data=data), r"holds none of the model's parameters"),
        (dict(model=model, optimizer=opt, loss_fn=loss, train_data=torch.utils.data.Subset(data, [])), r"is empty"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UsageError, match=message):
            Trainer(**kwargs, progress=False, quiet=True)
    with pytest.raises(UsageError, match=r"takes \(input, target\) batches"):
        Trainer(model, opt, loss, train_data=[torch.zeros(4)] * 8, batch_size=4, progress=False, quiet=True).fit(1)


@pytest.mark.parametrize("returned, message", [
    (None, r"step_fn returned NoneType None as 'loss'"),
    ("x", r"step_fn returned str 'x'"),
    (torch.ones(3), r"a tensor of shape \(3,\)"),
    ({"loss": 1.0, "d": float("inf")}, r"the step's 'd' became inf at epoch 1, step 1"),
])
def test_what_a_step_fn_returns_is_checked(returned, message):
    model = nn.Linear(4, 3)
    error = UsageError if "returned" in message or "shape" in message else TrainingError
    with pytest.raises(error, match=message):
        Trainer({"m": model}, {"o": torch.optim.SGD(model.parameters(), lr=0.1)}, train_data=small_classification(),
                step_fn=lambda batch: returned, progress=False, quiet=True).fit(1)


def test_names_that_would_collide_in_a_checkpoint_and_ema_of_several_models_are_refused():
    g, d = nn.Linear(4, 3), nn.Linear(4, 3)
    opts = {"G": torch.optim.SGD(g.parameters(), lr=0.1), "D": torch.optim.SGD(d.parameters(), lr=0.1)}
    for models, optimizers, message in [({"G": g, "D": d}, opts, r"'D', 'G' is taken"),
                                        ({"ema": g}, {"o": opts["G"]}, r"'ema' is taken")]:
        with pytest.raises(UsageError, match=message):
            Trainer(models, optimizers, train_data=small_classification(), step_fn=lambda b: 0.0)
    with pytest.raises(UsageError, match=r"ema averages one model's weights"):
        Trainer({"g": g, "d": d}, {"og": opts["G"]}, train_data=small_classification(), step_fn=lambda b: 0.0,
                ema=0.9)


def test_a_changed_warmup_is_refused_on_resume_even_when_changes_are_allowed(tmp_path):
    def trainer(warmup):
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                       train_data=small_classification(), run_dir=tmp_path / "run", warmup_steps=warmup,
                       allow_config_change=True, progress=False, quiet=True)

    trainer(5).fit(1)
    with pytest.raises(UsageError, match=r"another warm-up \(warmup_steps: 5 -> 50\).*even with --allow-config-change"):
        trainer(50).fit(2)
    assert LoopOptions(precision=32).precision == "32"  # TOML's precision = 32
