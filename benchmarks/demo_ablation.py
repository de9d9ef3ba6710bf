"""Ablations of the demo's methods on a VALIDATION split of training identities.

The demo's test identities are for the final report only; settings are compared here on
synthetic people drawn from another seed's stream (disjoint from both train and test people).
Each variant is pretrained in one process with the demo's budget and linear-probed / kNN'ed.

    python benchmarks/demo_ablation.py [--steps 150] [--variants hncl baseline hncl_lambda05 ...]
        [--difficulty realistic | easy] [--ray]

The faces are the demo's (realistic) unless --difficulty says otherwise (hncl/data/synthetic.py,
DIFFICULTIES). Writes benchmarks/results/demo_ablation.json, one entry per (difficulty, seed, steps).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time


from hncl.commands.demo import CONFIG, DIFFICULTY, METHODS, QUEUE, _shards, _training_purity
from hncl.config import load_config
from hncl.data.synthetic import DIFFICULTIES
from hncl.train.finetune import finetune_loop
from hncl.train.launch import launch, pretrain

# HNCL as the demo ran it in #24's first two rounds: the 5 heatmap-nearest faces of the batch,
# pooled "any" (MIL-NCE); the second round's variants were measured on top of it
ANY = {"method.name": "hncl", **QUEUE, "method.batch_neighbours": 5, "method.batch_pool": "any"}
# HNCL as the demo ran it before #24 (every in-batch neighbour pulled in): the first round's
# variants were measured against it
EACH = {**ANY, "method.batch_pool": "each"}
# HNCL as the demo ran it in #24's third round: every other face of the global batch a soft
# positive, weighted by softmax(heatmap cosine / 0.05); the fourth round's variants build on it
RELATIONAL = {**ANY, "method.batch_neighbours": 127, "method.batch_weight_temperature": 0.05, "method.batch_pool": "each"}
VARIANTS = {
    "random": None,  # no pretraining: the floor every method must clear
    "baseline": METHODS["baseline"],
    "hncl": METHODS["hncl"],  # the demo's: every face of the batch weighted by heatmap similarity (#24)
    "hncl_any": ANY,
    "hncl_each": EACH,
    "hncl_queue_only": {**EACH, "method.batch_neighbours": 0},  # the design's HNCL
    "nnclr": METHODS["nnclr"],
    "hncl_queue_only_lambda05": {**EACH, "method.batch_neighbours": 0, "method.nn_weight": 0.5},
    "hncl_queue_only_top5": {**EACH, "method.batch_neighbours": 0, "method.topk": 5},
    "hncl_batch10": {**EACH, "method.batch_neighbours": 10},
    "hncl_tau01": {**EACH, "method.temperature": 0.1},
    "baseline_tau01": {**METHODS["baseline"], "method.temperature": 0.1},  # the baselines get the same care
    "nnclr_tau01": {**METHODS["nnclr"], "method.temperature": 0.1},
    "nnclr_top5": {**METHODS["nnclr"], "method.topk": 5},
    # issue #17: false negatives, more in-batch positives
    "hncl_exclude": {**EACH, "method.exclude_neighbours": True},
    "hncl_batch10_exclude": {**EACH, "method.batch_neighbours": 10, "method.exclude_neighbours": True},
    # issue #24: noisy heatmap neighbours (realistic faces): fewer or surer in-batch positives
    "hncl_batch1": {**EACH, "method.batch_neighbours": 1},
    "hncl_batch2": {**EACH, "method.batch_neighbours": 2},
    "hncl_top5": {**EACH, "method.topk": 5},  # five queue neighbours: their noise averages out
    "hncl_batch10_any": {**EACH, "method.batch_neighbours": 10, "method.batch_pool": "any"},
    "hncl_mutual": {**EACH, "method.mutual_neighbours": True},
    "hncl_batch10_mutual": {**EACH, "method.batch_neighbours": 10, "method.mutual_neighbours": True},
    # on top of the demo's "any" pooling (#24, second round): more weight on the neighbours,
    # fewer of them, or kept out of the negatives
    "hncl_any_lambda2": {**ANY, "method.nn_weight": 2.0},
    "hncl_any_lambda05": {**ANY, "method.nn_weight": 0.5},
    "hncl_any_batch3": {**ANY, "method.batch_neighbours": 3},
    "hncl_any_exclude": {**ANY, "method.exclude_neighbours": True},
    # BatchNorm over the global batch (model.sync_bn): per-rank statistics mark each embedding
    # with its rank, which the loss can use against positives from the other rank (--ray only)
    "hncl_sync_bn": {**ANY, "model.sync_bn": True},
    "baseline_sync_bn": {**METHODS["baseline"], "model.sync_bn": True},
    # the whole span shuffled (blocks of 1000 hold ~71 of the identity-ordered training people, so
    # one process's batches have twice the same-person pairs of a 2-worker global batch)
    "hncl_shuffle_all": {**ANY, "data.shuffle_buffer": 2800},
    "baseline_shuffle_all": {**METHODS["baseline"], "data.shuffle_buffer": 2800},
    # smaller blocks: a 2-worker global batch with the same-person density of one process's
    "hncl_block500": {**ANY, "data.shuffle_buffer": 500},
    "baseline_block500": {**METHODS["baseline"], "data.shuffle_buffer": 500},
    # (#24, third round) the in-batch neighbours weighted by softmax(heatmap cosine / 0.05):
    # the 5 nearest pooled "any" (a mixture), or every other face of the global batch of 128
    # pooled "each" (a cross-entropy against the heatmaps' similarity: the demo's since)
    "hncl_soft": {**ANY, "method.batch_weight_temperature": 0.05},
    "hncl_relational": RELATIONAL,
    # (#24, fourth round) neighbours searched in the whitened space of the descriptor's first k PCA
    # components: head pose and face shape (the largest directions) no longer outweigh expression
    "hncl_whiten16": {**RELATIONAL, "descriptor.whiten": 16},
    "hncl_whiten32": {**RELATIONAL, "descriptor.whiten": 32},
    "hncl_any_whiten16": {**ANY, "descriptor.whiten": 16},  # the second round's 5 nearest pooled any, whitened
    "supervised": {"method.name": "supervised"},  # labels as positives: the upper bound
    "hncl_lambda2": {**EACH, "method.nn_weight": 2.0},
    "hncl_lambda05": {**EACH, "method.nn_weight": 0.5},
    # colour is an identity cue (skin, hair, background): views that vary it, for every method
    "baseline_colour": {**METHODS["baseline"], "data.colour": 0.8, "data.grayscale": 0.5},
    "hncl_colour": {**EACH, "data.colour": 0.8, "data.grayscale": 0.5},
    "nnclr_colour": {**METHODS["nnclr"], "data.colour": 0.8, "data.grayscale": 0.5},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/ablation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--difficulty", default=DIFFICULTY, choices=list(DIFFICULTIES), help="the faces (default %(default)s)")
    ap.add_argument("--ray", action="store_true", help="pretrain as the demo does (Ray, 2 workers), not in one process")
    args = ap.parse_args()
    out = args.out = os.path.join(args.out, args.difficulty)
    train = _shards(out, "train", 200, 14, args.seed, args.difficulty, print)
    val = _shards(out, "val", 60, 14, args.seed + 1000, args.difficulty, print)  # other people: another seed's stream
    path = os.path.join(os.path.dirname(os.path.dirname(out.rstrip("/"))), "demo_ablation.json")
    runs = {}
    if os.path.exists(path):  # keep other settings' and variants' results from earlier runs
        with open(path) as f:
            runs = json.load(f)
        if "results" in runs:  # the file's layout before #24: one (seed, steps) on the easy faces
            runs = {f"easy seed={runs['seed']} steps={runs['steps']}": runs["results"]}
    key = f"{args.difficulty} seed={args.seed} steps={args.steps}" + (" ray" if args.ray else "")
    if args.ray:
        from hncl.infra.raycluster import connect_ray

        print(f"Ray: {connect_ray(num_cpus=2)}", flush=True)
    results = runs.setdefault(key, {})
    for name in args.variants:
        run = os.path.join(args.out, "runs" + ("_ray" if args.ray else ""), name)
        init = os.path.join(run, "encoder.safetensors") if VARIANTS[name] is not None else "none"
        seconds = 0.0
        if VARIANTS[name] is not None:
            shutil.rmtree(run, ignore_errors=True)
            seconds = _pretrain(args, name, train)
        cfg = load_config(CONFIG, [f"finetune.train_shards={train}", f"finetune.test_shards={val}",
                                   f"finetune.init={init}",
                                   f"run.output_dir={os.path.join(out, 'probe' + ('_ray' if args.ray else ''))}", f"run.name={name}"])
        rep = launch(cfg, finetune_loop, debug=True)
        results[name] = {"val_linear_acc": rep["accuracy"], "val_knn_acc": rep["knn"]["accuracy"],
                         "seconds": round(seconds, 1)}
        if VARIANTS[name] is not None:  # what the positives were: share of the anchor's expression
            results[name].update(queue_purity=_training_purity(run), batch_purity=_training_purity(run, "batch_nn_purity"))
        print(name, results[name], flush=True)
        with open(path, "w") as f:
            json.dump(runs, f, indent=1)


def _pretrain(args, name: str, train: str) -> float:
    workers = 2 if args.ray else 1
    over = {"data.train_shards": train, "run.output_dir": os.path.join(args.out, "runs" + ("_ray" if args.ray else "")),
            "run.name": name, "run.seed": args.seed, "data.steps_per_epoch": args.steps,
            "dist.num_workers": workers, "data.batch_size": 128 // workers, **VARIANTS[name]}
    t0 = time.time()
    pretrain(load_config(CONFIG, [f"{k}={v}" for k, v in over.items()]), debug=not args.ray)
    return time.time() - t0


if __name__ == "__main__":
    main()
