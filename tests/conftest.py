"""Shared test helpers: the repo's Python, and running the etappe CLI in a real subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m etappe ARGS`` and capture its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "etappe", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture
def scratch(tmp_path):
    """A folder in memory when /dev/shm allows (the kills test processes, not disks; this spares the disk GBs)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * 2**30:
        path = Path(tempfile.mkdtemp(dir=shm, prefix="etappe-test-"))
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path


from s3server import s3, s3_server  # noqa: E402,F401  (the moto fixture for the object-store tests)
