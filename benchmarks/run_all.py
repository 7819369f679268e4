"""Run every benchmark of issue 6, one after the other, each in its own process; flags are passed on to each
(--full for full sizes, --repeats N). Output goes to the terminal and to benchmarks/out/run_all.txt.

    .venv/bin/python benchmarks/run_all.py            # quick sizes: 20-30 minutes on 2 cores, more when busy
    .venv/bin/python benchmarks/run_all.py --full     # full sizes (3.2 GB checkpoints, full epochs)
    .venv/bin/python benchmarks/run_all.py --only save,load
"""

from __future__ import annotations

import subprocess
import sys
import time

import common

SCRIPTS = {
    "train": "bench_train.py",              # targets 1, 2
    "train_options": "bench_train_options.py",  # target 1, optional: fused, foreach, compile
    "precision": "bench_precision.py",      # issue 13: bf16-mixed, compile, accumulation
    "profile": "profile_step.py",           # where a step's time goes
    "save": "bench_save.py",                # target 3
    "checksum": "bench_checksum.py",        # target 4
    "load": "bench_load.py",                # target 4
    "async_save": "bench_async_save.py",    # target 5
    "memory": "bench_memory.py",            # target 6
    "startup": "bench_startup.py",          # target 7
}


def main() -> int:
    argv = sys.argv[1:]
    only = None
    if "--only" in argv:
        at = argv.index("--only")
        only = argv[at + 1].split(",")
        argv = argv[:at] + argv[at + 2 :]
    common.OUT.mkdir(exist_ok=True)
    failed = []
    with open(common.OUT / "run_all.txt", "w") as log:
        def say(text: str) -> None:
            print(text, flush=True)
            log.write(text + "\n")
            log.flush()

        say(f"# etappe benchmarks, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        for name, script in SCRIPTS.items():
            if only and name not in only:
                continue
            cmd = [common.PYTHON, str(common.HERE / script), *argv]
            say(f"\n## {name}: {' '.join(['.venv/bin/python', f'benchmarks/{script}', *argv])}")
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                if "Warning" in line or line.startswith("  warnings.warn") or line.startswith("USDT:"):
                    continue
                say(line.rstrip("\n"))
            if proc.wait() != 0:
                failed.append(name)
            say(f"({name}: {time.perf_counter() - start:.0f} s, exit {proc.returncode})")
        if failed:
            say(f"\nFAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
