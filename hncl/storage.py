"""Local paths and s3:// URLs behind one small interface (fsspec; s3fs for S3).

S3 endpoints and credentials come from the standard AWS variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3 for a non-AWS endpoint such as MinIO or moto).
Writes are atomic: a file appears under its final name only when complete (local: write a
temporary name, then rename; S3: a single PUT of the finished object).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from typing import Any, List, Tuple

import fsspec

TMP_MARK = ".tmp-"


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def filesystem(url: str) -> Tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url, use_listings_cache=False) if url.startswith("s3://") \
        else fsspec.core.url_to_fs(url)
    return fs, path


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    if not is_remote(url):
        os.makedirs(url, exist_ok=True)


def listdir(url: str) -> List[str]:
    """Names (not paths) in a folder; empty if it does not exist."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def remove(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path)


def size(url: str) -> int:
    fs, path = filesystem(url)
    return int(fs.size(path))


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def put_file(local_path: str, url: str) -> None:
    """Move a finished local file to `url` atomically (the local file is consumed)."""
    if is_remote(url):
        fs, path = filesystem(url)
        fs.put_file(local_path, path)
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
    fd, local = tempfile.mkstemp(prefix="hncl-", suffix=".part")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    put_file(local, url)


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json.dumps(obj, indent=1, sort_keys=True).encode())
