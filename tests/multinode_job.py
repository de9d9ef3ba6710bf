"""Run a module-level test function on W Ray Train workers, one per node (STRICT_SPREAD, gloo),
on the cluster in $RAY_ADDRESS, and save what each rank returned, with the node it ran on:

    python tests/multinode_job.py MODULE:FUNCTION OUT_DIR WORKERS [JSON_ARGS]

OUT_DIR/rank{r}.pt = {"rank", "node_rank", "node_ip", "result"}. OUT_DIR must be on a disk every
node shares. A driver process of its own, so that a test process connected to another Ray (the
session's `ray_local`) can use the multi-node cluster too.
"""

import json
import os
import sys


def _worker(config: dict) -> None:
    import importlib

    import ray
    import ray.train
    import torch

    module, name = config["target"].split(":")
    result = getattr(importlib.import_module(module), name)(*config["args"])
    ctx = ray.train.get_context()
    torch.save({"rank": ctx.get_world_rank(), "node_rank": ctx.get_node_rank(),
                "node_ip": ray.util.get_node_ip_address(), "result": result},
               os.path.join(config["out"], f"rank{ctx.get_world_rank()}.pt"))


def main(argv) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    target, out, workers = argv[0], os.path.abspath(argv[1]), int(argv[2])
    args = json.loads(argv[3]) if len(argv) > 3 else []
    os.makedirs(out, exist_ok=True)
    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    TorchTrainer(_worker, train_loop_config={"target": target, "args": args, "out": out},
                 torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=workers, placement_strategy="STRICT_SPREAD"),
                 run_config=RunConfig(name="job", storage_path=os.path.join(out, "ray"))).fit()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from multinode_job import _worker as _importable  # pickled by reference: the nodes import this module

    _worker = _importable  # noqa: F811
    main(sys.argv[1:])
