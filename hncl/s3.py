"""The S3 filesystem hncl uses: s3fs, with a deadline on retrying transient failures.

A module of its own (imported only when an s3:// URL is used) so that the class pickles by
reference: Ray Train's controller receives the filesystem of an S3 run directory pickled.
"""

from __future__ import annotations

import asyncio
import logging
import time

import s3fs
from botocore.handlers import add_expect_header

from hncl.storage import is_transient, setting

log = logging.getLogger(__name__)


class ResilientS3FileSystem(s3fs.S3FileSystem):
    """s3fs whose every S3 call retries transient failures (hncl.storage.is_transient) with
    backoff until HNCL_S3_DEADLINE, each attempt bounded by what is left of it."""

    retries = 2  # s3fs's own quick retries inside each attempt (cut bodies, a dropped connection)

    async def set_session(self, refresh=False, kwargs={}):
        client = await super().set_session(refresh, kwargs)
        # botocore asks for "Expect: 100-continue" on uploads, and aiohttp waits for that answer
        # with no timeout (its read timeout starts once the body is sent): an endpoint that stops
        # answering would hold the upload for the whole deadline instead of failing within
        # HNCL_S3_READ_TIMEOUT and being retried. Without it the body goes out at once.
        client.meta.events.unregister("before-call.s3", add_expect_header)
        return client

    async def _call_s3(self, method, *akwarglist, **kwargs):
        budget = setting("HNCL_S3_DEADLINE")
        deadline = time.monotonic() + budget
        delay, last = 0.5, None
        while True:
            try:
                return await asyncio.wait_for(super()._call_s3(method, *akwarglist, **kwargs),
                                              timeout=max(deadline - time.monotonic(), 0.1))
            except asyncio.TimeoutError:  # the deadline cut the attempt short: say why it was retried
                raise (last or TimeoutError(f"no answer from the S3 endpoint within {budget:.0f} s")) from None
            except Exception as e:
                if not is_transient(e) or time.monotonic() + delay >= deadline:
                    raise
                if last is None:
                    log.info("S3 %s failed (%s); retrying for up to %.0f s", method,
                                str(e).splitlines()[0][:200] or type(e).__name__, deadline - time.monotonic())
                last = e
                await asyncio.sleep(delay)
                delay = min(2 * delay, 8.0)
