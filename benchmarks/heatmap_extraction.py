"""Heatmap extraction speed: faces/s of each make_shards backend.

  fan batched        hncl.heatmaps.extractors.FANHeatmaps: 2D-FAN-4 on batches of face crops
  fan per image      face-alignment's own FaceAlignment.get_landmarks_from_image loop, one call per
                     face, given the same face boxes (its detector is not timed), same network and
                     weights (random: timing only; no download), flip_input as configured
  dlib               hncl DlibHeatmaps (HOG detector + 68-point predictor, per face, CPU)
  landmarks          rendering given landmarks (synthetic faces, datasets that ship points)

    python benchmarks/heatmap_extraction.py [--device cpu|cuda] [--faces 32] [--batch 32]

Writes benchmarks/results/heatmap_extraction[_<device>].json and .png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
from typing import Dict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import median, table, write  # noqa: E402

from hncl.data.synthetic import SyntheticFaces  # noqa: E402
from hncl.heatmaps.extractors import DlibHeatmaps, FANHeatmaps, LandmarkHeatmaps  # noqa: E402


def face_alignment_per_image(net: torch.nn.Module, device: str, flip_input: bool):
    """face-alignment's FaceAlignment with our network object in place of its downloaded one
    (the constructor would download weights and a detector; everything it runs per face is its own)."""
    from face_alignment.api import FaceAlignment, LandmarksType
    from face_alignment.detection.core import REFERENCE_SCALE

    fa = FaceAlignment.__new__(FaceAlignment)
    fa.device, fa.flip_input, fa.landmarks_type, fa.verbose = device, flip_input, LandmarksType.TWO_D, False
    fa.dtype, fa.max_batch_size = torch.float32, 1
    fa.face_alignment_net = net
    fa.face_detector = types.SimpleNamespace(reference_scale=REFERENCE_SCALE)  # boxes are given
    return fa


def faces_per_s(fn, n: int, sync) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return n / (time.perf_counter() - t)


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--faces", type=int, default=32)
    ap.add_argument("--batch", type=int, default=None, help="FANHeatmaps chunk (default: its own, 32 on GPU, 1 on CPU)")
    ap.add_argument("--size", type=int, default=128, help="face crop size")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args(argv)
    from face_alignment.models.fan import FAN

    torch.manual_seed(0)
    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    net = FAN(4).eval().to(args.device, dtype)
    ds = SyntheticFaces(max(1, args.faces // 8), 8, size=args.size, seed=0)
    faces = [ds[i] for i in range(args.faces)]
    images = np.stack([f.image for f in faces])
    landmarks = np.stack([f.landmarks for f in faces])
    sync = (lambda: torch.cuda.synchronize()) if args.device.startswith("cuda") else (lambda: None)
    batched = FANHeatmaps(device=args.device, batch_size=args.batch, network=net)
    if dtype == torch.float16:
        batched.heatmaps = torch.autocast("cuda", dtype=torch.float16)(batched.heatmaps)
    box = [0, 0, args.size, args.size]
    per_image = {flip: face_alignment_per_image(net, args.device, flip) for flip in (False, True)}

    batched.extract(images[: min(4, args.faces)])  # warm-up (cuDNN autotune, allocator)
    for fa in per_image.values():
        loop_subset(fa, images[:1], box)
    loop_n = max(4, args.faces // 4)  # the per-image loop is slow on CPU: time a quarter
    # "fan batched": hncl FANHeatmaps, in chunks of batched.batch_size
    rates: Dict[str, list] = {"fan batched": [], "fan per image (face-alignment, flip_input=False)": [],
                              "fan per image (face-alignment, flip_input=True, its default)": []}
    for _ in range(args.rounds):
        rates["fan batched"].append(faces_per_s(lambda: batched.extract(images), args.faces, sync))
        for flip, name in ((False, "fan per image (face-alignment, flip_input=False)"),
                           (True, "fan per image (face-alignment, flip_input=True, its default)")):
            rates[name].append(faces_per_s(lambda fa=per_image[flip]: loop_subset(fa, images[:loop_n], box), loop_n, sync))
    med = {k: median(v) for k, v in rates.items()}
    dlib_images = images[: min(len(images), 32)]
    med["dlib (CPU, HOG detect + predictor)"] = faces_per_s(lambda: DlibHeatmaps(detect="auto").extract(dlib_images),
                                                            len(dlib_images), lambda: None)
    lm = LandmarkHeatmaps()
    med["landmarks (render given points)"] = faces_per_s(lambda: lm.extract(images, landmarks), args.faces, lambda: None)
    base = med["fan per image (face-alignment, flip_input=False)"]
    tag = ("cuda" if args.device.startswith("cuda") else "cpu") + (f"_{args.tag}" if args.tag else "")
    write(f"heatmap_extraction_{tag}", {"config": vars(args), "fan_chunk": batched.batch_size, "faces_per_s": med,
                                        "rounds": rates,
                                        "batched_vs_per_image": med["fan batched"] / base,
                                        "batched_vs_per_image_default_flip":
                                            med["fan batched"] / med["fan per image (face-alignment, flip_input=True, its default)"]})
    _plot(med, tag)
    print(table([[k, round(v, 1), round(v / base, 2)] for k, v in med.items()],
                ["backend", "faces/s", "x face-alignment per image (no flip)"]))
    return med


def loop_subset(fa, images, box) -> None:
    with torch.no_grad():
        for im in images:
            fa.get_landmarks_from_image(im, detected_faces=[box])


def _plot(med, tag) -> None:
    from hncl.evaluate.plots import plt

    fig, ax = plt.subplots(figsize=(7, 2.8))
    names = list(med)
    ax.barh(range(len(names)), [med[n] for n in names])
    ax.set_xscale("log")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel(f"faces/s ({tag})")
    fig.tight_layout()
    fig.savefig(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"heatmap_extraction_{tag}.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
