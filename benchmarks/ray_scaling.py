"""Weak scaling of the Ray Train pretraining job on CPU: 1 worker, then 2, same per-worker batch.

Each run is a real `hncl pretrain` on a local Ray cluster (TorchTrainer, gloo, DDP, sharded
queue, in-batch neighbours): one CPU per worker, no loader subprocesses, so W workers use W
cores. Throughput comes from the job's own metrics.jsonl (images/s per logging window); the
first windows (process start, Ray set-up, the first shard reads) are excluded.

    python benchmarks/ray_scaling.py [--steps 60 --batch 32 --workers 1 2]

Per-worker throughput ratio (W=2 / W=1): target >= 0.9. Writes benchmarks/results/ray_scaling.json/.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import median, table, write  # noqa: E402

from hncl.commands.demo import CONFIG, METHODS  # noqa: E402
from hncl.config import load_config  # noqa: E402
from hncl.data.make_shards import ShardJob, make_shards  # noqa: E402
from hncl.train.launch import pretrain  # noqa: E402


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32, help="per worker")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--skip-windows", type=int, default=2, help="logging windows dropped as start-up")
    args = ap.parse_args(argv)
    import ray

    ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
    out: Dict[str, Dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_shards(ShardJob(source="synthetic", out=os.path.join(tmp, "shards"), split="train",
                             source_options=(("num_samples", 1200), ("seed", 0), ("size", 112))),
                    shard_size=150, descriptor_dim=64, progress=False, log=lambda m: None)
        for w in args.workers:
            over = {**METHODS["hncl"], "data.train_shards": os.path.join(tmp, "shards"), "run.output_dir": tmp,
                    "run.name": f"w{w}", "data.steps_per_epoch": args.steps, "dist.num_workers": w,
                    "dist.cpus_per_worker": 1, "data.loader_workers": 0, "data.batch_size": args.batch,
                    "run.log_every": args.log_every, "method.queue_size": 2048}
            t0 = time.time()
            pretrain(load_config(CONFIG, [f"{k}={v}" for k, v in over.items()]))
            wall = time.time() - t0
            with open(os.path.join(tmp, f"w{w}", "metrics.jsonl")) as f:
                rows = [json.loads(l) for l in f]
            steady = [r["images_per_s"] for r in rows[args.skip_windows:]]
            out[str(w)] = {"images_per_s": median(steady), "per_worker": median(steady) / w, "windows": steady,
                           "wall_seconds": wall}
            print(f"W={w}: {out[str(w)]['images_per_s']:.1f} images/s ({out[str(w)]['per_worker']:.1f} per worker), "
                  f"job wall time {wall:.0f}s", flush=True)
    ray.shutdown()
    base = out[str(args.workers[0])]["per_worker"]
    for r in out.values():
        r["per_worker_ratio"] = r["per_worker"] / base
    write("ray_scaling", {"config": vars(args), "runs": out})
    _plot(out)
    print(table([[w, round(r["images_per_s"], 1), round(r["per_worker"], 1), round(r["per_worker_ratio"], 3),
                  round(r["wall_seconds"])] for w, r in out.items()],
                ["workers", "images/s", "per worker", "per-worker ratio vs W=1", "job wall s (incl. start-up)"]))
    return out


def _plot(out) -> None:
    from hncl.evaluate.plots import plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ws = [int(w) for w in out]
    ax.plot(ws, [out[str(w)]["per_worker"] for w in ws], "-o", label="measured")
    ax.plot(ws, [out[str(ws[0])]["per_worker"]] * len(ws), "--", c="gray", label="perfect weak scaling")
    ax.set(xlabel="Ray Train workers (1 CPU each)", ylabel="images/s per worker", xticks=ws)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ray_scaling.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
