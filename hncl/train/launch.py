"""Start pretraining: in this process (debug mode, or one torchrun rank) or on a Ray cluster."""

from __future__ import annotations

import os
from typing import Optional

from omegaconf import OmegaConf

from hncl.config import run_dir as run_dir_of
from hncl.config import value
from hncl.raycluster import connect_ray
from hncl.train.loop import init_local_process_group, train_loop_per_worker


def _container(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def pretrain_local(cfg) -> dict:
    """Debug mode: the same loop in this process, no Ray (breakpoints work). Under torchrun,
    each process is one rank of a gloo/nccl group."""
    config = {"cfg": _container(cfg), "session": "local"}
    if value(cfg.dist.strategy) != "deepspeed":
        init_local_process_group()  # under torchrun; a single plain process needs none
        return train_loop_per_worker(config)
    # DeepSpeed looks for MPI unless the torch.distributed variables are set, and needs a group
    from hncl.dist import free_port, local_process_group

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    with local_process_group("nccl" if cfg.dist.use_gpu else "gloo", env):
        return train_loop_per_worker(config)


def _storage(output_dir: str):
    """(storage_path, pyarrow filesystem or None) for Ray's RunConfig. Ray's controller actor
    unpickles the filesystem in another process, whose environment may lack the AWS variables:
    the instance carries what this process was configured with explicitly (hncl.storage)."""
    if not output_dir.startswith("s3://"):
        return os.path.abspath(output_dir), None
    import pyarrow.fs

    from hncl import storage

    return output_dir[len("s3://"):], pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(storage.s3_filesystem()))


def pretrain_ray(cfg, address: Optional[str] = None) -> dict:
    """Ray Train: TorchTrainer with one worker per rank, restarts from the last checkpoint on
    failure (dist.max_failures); rerunning with the same run.name resumes."""
    return run_on_ray(cfg, train_loop_per_worker, address)


def run_on_ray(cfg, loop, address: Optional[str] = None) -> dict:
    """Run `loop({"cfg", "session": "ray"})` on dist.num_workers Ray Train workers."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    where = connect_ray(address)
    storage_path, filesystem = _storage(cfg.run.output_dir)
    use_gpu = bool(cfg.dist.use_gpu)
    # Train V2 patches print() in its workers to log through Train's logger *and*, because Ray
    # wraps the workers' stdout, to print as well: every [hncl] line would appear twice
    env = {"OMP_NUM_THREADS": str(cfg.dist.cpus_per_worker), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION",
              "HNCL_S3_CONNECT_TIMEOUT", "HNCL_S3_READ_TIMEOUT", "HNCL_S3_DEADLINE"):
        if k in os.environ:
            env[k] = os.environ[k]
    trainer = TorchTrainer(
        loop,
        train_loop_config={"cfg": _container(cfg), "session": "ray"},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.dist.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.dist.cpus_per_worker,
                                                           **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=cfg.run.name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=cfg.dist.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
                             worker_runtime_env={"env_vars": env}),
    )
    print(f"[hncl] Ray Train on {where}: {cfg.dist.num_workers} workers; run directory {run_dir_of(cfg)}",
          flush=True)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result.return_value or {}
