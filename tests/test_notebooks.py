"""etappe in a real Jupyter kernel: the example notebooks executed with nbclient, and a fit cell interrupted through
the kernel, then run again. The kernel is this test run's Python (a kernelspec written into a temporary
JUPYTER_PATH), so it imports the etappe under test."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupyter_client = pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((ROOT / "examples" / "notebooks").glob("*.ipynb"))
WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module", autouse=True)
def kernel_spec(tmp_path_factory):
    """A "python3" kernelspec that runs this Python, found first through JUPYTER_PATH (a spec installed elsewhere,
    e.g. one that runs whatever `python` is on PATH, is not used); IPython's profile kept out of the way. One torch
    thread: on a busy 2-core machine two threads wait on each other, and a kernel's fit runs 10-30x slower."""
    base = tmp_path_factory.mktemp("jupyter")
    spec = base / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "etappe tests", "language": "python",
    }))
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "IPYTHONDIR", "PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ["JUPYTER_PATH"] = str(base)
    os.environ["IPYTHONDIR"] = str(base / "ipython")
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), saved["PYTHONPATH"]]))
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class RecordingClient(nbclient.NotebookClient):
    """An nbclient that keeps every iopub message of each cell (display_data, update_display_data, ...)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.messages: dict[int, list[dict]] = {}

    def process_message(self, msg, cell, cell_index):
        self.messages.setdefault(cell_index, []).append(msg)
        return super().process_message(msg, cell, cell_index)


def execute(path: Path, cwd: Path) -> tuple[object, RecordingClient]:
    nb = nbformat.read(path, as_version=4)
    client = RecordingClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb, client


def fit_calls(source: str) -> int:
    return len(re.findall(r"\bfit\(", "\n".join(line.split("#")[0] for line in source.splitlines())))


def curve_displays(messages: list[dict]) -> tuple[set[str], int]:
    """The display ids of figures shown (or later filled) with a PNG, and the number of in-place updates to them."""
    ids, updates, shown = set(), 0, {}
    for msg in messages:
        kind, content = msg["msg_type"], msg["content"]
        display_id = content.get("transient", {}).get("display_id")
        if kind not in ("display_data", "update_display_data") or display_id is None:
            continue
        if "image/png" in content["data"]:
            ids.add(display_id)
        if kind == "update_display_data":
            shown[display_id] = shown.get(display_id, 0) + 1
    updates = sum(n for d, n in shown.items() if d in ids)
    return ids, updates


def progress_shown(messages: list[dict]) -> bool:
    for msg in messages:
        data = msg["content"].get("data", {})
        if WIDGET in data or "<progress" in data.get("text/html", ""):
            return True
    return False


def test_example_notebooks_are_committed_without_outputs():
    assert len(NOTEBOOKS) == 3
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs committed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_example_notebook_runs_with_progress_one_live_figure_per_fit_and_a_history_table(path, tmp_path):
    nb, client = execute(path, tmp_path)
    fits = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"{path.name} cell {i}: {errors[0]['ename']}: {errors[0]['evalue']}"
        streams = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        assert "Traceback" not in streams and "\r" not in streams, f"{path.name} cell {i}: {streams[-500:]}"
        calls = fit_calls(cell.source)
        messages = client.messages.get(i, [])
        ids, updates = curve_displays(messages)
        if calls:
            fits += calls
            assert progress_shown(messages), f"{path.name} cell {i}: no progress bar"
            assert len(ids) == calls, f"{path.name} cell {i}: {len(ids)} curve figures for {calls} fit calls"
            assert updates >= 1, f"{path.name} cell {i}: the figure was never updated in place"
            assert "Epoch" in streams
        else:
            assert not ids
        if cell.source.strip() == "history":
            (shown,) = [o for o in cell.outputs if o.output_type == "execute_result"]
            assert "<table" in shown["data"]["text/html"] and "train_loss" in shown["data"]["text/html"]
            assert "History(" in shown["data"]["text/plain"]
    assert fits >= 1
    assert list(tmp_path.glob("runs/*/curves.png")), "curves.png is still written"


# ---------------------------------------------------------------- one kernel, driven through jupyter_client

SETUP = """
import time
import torch
from torch import nn
import etappe
from etappe.models import build

data = etappe.load_dataset("digits")

def loss_fn(output, target):
    time.sleep(0.005)  # a step long enough that an interrupt lands inside the epoch it was sent in
    return nn.functional.cross_entropy(output, target)

def make(lr=1e-3):
    torch.manual_seed(0)
    model = build("mlp", data.spec.input_shape, data.spec.num_outputs)
    return model, torch.optim.Adam(model.parameters(), lr=lr)

model, optimizer = make()
"""
FIT = """history = etappe.fit(model, data, epochs={epochs}, optimizer=optimizer, loss_fn=loss_fn, batch_size=16,
                     run_dir={run!r}, save_every=15)"""
PER_EPOCH = -(-1437 // 16)  # steps: digits' train split in batches of 16


class Kernel:
    """A kernel started by jupyter_client's KernelManager, and the iopub messages of each execution."""

    def __init__(self, cwd: Path) -> None:
        self.manager = jupyter_client.KernelManager(kernel_name="python3")
        self.manager.start_kernel(cwd=str(cwd))
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def submit(self, code: str) -> str:
        return self.client.execute(code)

    def messages(self, msg_id: str, timeout: float = 120, until: "callable | None" = None) -> list[dict]:
        """iopub messages of ``msg_id`` until the kernel is idle again (or ``until(message)`` says stop)."""
        out, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.client.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            out.append(msg)
            if until is not None and until(msg):
                return out
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return out
        raise AssertionError(f"the kernel did not finish within {timeout} s: {text(out)[-2000:]}")

    def run(self, code: str, timeout: float = 120) -> list[dict]:
        return self.messages(self.submit(code), timeout)

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def text(messages: list[dict]) -> str:
    parts = []
    for m in messages:
        c = m["content"]
        parts.append(c.get("text", "") + c.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def errors(messages: list[dict]) -> list[dict]:
    return [m["content"] for m in messages if m["msg_type"] == "error"]


@pytest.fixture
def kernel(tmp_path):
    k = Kernel(tmp_path)
    yield k
    k.close()


def test_interrupting_a_fit_cell_saves_the_step_and_running_it_again_ends_bit_identical(kernel, tmp_path):
    import torch

    assert not errors(kernel.run(SETUP))
    fit = FIT.format(epochs=3, run="run")
    msg_id = kernel.submit(fit)
    # Interrupt once a checkpoint shows epoch 2 begun (save_every=15): 75 steps of 5 ms or more are left in it.
    checkpoints, deadline = tmp_path / "run" / "checkpoints", time.monotonic() + 120
    while not any(int(p.name.split("-")[1]) > PER_EPOCH for p in checkpoints.glob("step-*")):
        assert time.monotonic() < deadline, "no checkpoint of epoch 2 within 120 s"
        time.sleep(0.05)
    kernel.manager.interrupt_kernel()
    rest = kernel.messages(msg_id)
    (error,) = errors(rest)
    assert error["ename"] == "Preempted", error
    assert "run this cell again" in error["evalue"] and "etappe resume" not in error["evalue"], error["evalue"]
    assert len(error["traceback"]) == 1, "an interrupt is shown as its message, not a traceback"
    step, where = re.search(r"saved step (\d+) to (\S+);", error["evalue"]).groups()
    step = int(step)
    assert PER_EPOCH < step < 2 * PER_EPOCH, f"stopped at step {step}: expected inside epoch 2"
    checkpoint = tmp_path / where
    assert checkpoint.parent == tmp_path / "run" / "checkpoints" and (checkpoint / "manifest.json").is_file()
    import etappe

    etappe.verify(checkpoint, step=step)  # committed and whole, at the step it stopped at

    assert "2" in text(kernel.run("1 + 1")), "the kernel is alive"
    again = kernel.run(fit)  # the same cell, run again
    assert not errors(again), errors(again)
    assert "Resuming" in text(again) and f"from step {step}" in text(again)
    straight = kernel.run("model2, optimizer2 = make()\n" + FIT.format(epochs=3, run="straight").replace(
        "model,", "model2,").replace("optimizer=optimizer", "optimizer=optimizer2") + textwrap.dedent("""
        torch.save({"resumed": model.state_dict(), "straight": model2.state_dict(),
                    "opt_resumed": optimizer.state_dict(), "opt_straight": optimizer2.state_dict()}, "both.pt")
        """))
    assert not errors(straight), errors(straight)
    both = torch.load(tmp_path / "both.pt", weights_only=True)
    for name, tensor in both["straight"].items():
        assert torch.equal(tensor, both["resumed"][name]), name
    for key, state in both["opt_straight"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, both["opt_resumed"]["state"][key][k]), (key, k)


def test_the_same_fit_again_with_another_learning_rate_is_refused(kernel, tmp_path):
    assert not errors(kernel.run(SETUP))
    assert not errors(kernel.run(FIT.format(epochs=1, run="run")))
    refused = kernel.run("model, optimizer = make(lr=1e-2)\n" + FIT.format(epochs=2, run="run"))
    (error,) = errors(refused)
    assert error["ename"] == "UsageError"
    assert "lr: 0.001 -> 0.01" in error["evalue"] and "new run folder" in error["evalue"], error["evalue"]
    assert len(error["traceback"]) == 1, "an expected failure is shown as its message, not a traceback"
    assert not errors(kernel.run(FIT.format(epochs=2, run="run").replace("run_dir='run'", "run_dir='run-lr'")))


def test_without_ipywidgets_the_bar_is_html_updated_in_place_and_plot_false_shows_no_figure(kernel):
    messages = kernel.run('import sys\nsys.modules["ipywidgets"] = None  # as if not installed\n' + SETUP
                          + FIT.format(epochs=2, run="run").replace("save_every=15", "plot=False"))
    assert not errors(messages), errors(messages)
    bars = [m for m in messages if "<progress" in m["content"].get("data", {}).get("text/html", "")]
    assert any(m["msg_type"] == "update_display_data" for m in bars), "the bar is updated in place"
    assert not any(WIDGET in m["content"].get("data", {}) for m in messages)
    assert not any("image/png" in m["content"].get("data", {}) for m in messages), "plot=False: no figure"
    streams = "".join(m["content"].get("text", "") for m in messages if m["msg_type"] == "stream")
    assert "\r" not in streams and "Epoch 2/2" in streams


def test_outside_a_notebook_ipython_is_not_imported_and_terminal_ipython_is_no_notebook(tmp_path):
    code = textwrap.dedent("""
        import sys
        import torch
        import etappe
        from etappe.notebook import in_notebook
        data = etappe.load_dataset("digits")
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        etappe.fit(model, data, epochs=1, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                   loss_fn=torch.nn.CrossEntropyLoss(), batch_size=64, quiet=True)
        print("plain", in_notebook(), "IPython" in sys.modules)
        from IPython.terminal.interactiveshell import TerminalInteractiveShell
        TerminalInteractiveShell.instance()
        print("terminal", in_notebook())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stderr
    assert "plain False False" in out.stdout and "terminal False" in out.stdout, out.stdout
