"""Local paths and s3:// URLs behind one small interface (fsspec; s3fs for S3).

S3 credentials are found as botocore finds them (its standard chain: AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE and the shared config files, web identity,
SSO, container and instance roles); AWS_ENDPOINT_URL_S3 names a non-AWS endpoint (MinIO, moto).
Writes are atomic: a file appears under its final name only when complete (local: write a
temporary name, then rename; S3: one PUT, or a multipart upload whose completion is checked
against the object when its answer was lost: hncl.infra.s3).

S3 under faults: every call has a connect and a read timeout, and transient failures (refused
or reset connections, timeouts, cut bodies, 5xx, throttling) are retried with backoff until a
deadline; what is not transient (a missing bucket or object, bad credentials) fails at once.
Either way the error is one line naming what failed (connect, auth, missing bucket/object), on
which URL, and what to do. Settings, from the environment (so that make-shards, training
workers and Ray's own checkpoint uploads share them):
    HNCL_S3_CONNECT_TIMEOUT   seconds to establish a connection (default 10)
    HNCL_S3_READ_TIMEOUT      seconds a response may stall (default 60; s3fs tries a request twice
                              before hncl's own retry, so an attempt stalls at most twice this)
    HNCL_S3_DEADLINE          seconds transient failures are retried, per call (default 120)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import socket
import uuid
from typing import Any, Iterator, List, Optional, Tuple

import fsspec

from hncl.errors import InputError, UserError
from hncl.infra import tempfiles

TMP_MARK = ".tmp-"
SETTINGS = {"HNCL_S3_CONNECT_TIMEOUT": 10.0, "HNCL_S3_READ_TIMEOUT": 60.0, "HNCL_S3_DEADLINE": 120.0}


def setting(name: str) -> float:
    return float(os.environ.get(name, SETTINGS[name]))


class StorageError(UserError):
    """An S3 call that failed for good: what, where, and what to do, in one line."""


class Unreachable(StorageError, ConnectionError):
    pass


class AccessDenied(StorageError, PermissionError):
    pass


class MissingCredentials(AccessDenied):
    pass


class MissingBucket(StorageError, InputError):
    pass


class MissingObject(StorageError, InputError):
    pass


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _client_code(exc: BaseException) -> Optional[str]:
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            err = response.get("Error") or {}
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return str(err.get("Code") or status or "")
    return None


_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestLimitExceeded", "500", "502", "503", "504"}
_TRANSIENT_ERRNO = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE, errno.EHOSTUNREACH,
                    errno.ENETUNREACH, errno.ECONNABORTED}


def is_transient(exc: BaseException) -> bool:
    """A failure worth retrying: the endpoint unreachable or slow, a connection or body cut,
    throttling or a 5xx."""
    import botocore.exceptions as bce

    names = {"ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError", "ClientOSError",
             "IncompleteRead", "FSTimeoutError", "ServerTimeoutError"}
    for e in _chain(exc):
        if isinstance(e, (FileNotFoundError, PermissionError)):
            return False
        if isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError, socket.timeout,
                          bce.HTTPClientError, bce.ConnectionError)) or type(e).__name__ in names:
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
            return True
    return _client_code(exc) in _TRANSIENT_CODES


def _bucket_of(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0]


def explain(exc: BaseException, url: str, doing: str) -> Optional[StorageError]:
    """The one-line StorageError for a failed S3 call on `url`, or None if `exc` is not one."""
    if not url.startswith("s3://") or isinstance(exc, StorageError):
        return None
    code = _client_code(exc) or ""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or "AWS S3"
    missing = _missing_credentials(exc)
    if missing:
        return MissingCredentials(f"cannot sign requests to {url}: {missing}")
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "403",
                "InvalidToken", "AuthorizationHeaderMalformed") or isinstance(exc, PermissionError):
        return AccessDenied(f"access denied to {url} ({code or exc}) by {endpoint}: check the credentials "
                            f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE) and the bucket's policy")
    if code == "NoSuchBucket" or (isinstance(exc, FileNotFoundError) and not bucket_exists(url)):
        return MissingBucket(f"S3 bucket '{_bucket_of(url)}' does not exist at {endpoint} ({url}): create it, "
                             f"or fix the URL or AWS_ENDPOINT_URL_S3")
    if isinstance(exc, FileNotFoundError) or code in ("NoSuchKey", "404"):
        return MissingObject(f"no such S3 object: {url}")
    if is_transient(exc):
        cause = next((str(e) for e in _chain(exc) if str(e)), type(exc).__name__).splitlines()[0][:200]
        return Unreachable(f"cannot reach the S3 endpoint {endpoint} while {doing} {url} ({cause}); retried for "
                           f"{setting('HNCL_S3_DEADLINE'):.0f} s (HNCL_S3_DEADLINE): check the endpoint "
                           f"(AWS_ENDPOINT_URL_S3) and the network, then rerun: finished work is kept")
    return None


def _missing_credentials(exc: BaseException) -> Optional[str]:
    """What is missing when botocore found no usable credentials, or None."""
    import botocore.exceptions as bce

    for e in _chain(exc):
        if isinstance(e, bce.ProfileNotFound):
            return (f"the AWS profile '{e.kwargs.get('profile')}' (AWS_PROFILE) is not in this host's AWS config files "
                    f"(AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE, default ~/.aws/)")
        if isinstance(e, (bce.NoCredentialsError, bce.PartialCredentialsError)):
            return (f"no AWS credentials found ({e}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
                    f"AWS_SESSION_TOKEN for temporary ones), or AWS_PROFILE, or run where a role provides them")
    return None


def bucket_exists(url: str) -> bool:
    """Whether the bucket of an s3:// URL exists (True when that cannot be told)."""
    try:
        fs, _ = filesystem(url)
        return bool(fs.exists(_bucket_of(url)))
    except Exception:  # cannot tell: say "object", not "bucket"
        return True


@contextlib.contextmanager
def s3_errors(url: str, doing: str):
    """Turn a failed S3 call into its one-line StorageError (anything else passes through)."""
    try:
        yield
    except Exception as e:
        err = explain(e, url, doing)
        if err is None:
            raise
        raise err from e


# What decides which credentials botocore finds (and where): a change gives a new filesystem
# instance, not fsspec's cached one made with the old ones.
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
                  "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ROLE_ARN", "AWS_ROLE_SESSION_NAME",
                  "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                  "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
                  "AWS_EC2_METADATA_DISABLED", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CA_BUNDLE")


def s3_filesystem(**credentials: Any):
    """The S3 filesystem with this process's credentials, endpoint, timeouts and retries.
    Credentials: botocore's standard chain, resolved (and refreshed) by aiobotocore in this
    process, unless given (key, secret, token, profile)."""
    from hncl.infra.s3 import ResilientS3FileSystem

    options = {k: v for k, v in credentials.items() if v}
    if os.environ.get("AWS_ENDPOINT_URL_S3"):
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL_S3"]
    config = {"connect_timeout": setting("HNCL_S3_CONNECT_TIMEOUT"), "read_timeout": setting("HNCL_S3_READ_TIMEOUT"),
              "retries": {"total_max_attempts": 1}}  # one try per request: hncl retries, with a deadline, in _call_s3
    return ResilientS3FileSystem(use_listings_cache=False, config_kwargs=config,
                                 credential_env=tuple((k, os.environ.get(k)) for k in CREDENTIAL_ENV), **options)


def portable_s3_filesystem(url: str):
    """An S3 filesystem for another process that may lack this one's environment (Ray's
    controller unpickles it): credentials this process has from its environment or the credential
    files travel with the instance (session token included); refreshable ones (assumed roles, web
    identity, SSO, instance and container roles) are resolved anew there, from the same profile."""
    import botocore.session

    with s3_errors(url, "finding credentials for"):
        creds = botocore.session.Session().get_credentials()
        if creds is None:
            import botocore.exceptions

            raise botocore.exceptions.NoCredentialsError()
        if creds.method in ("env", "shared-credentials-file", "config-file"):
            frozen = creds.get_frozen_credentials()
            return s3_filesystem(key=frozen.access_key, secret=frozen.secret_key, token=frozen.token)
        return s3_filesystem(profile=os.environ.get("AWS_PROFILE"))


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def filesystem(url: str) -> Tuple[fsspec.AbstractFileSystem, str]:
    if url.startswith("s3://"):
        return s3_filesystem(), url[len("s3://"):]
    return fsspec.core.url_to_fs(url)


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    with s3_errors(url, "checking"):
        return fs.exists(path)


def makedirs(url: str) -> None:
    if not is_remote(url):
        os.makedirs(url, exist_ok=True)


def listdir(url: str) -> List[str]:
    """Names (not paths) in a folder; empty if it does not exist."""
    fs, path = filesystem(url)
    with s3_errors(url, "listing"):
        if not fs.exists(path):
            return []
        return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    with s3_errors(url, "removing"):
        if fs.exists(path):
            fs.rm(path, recursive=recursive)


def size(url: str) -> int:
    fs, path = filesystem(url)
    with s3_errors(url, "reading"):
        return int(fs.size(path))


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with s3_errors(url, "reading"):
        with fs.open(path, "rb") as f:
            return f.read()


def open_stream(url: str):
    """A binary file object for streaming reads (shards); S3 reads are ranged and retried."""
    fs, path = filesystem(url)
    with s3_errors(url, "opening"):
        return fs.open(path, "rb")


def get_dir(url: str, local: str) -> None:
    """Download the folder `url` into the local folder `local`."""
    fs, path = filesystem(url)
    with s3_errors(url, "downloading"):
        fs.get(path.rstrip("/") + "/", local.rstrip("/") + "/", recursive=True)


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def put_file(local_path: str, url: str) -> None:
    """Move a finished local file to `url` atomically. The local file is consumed, also when an
    upload fails for good (nothing is left in the temp folder; the caller can make it again)."""
    if is_remote(url):
        fs, path = filesystem(url)
        try:
            with s3_errors(url, "uploading"):
                fs.put_file(local_path, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(local_path)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
        tmp = f"{url}{TMP_MARK}{uuid.uuid4().hex[:8]}"
        shutil.move(local_path, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a data set is meant to be shared
        os.replace(tmp, url)


def upload_dir(local: str, url: str, keep: bool = False) -> None:
    """Every file under the local folder `local` to the same relative path under `url`, each
    atomically; the local files are consumed unless `keep`."""
    for root, _, files in os.walk(local):
        for name in sorted(files):
            path = os.path.join(root, name)
            target = join(url, os.path.relpath(path, local))
            if keep:
                with open(path, "rb") as f:
                    write_bytes(target, f.read())
            else:
                put_file(path, target)


def write_bytes(url: str, data: bytes) -> None:
    fd, local = tempfiles.mkstemp("upload", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        put_file(local, url)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(local)


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json.dumps(obj, indent=1, sort_keys=True).encode())
