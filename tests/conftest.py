"""Shared test infrastructure: real components only.

- ``s3``: a real S3 endpoint (moto's threaded server on 127.0.0.1, free port) and an s3fs
  filesystem talking to it.
- ``run_distributed(fn, world_size, *args)``: runs ``fn(*args)`` in W real processes joined in a
  gloo process group (torch.multiprocessing spawn, free port) and returns their results in rank
  order. ``fn`` must be importable (a module-level function in a test module).
- ``ray_local``: one real local Ray cluster (``ray start --head`` + ``ray.init(address=...)``)
  for the whole session; at the end exactly its processes are stopped (never `ray stop`,
  which would stop every Ray on the machine).

Every test starts from the same process state and may not leave any behind (``_isolated``):
torch's thread count, default dtype and RNGs, the environment, and no process group.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Any, Callable, List

import numpy as np
import pytest
import torch
import torch.distributed as dist

from hncl.core.dist import free_port, spawn_gloo

_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _isolated():
    """Tests pass in any order: each starts with the same global state, and a test that leaves
    a process group behind fails (the next in-process run would think it is distributed)."""
    env = dict(os.environ)
    torch.set_num_threads(_THREADS)
    torch.set_default_dtype(torch.float32)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
    leaked_group = dist.is_available() and dist.is_initialized()
    if leaked_group:
        dist.destroy_process_group()
    torch.set_num_threads(_THREADS)
    torch.set_default_dtype(torch.float32)
    os.environ.clear()
    os.environ.update(env)
    assert not leaked_group, "the test left a torch.distributed process group initialised"


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
    yield f"http://{host}:{port}"
    server.stop()


def moto_env(endpoint: str) -> dict:
    """The standard AWS variables for the moto endpoint."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINT_URL_S3": endpoint}


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """An s3fs filesystem on the moto endpoint with a fresh bucket; yields (fs, bucket). The
    standard AWS variables point at moto for the test (so libraries that read them, hncl's
    storage, Ray's workers, hit moto too) and are restored after it."""
    import uuid

    import s3fs

    for k, v in moto_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_endpoint,
                           use_listings_cache=False)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield fs, bucket
    fs.rm(bucket, recursive=True)


# --- Ray ---------------------------------------------------------------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stop_ray_cluster(temp_dir: str) -> None:
    """Stop the Ray cluster whose processes run under `temp_dir` (and their children), nothing else."""
    from multinode import kill_processes

    kill_processes(None, temp_dir)


def ray_node_ports() -> List[str]:
    """`ray start` flags giving a node's listening services free ports of their own. Ray's fixed
    defaults (e.g. the dashboard agent's HTTP port 52365, which job submission goes through)
    belong to whichever Ray on the machine started first: a second one's agent cannot bind them
    and job submission fails with "No available agent"."""
    flags = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
             "--ray-client-server-port")
    return [f"{flag}={free_port()}" for flag in flags]


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A real local Ray cluster: `ray start --head` on 127.0.0.1 (2 CPUs, dashboard for job
    submission) with a temp dir of its own, this process connected with ray.init(address=...).
    Yields (ray module, dashboard URL, gcs address)."""
    import subprocess
    import sys
    import tempfile

    import ray

    bin_dir = os.path.dirname(sys.executable)
    # short: Ray's unix sockets live under it (108-byte limit)
    temp_dir = tempfile.mkdtemp(prefix="hncl-ray-", dir="/tmp")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1",
               PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),  # `python` in jobs = this venv
               PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests"), REPO]))  # workers import test modules
    port, dash = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run([os.path.join(bin_dir, "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                        f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
                        "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}",
                        *ray_node_ports()], check=True, env=env, capture_output=True, timeout=120)
        saved = os.environ.get("RAY_AUTH_MODE")
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address=address, log_to_driver=False)
        if saved is None:  # ray.init read it; tests see the environment they started with
            del os.environ["RAY_AUTH_MODE"]
        else:
            os.environ["RAY_AUTH_MODE"] = saved
        yield ray, f"http://127.0.0.1:{dash}", address
    finally:
        ray.shutdown()
        stop_ray_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Tests that start Ray carry the `ray` and `slow` markers (so `-m "not slow"` skips them)."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.slow)
