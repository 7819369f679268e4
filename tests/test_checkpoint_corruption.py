"""Corrupted checkpoints, property-based: any truncation, flipped byte or missing file of a checkpoint makes
``verify`` fail naming that file, ``load`` raise CheckpointError, and the store fall back to the previous one."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import etappe.checkpoint as ck
from etappe.checkpoint import CheckpointError, CheckpointStore, CheckpointWarning


def blank() -> tuple[nn.Module, torch.optim.Optimizer]:
    net = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 2))
    return net, torch.optim.Adam(net.parameters())


def state(step: int) -> dict:
    torch.manual_seed(step)
    net, opt = blank()
    net(torch.randn(4, 5)).sum().backward()
    opt.step()
    return {"model": net, "optimizer": opt, "step": step, "note": f"step {step}"}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A store holding a good checkpoint at step 1 and the one to corrupt at step 2."""
    root = tmp_path_factory.mktemp("template")
    store = CheckpointStore(root)
    store.save(1, state(1), {"loss": 0.5})
    store.save(2, state(2), {"loss": 0.4})
    return root


@pytest.fixture(scope="module")
def good_model(template) -> dict:
    return {k: v.clone() for k, v in state(1)["model"].state_dict().items()}


FILES = ["manifest.json", "model.safetensors", "optimizer.safetensors", "state.json"]


def test_template_is_what_the_properties_assume(template):
    assert sorted(p.name for p in (template / "step-00000002").iterdir()) == FILES
    ck.verify(template / "step-00000002")


def corrupt(path: Path, how: str, at: float, mask: int) -> None:
    data = path.read_bytes()
    offset = min(int(at * len(data)), len(data) - 1)
    if how == "truncate":
        path.write_bytes(data[:offset])
    elif how == "flip":
        path.write_bytes(data[:offset] + bytes([data[offset] ^ mask]) + data[offset + 1 :])
    else:
        path.unlink()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(FILES),
    how=st.sampled_from(["truncate", "flip", "delete"]),
    at=st.floats(0, 1, exclude_max=True),
    mask=st.integers(1, 255),
)
def test_any_corruption_is_caught_and_the_store_falls_back(template, good_model, name, how, at, mask):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        shutil.copytree(template, root)
        bad = root / "step-00000002"
        corrupt(bad / name, how, at, mask)

        with pytest.raises(CheckpointError) as err:
            ck.verify(bad)
        assert str(bad / name) in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(CheckpointError, match=name):
            ck.load(bad)
        net, _ = blank()
        before = {k: v.clone() for k, v in net.state_dict().items()}
        with pytest.raises(CheckpointError):
            ck.load(bad, model=net)
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing half-restored

        store = CheckpointStore(root)
        with pytest.warns(CheckpointWarning, match=name):
            assert store.latest() == root / "step-00000001"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            net, opt = blank()
            rest = store.load(model=net, optimizer=opt)
        assert rest == {"step": 1, "note": "step 1"}
        assert all(torch.equal(good_model[k], v) for k, v in net.state_dict().items())
        report = dict(ck.verify_tree(root))
        assert report[root / "step-00000001"] is None and name in report[bad]
