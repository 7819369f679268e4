"""Target 4: load with verification. The same weights + Adam state, written once by each format, then read back
side by side, with a cold page cache (sync; echo 3 > /proc/sys/vm/drop_caches, where allowed) and warm:

  raw read            read the safetensors file's bytes into memory (what the disk gives; context)
  etappe load         etappe.checkpoint.load(path): every file verified (xxh3), tensors returned, every page touched
  etappe load+restore etappe.checkpoint.load(path, model=m, optimizer=o): verified and restored into live objects
  safetensors         safetensors.torch.load_file(path), every page touched  (the bound)
  torch.load          torch.load(path, weights_only=True), every page touched

Targets: etappe load >= 0.8x safetensors and >= 1.5x torch.load (MB/s, median of per-round ratios).

    .venv/bin/python benchmarks/bench_load.py                # 100 MB of weights, 300 MB with Adam
    .venv/bin/python benchmarks/bench_load.py --full         # 1.07 GB of weights, 3.2 GB with Adam
"""

from __future__ import annotations

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

    import etappe.checkpoint as ck

    weights_mb = args.weights_mb or (1074 if args.full else 100)
    repeats = args.repeats or (3 if args.full else 5)
    print(common.machine())
    model, opt = common.make_state(weights_mb)
    total = common.state_bytes(model, opt)
    root = Path(tempfile.mkdtemp(prefix="etappe-bench-load-", dir=args.dir))
    paths = {"etappe": root / "ckpt", "safetensors": root / "bare.safetensors", "torch": root / "plain.pt"}
    ck.save(paths["etappe"], model=model, optimizer=opt)
    safetensors.torch.save_file(common.flat_tensors(model, opt), paths["safetensors"])
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, paths["torch"])
    # The objects to restore into: same shapes, other values (the restore must copy every byte).
    model2, opt2 = common.make_state(weights_mb)
    del model, opt
    can_drop = common.drop_page_cache()
    print(f"state: {total / 1e6:,.0f} MB; page cache {'dropped before each cold read' if can_drop else 'NOT droppable here: cold = warm'}")

    def mb_s(fn, cold: bool):
        def run() -> float:
            if cold:
                common.drop_page_cache()
            seconds, _ = common.timed(fn)
            return total / 1e6 / seconds
        return run

    def raw_read() -> None:
        with open(paths["safetensors"], "rb") as f:
            buf = bytearray(paths["safetensors"].stat().st_size)
            f.readinto(buf)

    def etappe_load() -> None:
        common.touch(common.tensors_of(ck.load(paths["etappe"])))

    def etappe_restore() -> None:
        ck.load(paths["etappe"], model=model2, optimizer=opt2)

    def st_load() -> None:
        common.touch(safetensors.torch.load_file(paths["safetensors"]).values())

    def torch_load() -> None:
        common.touch(common.tensors_of(torch.load(paths["torch"], weights_only=True)))

    jobs = {"raw read": raw_read, "etappe load": etappe_load, "etappe load+restore": etappe_restore,
            "safetensors": st_load, "torch.load": torch_load}
    for job in jobs.values():  # warm-up
        job()
    results = {}
    for temp in ("cold", "warm"):
        rounds = common.Rounds()
        figures = common.alternate({n: mb_s(j, temp == "cold") for n, j in jobs.items()}, repeats, rounds=rounds)
        bound, tl = figures["safetensors"], figures["torch.load"]
        rows = [[n, common.median(v), common.median([a / b for a, b in zip(v, bound)]),
                 common.median([a / b for a, b in zip(v, tl)])] for n, v in figures.items()]
        common.table(f"load, {temp} page cache, {total / 1e6:,.0f} MB, MB/s (median of {repeats} rounds)",
                     ["reader", "MB/s", "x safetensors", "x torch.load"], rows)
        e = rows[1]
        print(f"{temp}: etappe load {e[2]:.2f}x safetensors (target >= 0.8: {'met' if e[2] >= 0.8 else 'NOT met'}), "
              f"{e[3]:.2f}x torch.load (target >= 1.5: {'met' if e[3] >= 1.5 else 'NOT met'}); {rounds}")
        results[temp] = {"rows": rows, "figures": figures}
    shutil.rmtree(root, ignore_errors=True)
    print(f"\nwrote {common.write_rows('load', [{'mb': total / 1e6, **results}])}")


if __name__ == "__main__":
    main()
