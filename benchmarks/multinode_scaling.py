"""Weak scaling from one node to two (one worker each) on a real two-node Ray cluster on this
machine (tests/multinode.py: head 127.0.0.2, node 127.0.0.3, one CPU each), and the bytes each
collective sends per step.

Each run is a real `hncl pretrain` job (TorchTrainer, gloo, DDP, sharded queue, in-batch
neighbours; the demo's model and method settings), one CPU per worker. Three configurations
alternate in rounds (the machine is shared): one worker on the head; two workers on the head
(dist.placement=STRICT_PACK: one node, the head has 2 CPUs for this); two workers one per node
(STRICT_SPREAD, gloo between the nodes over TCP). Images/s come from each job's own
metrics.jsonl with the first windows dropped as start-up, the median over windows and then over
rounds is kept; ratios are per worker against the one-worker runs of the same rounds.

Both nodes share this machine's cores, memory and loopback, so the ratio measures what the
multi-node path costs in software (a raylet per node, placement across nodes, gloo over TCP
between nodes), not a network: on a real cluster the gradient all-reduce crosses a NIC.

    python benchmarks/multinode_scaling.py [--steps 60 --batch 32 --rounds 2]

Writes benchmarks/results/multinode_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from _common import median, table, write  # noqa: E402

from hncl.commands.demo import CONFIG, METHODS  # noqa: E402
from hncl.config import load_config  # noqa: E402
from hncl.data.make_shards import ShardJob, make_shards  # noqa: E402

COLLECTIVES = ("all_gather", "all_reduce", "all_to_all_single", "broadcast", "all_gather_object")


def counted_loop(config: dict) -> dict:
    """train_loop_per_worker with torch.distributed's Python collectives counted (bytes this rank
    sends, by collective and the hncl function that called it); writes comm_rank{r}.json into the
    run directory. DDP's gradient all-reduce runs in C++: it is the parameters' bytes per step."""
    import torch
    import torch.distributed as dist

    from hncl.config import run_dir
    from hncl.train.loop import train_loop_per_worker, typed_config

    counts: Dict[str, list] = {}
    originals = {n: getattr(dist, n) for n in COLLECTIVES}

    def caller() -> str:
        f = sys._getframe(2)
        while f is not None:
            path = f.f_code.co_filename.replace(os.sep, "/")
            if "/hncl/" in path and not path.endswith("hncl/core/dist.py"):
                return f"{os.path.basename(path)[:-3]}.{f.f_code.co_name}"
            if path.endswith("hncl/core/dist.py") and f.f_code.co_name == "backward":
                return "dist.all_gather_with_grad.backward"
            f = f.f_back
        return "other"

    def wrap(name, fn):
        def counted(*a, **kw):
            t = a[1] if name in ("all_gather", "all_to_all_single") else a[0]
            size = t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
            c = counts.setdefault(f"{name} <- {caller()}", [0, 0])
            c[0] += size
            c[1] += 1
            return fn(*a, **kw)
        return counted

    for n, fn in originals.items():
        setattr(dist, n, wrap(n, fn))
    try:
        out = train_loop_per_worker(config)
    finally:
        for n, fn in originals.items():
            setattr(dist, n, fn)
    cfg = typed_config(config["cfg"])
    if dist.is_initialized():
        from hncl.infra import storage

        storage.write_json(storage.join(run_dir(cfg), f"comm_rank{dist.get_rank()}.json"), counts)
    return out


def _grad_bytes(cfg) -> int:
    from hncl.core.model import HNCLModel

    model = HNCLModel.from_config(cfg.model)
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32, help="per worker")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--skip-windows", type=int, default=2, help="logging windows dropped as start-up")
    args = ap.parse_args(argv)
    from multinode import TwoNodeCluster

    from hncl.train.launch import launch

    cluster = TwoNodeCluster(head_cpus=2).start()
    os.environ.update(RAY_ADDRESS=cluster.address, RAY_AUTH_MODE="disabled")
    configs = {"1 node x 1": (1, "STRICT_PACK"), "1 node x 2": (2, "STRICT_PACK"), "2 nodes x 1": (2, "STRICT_SPREAD")}
    runs: Dict[str, list] = {k: [] for k in configs}
    comm: Dict[str, Dict] = {}
    try:
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:  # a disk both nodes see
            shards = os.path.join(tmp, "shards")
            make_shards(ShardJob(source="synthetic", out=shards, source_options=(("num_samples", 1200), ("seed", 0),
                                                                                 ("size", 112))),
                        shard_size=150, descriptor_dim=64, progress=False, log=lambda m: None)
            for rnd in range(args.rounds):
                for label, (w, placement) in configs.items():
                    name = f"{placement.lower()}-w{w}-r{rnd}"
                    over = {**METHODS["hncl"], "data.train_shards": shards, "run.output_dir": tmp, "run.name": name,
                            "data.steps_per_epoch": args.steps, "dist.num_workers": w, "dist.cpus_per_worker": 1,
                            "dist.placement": placement, "data.loader_workers": 0,
                            "data.batch_size": args.batch, "run.log_every": args.log_every,
                            "method.queue_size": 2048}
                    cfg = load_config(CONFIG, [f"{k}={v}" for k, v in over.items()])
                    t0 = time.time()
                    launch(cfg, counted_loop, address=cluster.address, inputs=("data.train_shards",))
                    wall = time.time() - t0
                    with open(os.path.join(tmp, name, "metrics.jsonl")) as f:
                        rows = [json.loads(line) for line in f]
                    steady = [r["images_per_s"] for r in rows[args.skip_windows:]]
                    runs[label].append({"images_per_s": median(steady), "windows": steady, "wall_seconds": wall})
                    print(f"round {rnd} {label}: {median(steady):.1f} images/s, job wall {wall:.0f}s", flush=True)
                    if label == "2 nodes x 1" and rnd == 0:
                        for r in (0, 1):
                            with open(os.path.join(tmp, name, f"comm_rank{r}.json")) as f:
                                comm[f"rank{r}"] = {k: {"bytes_per_step": v[0] / args.steps,
                                                        "calls_per_step": v[1] / args.steps}
                                                    for k, v in json.load(f).items()}
                        comm["ddp_gradient_allreduce_bytes_per_step"] = _grad_bytes(cfg)
    finally:
        import ray

        ray.shutdown()
        cluster.stop()
    out: Dict[str, Dict] = {}
    for label, rs in runs.items():
        ips = median([r["images_per_s"] for r in rs])
        out[label] = {"images_per_s": ips, "per_worker": ips / configs[label][0], "rounds": rs}
    base = out["1 node x 1"]["per_worker"]
    for r in out.values():
        r["per_worker_ratio"] = r["per_worker"] / base
    write("multinode_scaling", {"config": vars(args), "runs": out, "communication_w2": comm})
    print(table([[w, round(r["images_per_s"], 1), round(r["per_worker"], 1), round(r["per_worker_ratio"], 3),
                  ", ".join(f"{x['images_per_s']:.1f}" for x in r["rounds"])] for w, r in out.items()],
                ["nodes x workers", "images/s", "per worker", "per-worker ratio vs 1 x 1", "per round"]))
    rows = [[k, int(v["bytes_per_step"]), round(v["calls_per_step"], 2)] for k, v in sorted(comm["rank0"].items())]
    rows.append(["DDP gradient all-reduce (C++; parameters)", comm["ddp_gradient_allreduce_bytes_per_step"], "buckets"])
    print(table(rows, ["collective <- caller (rank 0)", "bytes sent per step", "calls per step"]))
    return out


if __name__ == "__main__":
    main()
