"""How pure HNCL's heatmap neighbours are with the descriptor as fitted vs whitened (descriptor.whiten).

On validation identities only (the people benchmarks/demo_ablation.py probes on: seed S + 1000's
held-out split), realistic faces, aligned and pooled as make-shards stores them, the set's own PCA
(inner 51 points, Dh=64, fitted on the set as make-shards does). Per descriptor:
  k1          the nearest other face has the same expression (the README's purity; the demo's
              test faces are measured with the plain descriptor, as the real-face figure was)
  batch top1  the same within random batches of 128 (what the in-batch term searches)
  soft@T      the share of softmax(cosine / T) weight on faces of the anchor's expression within
              a batch of 128: the purity of HNCL's soft in-batch positives (the demo's T = 0.05)

    python benchmarks/descriptor_whitening.py [--seeds 0,1,2] [--out benchmarks/results]

Writes descriptor_whitening.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from hncl.config import SHARD_SET
from hncl.data.synthetic import SyntheticFaces
from hncl.heatmaps.align import align_faces
from hncl.heatmaps.descriptor import HeatmapDescriptor
from hncl.heatmaps.render import pool_heatmaps, render_heatmaps

TEMPERATURES = (0.02, 0.05, 0.1)


def validation_faces(seed: int, ids: int, per_id: int, size: int = 112):
    faces = list(SyntheticFaces(ids, per_id, size, seed + 1000, "test", "realistic"))
    images, points = np.stack([f.image for f in faces]), np.stack([f.landmarks for f in faces])
    _, aligned, _ = align_faces(images, points, size)
    pooled = pool_heatmaps(render_heatmaps(torch.from_numpy(aligned), size), SHARD_SET.resolution)
    return pooled, torch.tensor([f.label for f in faces])


def purities(desc: torch.Tensor, labels: torch.Tensor, batch: int, draws: int, seed: int) -> dict:
    x = F.normalize(desc.float(), dim=1)
    sim = x @ x.T
    sim.fill_diagonal_(float("-inf"))
    row = {"k1": float((labels[sim.argmax(1)] == labels).float().mean())}
    g = torch.Generator().manual_seed(seed)
    top1, soft = [], {t: [] for t in TEMPERATURES}
    for _ in range(draws):
        idx = torch.randperm(len(x), generator=g)[:batch]
        s, lab = sim[idx][:, idx], labels[idx]
        same = (lab[None] == lab[:, None]).float()
        top1.append(float((lab[s.argmax(1)] == lab).float().mean()))
        for t in TEMPERATURES:
            soft[t].append(float((torch.softmax(s / t, dim=1) * same).sum(1).mean()))
    row["batch_top1"] = float(np.mean(top1))
    row.update({f"soft@{t}": float(np.mean(v)) for t, v in soft.items()})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ids", type=int, default=60, help="validation identities (demo_ablation's)")
    ap.add_argument("--per-id", type=int, default=14)
    ap.add_argument("--whiten", default="0,8,16,32,64", help="descriptor.whiten values (0: as fitted)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        pooled, labels = validation_faces(seed, args.ids, args.per_id)
        desc = HeatmapDescriptor.fit(pooled, dim=SHARD_SET.descriptor_dim, inner_only=SHARD_SET.inner_only, seed=seed)
        for k in [int(k) for k in args.whiten.split(",")]:
            row = {"seed": seed, "whiten": k, **purities((desc.whitened(k) if k else desc)(pooled), labels, 128, 40, seed)}
            rows.append(row)
            print(" ".join(f"{key} {v:.3f}" if isinstance(v, float) else f"{key} {v}" for key, v in row.items()), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "descriptor_whitening.json"), "w") as f:
        json.dump({"identities": args.ids, "per_identity": args.per_id, "rows": rows}, f, indent=1)
    keys = [k for k in rows[0] if k not in ("seed", "whiten")]
    print("| descriptor.whiten | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for k in dict.fromkeys(r["whiten"] for r in rows):
        mine = [r for r in rows if r["whiten"] == k]
        print(f"| {k or 'off (as fitted)'} | " + " | ".join(f"{np.mean([r[key] for r in mine]):.3f}" for key in keys) + " |")


if __name__ == "__main__":
    main()
