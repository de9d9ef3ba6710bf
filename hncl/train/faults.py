"""Fault injection for the tests of resuming and fault tolerance (run.fail_at_step,
run.fail_rank): one rank of a run dies once, as a preempted node would, at a step boundary."""

from __future__ import annotations

import os

from hncl.infra import storage


def maybe_fail(run_cfg, run_dir: str, rank: int, step: int) -> None:
    """Rank run.fail_rank exits (os._exit(1): no cleanup, as a kill) when it reaches step
    run.fail_at_step, the first time only: a marker in the run directory lets the resumed run
    pass that step."""
    if run_cfg.fail_at_step is None or step != run_cfg.fail_at_step or rank != run_cfg.fail_rank:
        return
    marker = storage.join(run_dir, ".fault_injected")
    if storage.exists(marker):
        return
    storage.write_bytes(marker, b"")
    print(f"[hncl] fault injection: rank {rank} exits at step {step}", flush=True)
    os._exit(1)
