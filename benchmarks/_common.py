"""Shared by the benchmark scripts: where results go, what machine made them, how to time.

Every benchmark reports ratios against a baseline measured in the same run, alternating the
two in rounds so that load from other tenants of a shared machine hits both alike; the median
over rounds is reported."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> Dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write(name: str, data: Dict, out: str = RESULTS) -> str:
    """benchmarks/results/<name>.json with the machine description; returns the path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"benchmark": name, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **data},
                  f, indent=1)
    print(f"wrote {path}")
    return path


def timed(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def interleaved(candidates: Dict[str, Callable[[], object]], rounds: int, per_round: int = 1,
                sync: Callable[[], None] = lambda: None) -> Dict[str, List[float]]:
    """Seconds per call of each candidate: `rounds` rounds, each calling every candidate
    `per_round` times in turn. Returns all per-call times (take the median)."""
    times: Dict[str, List[float]] = {k: [] for k in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            for _ in range(per_round):
                times[name].append(timed(fn, sync))
    return times


def median(xs: List[float]) -> float:
    return statistics.median(xs)


def table(rows: List[List[object]], header: List[str]) -> str:
    """A markdown table (printed last by every script, pasted into docs/PERFORMANCE.md)."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
