"""The one atomic-write helper every file etappe writes goes through, and the one rule for tied weights."""

import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from etappe.checkpoint import fsio, inspect, tied

# A run's metrics and figure written once, then again under a real file-size limit (RLIMIT_FSIZE): the kernel lets
# each new file grow to the limit and then refuses the write (EFBIG), in the middle of it. No mock: the writers
# are the ones the loop calls.
WRITE_UNDER_A_LIMIT = r"""
import errno, resource, signal, sys, types
from pathlib import Path
from etappe import log

run = Path(sys.argv[1])
def history(n):
    return types.SimpleNamespace(epochs=[{"epoch": e, "train_loss": 1 / e, "val_loss": 2 / e, "val_accuracy": e / n,
                                          "seconds": 0.5} for e in range(1, n + 1)])
log.write_history(run, history(2))
log.plot_curves(run, history(2))
print("before", sorted((p.name, p.stat().st_size) for p in run.iterdir()), flush=True)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
for write in (log.write_history, log.plot_curves):
    try:
        write(run, history(300))
    except OSError as e:
        print(write.__name__, "failed with", errno.errorcode[e.errno], flush=True)
    else:
        print(write.__name__, "wrote", flush=True)
"""


def test_a_write_that_fails_midway_keeps_the_previous_files_and_leaves_no_temporary_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.run([sys.executable, "-c", WRITE_UNDER_A_LIMIT, str(run)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1:] == ["write_history failed with EFBIG", "plot_curves failed with EFBIG"], proc.stdout
    assert sorted(p.name for p in run.iterdir()) == ["curves.png", "metrics.csv", "metrics.jsonl"]
    assert lines[0] == "before " + repr(sorted((p.name, p.stat().st_size) for p in run.iterdir()))
    assert (run / "metrics.jsonl").read_text().count("\n") == 2  # the two epochs written before
    assert (run / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_atomic_path_keeps_the_previous_file_when_its_writer_fails(tmp_path):
    target = tmp_path / "curves.png"
    fsio.atomic_write_bytes(target, b"previous")
    with pytest.raises(ValueError), fsio.atomic_path(target) as tmp:
        tmp.write_bytes(b"half a fig")
        raise ValueError("the writer failed")
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["curves.png"]
    with fsio.atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_exactly_one_os_replace_in_etappe():
    src = Path(fsio.__file__).resolve().parents[1]
    hits = [(p.name, line) for p in src.rglob("*.py") for line in p.read_text().splitlines()
            if "os.replace(" in line or "os.rename(" in line or ".rename(" in line]
    assert hits == [("fsio.py", "    os.replace(src, dst)")]


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.embed.weight


def test_tied_weights_one_rule():
    net = Tied()
    state = net.state_dict()
    a, b = state["embed.weight"], state["out.weight"]
    assert a is not b and tied.key(a) == tied.key(b)  # two tensors, one weight
    assert tied.key(a[1:]) != tied.key(a) and tied.key(a.t()) != tied.key(a)  # other views of it are not tied
    assert tied.key(torch.empty(0)) is None
    c = a[1:]
    assert [id(t) for t in tied.distinct([a, b, c])] == [id(a), id(c)]
    owned = tied.owned({"x": [a, b]})
    assert owned["x"][0] is owned["x"][1] and owned["x"][0].data_ptr() != a.data_ptr()
    plain = tied.untied(state)  # what a plain safetensors file takes: every name, memory of its own
    assert plain.keys() == state.keys() and plain["embed.weight"].data_ptr() != plain["out.weight"].data_ptr()
    assert torch.equal(safetensors.torch.load(safetensors.torch.save(plain))["out.weight"], b)


def test_inspect_counts_a_tied_weight_once_in_a_plain_file(tmp_path):
    torch.save(Tied().state_dict(), tmp_path / "tied.pt")
    (entry,) = inspect(tmp_path / "tied.pt")["entries"]
    assert entry["parameters"] == 15 and entry["bytes"] == 15 * 4
    assert [t["name"] for t in entry["tensors"]] == ["embed.weight", "out.weight"]
