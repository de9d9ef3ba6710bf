"""Frozen features and predictions of a labelled shard set, in one exact pass (every sample
once, in the set's order): what the linear probe, kNN, reports and diagnostics are computed on."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from hncl.core.classifier import FERClassifier, preprocess
from hncl.data.shards import ShardSet, eval_pipeline, loader


@torch.no_grad()
def extract(shards: ShardSet, encoder: Optional[torch.nn.Module], image_size: int, device, batch_size: int = 128,
            keep_images: int = 0, workers: int = 2) -> Dict[str, np.ndarray]:
    """One exact pass: encoder features, labels, ids, heatmaps (and the first `keep_images` faces)."""
    out: Dict[str, list] = {"feats": [], "label": [], "id": [], "heatmap": [], "images": []}
    kept = 0
    if encoder is not None:
        encoder.eval()
    for batch in loader(eval_pipeline(shards, batch_size), num_workers=workers):
        if encoder is not None:
            out["feats"].append(encoder(preprocess(batch["image"].to(device), image_size)).float().cpu())
        out["label"].append(batch["label"])
        out["id"].append(batch["id"])
        out["heatmap"].append(batch["heatmap"])
        if kept < keep_images:
            imgs = batch["image"][: keep_images - kept].permute(0, 2, 3, 1)
            out["images"].append(imgs)
            kept += len(imgs)
    return {k: torch.cat(v).numpy() for k, v in out.items() if v}


@torch.no_grad()
def predict_set(model: FERClassifier, shards: ShardSet, image_size: int, device, workers: int = 2) -> Dict[str, np.ndarray]:
    model.eval()
    preds, labels, probs = [], [], []
    for batch in loader(eval_pipeline(shards, 128), num_workers=workers):
        logits = model(preprocess(batch["image"].to(device), image_size))
        probs.append(logits.softmax(1).cpu())
        preds.append(logits.argmax(1).cpu())
        labels.append(batch["label"])
    return {"pred": torch.cat(preds).numpy(), "label": torch.cat(labels).numpy(), "prob": torch.cat(probs).numpy()}
