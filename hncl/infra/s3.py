"""The S3 filesystem hncl uses: s3fs, with a deadline on retrying transient failures.

A module of its own (imported only when an s3:// URL is used) so that the class pickles by
reference: Ray Train's controller receives the filesystem of an S3 run directory pickled.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any, Awaitable, Callable

import fsspec.asyn

import s3fs
from botocore.handlers import add_expect_header

from hncl.infra.storage import is_transient, setting

log = logging.getLogger(__name__)


class ResilientS3FileSystem(s3fs.S3FileSystem):
    """s3fs whose every S3 call, and every read of a body after its call, retries transient
    failures (hncl.infra.storage.is_transient) with backoff until HNCL_S3_DEADLINE, each attempt
    bounded by what is left of it."""

    retries = 2  # s3fs's own quick retries inside each attempt (cut bodies, a dropped connection)

    def __init__(self, *args, credential_env=(), **kwargs):
        # credential_env: only part of fsspec's instance-cache key (hncl.infra.storage.s3_filesystem)
        super().__init__(*args, **kwargs)

    async def set_session(self, refresh=False, kwargs={}):
        client = await super().set_session(refresh, kwargs)
        # botocore asks for "Expect: 100-continue" on uploads, and aiohttp waits for that answer
        # with no timeout (its read timeout starts once the body is sent): an endpoint that stops
        # answering would hold the upload for the whole deadline instead of failing within
        # HNCL_S3_READ_TIMEOUT and being retried. Without it the body goes out at once.
        client.meta.events.unregister("before-call.s3", add_expect_header)
        return client

    async def _retrying(self, what: str, attempt: Callable[[], Awaitable[Any]]) -> Any:
        """attempt(), again after each transient failure, with backoff, until HNCL_S3_DEADLINE."""
        budget = setting("HNCL_S3_DEADLINE")
        deadline = time.monotonic() + budget
        delay, last = 0.5, None
        while True:
            try:
                # asyncio.timeout, not wait_for: expired() tells the deadline apart from a request's
                # own read timeout (aiobotocore's body-read timeout is a TimeoutError too: transient)
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.1)) as limit:
                    return await attempt()
            except Exception as e:
                if limit.expired():  # the deadline cut the attempt short: say why it was retried
                    raise (last or TimeoutError(f"no answer from the S3 endpoint within {budget:.0f} s")) from None
                if not is_transient(e) or time.monotonic() + delay >= deadline:
                    raise
                if last is None:
                    log.info("S3 %s failed (%s); retrying for up to %.0f s", what,
                             str(e).splitlines()[0][:200] or type(e).__name__, deadline - time.monotonic())
                last = e
                await asyncio.sleep(delay)
                delay = min(2 * delay, 8.0)

    async def _call_s3(self, method, *akwarglist, **kwargs):
        call = super()._call_s3

        async def attempt():
            try:
                return await call(method, *akwarglist, **kwargs)
            except Exception as e:
                # NoSuchUpload (s3fs makes it a FileNotFoundError): done before, or really gone
                if method == "complete_multipart_upload" and isinstance(e, FileNotFoundError):
                    done = await self._completed_before(kwargs)
                    if done is not None:
                        return done
                raise

        return await self._retrying(method, attempt)

    # Reads whose body comes after the call: the request is retried in _call_s3, the body here
    # (a stall or a cut after the headers), each under the deadline as a whole.
    async def _cat_file(self, path, *args, **kwargs):
        cat = super()._cat_file
        return await self._retrying("get_object (body)", lambda: cat(path, *args, **kwargs))

    async def _get_file(self, rpath, lpath, *args, **kwargs):
        get = super()._get_file
        return await self._retrying("get_object (download)", lambda: get(rpath, lpath, *args, **kwargs))

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if mode == "rb":  # s3fs makes its S3File by name: a subclass gives its ranged reads the deadline
            f.__class__ = _ResilientS3File
            f.cache.fetcher = f._fetch_range  # the read cache holds the fetch it was made with
        return f

    async def _completed_before(self, kwargs) -> dict | None:
        """A completion retried after its answer was lost finds the upload gone (NoSuchUpload):
        it succeeded if the object now there is exactly this upload, i.e. its ETag is the MD5 of
        the parts' MD5s with the part count. The completion's answer, or None if it is not."""
        parts = kwargs["MultipartUpload"]["Parts"]
        digest = hashlib.md5(b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in parts)).hexdigest()
        expected = f'"{digest}-{len(parts)}"'
        try:
            head = await super()._call_s3("head_object", Bucket=kwargs["Bucket"], Key=kwargs["Key"])
        except Exception:
            return None
        if head.get("ETag") != expected:
            return None
        log.info("S3 complete_multipart_upload of s3://%s/%s: its answer was lost, the object is in place",
                 kwargs["Bucket"], kwargs["Key"])
        return {"Bucket": kwargs["Bucket"], "Key": kwargs["Key"], "ETag": expected}


class _ResilientS3File(s3fs.core.S3File):
    def _fetch_range(self, start, end):
        if start == end:
            return b""

        def attempt():  # s3fs's own fetch of the range: the request and the body
            return s3fs.core._inner_fetch(self.fs, self.bucket, self.key, self.version_id, start, end,
                                          self.read_kw, self.details)

        return fsspec.asyn.sync(self.fs.loop, self.fs._retrying, "get_object (range)", attempt)
