"""`hncl export`: a trained classifier as TorchScript, ONNX and safetensors, each checked
against PyTorch on a fresh batch (the ONNX model with onnxruntime, at a different batch size
than it was traced with, so the dynamic batch axis is checked too)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch

from hncl.core.classifier import load_classifier

TOLERANCE = 1e-4


def export(checkpoint: str, out_dir: str, seed: int = 0) -> dict:
    model, meta = load_classifier(checkpoint)
    size = meta["image_size"]
    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(2, 3, size, size, generator=gen)
    check = torch.randn(5, 3, size, size, generator=gen)
    with torch.no_grad():
        expected = model(check).numpy()

    ts_path = os.path.join(out_dir, "classifier.torchscript.pt")
    with torch.no_grad():
        torch.jit.trace(model, example).save(ts_path)
    ts_diff = float(np.abs(torch.jit.load(ts_path)(check).detach().numpy() - expected).max())

    import onnxruntime

    onnx_path = os.path.join(out_dir, "classifier.onnx")
    torch.onnx.export(model, (example,), onnx_path, input_names=["image"], output_names=["logits"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    onnx_diff = float(np.abs(session.run(None, {"image": check.numpy()})[0] - expected).max())

    src = os.path.dirname(checkpoint) if not os.path.isdir(checkpoint) else checkpoint
    for name in ("classifier.safetensors", "classifier.json"):
        if os.path.abspath(os.path.join(src, name)) != os.path.abspath(os.path.join(out_dir, name)):
            shutil.copy(os.path.join(src, name), os.path.join(out_dir, name))
    report = {"torchscript": ts_path, "onnx": onnx_path, "torchscript_max_abs_diff": ts_diff,
              "onnx_max_abs_diff": onnx_diff, "tolerance": TOLERANCE, "input": [None, 3, size, size],
              "classes": meta["classes"]}
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump(report, f, indent=1)
    bad = {k: v for k, v in report.items() if k.endswith("_diff") and v > TOLERANCE}
    if bad:
        raise RuntimeError(f"exported models disagree with PyTorch beyond {TOLERANCE}: {bad}")
    return report
