"""Target 1, optional: do fused or foreach optimizers, or torch.compile, beat the compute-only bound on CPU?

The bound loop of bench_train.py (whole set as float tensors, batches by indexing) with:
  bound            the default optimizer (on CPU: the per-tensor for-loop implementation)
  foreach          Adam/SGD(foreach=True)
  fused            Adam/SGD(fused=True)
  compile          torch.compile(model), default optimizer (compile time reported apart, not in the rate)
Ratios are medians over alternating rounds of (variant / bound in the same round).

    .venv/bin/python benchmarks/bench_train_options.py             # 10,000 samples, 5 rounds
    .venv/bin/python benchmarks/bench_train_options.py --no-compile
"""

from __future__ import annotations

import time

import torch
from torch import nn

import common
from bench_train import WORKLOADS


def run(w: dict, xf: torch.Tensor, y: torch.Tensor, option: str, compiled: dict) -> float:
    from etappe import models

    torch.manual_seed(0)
    model = models.build(w["model"], (1, 28, 28), 10)
    kwargs = {"foreach": True} if option == "foreach" else {"fused": True} if option == "fused" else {}
    opt_cls = torch.optim.Adam if w["optimizer"] == "adam" else torch.optim.SGD
    opt = opt_cls(model.parameters(), lr=w["lr"], **kwargs)
    forward = model
    if option == "compile":
        forward = torch.compile(model)
        if w["model"] not in compiled:  # first call compiles: timed apart
            seconds, _ = common.timed(lambda: forward(xf[: w["batch_size"]]).sum().backward())
            compiled[w["model"]] = seconds
            model.zero_grad(set_to_none=True)
    loss_fn = nn.CrossEntropyLoss()
    bs = w["batch_size"]
    start = time.perf_counter()
    perm = torch.randperm(len(xf))
    for i in range(0, len(xf), bs):
        idx = perm[i : i + bs]
        loss = loss_fn(forward(xf[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return len(xf) / (time.perf_counter() - start)


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    n = args.samples or (60_000 if args.full else 10_000)
    repeats = args.repeats or 5
    torch.set_num_threads(args.threads)
    print(common.machine())
    from etappe.data import load_dataset

    ds = load_dataset("fashion-mnist")
    xf, y = ds.train.x[:n].float().div_(255), ds.train.y[:n].contiguous()
    compiled: dict = {}
    out = []
    for name, w in WORKLOADS.items():
        options = ["bound", "foreach", "fused"] + ([] if args.no_compile else ["compile"])
        variants = {o: (lambda o=o: run(w, xf, y, o, compiled)) for o in options}
        for v in variants.values():
            v()  # warm-up (and compile)
        rounds = common.Rounds()
        figures = common.alternate(variants, repeats, rounds=rounds)
        rows = [[o, common.median(v), common.median([a / b for a, b in zip(v, figures["bound"])]),
                 max(v) / max(figures["bound"])] for o, v in figures.items()]
        common.table(f"{name}: batch {w['batch_size']}, {w['optimizer']}, {n} samples", ["variant", "samples/s",
                     "x bound (median of rounds)", "best / best bound"], rows)
        print(rounds)
        if name in compiled:
            print(f"torch.compile: first call took {compiled[name]:.1f} s")
        out.append({"workload": name, "figures": figures, "compile_s": compiled.get(name)})
    print(f"\nwrote {common.write_rows('train_options', out)}")


if __name__ == "__main__":
    main()
