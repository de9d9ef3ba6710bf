"""Run a worker function (pretraining, fine-tuning, a benchmark's): in this process (debug mode,
or one torchrun rank) or on a Ray cluster; `launch` is the one path every command takes."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional, Sequence

from omegaconf import OmegaConf

from hncl.config import run_dir as run_dir_of
from hncl.config import Placement
from hncl.infra.raycluster import connect_ray
from hncl.train.loop import train_loop_per_worker


# what each command's worker reads besides run.output_dir: on a cluster of several nodes every
# node must see them before any worker starts (hncl.infra.preflight.cluster_storage)
PRETRAIN_INPUTS = ("data.train_shards", "model.init_weights")
FINETUNE_INPUTS = ("finetune.train_shards", "finetune.test_shards", "finetune.init")


def worker_config(cfg, session: str) -> dict:
    """What every worker function takes: the resolved config as plain data (it crosses to Ray's
    workers) and where it runs, "local" (this process, or one torchrun rank) or "ray"."""
    return {"cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "session": session}


def launch(cfg, worker: Callable[[dict], dict], *, debug: bool = False, address: Optional[str] = None,
           inputs: Sequence[str] = ()) -> dict:
    """The one way a worker function runs: debug, in this process (no Ray; breakpoints work),
    and under torchrun each process is one rank (the worker joins the group torchrun describes);
    otherwise on dist.num_workers Ray Train workers of the cluster in `address` / RAY_ADDRESS,
    else of a private local Ray instance. Returns rank 0's result."""
    if debug:
        return worker(worker_config(cfg, "local"))
    return run_on_ray(cfg, worker, address, inputs)


def pretrain(cfg, *, debug: bool = False, address: Optional[str] = None) -> dict:
    """Pretraining (Ray Train restarts failed workers from the last checkpoint up to
    dist.max_failures times; rerunning with the same run.name resumes)."""
    return launch(cfg, train_loop_per_worker, debug=debug, address=address, inputs=PRETRAIN_INPUTS)


def _storage(output_dir: str):
    """(storage_path, pyarrow filesystem or None) for Ray's RunConfig. Ray's controller actor
    unpickles the filesystem in another process, whose environment may lack the AWS variables:
    the instance carries this process's credentials (hncl.infra.storage.portable_s3_filesystem)."""
    if not output_dir.startswith("s3://"):
        return os.path.abspath(output_dir), None
    import pyarrow.fs

    from hncl.infra import storage

    handler = pyarrow.fs.FSSpecHandler(storage.portable_s3_filesystem(output_dir))
    return output_dir[len("s3://"):], pyarrow.fs.PyFileSystem(handler)


def _capacity(nodes, bundle: dict, placement: Placement) -> int:
    """How many worker bundles the alive nodes can hold under `placement` (by total resources:
    a failed run's own workers are gone)."""
    per_node = [min((int(n["resources"].get(k, 0) // v) if v > 0 else 10**9) for k, v in bundle.items())
                for n in nodes]
    if placement is Placement.STRICT_SPREAD:
        return sum(1 for c in per_node if c >= 1)
    if placement is Placement.STRICT_PACK:
        return max(per_node, default=0)
    return sum(per_node)


def _resources_line(cfg, bundle: dict) -> tuple:
    """(what the workers need, what the cluster has, workers missing) in words."""
    from hncl.infra.raycluster import alive_nodes, describe

    placement = Placement(cfg.dist.placement)
    nodes = alive_nodes()
    need = f"{cfg.dist.num_workers} workers x {describe(bundle)}" + \
        (" on distinct nodes (dist.placement=STRICT_SPREAD)" if placement is Placement.STRICT_SPREAD else
         " on one node (dist.placement=STRICT_PACK)" if placement is Placement.STRICT_PACK else "")
    have = f"{len(nodes)} alive node{'s' if len(nodes) != 1 else ''} (" + \
        ", ".join(f"{n['ip']} {describe(n['resources'])}" for n in nodes) + ")"
    return need, have, max(0, cfg.dist.num_workers - _capacity(nodes, bundle, placement))


def last_committed_checkpoint(run_dir: str) -> Optional[tuple]:
    """(folder URL, step) of the newest checkpoint Ray Train committed for this run, from its
    checkpoint_manager_snapshot.json (a checkpoint folder can exist before it is committed)."""
    import json

    from hncl.infra import storage

    url = storage.join(run_dir, "checkpoint_manager_snapshot.json")
    try:
        if not storage.exists(url):
            return None
        latest = json.loads(storage.read_bytes(url)).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):
        return None
    name = latest.get("checkpoint_dir_name")
    return (storage.join(run_dir, name), (latest.get("metrics") or {}).get("step")) if name else None


def _startup_failure(exc: BaseException) -> Optional[str]:
    """'timeout' when Ray Train gave up waiting for its workers' resources, 'failed' when a new
    worker group could not start (WorkerGroupStartupTimeoutError / ...FailedError, wrapped in a
    ControllerError; matched by name: the classes are internal to Ray Train), else None."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        name = type(e).__name__
        if name == "WorkerGroupStartupTimeoutError":
            return "timeout"
        if name == "WorkerGroupStartupFailedError":
            return "failed"
        todo.extend([getattr(e, "controller_failure", None), e.__cause__, e.__context__])
    return None


def _stopped(cfg, bundle: dict, run_dir: str, why: str) -> str:
    """The one line a run that stopped for want of workers ends with."""
    need, have, missing = _resources_line(cfg, bundle)
    short = (f"{missing} worker{'s' if missing != 1 else ''} short" if missing else
             "enough for them now (a node came back, or other jobs released it)")
    last = last_committed_checkpoint(run_dir)
    saved = (f"Last committed checkpoint: {last[0]} (step {last[1]}); rerun the same command to resume from it"
             if last else "No checkpoint was committed yet; rerun the same command to start again")
    head = (f"the run stopped after waiting dist.node_wait_s={cfg.dist.node_wait_s:g} s for its workers' resources"
            if why == "timeout" else "the run stopped: a new group of workers failed to start (a node lost while "
                                     "they started?)")
    return f"{head}: it needs {need}, the cluster has {have}, {short}. {saved} once the nodes are back" + \
        _resume_smaller(cfg, bundle, missing, last[0] if last else None)


def _resume_smaller(cfg, bundle: dict, missing: int, checkpoint: Optional[str]) -> str:
    """How to go on now on the nodes there are: the most workers the cluster holds that split the
    run's global batch and queue evenly (a resume on another world size continues the run)."""
    from hncl.infra.raycluster import alive_nodes

    from hncl.infra import storage

    if not missing or checkpoint is None:
        return ""
    fits = _capacity(alive_nodes(), bundle, Placement(cfg.dist.placement))
    try:
        global_batch = storage.read_json(storage.join(checkpoint, "train_state.json"))["global_batch"]
    except Exception:  # an older checkpoint, or storage gone: the config says what it started with
        global_batch = cfg.data.global_batch_size or cfg.data.batch_size * cfg.dist.num_workers
    workers = [w for w in range(min(fits, cfg.dist.num_workers), 0, -1)
               if global_batch % w == 0 and cfg.method.queue_size % w == 0]
    if not workers:
        return ""
    w = workers[0]
    return (f", or now on the nodes there are: the same command with dist.num_workers={w} (the run keeps its "
            f"global batch of {global_batch}, {global_batch // w} per worker, and its schedule; the rest of the "
            f"interrupted data epoch is dealt to the {w} worker{'s' if w != 1 else ''})")


@contextlib.contextmanager
def _env(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_on_ray(cfg, loop, address: Optional[str] = None, inputs: Sequence[str] = ()) -> dict:
    """Run `loop(worker_config(cfg, "ray"))` on dist.num_workers Ray Train workers. Before any
    worker starts, on a cluster of several nodes every node must see run.output_dir and the
    `inputs` (config fields naming files or sets) as this driver does."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from hncl.infra import preflight
    from hncl.infra.raycluster import ClusterError, worker_env

    where = connect_ray(address)
    preflight.cluster_storage(cfg, inputs)
    storage_path, filesystem = _storage(cfg.run.output_dir)
    use_gpu = bool(cfg.dist.use_gpu)
    # Train V2 patches print() in its workers to log through Train's logger *and*, because Ray
    # wraps the workers' stdout, to print as well: every [hncl] line would appear twice
    env = {"OMP_NUM_THREADS": str(cfg.dist.cpus_per_worker), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **worker_env()}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    bundle = {"CPU": cfg.dist.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    placement = Placement(cfg.dist.placement)
    trainer = TorchTrainer(
        loop,
        train_loop_config=worker_config(cfg, "ray"),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.dist.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=bundle, placement_strategy=placement.value),
        # controller_failure_limit=0: when the workers' resources do not come within the start
        # timeout (dist.node_wait_s, below), the run stops instead of asking again forever. A
        # worker group that fails to start is not retried either: the run stops, naming the last
        # committed checkpoint, and rerunning resumes (Ray counts both failures alike)
        run_config=RunConfig(name=cfg.run.name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=cfg.dist.max_failures,
                                                          controller_failure_limit=0),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
                             worker_runtime_env={"env_vars": env}),
    )
    run_dir = run_dir_of(cfg)
    print(f"[hncl] Ray Train on {where}: {cfg.dist.num_workers} workers; run directory {run_dir}", flush=True)
    need, have, missing = _resources_line(cfg, bundle)
    if missing:
        print(f"[hncl] the workers need {need}; the cluster has {have}: waiting up to dist.node_wait_s="
              f"{cfg.dist.node_wait_s:g} s for {missing} more", flush=True)
    try:
        # Ray Train waits this long for a worker group's placement group (read by its controller,
        # to which the driver's value is propagated), at the start and after every failure
        with _env(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=f"{cfg.dist.node_wait_s:g}"):
            result = trainer.fit()
    except Exception as e:
        why = _startup_failure(e)
        if why is None:
            raise
        raise ClusterError(_stopped(cfg, bundle, run_dir, why)) from None
    if result.error is not None:
        raise result.error
    return result.return_value or {}
