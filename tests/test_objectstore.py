"""The object-store checkpoint store against moto's S3 emulator, a real server in a subprocess (tests/s3server.py)."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

from etappe.checkpoint.errors import CheckpointError, CheckpointWarning

from etappe.checkpoint import objectstore
from etappe.checkpoint.objectstore import ObjectCheckpointStore


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def test_round_trip_is_bit_identical(s3):
    net, opt = _net(), None
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(4, 8)).sum().backward()
    opt.step()
    store = ObjectCheckpointStore(s3.url("run/checkpoints"))
    url = store.save(7, {"model": net, "optimizer": opt, "epoch": 3}, metrics={"val_loss": 0.5})
    store.close()
    assert store.conditional_writes is True
    assert url.startswith(s3.url("run/checkpoints/step-00000007."))
    assert ObjectCheckpointStore(s3.url("run/checkpoints")).latest() == url
    other, = [_net(1)]
    other_opt = torch.optim.Adam(other.parameters())
    values = ObjectCheckpointStore(s3.url("run/checkpoints")).load(model=other, optimizer=other_opt)
    assert values["epoch"] == 3
    for a, b in zip(net.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert str(opt.state_dict()) == str(other_opt.state_dict())
    assert "run/checkpoints/writer.lock" not in s3.keys()
    assert objectstore.verify_url(s3.url("run")) == [(url, None)]


def test_async_save_commits_in_background_and_fetch_gives_a_local_checkpoint(s3, tmp_path):
    net = _net()
    store = ObjectCheckpointStore(s3.url("run/checkpoints"), async_save=True, keep_last=1)
    first = store.save(1, {"model": net})
    with torch.no_grad():
        net[0].weight.add_(1.0)
    second = store.save(2, {"model": net})  # waits for the first, snapshots, returns
    assert store.wait() == second
    store.close()
    assert [k.split("/")[2] for k in s3.keys("run/checkpoints/step-")] == [second.rsplit("/", 1)[1]] * 3
    assert first != second
    local = objectstore.fetch(s3.url("run"), tmp_path / "ckpt")  # a run folder: its newest checkpoint
    other = _net(5)
    etappe_load(local, model=other)
    assert torch.equal(other[0].weight, net[0].weight)
    objectstore.write_object(s3.url("run/metrics.jsonl"), b'{"epoch": 1}\n')
    assert objectstore.read_object(s3.url("run/metrics.jsonl")) == b'{"epoch": 1}\n'
    assert objectstore.read_object(s3.url("run/absent.json")) is None


def etappe_load(path, **objects):
    from etappe.checkpoint import folder
    return folder.load(path, **objects)


def _damage(s3, key: str, how: str) -> bytes:
    c = s3.client()
    original = c.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    if how == "delete":
        c.delete_object(Bucket=s3.bucket, Key=key)
    else:  # one bit flipped, same size: only the checksums can tell
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x10
        c.put_object(Bucket=s3.bucket, Key=key, Body=bytes(flipped))
    return original


def test_any_damaged_object_is_named_and_latest_falls_back(s3):
    store = ObjectCheckpointStore(s3.url("ckpts"))
    good = store.save(1, {"model": _net(), "note": "first"})
    bad = store.save(2, {"model": _net(1), "note": "second"})
    store.close()
    prefix = bad.split(f"s3://{s3.bucket}/", 1)[1]
    for name in ("manifest.json", "state.json", "model.safetensors"):
        for how in ("delete", "flip"):
            key = f"{prefix}/{name}"
            original = _damage(s3, key, how)
            results = dict(objectstore.verify_url(s3.url("ckpts")))
            assert results[good] is None, (name, how)
            assert results[bad] is not None and name in results[bad], (name, how, results[bad])
            reader = ObjectCheckpointStore(s3.url("ckpts"))
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                assert reader.latest() == good, (name, how)
                assert reader.load()["note"] == "first"
            # a prefix without a manifest is no checkpoint (it may be a save in flight): passed over in silence
            expected = [] if (name, how) == ("manifest.json", "delete") else [f"skipping checkpoint {bad}"] * 2
            assert [str(w.message)[: len(bad) + 20] for w in said] == expected, (name, how)
            s3.client().put_object(Bucket=s3.bucket, Key=key, Body=original)
    assert dict(objectstore.verify_url(s3.url("ckpts"))) == {good: None, bad: None}


WRITER = r"""
import sys, torch
from etappe.checkpoint.objectstore import ObjectCheckpointStore
store = ObjectCheckpointStore(sys.argv[1])
store.save(1, {"model": torch.nn.Linear(4, 4)})
print("saved", flush=True)
store.save(2, {"big": torch.zeros(48 << 20, dtype=torch.uint8), "model": torch.nn.Linear(4, 4)})
print("never", flush=True)
"""


def test_a_writer_killed_mid_upload_leaves_no_checkpoint_and_its_leftovers_are_swept(s3):
    root = s3.url("killed")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, root], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "saved\n"
        deadline = time.monotonic() + 120
        while not any("step-00000002." in k for k in s3.keys("killed/")):
            assert time.monotonic() < deadline and proc.poll() is None, "the second save never started uploading"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # its small state.json is up; the 48 MB tensor file is still going
        proc.wait()
    finally:
        proc.kill()
    leftovers = [k for k in s3.keys("killed/") if "step-00000002." in k]
    assert leftovers and not any(k.endswith("manifest.json") for k in leftovers)
    store = ObjectCheckpointStore(root)
    assert store.latest().startswith(root + "/step-00000001.")
    assert [c.step for c in store.checkpoints()] == [1]
    problems = dict(objectstore.verify_url(root))
    assert sorted(p is None for p in problems.values()) == [False, True]
    assert any(p and "manifest.json: missing" in p for p in problems.values())
    store.lock()  # the killed writer's lease: same host, dead pid, so taken over; then its leftovers go
    assert not [k for k in s3.keys("killed/") if "step-00000002." in k]
    store.save(2, {"model": torch.nn.Linear(4, 4)})
    store.close()
    assert [c.step for c in ObjectCheckpointStore(root).checkpoints()] == [1, 2]


def test_a_second_writer_is_refused_until_the_lease_is_released_or_expires(s3, monkeypatch):
    first = ObjectCheckpointStore(s3.url("two"))
    first.save(1, {"x": 1})
    second = ObjectCheckpointStore(s3.url("two"))
    with pytest.raises(CheckpointError, match=rf"another writer \(pid {os.getpid()} on"):
        second.save(2, {"x": 2})
    first.close()
    second.save(2, {"x": 2})
    second.close()
    # a lease left by a writer on another machine that stopped renewing it: refused until it expires
    monkeypatch.setenv("ETAPPE_S3_LEASE_SECONDS", "2")
    s3.client().put_object(Bucket=s3.bucket, Key="two/writer.lock",
                           Body=json.dumps({"host": "elsewhere", "pid": 1, "ttl_seconds": 2}).encode())
    third = ObjectCheckpointStore(s3.url("two"))
    with pytest.raises(CheckpointError, match="pid 1 on elsewhere.*expires"):
        third.lock()
    time.sleep(3.5)
    third.save(3, {"x": 3})
    assert json.loads(s3.client().get_object(Bucket=s3.bucket, Key="two/writer.lock")["Body"].read())["pid"] == os.getpid()
    third.close()
    assert [c.step for c in ObjectCheckpointStore(s3.url("two")).checkpoints()] == [1, 2, 3]


class _StripConditions(http.server.BaseHTTPRequestHandler):
    """A proxy to moto that drops If-None-Match and If-Match: a store without conditional writes."""
    upstream = ""
    protocol_version = "HTTP/1.1"

    def _forward(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("if-none-match", "if-match", "host")}
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, *args):
        pass


def test_a_store_without_conditional_writes_is_detected_and_said(s3, monkeypatch):
    handler = type("Strip", (_StripConditions,), {"upstream": s3.endpoint.split("//", 1)[1]})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_address[1]}")
        store = ObjectCheckpointStore(s3.url("plain"))
        with pytest.warns(CheckpointWarning, match=r"does not honour create-only writes.*two writers are not kept "
                                                   r"apart and a commit can be overwritten"):
            url = store.save(1, {"x": 1})
        assert store.conditional_writes is False
        assert store.latest() == url and store.load()["x"] == 1
        store.close()
    finally:
        proxy.shutdown()
    assert ObjectCheckpointStore(s3.url("plain")).latest() == url  # through moto itself: the same checkpoint
    assert not [k for k in s3.keys("plain/") if ".etappe-probe-" in k or k.endswith("writer.lock")]


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from etappe.checkpoint.store import CheckpointStore  # noqa: E402
from etappe.errors import UsageError  # noqa: E402

_RULES = st.fixed_dictionaries({
    "keep_last": st.none() | st.integers(0, 3),
    "keep_best": st.none() | st.integers(0, 2),
    "keep_every": st.none() | st.integers(1, 4),
    "mode": st.sampled_from(["min", "max"]),
})
_SAVES = st.lists(st.tuples(st.integers(0, 9), st.sampled_from([0.1, 0.5, 0.5, 2.0, float("nan")])), min_size=1,
                  max_size=6)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rules=_RULES, saves=_SAVES)
def test_retention_keeps_exactly_what_the_local_store_keeps(s3, tmp_path_factory, rules, saves):
    """Random save sequences (steps repeat and go back, metrics tie and are nan): the same steps and metrics remain
    as in a local CheckpointStore given the same sequence, and nothing else is left under the prefix."""
    monitor = "loss" if rules["keep_best"] is not None else None
    prefix = f"prop-{os.urandom(4).hex()}"
    remote = ObjectCheckpointStore(s3.url(prefix), monitor=monitor, **rules)
    local = CheckpointStore(tmp_path_factory.mktemp("local"), monitor=monitor, **rules)
    for step, loss in saves:
        remote.save(step, {"step": step}, metrics={"loss": loss})
        local.save(step, {"step": step}, metrics={"loss": loss})
    remote.close()
    local.close()
    def shown(cs):
        return [(c.step, repr(c.metrics["loss"])) for c in cs]
    assert shown(ObjectCheckpointStore(s3.url(prefix)).checkpoints()) == shown(local.checkpoints())
    names = {k.split("/")[1] for k in s3.keys(prefix + "/")}
    assert len(names) == len(local.checkpoints())  # no superseded attempt, no leftover, no lease, no probe
    assert all(name.startswith("step-") for name in names)


_SEGMENT = st.text(st.characters(codec="ascii", exclude_characters="/?#", min_codepoint=32, max_codepoint=126),
                   min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
_BUCKET = st.from_regex(r"[a-z0-9][a-z0-9-]{1,20}[a-z0-9]", fullmatch=True)


@given(bucket=_BUCKET, parts=st.lists(_SEGMENT, max_size=4), slash=st.booleans())
def test_well_formed_s3_urls_are_accepted_and_round_trip(bucket, parts, slash):
    url = "s3://" + "/".join([bucket, *parts]) + ("/" if slash and parts else "")
    assert objectstore.is_url(url)
    if url.rstrip("/") != url.rstrip("/").rstrip():  # white space at the end (before a trailing slash): refused
        with pytest.raises(UsageError, match="white space around a URL"):
            objectstore.check_url(url)
        return
    objectstore.check_url(url)
    from etappe.checkpoint.objectio import Url
    parsed = Url.of(url)
    assert (parsed.bucket, parsed.key) == (bucket, "/".join(parts))
    assert Url.of(str(parsed)) == parsed


@given(bucket=_BUCKET, parts=st.lists(_SEGMENT, max_size=3), bad=st.sampled_from(["", ".", ".."]),
       at=st.integers(0, 3))
def test_urls_with_empty_or_dot_segments_are_refused(bucket, parts, bad, at):
    parts = [*parts[:at], bad, *parts[at:], "x"]
    with pytest.raises(UsageError, match=r"empty, '\.' or '\.\.' part"):
        objectstore.check_url("s3://" + "/".join([bucket, *parts]))


@given(scheme=st.from_regex(r"[a-z][a-z0-9+.-]{1,8}", fullmatch=True).filter(lambda s: s != "s3"),
       rest=st.text(max_size=20))
def test_other_schemes_are_refused_in_one_line_naming_what_is_supported(scheme, rest):
    url = f"{scheme}://{rest}"
    assert objectstore.is_url(url)
    with pytest.raises(UsageError) as e:
        objectstore.check_url(url)
    assert "s3://" in str(e.value) and "\n" not in str(e.value)


@given(path=st.text(max_size=30).filter(lambda s: "://" not in s))
def test_local_paths_are_not_urls(path):
    from pathlib import Path
    assert not objectstore.is_url(path)
    assert not objectstore.is_url(Path(path or "."))
    assert not objectstore.is_url("C:\\" + path)
    assert not objectstore.is_url("C://" + path)  # a Windows drive, not a one-letter scheme


@pytest.mark.parametrize("url, said", [
    ("s3://", "no bucket"), ("s3:///run", "no bucket"), ("s3://B/run", "not an S3 bucket name"),
    ("s3://abc/run?versionId=1", "'?' or '#'"), ("S3://bkt/run", "lower case"), ("gs://bkt/run", "s3:// URLs only"),
    ("file:///tmp/x", "s3:// URLs only"), ("s3://192.168.0.1/x", "not an S3 bucket name"),
])
def test_bad_urls_are_refused_with_the_reason(url, said):
    with pytest.raises(UsageError, match=re.escape(said)):
        objectstore.check_url(url)
    assert isinstance(objectstore.open_store("runs/local"), CheckpointStore)


def test_a_lock_file_cannot_claim_a_lease_longer_than_an_hour_and_a_junk_one_is_named_so(s3):
    s3.client().put_object(Bucket=s3.bucket, Key="long/writer.lock", Body=json.dumps(
        {"host": "elsewhere", "pid": 1, "started": "2026-12-02T00:00:00Z", "ttl_seconds": 1e12}).encode())
    with pytest.raises(CheckpointError, match=r"expires (\d+) s from now") as refused:
        ObjectCheckpointStore(s3.url("long")).lock()
    assert int(re.search(r"expires (\d+) s", str(refused.value)).group(1)) <= 3600
    s3.client().put_object(Bucket=s3.bucket, Key="junk/writer.lock", Body=b"garbage{")
    with pytest.raises(CheckpointError, match=r"another writer \(an unreadable writer.lock, renewed"):
        ObjectCheckpointStore(s3.url("junk")).lock()
