"""Object-store URLs and the few requests etappe makes of a store: list, put (create-only for a commit), ranged get,
delete. Through s3fs's async client (``pip install 'etappe[s3]'``), imported only when a URL is first used.

Credentials and endpoint come from the standard environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``AWS_REGION``), as boto reads them. Large objects go up as multipart uploads and come down as
ranged GETs, many at a time.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from etappe.checkpoint.errors import CheckpointError
from etappe.errors import UsageError

SCHEMES = ("s3",)
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+)://(?P<rest>.*)", re.S)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP = re.compile(r"[0-9]+(\.[0-9]+){3}")
MAX_KEY = 900  # S3 allows 1024 bytes per key; a run's longest names (step-N.attempt/entry.safetensors) need ~100
PART = 16 << 20  # bytes per multipart part
RANGE = 32 << 20  # bytes per ranged GET (fewer, larger requests measured faster against one server)
CONCURRENCY = 16  # requests in flight at once, across all objects of one checkpoint


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL (``scheme://...``, a scheme of two or more letters), not a local path."""
    return isinstance(path, str) and _URL.match(path) is not None


def _spaced(url: str) -> bool:
    """White space at the start, or at the end before any trailing slashes (which a store's root drops)."""
    return url != url.lstrip() or url.rstrip("/") != url.rstrip("/").rstrip()


def check_url(url: str) -> None:
    """UsageError, in one line, for a URL etappe cannot honour (only ``s3://BUCKET/PREFIX`` is)."""
    m = _URL.match(url) if isinstance(url, str) else None
    if m is None:
        raise UsageError(f"expected a URL like s3://BUCKET/PREFIX, got {url!r}")
    shown = url if len(url) <= 120 else url[:117] + "..."
    if m["scheme"].lower() not in SCHEMES:
        raise UsageError(
            f"{shown!r}: etappe saves runs and checkpoints to local paths and to {', '.join(s + '://' for s in SCHEMES)}"
            f" URLs only ({m['scheme']}:// is not one: its commits lack the create-only writes etappe relies on); use "
            "s3://BUCKET/PREFIX or a local path"
        )
    if m["scheme"] != m["scheme"].lower():
        raise UsageError(f"{shown!r}: write the scheme in lower case, {m['scheme'].lower()}://")
    if _spaced(url):  # pasted, or read from a file, with a space
        raise UsageError(f"{shown!r} has white space around a URL; write {url.strip()!r}")
    bucket, _, key = m["rest"].partition("/")
    if not bucket:
        raise UsageError(f"{shown!r}: no bucket; expected s3://BUCKET/PREFIX")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or _IP.fullmatch(bucket):
        raise UsageError(f"{shown!r}: {bucket[:70]!r} is not an S3 bucket name (3-63 lower-case letters, digits, "
                         "'.' and '-', starting and ending with a letter or digit)")
    key = key[:-1] if key.endswith("/") else key
    if any(ord(c) < 32 or ord(c) == 127 for c in key) or "?" in key or "#" in key:
        raise UsageError(f"{shown!r}: the prefix holds a control character, '?' or '#'; use plain names")
    if len(key.encode()) > MAX_KEY:
        raise UsageError(f"{shown!r}: the prefix has {len(key.encode())} bytes, more than {MAX_KEY}; use a shorter one")
    for part in key.split("/") if key else []:
        if part in ("", ".", ".."):
            raise UsageError(f"{shown!r}: the prefix has an empty, '.' or '..' part; write it without them")


@dataclass(frozen=True)
class Url:
    """A checked ``s3://bucket/key`` (no trailing slash)."""

    bucket: str
    key: str

    @staticmethod
    def of(url: str) -> Url:
        check_url(url)
        bucket, _, key = _URL.match(url)["rest"].partition("/")
        return Url(bucket, key.rstrip("/"))

    def child(self, name: str) -> Url:
        return Url(self.bucket, f"{self.key}/{name}" if self.key else name)

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2]

    @property
    def parent(self) -> Url:
        return Url(self.bucket, self.key.rpartition("/")[0])

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"


class Conflict(Exception):
    """A conditional request the store refused with 412 (someone else wrote the object first)."""


def _filesystem():
    try:
        import s3fs
    except ImportError:
        raise UsageError("s3:// URLs need s3fs and fsspec: pip install 'etappe[s3]'") from None
    kwargs: dict[str, Any] = {"use_listings_cache": False}
    if os.environ.get("AWS_ENDPOINT_URL"):
        kwargs["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    return s3fs.S3FileSystem(**kwargs)


_FS: dict[tuple, Any] = {}


class Client:
    """The requests etappe makes of one S3 endpoint; blocking calls, run on s3fs's event loop."""

    def __init__(self) -> None:
        key = (os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ACCESS_KEY_ID"), os.getpid())
        if key not in _FS:
            _FS[key] = _filesystem()
        self.fs = _FS[key]

    def _run(self, coro_fn, *args, **kwargs):
        from fsspec.asyn import sync

        try:
            return sync(self.fs.loop, coro_fn, *args, **kwargs)
        except (Conflict, CheckpointError, UsageError):
            raise
        except Exception as e:  # noqa: BLE001 -- botocore and network errors, said in one line
            raise CheckpointError(f"object store request failed: {_said(e)}") from e

    async def _s3(self, bucket: str):
        await self.fs.set_session()
        return await self.fs.get_s3(bucket)

    def list(self, url: Url) -> dict[str, dict]:
        """Every object under ``url/`` by key relative to it: {relative key: {"size", "mtime", "etag"}}."""
        return self._run(self._list, url)

    async def _list(self, url: Url) -> dict[str, dict]:
        s3 = await self._s3(url.bucket)
        prefix = f"{url.key}/" if url.key else ""
        out = {}
        async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=url.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(prefix):]] = {"size": obj["Size"], "mtime": obj["LastModified"].timestamp(),
                                                 "etag": obj.get("ETag")}
        return out

    def put(self, url: Url, data: bytes, *, create_only: bool = False, if_match: str | None = None) -> str:
        """One PUT of ``data``; returns the new ETag. ``create_only``: ``If-None-Match: *``; ``if_match``: replace
        only that version. Raises Conflict on 412."""
        return self._run(self._put, url, data, create_only, if_match)

    async def _put(self, url: Url, data: bytes, create_only: bool = False, if_match: str | None = None) -> str:
        from botocore.exceptions import ClientError

        s3 = await self._s3(url.bucket)
        extra = {"IfNoneMatch": "*"} if create_only else {}
        if if_match is not None:
            extra["IfMatch"] = if_match
        try:
            if len(data) <= 2 * PART:
                return (await s3.put_object(Bucket=url.bucket, Key=url.key, Body=data, **extra))["ETag"]
            return await self._multipart(s3, url, data, extra)
        except ClientError as e:
            if _status(e) == 412:
                raise Conflict(str(url)) from None
            raise

    async def _multipart(self, s3, url: Url, data: bytes, extra: dict) -> str:
        upload = (await s3.create_multipart_upload(Bucket=url.bucket, Key=url.key))["UploadId"]
        view = memoryview(data)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def part(number: int, at: int) -> dict:
            async with gate:
                out = await s3.upload_part(Bucket=url.bucket, Key=url.key, UploadId=upload, PartNumber=number,
                                           Body=bytes(view[at : at + PART]))
            return {"PartNumber": number, "ETag": out["ETag"]}

        try:
            parts = await asyncio.gather(*(part(i + 1, at) for i, at in enumerate(range(0, len(data), PART))))
            done = await s3.complete_multipart_upload(Bucket=url.bucket, Key=url.key, UploadId=upload,
                                                      MultipartUpload={"Parts": list(parts)}, **extra)
            return done["ETag"]
        except BaseException:
            await s3.abort_multipart_upload(Bucket=url.bucket, Key=url.key, UploadId=upload)
            raise

    def put_many(self, objects: Mapping[Url, bytes]) -> None:
        """PUT every object, many at once (each large one in parts)."""
        async def all_of():
            await asyncio.gather(*(self._put(url, data) for url, data in objects.items()))
        self._run(all_of)

    def get(self, url: Url) -> bytes | None:
        """The bytes of one object (one GET); None if it does not exist."""
        return self._run(self._get_small, url)

    async def _get_small(self, url: Url) -> bytes | None:
        from botocore.exceptions import ClientError

        s3 = await self._s3(url.bucket)
        try:
            resp = await s3.get_object(Bucket=url.bucket, Key=url.key)
        except ClientError as e:
            if _status(e) == 404:
                return None
            raise
        async with resp["Body"] as body:
            return await body.read()

    def get_many(self, sizes: Mapping[Url, int]) -> dict[Url, bytearray | None]:
        """Each object's first ``size`` bytes (its whole size, as listed) in a writable buffer, fetched in ranges
        many at a time; None for one that is gone."""
        return self._run(self._get_many, sizes)

    async def _get_many(self, sizes: Mapping[Url, int]) -> dict[Url, bytearray | None]:
        from botocore.exceptions import ClientError

        gate = asyncio.Semaphore(CONCURRENCY)
        out: dict[Url, bytearray | None] = {url: bytearray(size) for url, size in sizes.items()}

        async def piece(url: Url, at: int, end: int) -> None:
            s3 = await self._s3(url.bucket)
            async with gate:
                try:
                    resp = await s3.get_object(Bucket=url.bucket, Key=url.key, Range=f"bytes={at}-{end - 1}")
                except ClientError as e:
                    if _status(e) in (404, 416):
                        out[url] = None
                        return
                    raise
                async with resp["Body"] as body:
                    data = await body.read()
            buf = out[url]
            if buf is not None:
                buf[at : at + len(data)] = data[: end - at]

        jobs = [piece(url, at, min(at + RANGE, size)) for url, size in sizes.items() for at in range(0, size, RANGE)]
        await asyncio.gather(*jobs)
        return out

    def delete(self, urls: list[Url]) -> None:
        """Delete these objects (all in one bucket), in the order given: one request per 1000."""
        for at in range(0, len(urls), 1000):
            batch = urls[at : at + 1000]
            self._run(self._delete, batch)

    async def _delete(self, urls: list[Url]) -> None:
        s3 = await self._s3(urls[0].bucket)
        if len(urls) == 1:
            await s3.delete_object(Bucket=urls[0].bucket, Key=urls[0].key)
            return
        await s3.delete_objects(Bucket=urls[0].bucket, Delete={"Objects": [{"Key": u.key} for u in urls],
                                                                "Quiet": True})

    def delete_if(self, url: Url, etag: str) -> bool:
        """Delete ``url`` only while it is version ``etag``; False if it is another (412) or gone."""
        async def go() -> bool:
            from botocore.exceptions import ClientError

            s3 = await self._s3(url.bucket)
            try:
                await s3.delete_object(Bucket=url.bucket, Key=url.key, IfMatch=etag)
            except ClientError as e:
                if _status(e) in (412, 404):
                    return False
                raise
            return True
        return self._run(go)

    def head(self, url: Url) -> tuple[dict | None, float]:
        """({"etag", "mtime", "size"} or None if absent, the server's clock now) of one object."""
        async def go():
            from botocore.exceptions import ClientError
            from email.utils import parsedate_to_datetime

            s3 = await self._s3(url.bucket)
            try:
                resp = await s3.head_object(Bucket=url.bucket, Key=url.key)
            except ClientError as e:
                if _status(e) != 404:
                    raise
                date = e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
                return None, parsedate_to_datetime(date).timestamp() if date else _now()
            date = resp["ResponseMetadata"]["HTTPHeaders"].get("date")
            now = parsedate_to_datetime(date).timestamp() if date else _now()
            return {"etag": resp["ETag"], "mtime": resp["LastModified"].timestamp(), "size": resp["ContentLength"]}, now
        return self._run(go)


def _now() -> float:
    import time
    return time.time()


def _status(e: Exception) -> int | None:
    return getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")


def _said(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
