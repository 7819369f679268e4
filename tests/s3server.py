"""An S3 server for the tests: moto's emulator as a real subprocess on a free port of 127.0.0.1.

moto speaks real HTTP and answers ``If-None-Match: *`` on an existing key with 412, as AWS S3 does since 2024. The
server lives for the whole session; each test gets a fresh bucket and the ``AWS_*`` variables in its environment
(so subprocesses it starts reach the same server).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

MOTO_SERVER = Path(sys.executable).with_name("moto_server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto(port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start moto's server and wait until it answers; returns (process, endpoint URL)."""
    port = port or free_port()
    cmd = [str(MOTO_SERVER)] if MOTO_SERVER.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode} before answering on {endpoint}")
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"moto_server did not answer on {endpoint} within 30 s")


@dataclass
class S3Bucket:
    """One test's bucket on the session's server."""
    endpoint: str
    bucket: str

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/") if prefix else f"s3://{self.bucket}"

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` in this bucket, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of a moto server running for the whole session."""
    pytest.importorskip("s3fs")
    proc, endpoint = start_moto()
    try:
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def s3(s3_server, monkeypatch) -> S3Bucket:
    """A fresh bucket on the session's server, with AWS_* set for this test and its subprocesses."""
    for key, value in {**AWS_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(key, value)
    bucket = S3Bucket(s3_server, "etappe-" + uuid.uuid4().hex[:12])
    bucket.client().create_bucket(Bucket=bucket.bucket)
    return bucket


__all__ = ["s3_server", "s3", "S3Bucket", "start_moto", "free_port", "AWS_ENV"]
