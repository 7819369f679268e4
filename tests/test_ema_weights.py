"""EMA weights and how runs trained: eval/export/predict --weights ema|raw on real runs, inspect showing precision,
accumulation, EMA and the gradient scaler, and state dicts of compiled or DDP-wrapped models loading into plain ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import etappe
from etappe.checkpoint import CheckpointStore, format_inspection, inspect, kinds, manifest
from etappe.errors import EtappeError, UsageError
from etappe.export import load_model, read_sidecar
from etappe.predict import predict
from tests.conftest import run_cli
from tests.test_cli import one_line_error


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real digits runs from the CLI: one with --ema 0.5 --accumulate 2 (2 epochs), one without EMA (1 epoch)."""
    root = tmp_path_factory.mktemp("ema")
    for name, flags in (("ema", ["--epochs", "2", "--ema", "0.5", "--accumulate", "2"]), ("raw", ["--epochs", "1"])):
        result = run_cli("train", "--data", "digits", *flags, "--run-dir", str(root / name), "--quiet", cwd=root)
        assert result.returncode == 0, result.stderr
    return root


def latest(run: Path) -> Path:
    return CheckpointStore(run / "checkpoints").latest()


def sample(root: Path) -> Path:
    """One digits-shaped input for predict."""
    x = root / "one.npy"
    np.save(x, np.full((1, 8, 8), 0.5, dtype=np.float32))
    return x


def eval_json(run, *flags):
    out = run_cli("eval", str(run), "--checkpoint", "latest", "--json", *flags, cwd=run.parent)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_eval_with_ema_weights_differs_from_raw_and_is_what_validation_saw(runs):
    ema, raw = eval_json(runs / "ema", "--weights", "ema"), eval_json(runs / "ema", "--weights", "raw")
    assert (ema["weights"], raw["weights"]) == ("ema", "raw")
    assert ema["loss"] != raw["loss"]
    # validation runs on the EMA weights when the run keeps them: the latest checkpoint's val_loss is theirs
    val_loss = manifest.read(latest(runs / "ema"))["metrics"]["val_loss"]
    assert ema["loss"] == pytest.approx(val_loss, rel=1e-6)
    assert raw["loss"] != pytest.approx(val_loss, rel=1e-6)
    assert eval_json(runs / "ema") == raw  # raw is the default
    text = run_cli("eval", str(runs / "ema"), "--weights", "ema", cwd=runs).stdout
    assert text.startswith("digits test (ema weights): loss")


@pytest.mark.parametrize("weights, entry", [("ema", "ema"), ("raw", "model")])
def test_export_holds_exactly_the_checkpoints_entry(runs, weights, entry):
    run = runs / "ema"
    out = runs / f"{weights}.safetensors"
    result = run_cli("export", str(run), "--format", "safetensors", "--checkpoint", "latest", "--weights", weights,
                     "--out", str(out), cwd=runs)
    assert result.returncode == 0, result.stderr
    saved = etappe.load(latest(run))
    exported = load_file(out)
    assert exported.keys() == saved[entry].keys()
    assert all(torch.equal(exported[k], saved[entry][k]) for k in exported)
    other = saved["model" if entry == "ema" else "ema"]
    assert not all(torch.equal(exported[k], other[k]) for k in exported)  # the two sets of weights differ
    assert read_sidecar(out)["weights"] == weights
    # the exported file loads back as what it is, and says so
    module, config = load_model(out, weights=weights)
    assert config["weights"] == weights
    assert all(torch.equal(module.state_dict()[k], saved[entry][k]) for k in exported)


def test_predict_uses_the_weights_asked_for(runs):
    x = sample(runs)
    probs = {w: predict(runs / "ema", [x], which="latest", weights=w)[0]["probability"]
             for w in ("ema", "raw")}
    assert probs["ema"] != probs["raw"]
    shown = run_cli("predict", str(runs / "ema"), str(x), "--checkpoint", "latest", "--weights", "ema", "--json",
                    cwd=runs)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)[0]["probability"] == pytest.approx(probs["ema"])


@pytest.mark.parametrize("command", [["eval"], ["export", "--format", "safetensors"], ["predict"]])
def test_weights_ema_on_a_run_without_ema_is_one_line_exit_2(runs, command):
    extra = [str(sample(runs))] if command == ["predict"] else []
    line = one_line_error(run_cli(command[0], str(runs / "raw"), *extra, *command[1:], "--weights", "ema", cwd=runs),
                          2)
    assert "no 'ema' entry" in line and "not trained with --ema" in line and "--weights raw" in line


def test_weights_ema_on_a_plain_weights_file_without_ema_is_refused(runs):
    with pytest.raises(UsageError, match="no 'ema' entry and no sidecar says"):
        load_model(runs / "raw" / "model.safetensors", weights="ema")
    with pytest.raises(UsageError, match="weights: expected one of 'raw', 'ema', got 'averaged'"):
        load_model(runs / "raw", weights="averaged")


def test_a_torch_save_dict_with_an_ema_entry_gives_it(runs, tmp_path):
    saved = etappe.load(latest(runs / "ema"))
    torch.save({"model": saved["model"], "ema": saved["ema"]}, tmp_path / "both.pt")
    (tmp_path / "config.json").write_text((runs / "ema" / "config.json").read_text())
    for weights, entry in (("ema", "ema"), ("raw", "model")):
        module, _ = load_model(tmp_path / "both.pt", weights=weights)
        assert all(torch.equal(v, saved[entry][k]) for k, v in module.state_dict().items())


# ------------------------------------------------------------------ inspect


def test_inspect_shows_precision_accumulation_and_ema_of_a_run(runs):
    for path in (runs / "ema", latest(runs / "ema")):  # the run folder (its latest checkpoint) and a checkpoint
        shown = run_cli("inspect", str(path), cwd=runs)
        assert shown.returncode == 0, shown.stderr
        assert ("training: precision 32, accumulate 2, not compiled, ema decay 0.5 (averaged model saved as entry "
                "'ema')") in shown.stdout.splitlines()
        info = json.loads(run_cli("inspect", str(path), "--json", cwd=runs).stdout)
        assert info["training"] == {"precision": "32", "accumulate": 2, "compile": False, "warmup_steps": 0,
                                    "ema": {"decay": 0.5, "saved": True}}
    info = inspect(latest(runs / "raw"))
    assert info["training"]["ema"] is None
    assert "accumulate 1, not compiled, no ema" in format_inspection(info)


def test_inspect_shows_the_grad_scalers_state(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    for _ in range(3):  # real steps: the scale grows after each finite one
        scaler.scale(model(torch.ones(4, 3)).sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    state = scaler.state_dict()
    assert state["scale"] == 8192.0
    config = {"precision": "16-mixed", "accumulate": 4, "compile": True, "ema": None, "warmup_steps": 10}
    etappe.save(tmp_path / "ck", model=model, scaler=scaler, config=config)
    info = inspect(tmp_path / "ck")
    assert info["training"] == {"precision": "16-mixed", "accumulate": 4, "compile": True, "warmup_steps": 10,
                                "ema": None, "scaler": {"entry": "scaler", "scale": 8192.0,
                                                        "growth_tracker": state["_growth_tracker"]}}
    assert (f"training: precision 16-mixed, accumulate 4, compiled, warm-up 10 steps, no ema, grad scaler scale "
            f"8192.0, growth tracker {state['_growth_tracker']}") in format_inspection(info)
    # a plain torch.save file with a scaler's state: shown from the state alone
    torch.save({"model": model.state_dict(), "amp": state}, tmp_path / "plain.pt")
    assert inspect(tmp_path / "plain.pt")["training"] == {
        "scaler": {"entry": "amp", "scale": 8192.0, "growth_tracker": state["_growth_tracker"]}}


# ------------------------------------------------------------------ compiled and DDP prefixes


def test_a_compiled_models_torch_save_state_dict_loads_into_the_plain_model(runs, tmp_path):
    model, _ = load_model(runs / "raw")
    state = torch.compile(model).state_dict()  # names _orig_mod.*, without compiling anything
    assert all(k.startswith("_orig_mod.") for k in state)
    torch.save(state, runs / "raw" / "compiled.pt")  # beside the run's config.json, which rebuilds the model
    fresh, _ = load_model(runs / "raw")
    with torch.no_grad():
        for p in fresh.parameters():
            p.fill_(float("nan"))
    etappe.load(runs / "raw" / "compiled.pt", model=fresh)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
    # eval and predict read it as they read the run's own weights
    assert eval_json(runs / "raw" / "compiled.pt") == eval_json(runs / "raw" / "model.safetensors")
    x = sample(runs)
    ran = [run_cli("predict", str(runs / "raw" / name), str(x), "--json", cwd=runs)
           for name in ("compiled.pt", "model.safetensors")]
    assert all(r.returncode == 0 for r in ran), [r.stderr for r in ran]
    assert json.loads(ran[0].stdout) == json.loads(ran[1].stdout)


def test_ddp_and_compiled_ddp_prefixes_load_from_safetensors_and_checkpoints(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model(torch.randn(5, 4))  # running stats and a counter that differ from a fresh model's
    for prefix in ("module.", "_orig_mod.module."):
        save_file({prefix + k: v for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
        fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        etappe.load(tmp_path / "w.safetensors", model=fresh)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
    etappe.save(tmp_path / "ck", model=torch.compile(model))  # a user's save of the compiled module itself
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    etappe.load(tmp_path / "ck", model=fresh)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())


class Holder(torch.nn.Module):
    """A model whose own names start with ``module.``: nothing of them may be taken off."""

    def __init__(self) -> None:
        super().__init__()
        self.module = torch.nn.Linear(2, 2)


def test_the_prefix_rule_strips_only_a_prefix_every_key_has_and_the_model_lacks(tmp_path):
    one, two = torch.zeros(1), torch.ones(1)
    plain = {"a.weight": one, "b.weight": two}
    assert kinds.unprefixed({"_orig_mod.a.weight": one, "_orig_mod.b.weight": two}, plain) == plain
    assert kinds.unprefixed({"module.a.weight": one, "module.b.weight": two}, plain) == plain
    partial = {"_orig_mod.a.weight": one, "b.weight": two}
    assert kinds.unprefixed(partial, plain) is partial
    own = Holder().state_dict()
    assert kinds.unprefixed(own, own.keys()) is own  # the model's own names start with module.: kept
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(EtappeError, match=r"cannot restore .* into Linear: .*_orig_mod\.a\.weight"):
        etappe.load(tmp_path / "partial.pt", model=torch.nn.Linear(1, 1))
