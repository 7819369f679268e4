"""One writer per store on an object store: a lease object, and the probe of whether the store honours
create-only writes at all.

The lease is ``ROOT/writer.lock``, created with ``If-None-Match: *`` and holding the writer's host, pid and start
time. The writer renews it (a PUT with ``If-Match`` on its own version) every ``ttl/4`` seconds from a thread, and
once more right before each commit. A lease not renewed for ``ttl`` seconds, by the store's own clock (its
``Last-Modified`` against the ``Date`` of the answer), has expired, and the next writer takes it over with a PUT
``If-Match`` the expired version, so only one of two writers racing for it wins. A lease whose holder ran on this
host (same hostname and boot) under a pid that no longer exists is taken over at once.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from etappe.checkpoint.errors import CheckpointError
from etappe.checkpoint.objectio import Client, Conflict, Url

LEASE = "writer.lock"
PROBE = ".etappe-probe-"
TTL_ENV = "ETAPPE_S3_LEASE_SECONDS"
DEFAULT_TTL = 60.0
MAX_TTL = 3600.0  # the longest lease a lock file may claim


def honours_create_only(client: Client, root: Url) -> bool:
    """PUT a probe object twice with ``If-None-Match: *`` (the second must be refused with 412), then delete it."""
    probe = root.child(PROBE + secrets.token_hex(6))
    try:
        client.put(probe, b"probe", create_only=True)
        try:
            client.put(probe, b"probe again", create_only=True)
        except Conflict:
            return True
        return False
    finally:
        client.delete([probe])


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """This process's hold on ``ROOT/writer.lock``: ``acquire``, ``renew`` (raises once lost), ``release``."""

    def __init__(self, client: Client, root: Url, *, conditional: bool) -> None:
        self.client, self.url, self.conditional = client, root.child(LEASE), conditional
        self.ttl = float(os.environ.get(TTL_ENV, DEFAULT_TTL))
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.holder = {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "lease": secrets.token_hex(6)}

    def _body(self) -> bytes:
        return json.dumps({**self.holder, "ttl_seconds": self.ttl}).encode()

    def acquire(self) -> None:
        """Take the lease, or raise CheckpointError naming the writer that holds it and how to get past it."""
        try:
            if not self.conditional and self.client.head(self.url)[0] is not None:
                raise Conflict(str(self.url))  # the store would not refuse the PUT below: look first
            self.etag = self.client.put(self.url, self._body(), create_only=True)
        except Conflict:
            self._take_over()
        if not self.conditional:  # best effort only: a read-back sees a writer that came a moment earlier
            current = self.client.get(self.url)
            if current is not None and json.loads(current).get("lease") != self.holder["lease"]:
                raise CheckpointError(f"{self.url}: another writer wrote the lease a moment ago: {current[:200]!r}")
        self._thread = threading.Thread(target=self._renewing, name="etappe-s3-lease", daemon=True)
        self._thread.start()

    def _take_over(self) -> None:
        info, now = self.client.head(self.url)
        if info is None:  # released meanwhile
            self.etag = self.client.put(self.url, self._body(), create_only=True)
            return
        raw = self.client.get(self.url) or b"{}"
        try:
            held = json.loads(raw)
            held = held if isinstance(held, dict) else {}
        except ValueError:
            held = {}
        age = now - info["mtime"]
        # the holder's own lease time (it renews every quarter of it), but never longer than MAX_TTL: a lock file
        # naming a lease of years would otherwise hold the store for ever
        ttl = held.get("ttl_seconds")
        ttl = min(float(ttl), MAX_TTL) if isinstance(ttl, (int, float)) and ttl > 0 else self.ttl
        dead_here = (held.get("host") == self.holder["host"] and held.get("boot") == self.holder["boot"]
                     and isinstance(held.get("pid"), int) and not _alive(held["pid"]))
        if age <= ttl and not dead_here:
            since = f", since {held['started']}" if "started" in held else ""
            who = f"pid {held['pid']} on {held['host']!s:.60}{since}" if {"pid", "host"} <= held.keys() \
                else "an unreadable writer.lock"
            raise CheckpointError(
                f"{self.url.parent} has another writer ({who}, renewed {age:.0f} s ago); one writer per store: if that "
                f"process is gone, its lease expires {max(ttl - age, 0):.0f} s from now, or delete {self.url}"
            )
        try:
            self.etag = self.client.put(self.url, self._body(), if_match=info["etag"])
        except Conflict:
            raise CheckpointError(f"{self.url.parent}: another writer took over the expired lease {self.url} at the "
                                  "same moment; one writer per store") from None

    def renew(self) -> None:
        """Renew the lease now; CheckpointError if it was lost (another writer took it after it expired)."""
        with self._lock:
            if self.lost is None and self.etag is not None:
                try:
                    if self.conditional:
                        self.etag = self.client.put(self.url, self._body(), if_match=self.etag)
                    else:
                        self.etag = self.client.put(self.url, self._body())
                except Conflict:
                    self.lost = (f"{self.url}: this writer's lease was taken over by another writer (it was not "
                                 f"renewed for {self.ttl:.0f} s); this process no longer writes to the store")
                except CheckpointError as e:
                    if not self._stop.is_set():
                        raise e
            if self.lost:
                raise CheckpointError(self.lost)

    def _renewing(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except CheckpointError:
                if self.lost:
                    return  # said by the next save

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._lock:
            if self.etag is not None and self.lost is None:
                if self.conditional:
                    self.client.delete_if(self.url, self.etag)
                else:
                    self.client.delete([self.url])
            self.etag = None
