"""Issue 13, acceptance 4: mixed precision, torch.compile and gradient accumulation on Fashion-MNIST, each measured
side by side in one run against a compute-only bound of its own.

Workloads (as bench_train.py, plus the MLP at batch 256): the MLP 784-512-512-10 (SGD lr 1e-3) at batch 32 and
256, the seed CNN (Adam lr 1e-3) at batch 64. Every run trains a fresh model (same seed) for one epoch over the
same N samples.

  a. precision   bound fp32     bench_train.py's plain loop (whole set as float tensors, a randperm, batches by
                                indexing, no .item())
                 bound bf16     the same loop with forward and loss under torch.autocast("cpu", torch.bfloat16)
                 trainer 32 / trainer bf16-mixed   etappe.loop.Trainer(precision=...).fit(1), samples / wall time
               Reported: bf16 bound / fp32 bound (target at MLP batch 256: >= 1.4x) and each Trainer / its own
               mode's bound (target: >= 0.95x in every mode).
  b. compile     Trainer(compile=True) against Trainer(compile=False) on the MLP, two epochs each: epoch 1
               includes the compilation (each round starts from an empty dynamo state and an empty inductor
               cache folder, as a first run does), epoch 2 is the steady state. Ratios of the Trainer's own
               per-epoch samples/s (steps only).
  c. accumulation  Trainer(batch 64, accumulate 4) against Trainer(batch 256) straight, and the same in the plain
               loop (4 micro-batches of 64, each loss scaled by 1/4, then one step; against the 256 bound); also
               the accumulating Trainer against the accumulating bound.
  d. --accuracy  test accuracy after 3 epochs over the full training set, fp32 against bf16-mixed, MLP batch 256
               (Adam lr 1e-3: SGD at lr 1e-3 barely moves in 3 epochs), one run per seed; target: within 0.5
               points. Slower; a mode of its own.

As in bench_train.py, variants run in short alternating rounds and every variant's run follows a reference run
of its own, right before it: each ratio is the median over rounds of (variant / the reference run just before it).
The Trainer turns torch's deterministic algorithms on for CPU (process-wide); they are turned off again after
each Trainer run, so the bounds run without them, as bench_train.py's do.

    .venv/bin/python benchmarks/bench_precision.py                 # 10,000 samples, 5 rounds, a few minutes
    .venv/bin/python benchmarks/bench_precision.py --threads 1     # steadier on a busy machine
    .venv/bin/python benchmarks/bench_precision.py --full          # full epochs (60,000 samples)
    .venv/bin/python benchmarks/bench_precision.py --accuracy      # d: 3 epochs, fp32 vs bf16-mixed, 5 seeds
    .venv/bin/python benchmarks/bench_precision.py --quick         # smoke run: tiny sizes, 1 round (no figures)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time

import torch
from torch import nn

import common
from bench_train import make

WORKLOADS = {
    "mlp-32": {"model": "mlp", "batch_size": 32, "optimizer": "sgd", "lr": 1e-3},
    "mlp-256": {"model": "mlp", "batch_size": 256, "optimizer": "sgd", "lr": 1e-3},
    "cnn-64": {"model": "cnn", "batch_size": 64, "optimizer": "adam", "lr": 1e-3},
}
ACCURACY = {"model": "mlp", "batch_size": 256, "optimizer": "adam", "lr": 1e-3}
ACCUMULATE = 4  # c: ACCUMULATE micro-batches of MICRO against one batch of ACCUMULATE * MICRO
MICRO = 64


def autocast(precision: str):
    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def bound(w: dict, xf: torch.Tensor, y: torch.Tensor, precision: str = "32", accumulate: int = 1) -> float:
    """The compute-only loop of bench_train.py, with autocast for bf16 and, given ``accumulate`` N, N micro-batches
    of ``batch_size`` per optimizer step, each loss weighted by its share of the step's samples (as etappe's step)."""
    model, opt = make(w)
    loss_fn = nn.CrossEntropyLoss()
    bs, n = w["batch_size"], len(xf)
    start = time.perf_counter()
    perm = torch.randperm(n)
    step = bs * accumulate
    for i in range(0, n, step):
        opt.zero_grad()
        total = min(step, n - i)
        for j in range(i, i + total, bs):
            idx = perm[j : min(j + bs, i + total)]
            with autocast(precision):
                loss = loss_fn(model(xf[idx]), y[idx])
            (loss * (len(idx) / total) if accumulate > 1 else loss).backward()
        opt.step()
    return n / (time.perf_counter() - start)


def trainer(w: dict, data, epochs: int = 1, out: list | None = None, **options) -> float:
    """Samples / wall time of a fresh Trainer's fit(epochs); its own per-epoch rows go to ``out``."""
    from etappe.loop import Trainer

    model, opt = make(w)
    t = Trainer(model, opt, nn.CrossEntropyLoss(), train_data=data, batch_size=w["batch_size"], progress=False,
                quiet=True, **options)
    seconds, history = common.timed(lambda: t.fit(epochs))
    torch.use_deterministic_algorithms(False)
    if out is not None:
        out.append([row["samples_per_s"] for row in history])
    return epochs * len(data) / seconds


def paired(run, reference):
    """The variant's run and the reference run right before it."""
    def both() -> tuple[float, float]:
        ref = reference()
        return run(), ref

    return both


def ratios(runs: list[tuple[float, float]]) -> list[float]:
    return [a / b for a, b in runs]


def measure_pairs(variants: dict, repeats: int, title: str) -> tuple[dict, object]:
    """Run the paired variants in alternating rounds and print their table: each ratio's median, min and max."""
    rounds = common.Rounds()
    pairs = common.alternate(variants, repeats, rounds=rounds)
    rows = []
    for v, runs in pairs.items():
        r = ratios(runs)
        rows.append([v, common.median(a for a, _ in runs), common.median(b for _, b in runs), common.median(r),
                     min(r), max(r)])
    common.table(title, ["ratio", "variant samples/s", "reference samples/s", "median", "min", "max"], rows)
    print(rounds)
    return pairs, rounds


def verdict(value: float, target: float) -> str:
    return "met" if value >= target else "NOT met"


# ---------------------------------------------------------------- a. precision


def precision_part(names: list[str], xf, y, data, repeats: int, summary: list) -> dict:
    out = {}
    for name in names:
        w = WORKLOADS[name]
        # warm-up: oneDNN primitives and bf16 kernels of each variant, on a small slice
        small = type(data)(data.x[:2048], data.y[:2048], data.input_scale)
        for p in ("32", "bf16-mixed"):
            bound(w, xf[:2048], y[:2048], p)
            trainer(w, small, precision=p)
        b32 = lambda: bound(w, xf, y, "32")  # noqa: E731
        b16 = lambda: bound(w, xf, y, "bf16-mixed")  # noqa: E731
        variants = {
            "bound bf16 / bound fp32": paired(b16, b32),
            "trainer 32 / bound fp32": paired(lambda: trainer(w, data, precision="32"), b32),
            "trainer bf16-mixed / bound bf16": paired(lambda: trainer(w, data, precision="bf16-mixed"), b16),
        }
        pairs, rounds = measure_pairs(variants, repeats, f"a. {name}: {w['model']} batch {w['batch_size']}, "
                                      f"{w['optimizer']} lr {w['lr']}, {len(xf)} samples")
        med = {v: common.median(ratios(runs)) for v, runs in pairs.items()}
        summary.append([name, med["bound bf16 / bound fp32"], med["trainer 32 / bound fp32"],
                        med["trainer bf16-mixed / bound bf16"],
                        med["bound bf16 / bound fp32"] * med["trainer bf16-mixed / bound bf16"]])
        out[name] = {"pairs": pairs, "rounds": str(rounds)}
    return out


# ---------------------------------------------------------------- b. compile


@contextlib.contextmanager
def cold_compile():
    """As a first run: an empty dynamo state, an empty in-memory and on-disk inductor cache."""
    folder = tempfile.mkdtemp(prefix="etappe-inductor-")
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    torch._dynamo.reset()
    with contextlib.suppress(Exception):  # private helper: present in torch 2.4-2.13, may move
        import torch._inductor.utils as inductor_utils

        inductor_utils.clear_inductor_caches()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
        shutil.rmtree(folder, ignore_errors=True)


def compile_part(xf, y, data, repeats: int) -> dict:
    w = WORKLOADS["mlp-32"]

    def pair() -> tuple[float, float, list, list]:
        """An eager fit(2), then a compiled one from a cold start: their wall rates and per-epoch rows."""
        eager: list = []
        compiled: list = []
        e = trainer(w, data, epochs=2, out=eager)
        with cold_compile():
            c = trainer(w, data, epochs=2, out=compiled, compile=True)
        return c, e, compiled[0], eager[0]

    trainer(w, type(data)(data.x[:2048], data.y[:2048], data.input_scale))  # warm-up of eager
    rounds = common.Rounds()
    runs = common.alternate({"compile": pair}, repeats, rounds=rounds)["compile"]
    first = [c[0] / e[0] for _, _, c, e in runs]
    steady = [c[1] / e[1] for _, _, c, e in runs]
    wall = [c / e for c, e, _, _ in runs]
    compile_s = [len(data) / c[0] - len(data) / c[1] for _, _, c, _ in runs]
    rows = [
        ["epoch 1 (compilation included)", common.median(c[0] for _, _, c, _ in runs),
         common.median(e[0] for _, _, _, e in runs), common.median(first), min(first), max(first)],
        ["epoch 2 (steady state)", common.median(c[1] for _, _, c, _ in runs),
         common.median(e[1] for _, _, _, e in runs), common.median(steady), min(steady), max(steady)],
        ["fit(2), wall time", common.median(c for c, _, _, _ in runs), common.median(e for _, e, _, _ in runs),
         common.median(wall), min(wall), max(wall)],
    ]
    common.table(f"b. compile: Trainer(compile=True) / Trainer(compile=False), mlp batch 32, {len(data)} samples "
                 "per epoch", ["what", "compiled samples/s", "eager samples/s", "median", "min", "max"], rows)
    print(rounds)
    print(f"compilation took about {common.median(compile_s):.1f} s (epoch 1's time less epoch 2's, median)")
    return {"first": first, "steady": steady, "wall": wall, "compile_s": compile_s, "rounds": str(rounds)}


# ---------------------------------------------------------------- c. accumulation


def accumulation_part(names: list[str], xf, y, data, repeats: int, summary: list) -> dict:
    out = {}
    for name in names:
        base = WORKLOADS[name]
        micro, whole = dict(base, batch_size=MICRO), dict(base, batch_size=MICRO * ACCUMULATE)
        small = type(data)(data.x[:2048], data.y[:2048], data.input_scale)
        bound(micro, xf[:2048], y[:2048], accumulate=ACCUMULATE)
        bound(whole, xf[:2048], y[:2048])
        trainer(micro, small, accumulate=ACCUMULATE)
        trainer(whole, small)
        b_acc = lambda: bound(micro, xf, y, accumulate=ACCUMULATE)  # noqa: E731
        b_whole = lambda: bound(whole, xf, y)  # noqa: E731
        label = f"{ACCUMULATE} x {MICRO}"
        variants = {
            f"trainer {label} / trainer {MICRO * ACCUMULATE}": paired(
                lambda: trainer(micro, data, accumulate=ACCUMULATE), lambda: trainer(whole, data)),
            f"bound {label} / bound {MICRO * ACCUMULATE}": paired(b_acc, b_whole),
            f"trainer {label} / bound {label}": paired(lambda: trainer(micro, data, accumulate=ACCUMULATE), b_acc),
        }
        pairs, rounds = measure_pairs(variants, repeats, f"c. accumulation, {base['model']} ({base['optimizer']} lr "
                                      f"{base['lr']}), fp32, {len(xf)} samples")
        summary.append([name.split("-")[0]] + [common.median(ratios(runs)) for runs in pairs.values()])
        out[name] = {"pairs": pairs, "rounds": str(rounds)}
    return out


# ---------------------------------------------------------------- d. accuracy


def accuracy_mode(ds, n: int, epochs: int, seeds: int) -> None:
    from etappe.data import TensorData
    from etappe.loop import Trainer, evaluate

    w = ACCURACY
    data = TensorData(ds.train.x[:n], ds.train.y[:n], ds.train.input_scale)
    test = TensorData(ds.test.x, ds.test.y, ds.test.input_scale)
    rows, diffs, out = [], [], []
    for seed in range(seeds):
        acc = {}
        for precision in ("32", "bf16-mixed"):
            torch.manual_seed(seed)
            from etappe import models

            model = models.build(w["model"], (1, 28, 28), 10)
            opt = torch.optim.Adam(model.parameters(), lr=w["lr"])
            t = Trainer(model, opt, nn.CrossEntropyLoss(), train_data=data, batch_size=w["batch_size"], seed=seed,
                        precision=precision, progress=False, quiet=True)
            seconds, _ = common.timed(lambda: t.fit(epochs))
            torch.use_deterministic_algorithms(False)
            acc[precision] = 100 * evaluate(model, test)["accuracy"]  # evaluated in fp32, as `etappe eval` does
            print(f"seed {seed} precision {precision}: test accuracy {acc[precision]:.2f}% ({seconds:.2f} s)", flush=True)
        diffs.append(acc["bf16-mixed"] - acc["32"])
        rows.append([seed, f"{acc['32']:.2f}", f"{acc['bf16-mixed']:.2f}", f"{diffs[-1]:+.2f}"])
        out.append({"seed": seed, **acc})
    import statistics

    mean = statistics.fmean(diffs)
    fp32 = [r["32"] for r in out]
    rows.append(["mean", f"{statistics.fmean(fp32):.2f}", f"{statistics.fmean(r['bf16-mixed'] for r in out):.2f}",
                 f"{mean:+.2f}"])
    common.table(f"d. test accuracy (%) after {epochs} epochs over {n} samples, mlp batch {w['batch_size']}, "
                 f"{w['optimizer']} lr {w['lr']}, {seeds} seeds", ["seed", "fp32", "bf16-mixed",
                                                                   "bf16 - fp32 (points)"], rows)
    spread = f", fp32 seed-to-seed std {statistics.stdev(fp32):.2f}" if seeds > 1 else ""
    print(f"\ntarget: bf16-mixed within 0.5 points of fp32: mean difference {mean:+.2f} points "
          f"({'met' if abs(mean) <= 0.5 else 'NOT met'}); largest per-seed |difference| "
          f"{max(abs(d) for d in diffs):.2f}{spread}")
    print(f"\n`{common.command()}`")
    print(f"wrote {common.write_rows('precision_accuracy', out)}")


# ---------------------------------------------------------------- main


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--quick", action="store_true", help="smoke run: 1,024 samples, 1 round; --accuracy: 2,048 samples, 1 epoch, 2 seeds (no figures)")
    p.add_argument("--samples", type=int, default=None, help="training samples per epoch (default 10,000; --full 60,000)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as the anchors)")
    p.add_argument("--parts", default="precision,compile,accumulate", help="which of a, b, c to run: precision,compile,accumulate (default all)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="workloads of part a")
    p.add_argument("--compile-repeats", type=int, default=None, help="rounds of part b (default 3: each compiles)")
    p.add_argument("--accuracy", action="store_true", help="d only: test accuracy after 3 epochs, fp32 vs bf16-mixed")
    p.add_argument("--epochs", type=int, default=3, help="epochs of --accuracy")
    p.add_argument("--seeds", type=int, default=5, help="seeds of --accuracy (default 5)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(common.machine())
    from etappe.data import TensorData, load_dataset

    ds = load_dataset("fashion-mnist")
    if args.accuracy:
        n = args.samples or (2048 if args.quick else len(ds.train.x))
        epochs, seeds = (1, min(args.seeds, 2)) if args.quick else (args.epochs, args.seeds)
        accuracy_mode(ds, n, epochs, seeds)
        return
    n = args.samples or (1024 if args.quick else 60_000 if args.full else 10_000)
    repeats = args.repeats or (1 if args.quick else 5)
    compile_repeats = args.compile_repeats or (1 if args.quick else 3)
    parts = args.parts.split(",")
    print(f"{n} samples per epoch, {repeats} alternating rounds ({compile_repeats} for compile), "
          f"{torch.get_num_threads()} threads")
    x, y = ds.train.x[:n].contiguous(), ds.train.y[:n].contiguous()
    xf = x.float().div_(255)
    data = TensorData(x, y, ds.train.input_scale)

    results: dict = {}
    precision_rows: list = []
    accumulate_rows: list = []
    if "precision" in parts:
        results["precision"] = precision_part(args.workloads.split(","), xf, y, data, repeats, precision_rows)
    if "compile" in parts:
        results["compile"] = compile_part(xf, y, data, compile_repeats)
    if "accumulate" in parts:
        results["accumulate"] = accumulation_part(["mlp-32", "cnn-64"], xf, y, data, repeats, accumulate_rows)

    print("\n## For RESULTS.md\n")
    print(common.machine())
    if precision_rows:
        common.table(f"Mixed precision, x the reference run right before it (median of {repeats} rounds, "
                     f"{n} samples)", ["workload", "bf16 bound / fp32 bound", "Trainer 32 / fp32 bound",
                                       "Trainer bf16-mixed / bf16 bound", "Trainer bf16-mixed / fp32 bound (product)"],
                     precision_rows)
        by_name = {r[0]: r for r in precision_rows}
        if "mlp-256" in by_name:
            print(f"- bf16-mixed bound at MLP batch 256: {by_name['mlp-256'][1]:.2f}x the fp32 bound (target >= 1.4x: "
                  f"{verdict(by_name['mlp-256'][1], 1.4)})")
        worst = min(min(r[2], r[3]) for r in precision_rows)
        print(f"- Trainer / its own mode's bound: lowest {worst:.3f}x (target >= 0.95x in every mode: "
              f"{verdict(worst, 0.95)})")
    if "compile" in results:
        c = results["compile"]
        common.table(f"torch.compile, MLP batch 32, Trainer(compile=True) / Trainer(compile=False) (median of "
                     f"{compile_repeats} rounds)", ["epoch 1 (compilation included)", "epoch 2 (steady state)",
                                                    "fit(2) wall", "compilation s"],
                     [[common.median(c["first"]), common.median(c["steady"]), common.median(c["wall"]),
                       common.median(c["compile_s"])]])
    if accumulate_rows:
        label = f"{ACCUMULATE} x {MICRO}"
        common.table(f"Gradient accumulation {label} against batch {ACCUMULATE * MICRO} (fp32, median of {repeats} "
                     "rounds)", ["model", f"Trainer {label} / Trainer {ACCUMULATE * MICRO}",
                                 f"bound {label} / bound {ACCUMULATE * MICRO}", f"Trainer {label} / bound {label}"],
                     accumulate_rows)
    print(f"\n`{common.command()}`")
    rows = {k: v for k, v in results.items()}
    print(f"wrote {common.write_rows('precision', [rows])}")


if __name__ == "__main__":
    main()
