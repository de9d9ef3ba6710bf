"""How hard the synthetic faces are: nearest-heatmap expression purity per Difficulty knob.

Measured as the demo's report measures it (hncl/evaluate/report.py: heatmap_k1): the faces of
held-out identities aligned as make-shards aligns them, heatmaps pooled to R=16, the shard set's
PCA descriptor (inner 51 points, Dh=64, fitted on the set itself as make-shards does), and the
fraction of faces whose nearest other face (cosine) has the same expression. Also for expressive
faces only (the queries; neighbours among all faces), the figure #24 gives for real photographs
(0.60-0.64). Rows: easy, realistic, each knob alone on top of easy, and realistic without each knob.

    python benchmarks/synthetic_difficulty.py [--ids 60 --per-id 14 --seeds 0,1,2 --out benchmarks/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch

from hncl.config import SHARD_SET
from hncl.data.synthetic import DIFFICULTIES, KNOBS, Difficulty, SyntheticFaces
from hncl.evaluate import knn
from hncl.heatmaps.align import align_faces
from hncl.heatmaps.descriptor import HeatmapDescriptor
from hncl.heatmaps.render import pool_heatmaps, render_heatmaps



def settings() -> dict:
    easy, real = DIFFICULTIES["easy"], DIFFICULTIES["realistic"]
    rows = {"easy": easy, "realistic": real}
    for k in KNOBS:
        rows[f"easy + {k}"] = dataclasses.replace(easy, **{k: getattr(real, k)})
    for k in KNOBS:
        rows[f"realistic - {k}"] = dataclasses.replace(real, **{k: getattr(easy, k)})
    return rows


def purity(d: Difficulty, ids: int, per_id: int, seed: int, size: int) -> dict:
    faces = list(SyntheticFaces(ids, per_id, size, seed, "test", d))
    images = np.stack([f.image for f in faces])
    points = np.stack([f.landmarks for f in faces])
    labels = np.array([f.label for f in faces])
    _, aligned_points, _ = align_faces(images, points, size)
    pooled = pool_heatmaps(render_heatmaps(torch.from_numpy(aligned_points), size), SHARD_SET.resolution)
    desc = HeatmapDescriptor.fit(pooled, dim=SHARD_SET.descriptor_dim, inner_only=SHARD_SET.inner_only, seed=seed)
    feats = desc(pooled).numpy()
    _, idx = knn.search(feats, feats, 2)
    nearest = np.where(idx[:, 0] == np.arange(len(idx)), idx[:, 1], idx[:, 0])
    same = labels[nearest] == labels
    return {"all": float(same.mean()), "expressive": float(same[labels != 0].mean()),
            "chance": knn.chance_purity(labels)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ids", type=int, default=60, help="test identities (the demo's)")
    ap.add_argument("--per-id", type=int, default=14)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", help="comma-separated row names (default: all)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = settings()
    if args.only:
        rows = {k: rows[k] for k in args.only.split(",")}
    results = []
    print(f"nearest-heatmap expression purity, {args.ids} test identities x {args.per_id}, seeds {seeds}")
    print(f"{'setting':32s} {'all faces':>16s} {'expressive':>16s}  chance")
    for name, d in rows.items():
        t = time.time()
        per_seed = [purity(d, args.ids, args.per_id, s, args.size) for s in seeds]
        row = {"setting": name, "difficulty": dataclasses.asdict(d), "seeds": seeds,
               **{k: [p[k] for p in per_seed] for k in ("all", "expressive", "chance")}}
        results.append(row)
        print(f"{name:32s} {np.mean(row['all']):.3f} +- {np.std(row['all']):.3f}  "
              f"{np.mean(row['expressive']):.3f} +- {np.std(row['expressive']):.3f}  "
              f"{np.mean(row['chance']):.3f}  ({time.time() - t:.0f} s)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "synthetic_difficulty.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
