"""Connecting this process to Ray: which cluster a command joins, decided in one place."""

from __future__ import annotations

import os
from typing import Optional

from hncl.dist import free_port


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
        ray.init(address=address)
        return f"the Ray cluster at {address}"
    # the dashboard serves the state API that Ray Train's placement-group cleaner polls: without
    # it the cleaner prints a warning every few seconds (and cannot clean up after a crash)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_port=free_port())
    return f"a private local Ray instance ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"
