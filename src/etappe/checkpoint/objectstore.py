"""Checkpoint stores on object stores (``s3://bucket/prefix``): CheckpointStore's interface and guarantees without a
rename.

Each save goes to a prefix of its own that nothing else ever writes, ``ROOT/step-<step>.<attempt>/`` (the attempt
a random id), and holds the files a local checkpoint holds (``folder.encode``'s state.json and safetensors files,
each with its xxh3-128 checksum in the manifest). The data objects go up first; ``manifest.json`` goes last, as one
create-only PUT (``If-None-Match: *``): that PUT is the commit. A prefix without a manifest is an interrupted save
and never a checkpoint. Readers list the prefixes and take the highest step whose manifest and every object it lists
verify; of two committed attempts at one step, the newer.

The writer holds a lease (objectlease.py), probes once whether the store honours create-only writes (and says
which guarantees are off if not), and after each commit removes: other commits of the same step (superseded, as a
local save over a step replaces it), what retention drops (manifest first, then its data), and interrupted saves.
It never touches an object outside ROOT, nor a checkpoint whose manifest it cannot read.

There is no fsync on an object store: a checkpoint is as durable as the store makes an object once its PUT has
returned.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from etappe.checkpoint import background, codec, folder, fsio, kinds, manifest, tensorfile
from etappe.checkpoint.errors import CheckpointError, CheckpointWarning, NewerFormatError
from etappe.checkpoint.objectio import Client, Conflict, Url, check_url, is_url
from etappe.checkpoint.objectlease import Lease, honours_create_only
from etappe.checkpoint.store import Checkpoint, CheckpointStore, _metric
from etappe.errors import UsageError

__all__ = ["ObjectCheckpointStore", "check_url", "fetch", "is_url", "open_store", "read_object", "verify_url",
           "write_object"]

_ATTEMPT = re.compile(r"step-([0-9]{8,})\.([0-9a-f]{12})")
GRACE_SECONDS = 3600.0  # without create-only writes, an unfinished save younger than this may still be in flight
NO_CONDITIONAL = ("does not honour create-only writes (If-None-Match: *), so two writers are not kept apart and a "
                  "commit can be overwritten; checkpoints still verify, but only one writer per store is safe")


class Where(str):
    """A URL where a path is expected in messages (``.name``: its last part)."""

    @property
    def name(self) -> str:
        return self.rpartition("/")[2]


def _attempt_of(name: str) -> tuple[int, str] | None:
    m = _ATTEMPT.fullmatch(name)
    return (int(m[1]), m[2]) if m and name.startswith(f"step-{int(m[1]):08d}.") else None


def _check_rules(keep_last, keep_best, monitor, mode, keep_every) -> None:
    for name, value, least in (("keep_last", keep_last, 0), ("keep_best", keep_best, 0), ("keep_every", keep_every, 1)):
        if value is not None and (not isinstance(value, int) or value < least):
            raise UsageError(f"{name} must be a whole number >= {least} or None, got {value!r}")
    if mode not in ("min", "max"):
        raise UsageError(f"mode must be 'min' or 'max', got {mode!r}")
    if keep_best is not None and monitor is None:
        raise UsageError("keep_best needs monitor, the name of the metric to rank checkpoints by")


class ObjectCheckpointStore:
    """CheckpointStore on ``s3://bucket/prefix``: the same methods, rules and guarantees, with checkpoints named by
    URL (``ROOT/step-<step>.<attempt>``) instead of by path. See the module's docstring for the commit.

    ``conditional_writes`` is None until the first save (or ``lock()``) probes the store, then True or False.
    """

    def __init__(self, root: str, *, keep_last: int | None = None, keep_best: int | None = None,
                 monitor: str | None = None, mode: str = "min", keep_every: int | None = None,
                 async_save: bool = False) -> None:
        _check_rules(keep_last, keep_best, monitor, mode, keep_every)
        self._url = Url.of(root)
        self.root = str(self._url)
        self.keep_last, self.keep_best, self.keep_every = keep_last, keep_best, keep_every
        self.monitor, self.mode = monitor, mode
        self.async_save = bool(async_save)
        self.conditional_writes: bool | None = None
        self._client: Client | None = None
        self._lease: Lease | None = None
        self._inflight: str | None = None  # the prefix name of the save being uploaded
        self._pool = background.SnapshotPool()
        self._writer = background.Writer()

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client()
        return self._client

    @property
    def writing(self) -> bool:
        """Whether this store holds the writer lease now (``lock`` or a save took it, ``close`` has not let go)."""
        return self._lease is not None

    def lock(self) -> None:
        """Become this store's one writer (the first ``save`` does it; ``close`` lets go): probe the store once for
        create-only writes, take the lease ``ROOT/writer.lock``, and remove interrupted saves. CheckpointError naming
        the holder if another writer has the lease."""
        if self._lease is not None:
            return
        if self.conditional_writes is None:
            self.conditional_writes = honours_create_only(self.client, self._url)
            if not self.conditional_writes:
                warnings.warn(f"{self.root}: the object store {NO_CONDITIONAL}", CheckpointWarning, stacklevel=2)
        lease = Lease(self.client, self._url, conditional=self.conditional_writes)
        lease.acquire()
        self._lease = lease
        self._sweep(self._listing())

    def save(self, step: int, objects: Mapping[str, Any], metrics: Mapping[str, float] | None = None, *,
             sharded: Mapping[str, Any] | None = None) -> str:
        """Save ``objects`` as the checkpoint of ``step`` (as ``CheckpointStore.save``), then apply retention; return
        the checkpoint's URL. With ``async_save``, the upload and commit run in the background (``wait()``)."""
        if sharded is not None:
            raise UsageError("sharded saves to object stores are not supported yet; save the run to a local folder "
                             "(and copy it), or save the model whole")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise UsageError(f"step must be a whole number >= 0, got {step!r}")
        metrics = {k: _metric(k, v) for k, v in (metrics or {}).items()}
        meta = {"step": step, "metrics": codec.encode(metrics, "metrics")[0]}
        self.lock()
        name = f"step-{step:08d}.{secrets.token_hex(6)}"
        where = Where(self._url.child(name))
        if not self.async_save:
            self._commit(name, folder.encode(objects), meta, step)
            return where
        self._writer.wait(clear=True)
        snapshot = self._pool.snapshot(folder.encode(objects))
        self._writer.start(lambda: self._commit(name, snapshot, meta, step), where)
        return where

    def wait(self, *, clear: bool = False) -> str | None:
        """As ``CheckpointStore.wait``: block until the background save is committed and pruned."""
        return self._writer.wait(clear=clear)

    def close(self) -> str | None:
        """``wait(clear=True)``, free the async snapshot memory, and give up the lease."""
        try:
            return self.wait(clear=True)
        finally:
            self._pool.clear()
            if self._lease is not None:
                lease, self._lease = self._lease, None
                lease.release()

    def _commit(self, name: str, encoded: Mapping[str, tuple[dict, Any]], meta: dict, step: int) -> None:
        prefix = self._url.child(name)
        self._inflight = name
        try:
            files, state = _files(encoded)
            sums = {n: (len(data), manifest.checksum(data)) for n, data in files.items()}
            self.client.put_many({prefix.child(n): data for n, data in files.items()})
            body = manifest.encode(sums, state, meta)
            self._lease.renew()  # the fence: this writer held the lease a moment before its commit
            try:
                self.client.put(prefix.child(manifest.MANIFEST), body, create_only=bool(self.conditional_writes))
            except Conflict:
                raise CheckpointError(f"{prefix}: another writer committed this exact checkpoint first (412 on its "
                                      "create-only manifest); not overwritten") from None
        finally:
            self._inflight = None
        self._prune(step, name)

    def _listing(self) -> dict[str, dict[str, dict]]:
        """{prefix name: {file name: info}} of every attempt under ROOT (other objects are not ours)."""
        return _group(self.client.list(self._url))

    def _sweep(self, listing: Mapping[str, dict]) -> None:
        """Remove attempts with no manifest (interrupted saves), except the one being uploaded; without
        create-only writes, only those untouched for GRACE_SECONDS (another writer may still be uploading)."""
        newest_seen = max((i["mtime"] for files in listing.values() for i in files.values()), default=0.0)
        for name, files in listing.items():
            if manifest.MANIFEST in files or name == self._inflight:
                continue
            if not self.conditional_writes and newest_seen - max(i["mtime"] for i in files.values()) < GRACE_SECONDS:
                continue
            self.client.delete([self._url.child(name).child(f) for f in sorted(files)])

    def _prune(self, newest: int, just_saved: str) -> None:
        listing = self._listing()
        committed = self._read_manifests(listing, strict=False)
        drop = [c for c in committed if c.step == newest and c.name != just_saved]  # superseded by this save
        rest = [c for c in committed if c.step != newest or c.name == just_saved]
        if self.keep_last is not None or self.keep_best is not None or self.keep_every is not None:
            keep = self._kept(rest, newest)
            drop += [c for c in rest if c.step not in keep]
        for c in drop:
            files = listing.get(c.name, {})
            self.client.delete([self._url.child(c.name).child(manifest.MANIFEST)])  # first: then it is no checkpoint
            self.client.delete([self._url.child(c.name).child(f) for f in sorted(files) if f != manifest.MANIFEST])
        self._sweep(listing)

    def _read_manifests(self, listing: Mapping[str, dict], *, strict: bool) -> list[_Committed]:
        """The committed attempts whose manifest reads, by step; one per step (the newest), unless ``strict`` is
        None (then all of them, for pruning). NewerFormatError if ``strict`` and one is newer than this etappe."""
        names = [n for n, files in listing.items() if manifest.MANIFEST in files]
        urls = {n: self._url.child(n).child(manifest.MANIFEST) for n in names}
        blobs = self.client.get_many({urls[n]: listing[n][manifest.MANIFEST]["size"] for n in names})
        found = []
        for n in names:
            step, _ = _attempt_of(n)
            try:
                body = parse_manifest(blobs[urls[n]], self._url.child(n), step)
            except NewerFormatError:
                if strict:
                    raise
                continue
            except CheckpointError:
                continue
            found.append(_Committed(Where(self._url.child(n)), step, manifest.metrics_of(body), n,
                                    listing[n][manifest.MANIFEST]["mtime"]))
        return sorted(found, key=lambda c: (c.step, c.mtime, c.name))

    def _candidates(self) -> list[tuple[str, int, dict]]:
        """Committed-looking attempts (a manifest object), newest first: (name, step, files)."""
        listing = self._listing()
        named = [(n, _attempt_of(n)[0], files) for n, files in listing.items() if manifest.MANIFEST in files]
        return sorted(named, key=lambda t: (t[1], t[2][manifest.MANIFEST]["mtime"], t[0]), reverse=True)

    def checkpoints(self) -> list[Checkpoint]:
        """The committed checkpoints by step (manifests read, data not checked); NewerFormatError as the local store."""
        per_step: dict[int, _Committed] = {}
        for c in self._read_manifests(self._listing(), strict=True):
            per_step[c.step] = c  # sorted: the newest attempt of a step wins
        return [Checkpoint(c.path, c.step, c.metrics) for c in sorted(per_step.values(), key=lambda c: c.step)]

    def latest(self) -> str | None:
        """The URL of the highest step that verifies (every object checked); bad ones are skipped with a warning."""
        for name, step, files in self._candidates():
            if self._verified(name, step, files):
                return Where(self._url.child(name))
        return None

    def best(self) -> str | None:
        """The best checkpoint by ``monitor`` that verifies; the latest if there is no monitor or no metric."""
        listing = self._listing()
        for c in self._ranked(self.checkpoints()):
            if self._verified(c.path.name, c.step, listing.get(c.path.name, {})):
                return c.path
        return self.latest()

    def _verified(self, name: str, step: int, files: dict) -> bool:
        try:
            read_checkpoint(self.client, self._url.child(name), step, files)
        except NewerFormatError:
            raise
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {self._url.child(name)}: {e}", CheckpointWarning, stacklevel=3)
            return False
        return True

    def load(self, path: str | None = None, /, *, trusted: bool = False, strict: bool = True,
             **objects: Any) -> kinds.Loaded:
        """As ``CheckpointStore.load``: checkpoint ``path`` (a URL), or the newest that verifies, falling back past
        bad ones with a warning; ``strict=False`` as for ``load``. ``trusted`` is taken as ``load`` takes it and
        changes nothing: a store's checkpoints hold no pickles."""
        folder.check_options(strict, trusted)
        if path is not None:
            url = Url.of(str(path))
            entries = read_checkpoint(self.client, url, _attempt_of(url.name)[0] if _attempt_of(url.name) else None)
            return folder.restore(Where(url), entries, objects, strict=strict)
        for name, step, files in self._candidates():
            url = self._url.child(name)
            try:
                entries = read_checkpoint(self.client, url, step, files)
            except NewerFormatError:
                raise
            except CheckpointError as e:
                warnings.warn(f"skipping checkpoint {url}: {e}", CheckpointWarning, stacklevel=2)
                continue
            return folder.restore(Where(url), entries, objects, strict=strict)
        raise CheckpointError(f"no valid checkpoint in {self.root}")

    # the local store's retention rule and ranking, not copies of them (same attributes: keep_*, monitor, mode)
    _ranked, _kept = CheckpointStore._ranked, CheckpointStore._kept


class _Committed:
    __slots__ = ("path", "step", "metrics", "name", "mtime")

    def __init__(self, path: str, step: int, metrics: dict, name: str, mtime: float) -> None:
        self.path, self.step, self.metrics, self.name, self.mtime = path, step, metrics, name, mtime


def _group(flat: Mapping[str, dict]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for key, info in flat.items():
        top, _, rest = key.partition("/")
        if rest and _attempt_of(top) is not None:
            out.setdefault(top, {})[rest] = info
    return out


def _files(encoded: Mapping[str, tuple[dict, Any]]) -> tuple[dict[str, bytes], str]:
    """The objects of a checkpoint ({file name: bytes}, as the local writer names them) and its state file's name."""
    files: dict[str, bytes] = {}
    entries = {}
    for entry, (record, tensors) in encoded.items():
        record = dict(record)
        if isinstance(tensors, tensorfile.Image):
            files[f"{entry}.safetensors"] = tensors.buffer[: tensors.size]
            record["tensors"] = f"{entry}.safetensors"
        elif tensors:
            files[f"{entry}.safetensors"] = b"".join(tensorfile.chunks(tensors))
            record["tensors"] = f"{entry}.safetensors"
        entries[entry] = record
    files[folder.STATE] = json.dumps({"entries": entries}, separators=(",", ":"), allow_nan=False).encode()
    return files, folder.STATE


def parse_manifest(data: bytes | bytearray | None, prefix: Url, step: int | None) -> dict[str, Any]:
    """``manifest.read`` of a manifest's bytes (the same checks, messages naming the URL)."""
    if data is None:
        raise CheckpointError(f"{prefix.child(manifest.MANIFEST)}: missing, so {prefix} is not a committed checkpoint "
                              "(an interrupted save, or a deleted manifest)")
    with tempfile.TemporaryDirectory(prefix="etappe-manifest-") as tmp:
        here = Path(tmp, prefix.name or "checkpoint")
        here.mkdir()
        (here / manifest.MANIFEST).write_bytes(data)
        try:
            return manifest.read(here, step=step)
        except CheckpointError as e:
            raise type(e)(str(e).replace(str(here), str(prefix))) from None


def read_checkpoint(client: Client, prefix: Url, step: int | None, files: Mapping[str, dict] | None = None, *,
                    decode: bool = True) -> Any:
    """Download checkpoint ``prefix`` and verify every object against its manifest; return its entries as
    ``folder.read`` does (or, ``decode=False``, (manifest bytes, {file: verified bytes}))."""
    if files is None:
        files = {k: v for k, v in client.list(prefix).items()}
    raw = client.get(prefix.child(manifest.MANIFEST)) if manifest.MANIFEST in files else None
    body = parse_manifest(raw, prefix, step)
    for name, entry in body["files"].items():
        where = prefix.child(name)
        if name not in files:
            raise CheckpointError(f"{where}: missing (the manifest lists it with {entry['size']} bytes)")
        if files[name]["size"] != entry["size"]:
            hint = "truncated" if files[name]["size"] < entry["size"] else "has extra bytes"
            raise CheckpointError(f"{where}: {files[name]['size']} bytes, the manifest says {entry['size']} ({hint}); "
                                  "the object is corrupt")
    blobs = client.get_many({prefix.child(n): e["size"] for n, e in body["files"].items()})
    verified = {}
    for name, entry in body["files"].items():
        blob = blobs[prefix.child(name)]
        if blob is None:
            raise CheckpointError(f"{prefix.child(name)}: missing (deleted while it was read)")
        found = manifest.checksum(blob)
        if found != entry["checksum"]:
            raise CheckpointError(f"{prefix.child(name)}: checksum mismatch (manifest {manifest.CHECKSUM} "
                                  f"{entry['checksum']}, object {found}); the object is corrupt")
        verified[name] = blob
    entries = folder.state_entries(Where(prefix.child(body["state"])), verified[body["state"]], body["files"])
    for name, e in entries.items():
        if "shards" in e:
            raise CheckpointError(f"{prefix}: entry {name!r} is sharded (FSDP), which etappe reads from local folders "
                                  "only: etappe.checkpoint.objectstore.fetch() it, then load the local copy")
    tensors = {name: tensorfile.parse(verified[e["tensors"]], Where(prefix.child(e["tensors"]))) if "tensors" in e
               else {} for name, e in entries.items()}
    if not decode:
        return raw, verified
    out = {}
    for name, e in entries.items():
        try:
            out[name] = codec.decode(e["data"], tensors[name])
        except CheckpointError as err:
            raise CheckpointError(f"{prefix.child(body['state'])}: entry {name!r}: {err}") from None
    return out


def _resolve(client: Client, url: Url) -> tuple[Url, int | None, dict]:
    """The checkpoint ``url`` names: itself (it holds a manifest), or the newest that verifies under it as a store
    root or under its ``checkpoints/`` as a run folder."""
    listing = client.list(url)
    if manifest.MANIFEST in listing:
        attempt = _attempt_of(url.name)
        return url, attempt[0] if attempt else None, listing
    for root in (url, url.child("checkpoints")):
        store = ObjectCheckpointStore(str(root))
        store._client = client
        latest = store.latest()
        if latest is not None:
            found = Url.of(latest)
            return found, _attempt_of(found.name)[0], client.list(found)
    raise CheckpointError(f"{url}: no committed checkpoint there (a checkpoint's prefix holds manifest.json; a store "
                          "or a run folder holds step-N.<attempt>/ prefixes, in checkpoints/ for a run)")


def fetch(url: str, dest: str | os.PathLike) -> Path:
    """Download the committed, verified checkpoint ``url`` names (a checkpoint, or a store or run folder: then its
    newest that verifies) into local folder ``dest`` (missing or empty), as a normal checkpoint folder."""
    dest = Path(dest)
    client = Client()
    prefix, step, files = _resolve(client, Url.of(url))
    manifest_bytes, blobs = read_checkpoint(client, prefix, step, files, decode=False)
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise CheckpointError(f"cannot fetch {prefix} into {dest}: it exists and is not an empty folder; pick another")

    def write_files(tmp: Path) -> tuple[str, bytes]:
        for name, blob in blobs.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            fsio.write_file(tmp / name, [blob])
        return manifest.MANIFEST, bytes(manifest_bytes)

    if dest.is_dir():
        dest.rmdir()
    fsio.commit_folder(dest, write_files)
    return dest


def verify_url(url: str) -> list[tuple[str, str | None]]:
    """Verify a checkpoint, or every checkpoint under a prefix (a store, a run, many runs): (URL, problem or None)
    for each attempt prefix, by URL. One without a manifest is reported (an interrupted save or a deleted manifest).
    CheckpointError if there is nothing to check."""
    client = Client()
    base = Url.of(url)
    listing = client.list(base)
    if manifest.MANIFEST in listing or (listing and _attempt_of(base.name) is not None):
        groups = {base: listing}
    else:
        groups: dict[Url, dict] = {}
        for key, info in listing.items():
            parts = key.split("/")
            for i, part in enumerate(parts[:-1]):
                if _attempt_of(part) is not None:
                    prefix = Url(base.bucket, "/".join(filter(None, [base.key, *parts[: i + 1]])))
                    groups.setdefault(prefix, {})["/".join(parts[i + 1:])] = info
                    break
    if not groups:
        raise CheckpointError(f"{base}: no checkpoints under it (prefixes step-N.<attempt>/ holding manifest.json)")
    results = []
    for prefix, files in sorted(groups.items(), key=lambda kv: str(kv[0])):
        attempt = _attempt_of(prefix.name)
        try:
            read_checkpoint(client, prefix, attempt[0] if attempt else None, files)
            results.append((str(prefix), None))
        except CheckpointError as e:
            results.append((str(prefix), str(e)))
    return results


def write_object(url: str, data: bytes) -> None:
    """Write one object in one PUT (a reader sees the old object or the new one): a run's logs and config."""
    Client().put(Url.of(url), bytes(data))


def read_object(url: str) -> bytes | None:
    """One object's bytes; None if it does not exist."""
    return Client().get(Url.of(url))


def open_store(root: str | os.PathLike, **kwargs: Any) -> CheckpointStore | ObjectCheckpointStore:
    """The store at ``root``: an ObjectCheckpointStore for a URL (UsageError for one etappe cannot honour), else a
    local CheckpointStore."""
    if is_url(root):
        check_url(root)
        return ObjectCheckpointStore(root, **kwargs)
    return CheckpointStore(root, **kwargs)
