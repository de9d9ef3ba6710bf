"""`hncl predict`: expressions for an image or a folder of images, with a trained classifier.

Faces are centre-cropped to a square and resized (see hncl.core.classifier), or with --align dlib
aligned on eyes and nose exactly as make_shards does, after dlib has found a face. Every file
gets a row; unreadable files and images with no face have a status instead of an expression.
"""

from __future__ import annotations

import csv
import json
import os
from typing import List

import numpy as np
import torch

from hncl.core.classifier import load_classifier, preprocess
from hncl.data.sources import IMAGE_EXTENSIONS, SourceError, SourceItem, load_rgb
from hncl.errors import InputError
from hncl.heatmaps.detect import NO_FACE


def list_images(target: str) -> List[str]:
    if os.path.isdir(target):
        return sorted(os.path.join(r, f) for r, _, fs in os.walk(target) for f in fs
                      if f.lower().endswith(IMAGE_EXTENSIONS))
    if os.path.exists(target):
        return [target]
    raise InputError(f"no such file or folder: {target}")


OK = "ok"


def predict(checkpoint: str, target: str, align: str = "none", batch_size: int = 32) -> List[dict]:
    """One row per image file: {file, status, note, expression, confidence, probabilities}.
    status is "ok" for a classified face, else why it was not classified ("unreadable image:
    ...", and with align="dlib" "no face detected" or "cannot align: ..."): an image that holds
    no face gets no expression. note: e.g. "several faces (kept the largest)"."""
    model, meta = load_classifier(checkpoint)
    size, classes = meta["image_size"], meta["classes"]
    processor = None
    if align == "dlib":
        from hncl.data.shard_writer import FaceProcessor
        from hncl.heatmaps.extractors import DlibHeatmaps

        processor = FaceProcessor(DlibHeatmaps(detect="always"), image_size=size)
    elif align != "none":
        raise ValueError(f"--align must be none or dlib, got {align!r}")
    rows = []
    files = list_images(target)
    for start in range(0, len(files), batch_size):
        tensors, batch_rows = [], []
        for path in files[start:start + batch_size]:
            row = {"file": path, "status": OK, "note": None, "expression": None, "confidence": None,
                   "probabilities": None}
            rows.append(row)
            try:
                image = load_rgb(path)
            except SourceError as e:
                row["status"] = f"{e.reason} ({e.where.split('(', 1)[-1].rstrip(')')})"
                continue
            if processor is not None:
                face, = processor.process([SourceItem(0, image, None, None, None)])
                if face.reason is not None:
                    row["status"] = face.reason if face.reason == NO_FACE else f"cannot align ({face.reason})"
                    continue
                image, row["note"] = face.aligned, face.note
            tensors.append(preprocess(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None], size))
            batch_rows.append(row)
        if not tensors:
            continue
        with torch.no_grad():
            probs = model(torch.cat(tensors)).softmax(1).numpy()
        for row, p in zip(batch_rows, probs):
            row.update(expression=classes[int(p.argmax())], confidence=float(p.max()),
                       probabilities={c: round(float(v), 6) for c, v in zip(classes, p)})
    return rows


def write_rows(rows: List[dict], path: str) -> None:
    if path.endswith(".json"):
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
        return
    classes = next((list(r["probabilities"]) for r in rows if r["probabilities"]), [])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "status", "expression", "confidence", *classes, "note"])
        for r in rows:
            probs = r["probabilities"] or {}
            w.writerow([r["file"], r["status"], r["expression"] or "",
                        "" if r["confidence"] is None else f"{r['confidence']:.4f}",
                        *(f"{probs[c]:.4f}" if c in probs else "" for c in classes), r["note"] or ""])


def format_table(rows: List[dict]) -> str:
    if not rows:
        return "(no images)"
    width = max(len(os.path.basename(r["file"])) for r in rows)
    lines = [f"{'file':<{width}}  {'expression':<10}  confidence  status"]
    for r in rows:
        conf = "" if r["confidence"] is None else f"{r['confidence']:.3f}"
        status = r["status"] + (f"; {r['note']}" if r["note"] else "")
        lines.append(f"{os.path.basename(r['file']):<{width}}  {r['expression'] or '-':<10}  {conf:<10}  {status}")
    return "\n".join(lines)
