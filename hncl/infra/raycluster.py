"""Connecting this process to Ray, and what the driver learns about the cluster before a job
starts: which cluster a command joins (decided in one place), its nodes, what every node can
see of the job's storage, and the environment every Ray worker of the job gets."""

from __future__ import annotations

import os
import socket
from typing import Dict, List, Optional

from hncl.core.dist import free_port
from hncl.errors import UserError
from hncl.infra.storage import CREDENTIAL_ENV

# What the driver forwards to every worker and task it starts (Ray starts them with the node's
# environment, not the driver's): what botocore's credential chain reads (keys and session token,
# profile and config files, web identity, region), the endpoint and hncl's S3 timeouts, so every
# node reads and writes the same storage as the driver. A node's own instance or container role
# needs nothing forwarded.
FORWARDED_ENV = tuple(k for k in CREDENTIAL_ENV if not k.startswith("AWS_CONTAINER_")) + (
    "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "HNCL_S3_CONNECT_TIMEOUT", "HNCL_S3_READ_TIMEOUT", "HNCL_S3_DEADLINE")


class ClusterError(UserError, RuntimeError):
    """The cluster cannot run this job as configured (unreachable, a node that cannot see the
    job's storage, resources that never came): one line saying what and what to do."""


def worker_env() -> Dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A GCS address (host:port, or ray://host:port) that refuses connections fails here in one
    line, instead of in ray.init's retries (a minute of reconnect attempts and a traceback)."""
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # 'auto' and the like: Ray resolves them
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}): check --address / "
                           f"$RAY_ADDRESS (the head node's host:port from `ray start --head`) and that the head "
                           f"node is running") from None


def connect_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> str:
    """Connect this driver to Ray, once. The cluster is `address` when given, else $RAY_ADDRESS
    (set by `ray job submit` and by users of a cluster), else a private Ray instance started
    for this process alone (`num_cpus` of this machine) and stopped with it: a cluster someone
    started with `ray start` on this machine is never joined by accident. Returns what was
    connected to, for the log."""
    import ray

    if ray.is_initialized():
        return "the Ray instance this process is already connected to"
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        _check_reachable(address)
        try:
            ray.init(address=address)
        except ConnectionError as e:
            raise ClusterError(f"cannot connect to the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
        return f"the Ray cluster at {address}"
    # the dashboard serves the state API that Ray Train's placement-group cleaner polls: without
    # it the cleaner prints a warning every few seconds (and cannot clean up after a crash)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_port=free_port())
    return f"a private local Ray instance ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"


def alive_nodes() -> List[dict]:
    """The cluster's alive nodes: {"id", "ip", "resources"} (resources without Ray's internal
    node:* and memory entries), sorted by IP."""
    import ray

    nodes = []
    for n in ray.nodes():
        if n.get("Alive"):
            res = {k: v for k, v in n.get("Resources", {}).items()
                   if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
            nodes.append({"id": n["NodeID"], "ip": n["NodeManagerAddress"], "resources": res})
    return sorted(nodes, key=lambda n: n["ip"])


def describe(resources: Dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def _probe(checks: List[dict]) -> List[Optional[str]]:
    """Runs on one node: for each check, None when this node sees what the driver sees, else why
    not (one line). {"kind": "token", "path", "token"}: a local file with this content;
    {"kind": "exists", "url"}: a file (local or s3://) exists."""
    out: List[Optional[str]] = []
    for c in checks:
        try:
            if c["kind"] == "token":
                with open(c["path"]) as f:
                    ok = f.read() == c["token"]
                out.append(None if ok else "it sees other content in the file this driver just wrote there")
            else:
                from hncl.infra import storage

                fs, path = storage.filesystem(c["url"])
                fs.info(path)  # unlike exists(), says why it cannot reach a store (s3fs' exists() says False)
                out.append(None)
        except FileNotFoundError:
            out.append("it does not see the file this driver just wrote there" if c["kind"] == "token"
                       else f"{c.get('url', c.get('path'))} does not exist there")
        except Exception as e:  # what the node's workers would hit: say it in one line
            text = str(e).strip().splitlines()
            out.append(f"{type(e).__name__}: {text[0] if text else ''}"[:300])
    return out


def node_visibility(checks: List[dict], nodes: List[dict], timeout_s: float = 120.0) -> Dict[str, List[Optional[str]]]:
    """Run `checks` (see _probe) on every node in `nodes` with the environment the job's workers
    get; returns {node ip: [None or why not, per check]}. A node that does not answer within
    `timeout_s` gets that reason for every check."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    env = worker_env()
    probe = ray.remote(num_cpus=0, max_retries=0, **({"runtime_env": {"env_vars": env}} if env else {}))(_probe)
    refs = {n["ip"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["id"], soft=False)
                                   ).remote(checks) for n in nodes}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    out = {}
    for ip, ref in refs.items():
        if ref in ready:
            try:
                out[ip] = ray.get(ref)
            except Exception as e:  # the probe's worker could not start there
                out[ip] = [f"the check could not run there ({type(e).__name__})"] * len(checks)
        else:
            out[ip] = [f"the node did not answer within {timeout_s:.0f} s"] * len(checks)
            ray.cancel(ref, force=True)
    return out


def require_visible(locations: List[tuple]) -> None:
    """On a cluster of several alive nodes: every node sees each (name, url, "output"|"input")
    location as this driver does, with the environment the job's workers get, else ClusterError
    in one line. An output folder on a local path must show a marker file this driver writes
    there (then removed), an s3:// output its bucket; an input (a file: a set's manifest.json, a
    weights file) must be readable. One cluster of one node: nothing to check."""
    import uuid

    from hncl.infra import storage

    nodes = alive_nodes()
    if len(nodes) < 2:
        return
    checks, what, marker = [], [], None
    for name, url, kind in locations:
        shown = url[: -len("/manifest.json")] if url.endswith("/manifest.json") else url
        if kind == "output" and not storage.is_remote(url):
            token = uuid.uuid4().hex
            os.makedirs(url, exist_ok=True)
            marker = os.path.join(url, f".hncl-shared-check-{token}")
            with open(marker, "w") as f:
                f.write(token)
            checks.append({"kind": "token", "path": marker, "token": token})
        elif kind == "output":
            scheme, rest = url.split("://", 1)
            checks.append({"kind": "exists", "url": f"{scheme}://{rest.split('/', 1)[0]}"})  # the bucket
        else:
            checks.append({"kind": "exists", "url": url})
        what.append((name, shown, kind, storage.is_remote(url)))
    try:
        seen = node_visibility(checks, nodes)
    finally:
        if marker is not None and os.path.exists(marker):
            os.remove(marker)
    problems = []
    for ip, results in seen.items():
        for (name, url, kind, remote), why in zip(what, results):
            if why is None:
                continue
            if remote:
                endpoint = os.environ.get("AWS_ENDPOINT_URL_S3", "AWS's default endpoint")
                problems.append(f"{name}={url} is not reachable from node {ip} ({why}); its workers would use the "
                                f"endpoint {endpoint} with this driver's AWS_* settings: check that node's network "
                                f"and name resolution")
            else:
                fix = ("use s3://... or a filesystem every node mounts at the same path" if kind == "output"
                       else "copy it to s3://... or to a filesystem every node mounts at the same path")
                problems.append(f"{name}={url} is not visible from node {ip} ({why}): the nodes do not share this "
                                f"disk; {fix}")
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(p.split(' (')[0] for p in problems[1:])})" \
            if len(problems) > 1 else ""
        raise ClusterError(problems[0] + more)
