"""Targets 1 and 2: training throughput on Fashion-MNIST, etappe against the seed-style loop and the compute-only
bound, measured side by side in one run; and the cost of checkpointing every epoch.

Workloads: the seed CNN (batch 64, Adam lr 1e-3) and the quickstart MLP 784-512-512-10 (batch 32, SGD lr 1e-3).
Variants, each training a fresh model (same seed) for one epoch over the same N samples:

  seed        per-sample Dataset (uint8 -> float / 255 per item, as ToTensor) + DataLoader(batch, shuffle=True)
  bound       whole set as float tensors, a randperm, batches by indexing; no DataLoader, no .item(), plain loop
  bound+det   the bound with torch.use_deterministic_algorithms(True), which etappe's Trainer sets on CPU
  trainer     etappe.loop.Trainer(run_dir=None): samples / wall time of fit(1)
  trainer+ckpt  the same with run_dir set (a checkpoint at the end of the epoch), when the store exists
  bound, channels-last / trainer, channels-last  (CNN) the same with model.to(memory_format=torch.channels_last),
              the layout `etappe train` gives etappe's conv models; the CLI is compared against that bound
  lightning   Lightning's default Trainer over the seed-style DataLoader, when lightning is installed
  cli         `etappe train ...` in a subprocess, over the full training set; its own reported samples/s (the CNN
              also with --no-channels-last: the CLI keeps conv models in channels-last memory format by default)

The machine's speed drifts by up to 2x within seconds here, so variants run in short alternating rounds, and every
variant's run follows a bound run of its own, right before it: each ratio is the median over rounds of (variant /
the bound run just before it), a pair seconds apart rather than a round apart. "best / best bound" compares the
fastest run of each (contention only ever slows a run down). With 2 threads a stolen core stalls every parallel
region, so --threads 1 gives much steadier ratios on a busy machine.

    .venv/bin/python benchmarks/bench_train.py            # 10,000 samples, 5 rounds, a few minutes
    .venv/bin/python benchmarks/bench_train.py --threads 1 --no-cli   # steadier on a busy machine
    .venv/bin/python benchmarks/bench_train.py --full     # full epochs (60,000 samples), 5 rounds
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import common

WORKLOADS = {
    "cnn": {"model": "cnn", "batch_size": 64, "optimizer": "adam", "lr": 1e-3},
    "mlp": {"model": "mlp", "batch_size": 32, "optimizer": "sgd", "lr": 1e-3},
}


def make(w: dict, channels_last: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
    from etappe import models

    torch.manual_seed(0)
    model = models.build(w["model"], (1, 28, 28), 10)
    if channels_last:  # what `etappe train` does to its conv models; a Python user opts in the same way
        model.to(memory_format=torch.channels_last)
    opt_cls = torch.optim.Adam if w["optimizer"] == "adam" else torch.optim.SGD
    return model, opt_cls(model.parameters(), lr=w["lr"])


class PerSample(torch.utils.data.Dataset):
    """The seeds' dataset: one (image, label) per __getitem__, the image scaled to float as ToTensor does."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i].float().div(255), int(self.y[i])


def seed_loop(w: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    model, opt = make(w)
    loss_fn = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(PerSample(x, y), batch_size=w["batch_size"], shuffle=True)
    start = time.perf_counter()
    for xb, yb in loader:
        loss = loss_fn(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return len(x) / (time.perf_counter() - start)


def bound_loop(w: dict, xf: torch.Tensor, y: torch.Tensor, deterministic: bool = False,
               channels_last: bool = False) -> float:
    # etappe's Trainer turns deterministic algorithms on for CPU (process-wide); the bound runs without them,
    # and once more with them ("bound+det") to show what that setting costs.
    torch.use_deterministic_algorithms(deterministic)
    model, opt = make(w, channels_last)
    loss_fn = nn.CrossEntropyLoss()
    bs = w["batch_size"]
    start = time.perf_counter()
    perm = torch.randperm(len(xf))
    for i in range(0, len(xf), bs):
        idx = perm[i : i + bs]
        loss = loss_fn(model(xf[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    rate = len(xf) / (time.perf_counter() - start)
    torch.use_deterministic_algorithms(False)
    return rate


def trainer_run(w: dict, data, run_dir: Path | None, out: dict, channels_last: bool = False) -> float:
    from etappe.loop import Trainer

    model, opt = make(w, channels_last)
    trainer = Trainer(model, opt, nn.CrossEntropyLoss(), train_data=data, batch_size=w["batch_size"],
                      progress=False, quiet=True, run_dir=run_dir)
    seconds, history = common.timed(lambda: trainer.fit(1))
    out.setdefault("reported", []).append(history[0]["samples_per_s"])
    if run_dir is not None:
        # What one checkpoint costs, timed directly (median of 3), and what the whole fit spent outside the steps.
        saves = [common.timed(trainer.save)[0] for _ in range(3)]
        out.setdefault("save_s", []).append(common.median(saves))
        out.setdefault("fit_s", []).append(seconds)
        out.setdefault("steps_s", []).append(history[0]["seconds"])
        shutil.rmtree(run_dir, ignore_errors=True)
    torch.use_deterministic_algorithms(False)
    return len(data) / seconds


def lightning_run(w: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    import lightning as L

    for logger in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    class Lit(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.opt = make(w)

        def training_step(self, batch, _i):
            xb, yb = batch
            loss = nn.functional.cross_entropy(self.model(xb), yb)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return self.opt

    loader = torch.utils.data.DataLoader(PerSample(x, y), batch_size=w["batch_size"], shuffle=True)
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings(), \
            contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=root)  # otherwise the defaults
        seconds, _ = common.timed(lambda: trainer.fit(Lit(), loader))
    return len(x) / seconds


def cli_run(name: str, w: dict, *flags: str) -> float:
    with tempfile.TemporaryDirectory() as root:
        run_dir = Path(root) / "run"
        cmd = [common.ETAPPE, "train", "--data", "fashion-mnist", "--model", w["model"], "--epochs", "1",
               "--batch-size", str(w["batch_size"]), "--optimizer", w["optimizer"], "--lr", str(w["lr"]),
               "--run-dir", str(run_dir), "--quiet", *flags]
        result = common.run_quiet(cmd)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()[-500:]}")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return rows[-1]["samples_per_s"]


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--samples", type=int, default=None, help="training samples per epoch (default 10,000; --full 60,000)")
    p.add_argument("--workloads", default="cnn,mlp")
    p.add_argument("--no-lightning", action="store_true")
    p.add_argument("--no-cli", action="store_true")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as the anchors)")
    args = p.parse_args()
    n = args.samples or (60_000 if args.full else 10_000)
    repeats = args.repeats or 5
    torch.set_num_threads(args.threads)
    print(common.machine())
    print(f"{n} samples per epoch, {repeats} alternating rounds")

    from etappe.data import TensorData, load_dataset

    ds = load_dataset("fashion-mnist")
    x, y = ds.train.x[:n].contiguous(), ds.train.y[:n].contiguous()
    xf = x.float().div_(255)
    data = TensorData(x, y, ds.train.input_scale)

    store_missing = common.check_store()
    try:
        import lightning  # noqa: F401

        lightning_note = None
    except ImportError:
        lightning_note = "lightning is not installed: skipped (pip install lightning, if it leaves torch alone)"
    if args.no_lightning:
        lightning_note = "skipped (--no-lightning)"

    tmp = Path(tempfile.mkdtemp(prefix="etappe-bench-"))
    out_rows = []
    for name in args.workloads.split(","):
        w = WORKLOADS[name]
        ckpt: dict = {}
        plain: dict = {}
        variants = {
            "bound": lambda: bound_loop(w, xf, y),
            "bound+det": lambda: bound_loop(w, xf, y, deterministic=True),
            "seed": lambda: seed_loop(w, x, y),
            "trainer": lambda: trainer_run(w, data, None, plain),
        }
        if name == "cnn":  # the same model in channels-last memory format, as `etappe train` runs it
            variants["bound, channels-last"] = lambda: bound_loop(w, xf, y, channels_last=True)
            variants["trainer, channels-last"] = lambda: trainer_run(w, data, None, {}, channels_last=True)
        if store_missing is None:
            variants["trainer+ckpt"] = lambda: trainer_run(w, data, tmp / f"run-{time.monotonic_ns()}", ckpt)
        if lightning_note is None:
            variants["lightning"] = lambda: lightning_run(w, x, y)
        if store_missing is None and not args.no_cli:
            # The CLI always trains on the full set (and keeps the CNN channels-last unless told not to).
            variants["cli"] = lambda: cli_run(name, w)
            if name == "cnn":
                variants["cli --no-channels-last"] = lambda: cli_run(name, w, "--no-channels-last")
        # Warm-up: one short pass of each in-process variant (oneDNN primitives, first-call costs).
        small = TensorData(x[:2000], y[:2000], ds.train.input_scale)
        bound_loop(w, xf[:2000], y[:2000])
        seed_loop(w, x[:2000], y[:2000])
        trainer_run(w, small, None, {})
        if name == "cnn":
            bound_loop(w, xf[:2000], y[:2000], channels_last=True)
            trainer_run(w, small, None, {}, channels_last=True)
        if "lightning" in variants:
            lightning_run(w, x[:2000], y[:2000])

        def paired(run):  # the variant's run and the bound run just before it
            def both() -> tuple[float, float]:
                reference = bound_loop(w, xf, y)
                return run(), reference

            return both

        rounds = common.Rounds()
        timed_pairs = {v: paired(run) for v, run in variants.items() if v != "bound"}
        pairs = common.alternate(timed_pairs, repeats, rounds=rounds)
        figures = {"bound": [b for runs in pairs.values() for _, b in runs]} | {
            v: [a for a, _ in runs] for v, runs in pairs.items()}
        bound = figures["bound"]
        rows = [["bound", common.median(bound), 1.0, 1.0, 1.0, 1.0]]
        for v, runs in pairs.items():
            values, ratios = [a for a, _ in runs], [a / b for a, b in runs]
            rows.append([v, common.median(values), common.median(ratios), min(ratios), max(ratios),
                         max(values) / max(bound)])
        headers = ["variant", "samples/s (median)", "x the bound run before it (median)", "min", "max",
                   "best / best bound"]
        common.table(f"{name}: batch {w['batch_size']}, {w['optimizer']} lr {w['lr']}, {n} samples/epoch",
                     headers, rows)
        print(rounds)
        if "bound, channels-last" in figures:
            same = {v: pairs[v] for v in ("trainer, channels-last", "cli") if v in pairs}
            cl = common.median(a / b for a, b in pairs["bound, channels-last"])
            print("the same layout (channels-last bound = " + f"{cl:.3f}x the NCHW bound): " + ", ".join(
                f"{v} {common.median(a / b for a, b in runs) / cl:.3f}x" for v, runs in same.items()))
        seed_med = common.median(figures["seed"])
        print(f"bound / seed-style = {common.median(bound) / seed_med:.2f}x (median figures); "
              f"trainer's own reported samples/s (steps only) median {common.median(plain['reported']):,.0f}")
        if "lightning" in figures:
            tl = [a / b for a, b in zip(figures["trainer"], figures["lightning"])]  # both of the same round
            print(f"trainer / lightning = {common.median(tl):.2f}x (median of rounds); target >= 1.5x")
        else:
            print(f"lightning: {lightning_note}")
        if store_missing is not None:
            print(f"trainer+ckpt and cli: pending, {store_missing}")
        if ckpt:
            save_s = common.median(ckpt["save_s"])
            epoch_s = 60_000 / common.median(figures["trainer"])  # one full epoch of this workload
            overhead = [f - s for f, s in zip(ckpt["fit_s"], ckpt["steps_s"])]
            print(f"checkpoint: one save {save_s * 1e3:.1f} ms = {100 * save_s / epoch_s:.2f}% of a full epoch "
                  f"({epoch_s:.1f} s) (target 2: <= 1%); fit(1) with run_dir spends {common.median(overhead):.2f} s "
                  f"outside the training steps (save, metrics, curves.png)")
        out_rows.append({"workload": name, "samples": n, "figures": figures, "rounds": str(rounds),
                         "ckpt": ckpt, "reported": plain.get("reported")})
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nwrote {common.write_rows('train', out_rows)}")


if __name__ == "__main__":
    main()
