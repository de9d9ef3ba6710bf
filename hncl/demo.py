"""`hncl demo` (preview): the end-to-end path that exists today, on synthetic faces, in one process.

synthetic faces -> alignment -> landmark heatmaps -> descriptor (PCA) -> HNCL training steps
(model + heatmap-neighbour queue + loss) -> report. It shows the two numbers HNCL rests on:
how often heatmap neighbours share the expression (held-out identities) and how pure the
positives the queue hands to the loss are while training. The full demo (Ray, shards, two
baselines, linear probe and kNN) replaces this with the demo issue (#8).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from hncl.data.augment import TwoViews
from hncl.data.synthetic import EXPRESSIONS, SyntheticFaces, contact_sheet
from hncl.heatmaps.align import align_faces
from hncl.heatmaps.descriptor import HeatmapDescriptor
from hncl.heatmaps.extractors import LandmarkHeatmaps
from hncl.heatmaps.render import pool_heatmaps
from hncl.loss import HNCLLoss
from hncl.method import HNCL
from hncl.model import HNCLModel
from hncl.queue import ShardedNeighborQueue


def _faces(split: str, ids: int, per_id: int, seed: int, size: int = 112):
    ds = SyntheticFaces(ids, per_id, size=size, seed=seed, split=split)
    faces = list(ds)
    imgs, pts = np.stack([f.image for f in faces]), np.stack([f.landmarks for f in faces])
    aligned, apts, _ = align_faces(imgs, pts, size)
    pooled = pool_heatmaps(LandmarkHeatmaps().extract(aligned, apts).heatmaps, 16)
    labels = torch.tensor([f.label for f in faces])
    sample_ids = torch.tensor([ds.sample_id(i) for i in range(len(ds))])
    return faces, aligned, apts, pooled, labels, sample_ids


def _purity(features: torch.Tensor, labels: torch.Tensor) -> float:
    x = torch.nn.functional.normalize(features.float().flatten(1), dim=1)
    sim = x @ x.T
    sim.fill_diagonal_(float("-inf"))
    return float((labels[sim.argmax(1)] == labels).float().mean())


def run_preview(out_dir: str, seed: int = 0, steps: int = 60, quick: bool = False, log=print) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    t0 = time.time()
    n_train, n_test, per_id = (24, 10, 14) if quick else (60, 20, 14)
    steps = min(steps, 20) if quick else steps
    faces, tr_img, tr_pts, tr_pooled, tr_labels, tr_ids = _faces("train", n_train, per_id, seed)
    _, te_img, _, te_pooled, te_labels, _ = _faces("test", n_test, per_id, seed)
    log(f"[1/4] {len(tr_img)} train and {len(te_img)} test faces (disjoint identities), aligned, with "
        f"heatmaps: {time.time() - t0:.1f}s")
    sheet = os.path.join(out_dir, "faces.png")
    for f, img, p in zip(faces, tr_img, tr_pts):
        f.image, f.landmarks = img, p
    contact_sheet(faces[:32], sheet)

    desc = HeatmapDescriptor.fit(tr_pooled, dim=64, inner_only=True, seed=seed)
    desc.save(os.path.join(out_dir, "descriptor.npz"))
    purity = {"chance": float(((torch.bincount(te_labels) / len(te_labels)) ** 2).sum()),
              "raw_pixels": _purity(torch.from_numpy(te_img), te_labels),
              "heatmap_descriptor": _purity(desc(te_pooled), te_labels)}
    log(f"[2/4] nearest-neighbour expression purity on held-out identities: heatmap descriptor "
        f"{purity['heatmap_descriptor']:.3f}, raw pixels {purity['raw_pixels']:.3f}, chance {purity['chance']:.3f}")

    size, batch = 64, 64
    images = torch.nn.functional.interpolate(torch.from_numpy(tr_img).permute(0, 3, 1, 2).float(), size=size,
                                             mode="area").round().to(torch.uint8)
    model = HNCLModel("resnet18", width=16, stem="imagenet", proj_hidden=256, proj_out=64, pred_hidden=256)
    queue = ShardedNeighborQueue(512, 64, desc.dim, nn_space="heatmap")
    hncl = HNCL(model, queue, HNCLLoss(temperature=0.2), topk=1, descriptor=desc)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-5)
    views = TwoViews(size)
    gen = torch.Generator().manual_seed(seed)
    log(f"[3/4] HNCL training, one process: ResNet-18/16 at {size}px, batch {batch}, queue {queue.capacity}")
    history = []
    with open(os.path.join(out_dir, "metrics.jsonl"), "w") as f:
        for step in range(1, steps + 1):
            idx = torch.randperm(len(images), generator=gen)[:batch]
            x1, x2 = views(images[idx])
            loss, m = hncl.training_step({"x1": x1, "x2": x2, "id": tr_ids[idx], "label": tr_labels[idx],
                                          "heatmap": tr_pooled[idx]})
            opt.zero_grad()
            loss.backward()
            opt.step()
            m["step"] = step
            history.append(m)
            f.write(json.dumps(m) + "\n")
            if step % 10 == 0 or step == steps:
                log(f"  step {step:3d}  loss {m['loss']:.3f}  (view {m['loss_view']:.3f}, neighbour "
                    f"{m['loss_nn']:.3f})  queue {m['queue_fill']:.0%}  positive purity {m['nn_purity']:.2f}")
    tail = [h for h in history[len(history) // 2:] if not np.isnan(h["nn_purity"])]
    summary = {
        "purity": purity,
        "training": {"steps": steps, "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
                     "positive_purity": float(np.mean([h["nn_purity"] for h in tail])) if tail else None},
        "seconds": time.time() - t0, "classes": list(EXPRESSIONS),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(f"[4/4] wrote {sheet}, metrics.jsonl, summary.json to {out_dir} in {summary['seconds']:.0f}s")
    log("      (preview: the full demo with Ray, shards and baselines lands with issue #8)")
    return summary
