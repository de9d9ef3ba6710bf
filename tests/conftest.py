"""Shared test infrastructure: real components only.

- ``s3``: a real S3 endpoint (moto's threaded server on 127.0.0.1, free port) and an s3fs
  filesystem talking to it.
- ``run_distributed(fn, world_size, *args)``: runs ``fn(*args)`` in W real processes joined in a
  gloo process group (torch.multiprocessing spawn, free port) and returns their results in rank
  order. ``fn`` must be importable (a module-level function in a test module).
- ``ray_local``: one real local Ray cluster (``ray start --head`` + ``ray.init(address=...)``)
  for the whole session, stopped at the end.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List

import pytest

from hncl.dist import free_port, spawn_gloo


# --- multi-process gloo ---------------------------------------------------------------------
def run_distributed(fn: Callable, world_size: int, *args: Any) -> List[Any]:
    """Run fn(*args) on `world_size` gloo ranks (one thread each); a failure on any rank raises
    here with its traceback."""
    return spawn_gloo(fn, world_size, *args)


@pytest.fixture(name="run_distributed")
def run_distributed_fixture():
    return run_distributed


# --- S3 ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3")}
    # Libraries that read the standard variables (pyarrow, boto3, Ray's storage) hit moto too.
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_ENDPOINT_URL_S3=url)
    yield url
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3(s3_endpoint):
    """An s3fs filesystem on the moto endpoint with a fresh bucket; yields (fs, bucket)."""
    import uuid

    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_endpoint,
                           use_listings_cache=False)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield fs, bucket
    fs.rm(bucket, recursive=True)


# --- Ray ---------------------------------------------------------------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster: `ray start --head` on 127.0.0.1 (2 CPUs, dashboard for job
    submission), this process connected with ray.init(address=...); `ray stop` at the end.
    Yields (ray module, dashboard URL, gcs address)."""
    import subprocess
    import sys

    import ray

    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1",
               PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),  # `python` in jobs = this venv
               PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests"), REPO]))  # workers import test modules
    os.environ["RAY_AUTH_MODE"] = "disabled"
    port, dash = free_port(), free_port()
    subprocess.run([os.path.join(bin_dir, "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                    f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
                    "--include-dashboard=true", "--disable-usage-stats"], check=True, env=env,
                   capture_output=True, timeout=120)
    try:
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        yield ray, f"http://127.0.0.1:{dash}", f"127.0.0.1:{port}"
    finally:
        ray.shutdown()
        subprocess.run([os.path.join(bin_dir, "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
