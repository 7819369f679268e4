"""Target 3: save. Model weights + Adam state (3x the weights), written durably, side by side in one run:

  etappe      CheckpointStore(root).save(step, {"model": m, "optimizer": o}, metrics): files, checksums, fsync, commit
  safetensors safetensors.torch.save_file(all tensors, path) + fsync  (the bound)
  torch.save  torch.save({"model": sd, "optimizer": osd}, path) + fsync

Targets: etappe >= 0.9x safetensors and >= 1.5x torch.save (MB/s, median of rounds of per-round ratios).

    .venv/bin/python benchmarks/bench_save.py                # 100 MB of weights, 300 MB with Adam
    .venv/bin/python benchmarks/bench_save.py --full         # 1.07 GB of weights, 3.2 GB with Adam
    .venv/bin/python benchmarks/bench_save.py --dir /mnt/x   # write somewhere else (default: a temp folder)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import common


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--weights-mb", type=float, default=None, help="MB of float32 weights (default 100; --full 1074)")
    p.add_argument("--dir", default=None, help="folder to write in (default: a new temp folder)")
    args = p.parse_args()
    import safetensors.torch
    import torch

    from etappe.checkpoint import CheckpointStore

    weights_mb = args.weights_mb or (1074 if args.full else 100)
    repeats = args.repeats or (3 if args.full else 5)
    print(common.machine())
    model, opt = common.make_state(weights_mb)
    total = common.state_bytes(model, opt)
    flat = common.flat_tensors(model, opt)
    print(f"state: {len(flat)} tensors, {total / 1e6:,.0f} MB (weights {weights_mb:,.0f} MB + Adam)")
    root = Path(tempfile.mkdtemp(prefix="etappe-bench-save-", dir=args.dir))

    def fresh(name: str) -> Path:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        os.sync()  # start each write with no dirty pages of an earlier one pending
        return path

    def etappe_save() -> float:
        path = fresh("store")
        store = CheckpointStore(path)
        seconds, _ = common.timed(lambda: store.save(1, {"model": model, "optimizer": opt}, {"loss": 0.5}))
        return total / 1e6 / seconds

    def safetensors_save() -> float:
        path = fresh("bare.safetensors")

        def run() -> None:
            safetensors.torch.save_file(flat, path)
            common.fsync_path(path)

        return total / 1e6 / common.timed(run)[0]

    def torch_save() -> float:
        path = fresh("plain.pt")

        def run() -> None:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
            common.fsync_path(path)

        return total / 1e6 / common.timed(run)[0]

    variants = {"safetensors + fsync": safetensors_save, "etappe store.save": etappe_save,
                "torch.save + fsync": torch_save}
    for v in variants.values():  # warm-up (first-write costs, imports)
        v()
    rounds = common.Rounds()
    figures = common.alternate(variants, repeats, rounds=rounds)
    shutil.rmtree(root, ignore_errors=True)
    bound, ts = figures["safetensors + fsync"], figures["torch.save + fsync"]
    rows = []
    for name, values in figures.items():
        rows.append([name, common.median(values), common.median([a / b for a, b in zip(values, bound)]),
                     common.median([a / b for a, b in zip(values, ts)])])
    common.table(f"save, {total / 1e6:,.0f} MB, MB/s (median of {repeats} rounds)",
                 ["writer", "MB/s", "x safetensors", "x torch.save"], rows)
    e = rows[1]
    print(f"etappe: {e[2]:.2f}x safetensors (target >= 0.9: {'met' if e[2] >= 0.9 else 'NOT met'}), "
          f"{e[3]:.2f}x torch.save (target >= 1.5: {'met' if e[3] >= 1.5 else 'NOT met'})")
    print(rounds)
    print(f"\nwrote {common.write_rows('save', [{'writer': r[0], 'mb_s': r[1], 'x_safetensors': r[2], 'x_torch_save': r[3]} for r in rows] + [{'figures': figures, 'mb': total / 1e6}])}")


if __name__ == "__main__":
    main()
