"""Plain torch.save files in the seeds' layouts: inspected and loaded into fresh models and optimizers; files
that need full unpickling are refused unless trusted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import etappe.checkpoint as ck
from etappe.checkpoint import CheckpointError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def trained(seed: int) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
    return net, opt


def blank() -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(99)
    net = Net()
    return net, torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.1)


def same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            if not same_state(x, y):
                return False
        elif isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def test_bare_state_dict(tmp_path):
    net, _ = trained(0)
    torch.save(net.state_dict(), tmp_path / "s.pt")
    fresh, _ = blank()
    assert ck.load(tmp_path / "s.pt", model=fresh) == {}
    assert same_state(fresh.state_dict(), net.state_dict())
    raw = ck.load(tmp_path / "s.pt")
    assert list(raw) == ["model"] and same_state(raw["model"], net.state_dict())
    with pytest.raises(CheckpointError, match="nothing for 'optimizer'; it holds: model"):
        ck.load(tmp_path / "s.pt", model=fresh, optimizer=blank()[1])
    info = ck.inspect(tmp_path / "s.pt")
    assert info["format"] == "torch.save" and info["entries"][0]["kind"] == "module"
    assert info["entries"][0]["parameters"] == sum(p.numel() for p in net.parameters())
    assert "fc1.weight\t[6, 4]\tfloat32\t96 B" in ck.format_inspection(info)


@pytest.mark.parametrize("suffix", [".pt", ".tar"])
def test_general_checkpoint(tmp_path, suffix):
    net, opt = trained(1)
    path = tmp_path / f"model{suffix}"
    torch.save({"epoch": 5, "model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict(), "loss": 0.4}, path)
    fresh, fresh_opt = blank()
    assert ck.load(path, model=fresh, optimizer=fresh_opt) == {"epoch": 5, "loss": 0.4}
    assert same_state(fresh.state_dict(), net.state_dict()) and same_state(fresh_opt.state_dict(), opt.state_dict())
    fresh2, _ = blank()
    ck.load(path, net=fresh2)  # no key answers to 'net': the only model state_dict in the file does
    assert same_state(fresh2.state_dict(), net.state_dict())
    entries = {e["name"]: e for e in ck.inspect(path)["entries"]}
    assert entries["optimizer_state_dict"]["type"].startswith("SGD (guessed")
    assert entries["optimizer_state_dict"]["param_groups"][0]["momentum"] == 0.9
    assert entries["epoch"]["value"] == 5 and entries["model_state_dict"]["kind"] == "module"


def test_state_dict_and_optimizer_keys_with_a_scheduler(tmp_path):
    net, opt = trained(2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3)
    opt.step()
    sched.step()
    state = {"epoch": 7, "lr_sched": sched.state_dict(), "state_dict": net.state_dict(), "optimizer": opt.state_dict()}
    torch.save(state, tmp_path / "checkpoint.pth.tar")
    fresh, fresh_opt = blank()
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=1)
    rest = ck.load(tmp_path / "checkpoint.pth.tar", model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    assert rest == {"epoch": 7}
    assert same_state(fresh.state_dict(), net.state_dict()) and same_state(fresh_opt.state_dict(), opt.state_dict())
    assert fresh_sched.state_dict() == sched.state_dict()
    kinds = {e["name"]: e["kind"] for e in ck.inspect(tmp_path / "checkpoint.pth.tar")["entries"]}
    assert kinds == {"epoch": "value", "lr_sched": "scheduler", "state_dict": "module", "optimizer": "optimizer"}


def test_model_and_optimizer_keys(tmp_path):
    net, opt = trained(3)
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "checkpoint.pth.tar")
    fresh, fresh_opt = blank()
    assert ck.load(tmp_path / "checkpoint.pth.tar", model=fresh, optimizer=fresh_opt) == {}
    assert same_state(fresh.state_dict(), net.state_dict()) and same_state(fresh_opt.state_dict(), opt.state_dict())


def test_several_models_in_one_file(tmp_path):
    (a, oa), (b, ob) = trained(4), trained(5)
    torch.save({"modelA_state_dict": a.state_dict(), "modelB_state_dict": b.state_dict(),
                "optimizerA_state_dict": oa.state_dict(), "optimizerB_state_dict": ob.state_dict()}, tmp_path / "model.pt")
    (fa, foa), (fb, fob) = blank(), blank()
    assert ck.load(tmp_path / "model.pt", modelA=fa, modelB=fb, optimizerA=foa, optimizerB=fob) == {}
    assert same_state(fa.state_dict(), a.state_dict()) and same_state(fb.state_dict(), b.state_dict())
    assert same_state(foa.state_dict(), oa.state_dict()) and same_state(fob.state_dict(), ob.state_dict())
    (g, og), (d, od) = trained(6), trained(7)
    torch.save({"G": g.state_dict(), "D": d.state_dict(), "opt_G": og.state_dict(), "opt_D": od.state_dict()}, tmp_path / "gan.pth")
    (fg, fog), (fd, fod) = blank(), blank()
    ck.load(tmp_path / "gan.pth", G=fg, D=fd, opt_G=fog, opt_D=fod)
    assert same_state(fg.state_dict(), g.state_dict()) and same_state(fod.state_dict(), od.state_dict())
    with pytest.raises(CheckpointError, match="nothing for 'model'"):
        ck.load(tmp_path / "gan.pth", model=blank()[0])  # two models: which one is ambiguous
    text = ck.format_inspection(ck.inspect(tmp_path / "gan.pth"))
    assert "G: Net" not in text and "G: model state_dict" in text and "opt_D: SGD" in text


class Evil:
    """Unpickling this runs a shell command, as a malicious checkpoint would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_file_whose_pickle_runs_code_is_refused_unless_trusted(tmp_path):
    marker = tmp_path / "pwned"
    net, _ = trained(8)
    path = tmp_path / "innocent.pth"
    torch.save({"model_state_dict": net.state_dict(), "epoch": 1, "extra": Evil(marker)}, path)

    for attempt in (lambda: ck.load(path), lambda: ck.load(path, model=blank()[0]), lambda: ck.inspect(path)):
        with pytest.raises(CheckpointError) as err:
            attempt()
        msg = str(err.value)
        assert "refused" in msg and "trusted=True" in msg and "--trust" in msg and "system" in msg and str(path) in msg
        assert not marker.exists()
    ck.verify(path)  # checks the archive's CRCs without unpickling
    assert not marker.exists()

    fresh, _ = blank()
    rest = ck.load(path, trusted=True, model=fresh)
    assert marker.exists()  # the opt-in really does run the file's code
    assert same_state(fresh.state_dict(), net.state_dict()) and rest["epoch"] == 1


def test_a_whole_pickled_model_needs_trust(tmp_path):
    net, opt = trained(9)
    torch.save({"epoch": 2, "model": net, "optimizer": opt}, tmp_path / "s.pt")  # the seeds' "second way"
    with pytest.raises(CheckpointError, match="refused.*Net"):
        ck.load(tmp_path / "s.pt", model=blank()[0])
    fresh, fresh_opt = blank()
    assert ck.load(tmp_path / "s.pt", trusted=True, model=fresh, optimizer=fresh_opt) == {"epoch": 2}
    assert same_state(fresh.state_dict(), net.state_dict()) and same_state(fresh_opt.state_dict(), opt.state_dict())
    info = ck.inspect(tmp_path / "s.pt", trusted=True)
    json.dumps(info)
    assert {e["name"]: e.get("type") for e in info["entries"]}["model"].endswith("Net")


def test_unreadable_files_give_one_line(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    net, _ = trained(10)
    torch.save(net.state_dict(), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    for name in ("junk.pt", "cut.pt"):
        with pytest.raises(CheckpointError, match=f"{name}: not a readable torch.save file") as err:
            ck.load(tmp_path / name)
        assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="cut.pt"):
        ck.verify(tmp_path / "cut.pt")
    flipped = bytearray(data)
    flipped[data.index(net.fc1.weight.detach().numpy().tobytes()) + 5] ^= 0xFF  # inside a tensor's bytes
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="flipped.pt"):
        ck.verify(tmp_path / "flipped.pt")


def test_safetensors_file_is_a_bare_state_dict(tmp_path):
    from safetensors.torch import save_file

    net, _ = trained(11)
    save_file(net.state_dict(), tmp_path / "model.safetensors")
    fresh, _ = blank()
    ck.load(tmp_path / "model.safetensors", model=fresh)
    assert same_state(fresh.state_dict(), net.state_dict())
    assert ck.inspect(tmp_path / "model.safetensors")["format"] == "safetensors"
