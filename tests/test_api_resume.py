"""The Python API resumes a run folder only as the run it is: a run-defining change (learning rate, batch size,
optimizer, ...) is refused as the CLI refuses it, before anything is restored into the caller's objects, and a
run already past the epochs asked says so instead of returning another model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import etappe
from etappe.data import TensorData
from etappe.errors import UsageError
from etappe.loop import Trainer


def data(n=48):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorData(x, x[:, :3].argmax(1))


def fit(run_dir, epochs=2, lr=0.1, batch_size=8, optimizer="sgd", momentum=0.0, model=None, **kwargs):
    torch.manual_seed(0)
    model = model if model is not None else nn.Linear(4, 3)
    opt = (torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=lr))
    history = etappe.fit(model, data(), epochs=epochs, optimizer=opt, loss_fn=nn.CrossEntropyLoss(), val_data=data(),
                         batch_size=batch_size, run_dir=run_dir, progress=False, quiet=True, **kwargs)
    return model, opt, history


def fresh_model():
    torch.manual_seed(123)
    return nn.Linear(4, 3)


@pytest.mark.parametrize("change,named", [
    ({"lr": 0.2}, "lr: 0.1 -> 0.2"),
    ({"batch_size": 16}, "batch_size: 8 -> 16"),
    ({"momentum": 0.9}, "momentum: 0.0 -> 0.9"),
    ({"optimizer": "adam"}, "'SGD' -> 'Adam'"),
])
def test_a_run_defining_change_is_refused_before_anything_is_restored(tmp_path, change, named):
    fit(tmp_path / "run")
    model = fresh_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError) as refused:
        fit(tmp_path / "run", epochs=3, model=model, **change)
    message = str(refused.value)
    assert named in message and "allow_config_change=True" in message and "\n" not in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing restored into it
    assert len(etappe.CheckpointStore(tmp_path / "run" / "checkpoints").checkpoints()) >= 1


def test_an_allowed_change_applies_from_the_resume_on(tmp_path):
    fit(tmp_path / "run")
    _, opt, history = fit(tmp_path / "run", epochs=3, lr=0.05, allow_config_change=True)
    assert len(history) == 3
    assert opt.param_groups[0]["lr"] == 0.05 and history[-1]["lr"] == 0.05


def test_the_same_config_resumes_and_extends(tmp_path):
    fit(tmp_path / "run")
    _, _, history = fit(tmp_path / "run", epochs=3)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    _, _, again = fit(tmp_path / "run", epochs=3)  # nothing left to do: the same run, as it is
    assert [r["epoch"] for r in again] == [1, 2, 3]


def test_fewer_epochs_than_done_are_refused_before_anything_is_restored(tmp_path):
    fit(tmp_path / "run", epochs=3)
    model = fresh_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError) as refused:
        fit(tmp_path / "run", epochs=2, model=model)
    assert "has 3 epochs done; epochs=2 asks for fewer" in str(refused.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fewer_epochs_on_the_same_trainer_are_refused(tmp_path):
    model = nn.Linear(4, 3)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), train_data=data(),
                      batch_size=8, progress=False, quiet=True)
    trainer.fit(2)
    with pytest.raises(UsageError, match="has 2 epochs done; epochs=1 asks for fewer"):
        trainer.fit(1)


def test_a_monitor_that_can_never_exist_is_refused(tmp_path):
    model = nn.Linear(4, 3)
    with pytest.raises(UsageError, match="monitor 'val_f1'"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), train_data=data(),
                val_data=data(), monitor="val_f1", patience=2, progress=False, quiet=True)
    with pytest.raises(UsageError, match="monitor 'val_loss'.*val_data"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), train_data=data(),
                monitor="val_loss", patience=2, progress=False, quiet=True)


def test_a_refused_resume_lets_go_of_the_run_folder_so_a_corrected_call_can_take_it(tmp_path):
    # A notebook keeps the refused call's traceback, and with it the Trainer: its writer lock must not outlive
    # the refusal, or the corrected call in the next cell would be told the folder has another writer.
    fit(tmp_path / "run")
    model = fresh_model()
    kept = []
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.2), nn.CrossEntropyLoss(), train_data=data(),
                      val_data=data(), batch_size=8, run_dir=tmp_path / "run", progress=False, quiet=True)
    kept.append(trainer)
    with pytest.raises(UsageError, match="lr: 0.1 -> 0.2"):
        trainer.fit(3)
    _, _, history = fit(tmp_path / "run", epochs=3)  # the corrected call, while the refused Trainer lives on
    assert [r["epoch"] for r in history] == [1, 2, 3]


def test_changed_training_data_is_refused_like_a_changed_lr(tmp_path):
    fit(tmp_path / "run")
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0)
    common = dict(epochs=3, optimizer=opt, loss_fn=nn.CrossEntropyLoss(), val_data=data(), batch_size=8,
                  run_dir=tmp_path / "run", progress=False, quiet=True)
    with pytest.raises(UsageError, match="train_data"):
        etappe.fit(model, torch.utils.data.Subset(data(), range(40)), **common)
    with pytest.raises(UsageError, match="train_data"):
        etappe.fit(model, data(40), **common)  # the same type and one fewer sample... another length
    changed = data()
    changed.x[0, 0] += 1.0  # same type, same length, one value changed
    with pytest.raises(UsageError, match="train_data.checksum"):
        etappe.fit(model, changed, **common)
    fit(tmp_path / "run", epochs=3)  # the same data resumes


def test_a_change_of_optimizer_type_is_refused_even_when_allowed(tmp_path):
    fit(tmp_path / "run")
    with pytest.raises(UsageError, match="new run folder"):
        fit(tmp_path / "run", epochs=3, optimizer="adam", allow_config_change=True)


def test_a_run_stopped_inside_the_next_epoch_refuses_the_epochs_it_has_passed(tmp_path):
    # stopped by a real SIGINT (a notebook's interrupt button) during epoch 2: epochs=1 would return a model
    # trained past epoch 1 under epoch 1's history
    import os
    import signal

    calls = [0]

    def loss_fn(out, y):
        calls[0] += 1
        if calls[0] == 8:  # the second batch of epoch 2 (6 batches an epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return nn.functional.cross_entropy(out, y)

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    with pytest.raises(etappe.Preempted):
        etappe.fit(model, data(), epochs=3, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=loss_fn,
                   batch_size=8, run_dir=tmp_path / "run", progress=False, quiet=True)
    with pytest.raises(UsageError) as refused:
        etappe.fit(model, data(), epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=loss_fn,
                   batch_size=8, run_dir=tmp_path / "run", progress=False, quiet=True)
    assert "has 1 epochs and 2 batches of epoch 2 done; epochs=1 asks for fewer" in str(refused.value)
    assert "Ask for 2 or more" in str(refused.value)


def test_an_interrupt_after_the_last_step_lets_the_run_finish(tmp_path, capsys):
    # a real SIGINT while the last epoch is validated (after its last step): nothing is left to stop, so the run
    # completes and says so, instead of a KeyboardInterrupt from whatever was running then
    import os
    import signal

    calls = [0]

    def loss_fn(out, y):
        calls[0] += 1
        if calls[0] == 2 * 7:  # each epoch: 6 steps, then validation in one batch; this is epoch 2's validation
            os.kill(os.getpid(), signal.SIGINT)
        return nn.functional.cross_entropy(out, y)

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    history = etappe.fit(model, data(), epochs=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         loss_fn=loss_fn, val_data=data(), batch_size=8, run_dir=tmp_path / "run",
                         progress=False)
    assert calls[0] == 14 and [r["epoch"] for r in history] == [1, 2]
    assert "SIGINT arrived after the last step: the run is complete" in capsys.readouterr().out
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_save_into_a_run_this_trainer_has_not_resumed_is_refused_and_writes_nothing(tmp_path):
    """Trainer.save() on a run folder holding another run's checkpoints, before resume() or fit(): it would add
    an untrained state, never compared with the run's config, as one more checkpoint of that run."""
    fit(tmp_path / "run", epochs=2)
    store = etappe.CheckpointStore(tmp_path / "run" / "checkpoints")
    before = [c.step for c in store.checkpoints()]
    model = fresh_model()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.9), nn.CrossEntropyLoss(), train_data=data(),
                      batch_size=7, run_dir=tmp_path / "run", progress=False, quiet=True)
    with pytest.raises(UsageError, match=r"holds a run \(checkpoints up to step 12\).*resume\(\) or fit\(\) first"):
        trainer.save()
    assert [c.step for c in store.checkpoints()] == before == [6, 12]
    fresh = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.9), nn.CrossEntropyLoss(), train_data=data(),
                    batch_size=7, run_dir=tmp_path / "new", progress=False, quiet=True)
    assert fresh.save(wait=True).name == "step-00000000" and fresh.save(wait=True) is not None  # its own run: saves on
    _, _, history = fit(tmp_path / "run", epochs=3)  # the run itself resumes and saves as before
    assert [r["epoch"] for r in history] == [1, 2, 3]
