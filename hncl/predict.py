"""`hncl predict`: expressions for an image or a folder of images, with a trained classifier.

Faces are centre-cropped to a square and resized (see hncl.classifier), or with --align dlib
aligned on eyes and nose exactly as make_shards does. Unreadable files and faces that cannot be
aligned are reported and skipped.
"""

from __future__ import annotations

import csv
import json
import os
from typing import List, Tuple

import numpy as np
import torch

from hncl.classifier import load_classifier, preprocess
from hncl.data.sources import IMAGE_EXTENSIONS, SourceError, SourceItem, load_rgb


def list_images(target: str) -> List[str]:
    if os.path.isdir(target):
        return sorted(os.path.join(r, f) for r, _, fs in os.walk(target) for f in fs
                      if f.lower().endswith(IMAGE_EXTENSIONS))
    if os.path.exists(target):
        return [target]
    raise FileNotFoundError(f"no such file or folder: {target}")


def predict(checkpoint: str, target: str, align: str = "none", batch_size: int = 32) -> Tuple[List[dict], List[str]]:
    """-> (rows {file, expression, confidence, probabilities}, problems 'file: reason')."""
    model, meta = load_classifier(checkpoint)
    size, classes = meta["image_size"], meta["classes"]
    processor = None
    if align == "dlib":
        from hncl.data.shard_writer import FaceProcessor
        from hncl.heatmaps.extractors import DlibHeatmaps

        processor = FaceProcessor(DlibHeatmaps(detect="auto"), image_size=size)
    elif align != "none":
        raise ValueError(f"--align must be none or dlib, got {align!r}")
    rows, problems = [], []
    files = list_images(target)
    for start in range(0, len(files), batch_size):
        tensors, names = [], []
        for path in files[start:start + batch_size]:
            try:
                image = load_rgb(path)
            except SourceError as e:
                problems.append(f"{path}: {e.reason} ({e.where.split('(', 1)[-1].rstrip(')')})")
                continue
            if processor is not None:
                (result, reason), = processor.process([SourceItem(0, image, None, None, None)])
                if result is None:
                    problems.append(f"{path}: cannot align ({reason})")
                    continue
                image = result[0]
            tensors.append(preprocess(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None], size))
            names.append(path)
        if not tensors:
            continue
        with torch.no_grad():
            probs = model(torch.cat(tensors)).softmax(1).numpy()
        for name, p in zip(names, probs):
            rows.append({"file": name, "expression": classes[int(p.argmax())], "confidence": float(p.max()),
                         "probabilities": {c: round(float(v), 6) for c, v in zip(classes, p)}})
    return rows, problems


def write_rows(rows: List[dict], path: str) -> None:
    if path.endswith(".json"):
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
        return
    classes = list(rows[0]["probabilities"]) if rows else []
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "expression", "confidence", *classes])
        for r in rows:
            w.writerow([r["file"], r["expression"], f"{r['confidence']:.4f}",
                        *(f"{r['probabilities'][c]:.4f}" for c in classes)])


def format_table(rows: List[dict]) -> str:
    if not rows:
        return "(no predictions)"
    width = max(len(os.path.basename(r["file"])) for r in rows)
    lines = [f"{'file':<{width}}  {'expression':<10}  confidence"]
    lines += [f"{os.path.basename(r['file']):<{width}}  {r['expression']:<10}  {r['confidence']:.3f}" for r in rows]
    return "\n".join(lines)
