"""Ablations of the demo's methods on a VALIDATION split of training identities.

The demo's test identities are for the final report only; settings are compared here on
synthetic people drawn from another seed's stream (disjoint from both train and test people).
Each variant is pretrained in one process with the demo's budget and linear-probed / kNN'ed.

    python benchmarks/demo_ablation.py [--steps 150] [--variants hncl baseline hncl_lambda05 ...]

Writes benchmarks/results/demo_ablation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time


from hncl.commands.demo import CONFIG, METHODS, _shards
from hncl.config import load_config
from hncl.train.finetune import finetune_loop
from hncl.train.launch import launch, pretrain

VARIANTS = {
    "random": None,  # no pretraining: the floor every method must clear
    "baseline": METHODS["baseline"],
    "hncl": METHODS["hncl"],
    "hncl_queue_only": {**METHODS["hncl"], "method.batch_neighbours": 0},  # the design's HNCL
    "nnclr": METHODS["nnclr"],
    "hncl_queue_only_lambda05": {**METHODS["hncl"], "method.batch_neighbours": 0, "method.nn_weight": 0.5},
    "hncl_queue_only_top5": {**METHODS["hncl"], "method.batch_neighbours": 0, "method.topk": 5},
    "hncl_batch10": {**METHODS["hncl"], "method.batch_neighbours": 10},
    "hncl_tau01": {**METHODS["hncl"], "method.temperature": 0.1},
    "baseline_tau01": {**METHODS["baseline"], "method.temperature": 0.1},  # the baselines get the same care
    "nnclr_tau01": {**METHODS["nnclr"], "method.temperature": 0.1},
    "nnclr_top5": {**METHODS["nnclr"], "method.topk": 5},
    # issue #17: false negatives, more in-batch positives
    "hncl_exclude": {**METHODS["hncl"], "method.exclude_neighbours": True},
    "hncl_batch10_exclude": {**METHODS["hncl"], "method.batch_neighbours": 10, "method.exclude_neighbours": True},
    "supervised": {"method.name": "supervised"},  # labels as positives: the upper bound
    "hncl_lambda2": {**METHODS["hncl"], "method.nn_weight": 2.0},
    "hncl_lambda05": {**METHODS["hncl"], "method.nn_weight": 0.5},
    # colour is an identity cue (skin, hair, background): views that vary it, for every method
    "baseline_colour": {**METHODS["baseline"], "data.colour": 0.8, "data.grayscale": 0.5},
    "hncl_colour": {**METHODS["hncl"], "data.colour": 0.8, "data.grayscale": 0.5},
    "nnclr_colour": {**METHODS["nnclr"], "data.colour": 0.8, "data.grayscale": 0.5},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/ablation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    train = _shards(args.out, "train", 200, 14, args.seed, print)
    val = _shards(args.out, "val", 60, 14, args.seed + 1000, print)  # other people: another seed's stream
    path = os.path.join(os.path.dirname(args.out.rstrip("/")), "demo_ablation.json")
    results, old = {}, {}
    if os.path.exists(path):  # keep other variants' results from earlier runs of this seed/steps
        with open(path) as f:
            old = json.load(f)
        if (old.get("steps"), old.get("seed")) == (args.steps, args.seed):
            results = old["results"]
        else:
            old = {}
    for name in args.variants:
        run = os.path.join(args.out, "runs", name)
        init = os.path.join(run, "encoder.safetensors") if VARIANTS[name] is not None else "none"
        seconds = 0.0
        if VARIANTS[name] is not None:
            shutil.rmtree(run, ignore_errors=True)
            seconds = _pretrain(args, name, train)
        cfg = load_config(CONFIG, [f"finetune.train_shards={train}", f"finetune.test_shards={val}",
                                   f"finetune.init={init}",
                                   f"run.output_dir={os.path.join(args.out, 'probe')}", f"run.name={name}"])
        rep = launch(cfg, finetune_loop, debug=True)
        results[name] = {"val_linear_acc": rep["accuracy"], "val_knn_acc": rep["knn"]["accuracy"],
                         "seconds": round(seconds, 1)}
        print(name, results[name], flush=True)
        with open(path, "w") as f:
            json.dump({**old, "steps": args.steps, "seed": args.seed, "results": results}, f, indent=1)


def _pretrain(args, name: str, train: str) -> float:
    over = {"data.train_shards": train, "run.output_dir": os.path.join(args.out, "runs"), "run.name": name,
            "run.seed": args.seed, "data.steps_per_epoch": args.steps, "dist.num_workers": 1,
            "data.batch_size": 128, **VARIANTS[name]}
    t0 = time.time()
    pretrain(load_config(CONFIG, [f"{k}={v}" for k, v in over.items()]), debug=True)
    return time.time() - t0


if __name__ == "__main__":
    main()
