"""Target 7: start-up. Wall time of `etappe --help` and of a bad flag (`etappe train --optimizer nope`), each in a
fresh subprocess, median of N, against bare `python -c pass` and `python -c "import torch"` in the same run.
Target: under 0.5 s.

    .venv/bin/python benchmarks/bench_startup.py            # median of 5
    .venv/bin/python benchmarks/bench_startup.py --full     # median of 15
"""

from __future__ import annotations

import common

COMMANDS = {
    "python -c pass": [common.PYTHON, "-c", "pass"],
    "python -c 'import torch'": [common.PYTHON, "-c", "import torch"],
    "etappe --help": [common.ETAPPE, "--help"],
    "etappe train --optimizer nope": [common.ETAPPE, "train", "--optimizer", "nope"],
    "python -m etappe --help": [common.PYTHON, "-m", "etappe", "--help"],
}
EXPECTED_EXIT = {"etappe train --optimizer nope": 2}


def main() -> None:
    args = common.parser(__doc__).parse_args()
    repeats = args.repeats or (15 if args.full else 5)
    print(common.machine())

    def run(name: str) -> float:
        seconds, result = common.timed(lambda: common.run_quiet(COMMANDS[name]))
        if result.returncode != EXPECTED_EXIT.get(name, 0):
            raise RuntimeError(f"{name} exited {result.returncode}: {result.stderr.strip()[-300:]}")
        return seconds

    for name in COMMANDS:  # warm the file cache
        run(name)
    rounds = common.Rounds()
    figures = common.alternate({name: (lambda n=name: run(n)) for name in COMMANDS}, repeats, rounds=rounds)
    torch_s = common.median(figures["python -c 'import torch'"])
    rows = []
    for name, values in figures.items():
        s = common.median(values)
        verdict = ("met" if s < 0.5 else "NOT met") if name.startswith("etappe") else ""
        rows.append([name, s, min(values), max(values), s / torch_s, verdict])
    common.table(f"start-up, wall seconds, median of {repeats}", ["command", "median s", "min", "max",
                 "x import torch", "target < 0.5 s"], rows)
    print(rounds)
    err = common.run_quiet(COMMANDS["etappe train --optimizer nope"]).stderr.strip()
    print(f"bad-flag message: {err}")
    print(f"\nwrote {common.write_rows('startup', [{'command': r[0], 'median_s': r[1]} for r in rows])}")


if __name__ == "__main__":
    main()
