"""Open question (issue 13, README "Not yet promised"): on a busy CPU a training run sometimes takes another
float-rounding path. This runs the same 3-epoch fp32 MLP on digits N times in fresh processes, with competing CPU
burners, and counts the distinct final weights (1 means deterministic).

    .venv/bin/python benchmarks/rounding_under_load.py --runs 16 --burners 2          # the loop as etappe's Trainer does it
    .venv/bin/python benchmarks/rounding_under_load.py --runs 16 --burners 2 --plain  # the simplest plain loop

Measured 2026-12-02 on this 2-core machine: the Trainer-like loop (index_select batches, .item(), deterministic
algorithms, fill_uninitialized_memory off) gave 2 distinct results in 16 runs (1 run differed); --plain gave 1 in 16.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import multiprocessing
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def train(plain: bool) -> str:
    import torch

    sys.path.insert(0, str(SRC))
    from etappe.data.sets import digits
    from etappe.models import mlp

    torch.use_deterministic_algorithms(True)
    if not plain:
        torch.utils.deterministic.fill_uninitialized_memory = False
    torch.manual_seed(0)
    data = digits().train
    x_all = data.x.float() * data.input_scale
    model = mlp((1, 8, 8), 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        perm = torch.randperm(len(data.y), generator=g)
        for i in range(0, len(data.y), 64):
            idx = perm[i:i + 64]
            x, y = (x_all[idx], data.y[idx]) if plain else data.take(idx)
            loss = loss_fn(model(x), y)
            if not plain:
                loss.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:12]


def burn() -> None:
    while True:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=16)
    p.add_argument("--burners", type=int, default=2, help="busy-looping processes running alongside")
    p.add_argument("--plain", action="store_true", help="the simplest plain loop instead of the Trainer's way")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(train(args.plain))
        return
    burners = [multiprocessing.Process(target=burn, daemon=True) for _ in range(args.burners)]
    for b in burners:
        b.start()
    try:
        cmd = [sys.executable, __file__, "--one"] + (["--plain"] if args.plain else [])
        seen = collections.Counter(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
                                   for _ in range(args.runs))
    finally:
        for b in burners:
            b.terminate()
    print(f"{len(seen)} distinct final weights in {args.runs} runs ({'plain' if args.plain else 'Trainer-like'} loop, "
          f"{args.burners} burners): {dict(seen)}")


if __name__ == "__main__":
    main()
