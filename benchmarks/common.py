"""What every benchmark shares: the machine line, timing, medians, a table printer and a JSON row writer.

Benchmarks compare side by side in one run and report ratios; absolute figures drift from run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = sys.executable
ETAPPE = str(Path(PYTHON).with_name("etappe"))
OUT = HERE / "out"  # JSON rows of the last run of each benchmark (git-ignored)


def machine() -> str:
    """``2026-11-23, 2 CPUs (AMD EPYC), torch 2.13.0+cpu, Python 3.11.9`` -- imports torch."""
    import torch

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = f" ({line.split(':', 1)[1].strip()})"
                break
    except OSError:
        pass
    return (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs{cpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}")


def command() -> str:
    """The command line that ran this benchmark, as it would be typed."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return " ".join([".venv/bin/python", str(script), *sys.argv[1:]])


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    p.add_argument("--full", action="store_true", help="full sizes (slow); default: quick sizes")
    p.add_argument("--repeats", type=int, default=None, help="runs per variant (median is reported)")
    return p


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds ``fn()`` took (perf_counter) and what it returned."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# ---------------------------------------------------------------- a shared machine
# Other work on this machine (test suites, other sessions) takes cores away, and with 2 torch threads a step then
# waits for the descheduled thread: throughput drops 2-20x for seconds. So every measured run also measures the
# CPU time everyone else took meanwhile, and a round in which others took more than OTHERS_MAX is run again
# (once: on a machine that never goes quiet the busy round is kept, and counted in the report).

OTHERS_MAX = 0.10  # share of the machine's CPU time others may take during a measured round


def _busy_seconds() -> float:
    """CPU seconds all CPUs spent busy (user, system, irq, and steal by the hypervisor) since boot."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class OthersMeter:
    """``with OthersMeter() as m: ...`` then ``m.share``: the share of the machine's CPU time that other
    processes (and the hypervisor) took during the block."""

    def __enter__(self) -> "OthersMeter":
        self.t, self.busy, self.own = time.perf_counter(), _busy_seconds(), _own_seconds()
        return self

    def __exit__(self, *exc: Any) -> None:
        wall = time.perf_counter() - self.t
        others = (_busy_seconds() - self.busy) - (_own_seconds() - self.own)
        self.share = max(0.0, others) / max(wall * (os.cpu_count() or 1), 1e-9)


def wait_quiet(limit_s: float = 10.0, probe_s: float = 0.5) -> float:
    """Wait (up to ``limit_s``) until others take at most OTHERS_MAX of the machine; returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        with OthersMeter() as m:
            time.sleep(probe_s)
        if m.share <= OTHERS_MAX:
            break
    return time.perf_counter() - start


class Rounds:
    """Counts of clean, re-run and accepted-while-busy rounds, for the report."""

    def __init__(self) -> None:
        self.clean = self.rerun = self.busy = 0

    def __str__(self) -> str:
        note = f"{self.clean} clean rounds, {self.rerun} re-run because other processes took > {OTHERS_MAX:.0%} CPU"
        return note + (f", {self.busy} kept although busy (the machine never went quiet)" if self.busy else "")


def alternate(variants: dict[str, Callable[[], float]], repeats: int, tries: int = 2,
              rounds: Rounds | None = None) -> dict[str, list[float]]:
    """Run each variant once per round, ``repeats`` rounds, in rotating order so drift hits all alike.
    Each variant returns its figure; the lists of figures are returned by name. A round during which other
    processes took more than OTHERS_MAX of the CPU is run again (up to ``tries`` times, then kept)."""
    names = list(variants)
    figures: dict[str, list[float]] = {n: [] for n in names}
    rounds = rounds if rounds is not None else Rounds()
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for attempt in range(tries):
            wait_quiet()
            with OthersMeter() as m:
                got = {name: variants[name]() for name in order}
            if m.share <= OTHERS_MAX:
                rounds.clean += 1
                break
            if attempt == tries - 1:
                rounds.busy += 1
            else:
                rounds.rerun += 1
        for name in names:
            figures[name].append(got[name])
    return figures


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3f}"
    return str(value)


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (also readable on a terminal), printed and returned."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    text = "\n".join([f"\n{title}", line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in cells)])
    print(text, flush=True)
    return text


def write_rows(name: str, rows: list[dict]) -> Path:
    """Save this run's rows (with date, machine and command) to benchmarks/out/NAME.json."""
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "command": command(), "rows": rows}, indent=1) + "\n")
    return path


def run_quiet(cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a command, capturing its output; raise with its stderr when it fails unexpectedly."""
    return subprocess.run(list(cmd), capture_output=True, text=True, cwd=kwargs.pop("cwd", ROOT), **kwargs)


def drop_page_cache() -> bool:
    """Flush dirty pages and drop the page cache (needs root); False where it is not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_store() -> str | None:
    """None when etappe's checkpoint store is importable, else why not (for a 'pending' note)."""
    try:
        import etappe.checkpoint as ck  # noqa: F401
    except Exception as exc:  # noqa: BLE001 -- any import failure means the store is not there yet
        return f"etappe.checkpoint is not importable yet ({type(exc).__name__}: {exc})"
    missing = [n for n in ("save", "load", "CheckpointStore") if not hasattr(ck, n)]
    return f"etappe.checkpoint lacks {', '.join(missing)}" if missing else None


# ---------------------------------------------------------------- checkpoint state


def make_state(weights_mb: float, width: int | None = None):
    """A stack of Linear layers holding ``weights_mb`` MB of float32 weights, and an Adam optimizer that has
    taken one step (so its exp_avg and exp_avg_sq double that): about 3x ``weights_mb`` of state in all."""
    import torch
    from torch import nn

    width = width or (4096 if weights_mb >= 1000 else 2048)
    per_layer = (width * width + width) * 4 / 1e6
    layers = max(1, round(weights_mb / per_layer))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def flat_tensors(model, opt) -> dict:
    """Every tensor of the model's and the optimizer's state, by a flat name (what a bare safetensors file holds)."""
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"optimizer.{i}.{k}"] = v if v.dim() else v.reshape(1)
    return out


def state_bytes(model, opt) -> int:
    return sum(t.numel() * t.element_size() for t in flat_tensors(model, opt).values())


def touch(tensors) -> None:
    """Read one element per 4 KB page of every tensor (forces a lazily mapped file into memory)."""
    import torch

    for t in tensors:
        if t.numel():
            flat = t.reshape(-1)
            step = max(1, 4096 // t.element_size())
            flat[::step].to(torch.float64).sum()


def tensors_of(tree):
    """Every tensor in a nested dict/list/tuple."""
    import torch

    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from tensors_of(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from tensors_of(v)
