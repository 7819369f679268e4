"""Checkpoints on an object store: etappe's save and load of a state dict against a bare s3fs put and get of the same
bytes, to the same local S3 server (moto's emulator, started here as a subprocess), side by side in one run:

  s3fs put      fs.pipe_file(key, bytes)  of the checkpoint's safetensors file (s3fs's own multipart, concurrent)
  etappe save   ObjectCheckpointStore.save(step, {"model": m}): encode, checksum, upload, create-only manifest
  s3fs get      fs.cat_file(key)  of the same file (s3fs's own ranged GETs, concurrent)
  etappe load   ObjectCheckpointStore.load(url, model=m): list, download, verify every checksum, restore

Target: etappe >= 0.9x s3fs, both ways (MB/s, median of per-round ratios). moto is an emulator in Python: its
absolute speed says nothing about AWS; the ratio says what etappe's commit costs over a bare transfer.

    .venv/bin/python benchmarks/bench_s3.py                  # ~200 MB state dict, 3 rounds
    .venv/bin/python benchmarks/bench_s3.py --mb 50 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=200, help="MB of float32 weights (default 200)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    import common
    import torch
    from s3server import AWS_ENV, start_moto

    proc, endpoint = start_moto()
    os.environ.update({**AWS_ENV, "AWS_ENDPOINT_URL": endpoint})
    try:
        from etappe.checkpoint import tensorfile
        from etappe.checkpoint.objectio import Client
        from etappe.checkpoint.objectstore import ObjectCheckpointStore

        width = 1024
        rows = max(1, int(args.mb * 2**20 / 4 / width))
        model = torch.nn.Linear(width, rows, bias=False)
        other = torch.nn.Linear(width, rows, bias=False)
        data = b"".join(tensorfile.chunks(dict(model.state_dict())))
        mb = len(data) / 2**20
        fs = Client().fs
        fs.mkdir("bench")
        store = ObjectCheckpointStore("s3://bench/ckpts", keep_last=1)
        print(f"# {common.machine()}")
        print(f"# {mb:.0f} MB state dict, moto server {endpoint}, {args.rounds} rounds")
        ratios: dict[str, list[float]] = {"save": [], "load": []}
        for r in range(args.rounds):
            t = time.perf_counter(); fs.pipe_file("bench/bare.safetensors", data); put = time.perf_counter() - t
            t = time.perf_counter(); url = store.save(r, {"model": model}); save = time.perf_counter() - t
            t = time.perf_counter(); got = fs.cat_file("bench/bare.safetensors"); get = time.perf_counter() - t
            assert len(got) == len(data)
            del got
            t = time.perf_counter(); store.load(url, model=other); load = time.perf_counter() - t
            assert torch.equal(other.weight, model.weight)
            ratios["save"].append(put / save)
            ratios["load"].append(get / load)
            print(f"round {r}: s3fs put {mb / put:6.1f} MB/s  etappe save {mb / save:6.1f} MB/s  ({put / save:.2f}x) | "
                  f"s3fs get {mb / get:6.1f} MB/s  etappe load {mb / load:6.1f} MB/s  ({get / load:.2f}x)")
        store.close()
        print(f"save: etappe / s3fs = {common.median(ratios['save']):.2f}x (target >= 0.9x)")
        print(f"load: etappe / s3fs = {common.median(ratios['load']):.2f}x (target >= 0.9x)")
    finally:
        proc.kill()


if __name__ == "__main__":
    main()
