"""Target 6: peak resident memory of the Fashion-MNIST CNN run (batch 64, Adam), etappe against the compute-only
loop. Each runs in its own subprocess; the parent reads that child's peak RSS from os.wait4 (the child's own
rusage, as RUSAGE_CHILDREN gives it for a single child). Target: etappe within 1.5x of the compute-only loop.

  bound     reads the IDX files, holds the whole set as float32 tensors, trains by indexing, evaluates the test set
  trainer   etappe.data.load_dataset + etappe.loop.Trainer(run_dir=None, val_data=test)
  cli       etappe train --data fashion-mnist --model cnn ... --run-dir TMP --quiet (checkpoints, metrics, curves)
  import    python -c "import torch; import etappe.loop" (the floor every variant pays)

    .venv/bin/python benchmarks/bench_memory.py            # 300 training steps per child
    .venv/bin/python benchmarks/bench_memory.py --full     # one full epoch per child
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import common


def child(mode: str, steps: int) -> None:
    import torch
    from torch import nn

    torch.set_num_threads(2)
    if mode == "import":
        import etappe.loop  # noqa: F401

        return
    from etappe import models

    torch.manual_seed(0)
    model = models.build("cnn", (1, 28, 28), 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    if mode == "trainer":
        from etappe.data import TensorData, load_dataset
        from etappe.loop import Trainer

        ds = load_dataset("fashion-mnist")
        train = ds.train if steps <= 0 else TensorData(ds.train.x[: steps * 64], ds.train.y[: steps * 64],
                                                       ds.train.input_scale)
        Trainer(model, opt, loss_fn, train_data=train, val_data=ds.test, batch_size=64, progress=False,
                quiet=True).fit(1)
        return
    from etappe.data.idx import read_idx

    root = Path("/usr/share/datasets/fashion-mnist")
    load = lambda stem: torch.from_numpy(read_idx(root / f"{stem}.gz"))  # noqa: E731
    x = load("train-images-idx3-ubyte").float().div_(255).unsqueeze(1)
    y = load("train-labels-idx1-ubyte").long()
    xt = load("t10k-images-idx3-ubyte").float().div_(255).unsqueeze(1)
    yt = load("t10k-labels-idx1-ubyte").long()
    n = len(x) if steps <= 0 else steps * 64
    perm = torch.randperm(n)
    for i in range(0, n, 64):
        idx = perm[i : i + 64]
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.inference_mode():
        for i in range(0, len(xt), 512):
            model(xt[i : i + 512]).argmax(1).eq(yt[i : i + 512]).sum()


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak RSS (MB) of one child process, from its own rusage."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=common.ROOT)
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {err.strip()[-400:]}")
    return usage.ru_maxrss / 1024  # kilobytes on Linux


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--child", help=argparse_hidden)
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args()
    steps = args.steps if args.steps is not None else (0 if args.full else 300)
    if args.child:
        child(args.child, steps)
        return
    repeats = args.repeats or 3
    print(common.machine())
    me = [common.PYTHON, str(Path(__file__).resolve())]
    with tempfile.TemporaryDirectory() as tmp:
        epochs_note = "one full epoch" if steps <= 0 else f"{steps} steps"
        commands = {
            "import": me + ["--child", "import"],
            "bound": me + ["--child", "bound", "--steps", str(steps)],
            "trainer": me + ["--child", "trainer", "--steps", str(steps)],
        }
        if common.check_store() is None:
            commands["cli (full epoch)"] = [common.ETAPPE, "train", "--data", "fashion-mnist", "--model", "cnn",
                                            "--epochs", "1", "--batch-size", "64", "--optimizer", "adam",
                                            "--lr", "1e-3", "--run-dir", f"{tmp}/run", "--quiet"]
        figures: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(repeats):
            for name, cmd in commands.items():
                figures[name].append(peak_rss_mb(cmd))
                subprocess.run(["rm", "-rf", f"{tmp}/run"])
    bound = common.median(figures["bound"])
    rows = []
    for name, values in figures.items():
        ratio = common.median(values) / bound
        verdict = ("met" if ratio <= 1.5 else "NOT met") if name not in ("import", "bound") else ""
        rows.append([name, common.median(values), min(values), max(values), ratio, verdict])
    common.table(f"peak RSS, MB (median of {repeats}), CNN batch 64 Adam, {epochs_note}",
                 ["process", "peak RSS MB", "min", "max", "x bound", "target <= 1.5x"], rows)
    if common.check_store() is not None:
        print(f"cli: pending, {common.check_store()}")
    print(f"\nwrote {common.write_rows('memory', [dict(zip(['process', 'mb', 'min', 'max', 'ratio'], r)) for r in rows])}")


argparse_hidden = "internal: run one measured child (import, bound, trainer)"

if __name__ == "__main__":
    main()
