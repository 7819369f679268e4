"""Target 5: async save. A foreground training loop (the quickstart MLP, batch 32, SGD, random data, 2 torch
threads) runs in the main thread while weights + Adam state are checkpointed. For each way of saving:

  stall        seconds the training thread is blocked by the save call
  fg rate      foreground steps/s while the write is in flight, as a share of the undisturbed rate (measured
               just before, in the same round)
  lost         training seconds the checkpoint costs: the stall plus the steps not taken while the write runs
               (in-flight seconds x (1 - fg rate))
  durable      seconds from the call until the checkpoint is on disk
  peak extra   peak RSS above the state alone, over two saves (the first allocates any buffer pool), in a fresh
               process per way, as a multiple of the state's size

Ways: etappe's sync store.save (the reference "sync save of the same state"), torch.save + fsync,
clone-then-thread (clone every tensor, write safetensors + fsync in a thread), copy-into-reused-buffers-then-
thread (the bare design, built here from plain parts), torch.distributed.checkpoint.async_save (a 1-process gloo
group if it needs one), etappe's async save, and etappe's async save with its writer thread left at nice 0 (an
ablation: how much of the foreground's speed comes from renicing the writer).
Targets: etappe's stall <= 10% of its sync save; its fg rate >= 2x dcp.async_save's; peak extra <= 1x the state.
The run's table is also written to the "Async save" section of benchmarks/RESULTS.md (to RESULTS-async.md when
RESULTS.md does not exist yet); --no-results skips that.

    .venv/bin/python benchmarks/bench_async_save.py           # 100 MB of weights, 300 MB with Adam
    .venv/bin/python benchmarks/bench_async_save.py --full    # 1.07 GB of weights, 3.2 GB with Adam
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import common

SECTION = "## Async save"


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Make VmHWM start again from the current RSS (Linux 4.0+); without it, it holds the process's whole peak."""
    Path("/proc/self/clear_refs").write_text("5\n")


class Foreground:
    """The training loop that should not notice the checkpoint."""

    def __init__(self) -> None:
        import torch
        from torch import nn

        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                   nn.Linear(512, 10))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.x, self.y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
        self.loss_fn = nn.CrossEntropyLoss()

    def step(self) -> None:
        loss = self.loss_fn(self.model(self.x), self.y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def rate(self, seconds: float) -> float:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            self.step()
            n += 1
        return n / (time.perf_counter() - start)


Begin = Callable[[], "Callable[[], object] | None"]  # starts a save; returns its wait function (None: done)


def run_save(fg: Foreground, begin: Begin, base_rate: float) -> dict:
    """Start a save, train until it is durable; the figures of one save."""
    start = time.perf_counter()
    wait = begin()
    stall = time.perf_counter() - start
    steps, t0 = 0, time.perf_counter()
    if wait is not None:
        finished = threading.Event()
        failure: list[BaseException] = []

        def waiter() -> None:
            try:
                wait()
            except BaseException as e:  # noqa: BLE001 -- reported in the main thread
                failure.append(e)
            finished.set()

        threading.Thread(target=waiter, daemon=True).start()
        while not finished.is_set():
            fg.step()
            steps += 1
        if failure:
            raise failure[0]
    during = time.perf_counter() - t0
    share = steps / during / base_rate if wait is not None and during > 0.05 else float("nan")
    lost = stall + (during - steps / base_rate if wait is not None else 0.0)
    return {"stall": stall, "during": during, "fg_share": share, "lost": lost,
            "durable": time.perf_counter() - start}


def dcp_setup() -> tuple[Callable | None, str]:
    """dcp.async_save as (save function, note); tries without a process group, then with a 1-process gloo one."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
    probe = {"w": torch.zeros(4)}
    errors = []
    for attempt in ("no process group", "1-process gloo group"):
        if attempt != "no process group":
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(port))
            try:
                dist.init_process_group("gloo", rank=0, world_size=1)
            except Exception as exc:  # noqa: BLE001 -- reported, the row skipped
                errors.append(f"gloo: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                break
        try:
            with tempfile.TemporaryDirectory() as d:
                dcp.async_save(probe, checkpoint_id=d).result()
            return dcp.async_save, f"dcp.async_save ran with {attempt}"
        except Exception as exc:  # noqa: BLE001 -- any failure means: try the next way, or skip the row
            errors.append(f"{attempt}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    return None, "dcp.async_save failed here: " + "; ".join(errors)


def make_ways(model, opt, root: Path, with_extras: bool) -> dict[str, Begin]:
    """Every way of saving, by name: each a ``begin`` function writing under ``root``."""
    import safetensors.torch
    import torch

    from etappe.checkpoint import CheckpointStore, background

    root.mkdir(parents=True, exist_ok=True)
    counter = iter(range(10**9))
    objects = {"model": model, "optimizer": opt}
    ways: dict[str, Begin] = {}

    def fresh(name: str) -> Path:
        return root / f"{name}-{next(counter)}"

    def etappe_sync():
        CheckpointStore(fresh("sync")).save(1, objects, {"loss": 0.5})

    ways["etappe store.save (sync)"] = etappe_sync

    def torch_save():
        path = fresh("plain.pt")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
        common.fsync_path(path)

    ways["torch.save + fsync (sync)"] = torch_save

    def write_thread(tensors: dict, path: Path) -> Callable[[], None]:
        def write() -> None:
            safetensors.torch.save_file(tensors, path)
            common.fsync_path(path)

        t = threading.Thread(target=write, daemon=True)
        t.start()
        return t.join

    def clone_thread():
        snapshot = {k: v.clone() for k, v in common.flat_tensors(model, opt).items()}
        return write_thread(snapshot, fresh("clone.safetensors"))

    ways["clone + thread"] = clone_thread

    if with_extras:
        reused: dict[str, torch.Tensor] = {}

        def reuse_thread():
            flat = common.flat_tensors(model, opt)
            if not reused:  # allocated once, on the first save
                reused.update({k: torch.empty_like(v) for k, v in flat.items()})
            for k, v in flat.items():
                reused[k].copy_(v)
            return write_thread(reused, fresh("reuse.safetensors"))

        ways["copy into reused buffers + thread"] = reuse_thread

    dcp_save, note = dcp_setup()
    print(note)
    if dcp_save is not None:
        def dcp_async():
            future = dcp_save({"model": model.state_dict(), "optimizer": opt.state_dict()},
                              checkpoint_id=str(fresh("dcp")))
            return future.result

        ways["dcp.async_save"] = dcp_async

    store = CheckpointStore(root / "etappe-async", async_save=True)  # one store: its pool is reused save to save
    steps = iter(range(10**9))

    def etappe_async():
        store.save(next(steps), objects, {"loss": 0.5})
        return store.wait

    ways["etappe async_save"] = etappe_async

    if with_extras:
        nice = background.NICE

        def etappe_async_nice0():
            background.NICE = 0  # read by the writer thread as it starts; put back once it is done
            store.save(next(steps), objects, {"loss": 0.5})

            def wait() -> None:
                try:
                    store.wait()
                finally:
                    background.NICE = nice

            return wait

        ways["etappe async_save, writer at nice 0"] = etappe_async_nice0
    return ways


def peak_extra(way: str, weights_mb: float, root: Path) -> float:
    """Peak RSS above the state alone over two saves of ``way``, in a fresh process, in MB."""
    code = f"""
import sys, json
sys.path.insert(0, {str(common.HERE)!r})
import bench_async_save as b, common
from pathlib import Path
import torch
torch.set_num_threads(2)
model, opt = common.make_state({weights_mb!r})
ways = b.make_ways(model, opt, Path({str(root)!r}), with_extras=True)
before = b.rss_mb()
b.reset_peak()  # building the state peaked higher (gradients, Adam's temporaries)
for _ in range(2):
    wait = ways[{way!r}]()
    if wait is not None:
        wait()
print(json.dumps(b.rss_mb("VmHWM") - before))
"""
    proc = common.run_quiet([common.PYTHON, "-c", code])
    if proc.returncode != 0:
        raise RuntimeError(f"peak memory of {way}: {proc.stderr.strip().splitlines()[-1:]}")
    return max(0.0, float(json.loads(proc.stdout.strip().splitlines()[-1])))


INTRO = """Written by `benchmarks/bench_async_save.py`: one subsection per size, each replaced by that size's latest run.
etappe's async save copies the state into buffers laid out as its files (allocated on the first save, reused after),
returns, and writes them from one background thread at nice 10 with O_DIRECT, then commits as a sync save does.
Columns: stall = seconds the training thread is blocked; fg rate = a foreground MLP's steps/s while the write is in
flight, over its rate just before; training lost = stall + in-flight seconds x (1 - fg rate); durable = seconds
until committed; peak extra = peak RSS above the state alone over two saves, in a fresh process per way.
"""


def write_results(label: str, body: str) -> Path:
    """Put ``body`` as subsection ``label`` of the SECTION of RESULTS.md, keeping its other subsections and the
    file's other sections; or in RESULTS-async.md while there is no RESULTS.md."""
    target = common.HERE / "RESULTS.md"
    if not target.exists():
        target = common.HERE / "RESULTS-async.md"
    lines = target.read_text().splitlines(keepends=True) if target.exists() else []
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is None:
        before, inside, after = "".join(lines).rstrip("\n") + ("\n\n" if lines else ""), [], ""
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        before, inside, after = "".join(lines[:start]), lines[start + 1 : end], "".join(lines[end:])
    subsections: dict[str, list[str]] = {}
    current = None  # text before the first subsection is the intro, written anew
    for line in inside:
        if line.startswith("### "):
            current = line[4:].strip()
            subsections[current] = []
        elif current is not None:
            subsections[current].append(line)
    subsections = {k: "".join(v).strip("\n") for k, v in subsections.items()}
    subsections[label] = body.strip("\n")
    section = f"{SECTION}\n\n{INTRO}\n" + "".join(f"### {k}\n\n{v}\n\n" for k, v in subsections.items())
    target.write_text(before + (section if after else section.rstrip("\n") + "\n") + after)
    return target


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--weights-mb", type=float, default=None, help="MB of float32 weights (default 100; --full 1074)")
    p.add_argument("--dir", default=None, help="folder to write in (default: a new temp folder)")
    p.add_argument("--no-results", action="store_true", help="do not write the Async save section of RESULTS.md")
    args = p.parse_args()
    import torch

    torch.set_num_threads(2)
    weights_mb = args.weights_mb or (1074 if args.full else 100)
    repeats = args.repeats or 5
    with_extras = not args.full  # at full size a second buffer pool would not fit beside the others here
    machine = common.machine()
    print(machine)
    model, opt = common.make_state(weights_mb)
    total = common.state_bytes(model, opt)
    print(f"state: {total / 1e6:,.0f} MB (weights {weights_mb:,.0f} MB + Adam)")
    root = Path(tempfile.mkdtemp(prefix="etappe-bench-async-", dir=args.dir))
    fg = Foreground()
    ways = make_ways(model, opt, root, with_extras)

    def cleanup() -> None:
        for child in root.iterdir():
            if child.name == "etappe-async":
                for c in child.iterdir():
                    shutil.rmtree(c)
            else:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        os.sync()  # no dirty pages of one way's write left to slow the next

    fg.rate(1.0)  # warm-up
    first = {}
    for name, begin in ways.items():  # the first save of each way: imports, pools allocated
        first[name] = run_save(fg, begin, 1.0)["stall"]
        cleanup()

    def measured(name: str) -> Callable[[], dict]:
        def run() -> dict:
            cleanup()
            return run_save(fg, ways[name], fg.rate(1.0))  # against the undisturbed rate just before

        return run

    rounds = common.Rounds()
    results = common.alternate({name: measured(name) for name in ways}, repeats, rounds=rounds)
    print(f"rounds: {rounds}")

    mem = {}
    for name in ways:
        if name != "etappe async_save, writer at nice 0":  # the same pool as etappe async_save
            mem[name] = peak_extra(name, weights_mb, root / "mem") / (total / 2**20)
            shutil.rmtree(root / "mem", ignore_errors=True)

    sync_stall = common.median(x["stall"] for x in results["etappe store.save (sync)"])
    rows = []
    for name, runs in results.items():
        stall = common.median(x["stall"] for x in runs)
        rows.append([name, stall, stall / sync_stall, common.median(x["fg_share"] for x in runs),
                     common.median(x["lost"] for x in runs), common.median(x["durable"] for x in runs),
                     mem.get(name, float("nan"))])
    headers = ["way", "stall s", "stall / etappe sync", "fg rate / undisturbed", "training lost s", "durable s",
               "peak extra / state"]
    title = (f"async save of {total / 1e6:,.0f} MB (weights + Adam), medians of {repeats} rounds; foreground "
             "MLP, batch 32, 2 threads")
    table = common.table(title, headers, rows)
    by = {r[0]: r for r in rows}
    e, d = by["etappe async_save"], by.get("dcp.async_save")
    verdict = [f"- stall: etappe async {e[2]:.2%} of etappe sync (target <= 10%: {'met' if e[2] <= 0.10 else 'NOT met'})"
               + (f"; dcp.async_save {d[2]:.0%}" if d else "") + f"; clone + thread {by['clone + thread'][2]:.0%}",
               f"- the stall is the copy into the pool, at {total / e[1] / 1e9:.1f} GB/s; the sync save writes at "
               f"{total / sync_stall / 1e9:.1f} GB/s, so a stall <= 10% of it needs a copy at >= "
               f"{10 * total / sync_stall / 1e9:.0f} GB/s",
               f"- training time lost per checkpoint: etappe async {e[4]:.2f} s, etappe sync {sync_stall:.2f} s"
               + (f", dcp.async_save {d[4]:.2f} s" if d else "") + f", clone + thread {by['clone + thread'][4]:.2f} s",
               f"- first async save (allocates the pool): stall {first['etappe async_save']:.3f} s "
               f"({first['etappe async_save'] / sync_stall:.0%} of sync); later saves reuse it",
               f"- peak extra memory: {e[6]:.2f}x the state (target <= 1x: {'met' if e[6] <= 1.02 else 'NOT met'})"]
    if d:
        ratio = e[3] / d[3]
        verdict.insert(1, f"- foreground during the write: etappe {e[3]:.2f}x undisturbed, dcp.async_save {d[3]:.2f}x, "
                          f"clone + thread {by['clone + thread'][3]:.2f}x: etappe / dcp = {ratio:.2f} "
                          f"(target >= 2: {'met' if ratio >= 2 else 'NOT met'})")
    print("\n".join(verdict))
    shutil.rmtree(root, ignore_errors=True)
    out = common.write_rows("async_save", [dict(zip(["way", "stall_s", "stall_x_sync", "fg_share", "lost_s",
                                                      "durable_s", "peak_extra_x_state"], r)) for r in rows])
    print(f"\nwrote {out}")
    if not args.no_results:
        date = subprocess.run(["date"], capture_output=True, text=True).stdout.strip()
        label = "--full sizes" if args.full and not args.weights_mb else (
            f"--weights-mb {args.weights_mb:g}" if args.weights_mb else "quick sizes")
        body = (f"{date}; {machine}\n\n`{common.command()}`\n{table}\n\n" + "\n".join(verdict) + f"\n\n{rounds}.")
        print(f"wrote {write_results(label, body)}")


if __name__ == "__main__":
    main()
