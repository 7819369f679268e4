"""Target 4, the checksum: MB/s of candidate checksums over one in-memory buffer (one thread, warm memory),
beside a plain memory copy, to show which one verification can afford. etappe's choice is
etappe.checkpoint.CHECKSUM.

    .venv/bin/python benchmarks/bench_checksum.py            # 256 MB buffer
    .venv/bin/python benchmarks/bench_checksum.py --full     # 1 GB buffer
"""

from __future__ import annotations

import hashlib
import zlib

import common


def candidates() -> dict:
    import xxhash

    out = {
        "xxh3_64 (xxhash)": xxhash.xxh3_64_intdigest,
        "xxh3_128 (xxhash)": xxhash.xxh3_128_intdigest,
        "xxh64 (xxhash)": xxhash.xxh64_intdigest,
        "crc32 (zlib)": zlib.crc32,
        "adler32 (zlib)": zlib.adler32,
        "sha256 (hashlib)": lambda b: hashlib.sha256(b).digest(),
        "blake2b (hashlib)": lambda b: hashlib.blake2b(b).digest(),
        "md5 (hashlib)": lambda b: hashlib.md5(b).digest(),
    }
    try:
        import crc32c

        out["crc32c (crc32c wheel)"] = crc32c.crc32c
    except ImportError:
        out["crc32c"] = None
    return out


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--mb", type=int, default=None)
    args = p.parse_args()
    import numpy as np

    mb = args.mb or (1024 if args.full else 256)
    repeats = args.repeats or 5
    print(common.machine())
    src = np.random.default_rng(0).integers(0, 256, mb * 2**20, dtype=np.uint8)
    buf = memoryview(src.data)
    dst = np.ones_like(src)  # already allocated and faulted in

    def copy(_b) -> None:
        np.copyto(dst, src)

    funcs = {"memory copy (into allocated)": copy, **candidates()}
    missing = [n for n, f in funcs.items() if f is None]
    funcs = {n: f for n, f in funcs.items() if f is not None}
    variants = {n: (lambda f=f: len(buf) / 1e6 / common.timed(lambda: f(buf))[0]) for n, f in funcs.items()}
    for v in variants.values():
        v()
    rounds = common.Rounds()
    figures = common.alternate(variants, repeats, rounds=rounds)
    try:
        from etappe.checkpoint import CHECKSUM
    except ImportError:
        CHECKSUM = "?"
    xxh = figures["xxh3_128 (xxhash)"]
    rows = [[n, common.median(v), common.median([a / b for a, b in zip(v, xxh)]),
             "<- etappe" if n.startswith(CHECKSUM + " ") else ""] for n, v in figures.items()]
    rows.sort(key=lambda r: -r[1])
    common.table(f"checksums over {mb} MB in memory, one thread, MB/s (median of {repeats})",
                 ["checksum", "MB/s", "x xxh3_128", "chosen"], rows)
    if missing:
        print(f"not installed: {', '.join(missing)} (pip install crc32c)")
    print(rounds)
    print(f"\nwrote {common.write_rows('checksum', [{'checksum': r[0], 'mb_s': r[1]} for r in rows])}")


if __name__ == "__main__":
    main()
