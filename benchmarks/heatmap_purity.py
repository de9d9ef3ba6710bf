"""Heatmap-neighbour purity on synthetic faces: the number the whole method rests on.

For faces of held-out identities, the fraction of each face's nearest neighbours (cosine, self
excluded) that share its expression label, for heatmap descriptors (full 68 vs inner 51 points,
several R and Dh; PCA fitted on the train identities) next to chance and raw-pixel neighbours.

    python benchmarks/heatmap_purity.py [--train-ids 150 --test-ids 60 --per-id 14 --out benchmarks/results]

Writes heatmap_purity.json and heatmap_purity.png; the table is copied into docs/HEATMAPS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from hncl.data.synthetic import EXPRESSIONS, SyntheticFaces
from hncl.heatmaps.align import align_faces
from hncl.heatmaps.descriptor import HeatmapDescriptor, flatten_heatmaps
from hncl.heatmaps.extractors import DlibHeatmaps
from hncl.heatmaps.render import pool_heatmaps, render_heatmaps


def purity(features: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    x = F.normalize(features.float(), dim=1)
    sim = x @ x.T
    sim.fill_diagonal_(float("-inf"))
    nn = sim.topk(k, dim=1).indices
    return float((labels[nn] == labels.unsqueeze(1)).float().mean())


def faces_arrays(ds):
    faces = list(ds)
    return (np.stack([f.image for f in faces]), np.stack([f.landmarks for f in faces]),
            torch.tensor([f.label for f in faces]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-ids", type=int, default=150)
    ap.add_argument("--test-ids", type=int, default=60)
    ap.add_argument("--per-id", type=int, default=14)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-dlib", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    t0 = time.time()
    tr_img, tr_pts, _ = faces_arrays(SyntheticFaces(args.train_ids, args.per_id, args.size, args.seed, "train"))
    te_img, te_pts, te_lab = faces_arrays(SyntheticFaces(args.test_ids, args.per_id, args.size, args.seed, "test"))
    raw_te_img = te_img
    raw_p_tr = pool_heatmaps(render_heatmaps(torch.from_numpy(tr_pts), args.size), 16)
    raw_p_te = pool_heatmaps(render_heatmaps(torch.from_numpy(te_pts), args.size), 16)
    # what make_shards stores: faces aligned on eyes + nose, heatmaps of the aligned faces
    tr_img, tr_pts, _ = align_faces(tr_img, tr_pts, args.size)
    te_img, te_pts, _ = align_faces(te_img, te_pts, args.size)
    hm_tr = render_heatmaps(torch.from_numpy(tr_pts), args.size)
    hm_te = render_heatmaps(torch.from_numpy(te_pts), args.size)
    print(f"{len(tr_img)} train / {len(te_img)} test faces in {time.time() - t0:.1f}s")

    rows = []

    def add(name, feats):
        row = {"features": name, "k1": purity(feats, te_lab, 1), "k5": purity(feats, te_lab, 5)}
        rows.append(row)
        print(f"{name:45s} k=1 {row['k1']:.3f}  k=5 {row['k5']:.3f}")

    counts = torch.bincount(te_lab, minlength=len(EXPRESSIONS)).float()
    chance = float(((counts / counts.sum()) ** 2).sum())
    rows.append({"features": "chance (label frequencies)", "k1": chance, "k5": chance})
    for name, imgs in (("unaligned", raw_te_img), ("aligned", te_img)):
        add(f"raw pixels 32x32 RGB, {name}", F.interpolate(torch.from_numpy(imgs).permute(0, 3, 1, 2).float(),
                                                           size=32, mode="area").flatten(1))
    desc = HeatmapDescriptor.fit(raw_p_tr, dim=256, inner_only=True, seed=args.seed)
    add("heatmap R=16 inner 51, PCA Dh=256, UNALIGNED", desc(raw_p_te))
    for res in (8, 16, 32):
        p_tr, p_te = pool_heatmaps(hm_tr, res), pool_heatmaps(hm_te, res)
        for inner in (False, True):
            pts = "inner 51" if inner else "all 68"
            add(f"heatmap R={res} {pts}, no PCA, aligned", flatten_heatmaps(p_te, inner))
            for dim in (64, 256):
                desc = HeatmapDescriptor.fit(p_tr, dim=dim, inner_only=inner, seed=args.seed)
                add(f"heatmap R={res} {pts}, PCA Dh={dim}, aligned", desc(p_te))
    if not args.no_dlib:
        t = time.time()
        ext = DlibHeatmaps(detect="never")
        d_tr = ext.extract(tr_img)
        d_te = ext.extract(te_img)
        err = (d_te.landmarks - torch.from_numpy(te_pts)).norm(dim=-1).mean().item()
        print(f"dlib on synthetic faces: mean point error {err:.2f} px ({time.time() - t:.1f}s)")
        desc = HeatmapDescriptor.fit(pool_heatmaps(d_tr.heatmaps, 16), dim=256, inner_only=True)
        add("dlib-extracted heatmap R=16 inner 51, PCA Dh=256, aligned", desc(pool_heatmaps(d_te.heatmaps, 16)))
        rows[-1]["dlib_mean_point_error_px"] = err

    result = {"train_faces": len(tr_img), "test_faces": len(te_img), "test_identities": args.test_ids,
              "image_size": args.size, "seed": args.seed, "rows": rows}
    with open(os.path.join(args.out, "heatmap_purity.json"), "w") as f:
        json.dump(result, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1))
    names = [r["features"] for r in rows]
    ax.barh(range(len(rows)), [r["k1"] for r in rows], color="tab:blue", label="k=1")
    ax.barh(range(len(rows)), [r["k5"] for r in rows], color="tab:orange", alpha=0.5, label="k=5")
    ax.set_yticks(range(len(rows)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("neighbour expression purity (held-out identities)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "heatmap_purity.png"), dpi=110)
    print("| features | purity k=1 | purity k=5 |\n|---|---|---|")
    for r in rows:
        print(f"| {r['features']} | {r['k1']:.3f} | {r['k5']:.3f} |")


if __name__ == "__main__":
    main()
