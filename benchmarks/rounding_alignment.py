"""Open question (issue 13, README "Not yet promised"), fifth hypothesis: oneMKL documents that without its
conditional numerical reproducibility mode, results may depend on the memory alignment of the arrays. A batch
that is a view into a numpy array (16-byte aligned) rather than a fresh torch tensor (64-byte aligned) could then
round by where the allocator put it. This computes the MLP's first-layer products (784-512, batch 256) with the
input placed at every 4-byte offset of a 64-byte line and counts the distinct results of each (1 means alignment
does not matter).

Sixth hypothesis (--team N): a process now and then splits an op over fewer threads than it has (an OpenMP team
cut short under load), as the odd runs look like runs of another thread count. A sum of 2**20 floats rounds
differently over 1 and 2 threads; this calls it N times in this process (torch's thread settings untouched), with
an optional second thread doing matrix products, and counts which thread count's result each call gave.

    .venv/bin/python benchmarks/rounding_alignment.py
    .venv/bin/python benchmarks/rounding_alignment.py --team 300000 [--side-thread]   # with CPU burners beside it
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import subprocess
import sys
import threading
import time

import torch


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:12]


def main() -> None:
    torch.manual_seed(0)
    batch, inputs, hidden = 256, 784, 512
    weight, grad_out, x0 = torch.randn(hidden, inputs) * 0.03, torch.randn(batch, hidden), torch.randn(batch, inputs)
    results: dict[str, set[str]] = {}
    for offset in range(16):  # floats: 0, 4, ..., 60 bytes past a 64-byte boundary
        x = torch.empty(batch * inputs + 16)[offset:offset + batch * inputs].view(batch, inputs)
        x.copy_(x0)
        xb = torch.empty(batch * inputs + 32, dtype=torch.bfloat16)[offset:offset + batch * inputs].view(batch, inputs)
        xb.copy_(x0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_forward = x @ weight.t()
        for name, value in [("fp32 forward", x @ weight.t()), ("fp32 weight grad", grad_out.t() @ x),
                            ("bf16 autocast forward", bf16_forward),
                            ("bf16 weight grad", grad_out.bfloat16().t() @ xb), ("fp32 bias-like sum", x.sum(0))]:
            results.setdefault(name, set()).add(digest(value))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; input at 16 alignments")
    for name, seen in results.items():
        print(f"  {name}: {len(seen)} distinct")


def team(calls: int, side_thread: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(1 << 20) * 1000
    probe = "import torch; torch.manual_seed(0); x = torch.randn(1 << 20) * 1000; torch.set_num_threads({}); print(x.sum().item())"
    by_threads = {float(subprocess.run([sys.executable, "-c", probe.format(n)], capture_output=True, text=True,
                                       check=True).stdout): f"{n} threads" for n in (1, 2)}
    if len(by_threads) < 2:
        sys.exit("the probe sum rounds alike over 1 and 2 threads here: it cannot tell team sizes apart")
    stop = threading.Event()

    def products() -> None:
        y = torch.randn(512, 512)
        while not stop.is_set():
            (y @ y).sum()

    side = threading.Thread(target=products) if side_thread else None
    if side is not None:
        side.start()
    seen: collections.Counter = collections.Counter()
    start = time.perf_counter()
    for _ in range(calls):
        value = x.sum().item()
        seen[by_threads.get(value, repr(value))] += 1
    stop.set()
    print(f"{calls} sums in {time.perf_counter() - start:.1f} s ({torch.get_num_threads()} threads, side thread "
          f"{'on' if side_thread else 'off'}): {dict(seen)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--team", type=int, metavar="N", help="probe the team size N times instead")
    parser.add_argument("--side-thread", action="store_true")
    args = parser.parse_args()
    team(args.team, args.side_thread) if args.team else main()
