"""Backbones: training images/s of each encoder family at the demo's size, and HNCL's step
overhead over the two-view baseline on that encoder, both measured in the same run.

For each backbone, method_overhead.py's measurement (same model, batch, optimiser and data;
HNCL adds the descriptor, the lookup in a full queue, the neighbour terms and the enqueue) runs
with the two methods' steps alternating; images/s = batch / median step time (each image is two
views). The ratio HNCL / baseline is the overhead; the encoder's share of a step grows with its
size, so the overhead shrinks on bigger encoders.

    python benchmarks/backbones.py                   # CPU, 64 px, batch 64, Q = 65,536
    python benchmarks/backbones.py --device cuda --size 224 --batch 128 --precision bf16

Writes benchmarks/results/backbones.json.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import table, write  # noqa: E402

import method_overhead  # noqa: E402

# (model.arch, model.width): the demo's ResNet-18/16, then each family at its published width
BACKBONES = [("resnet18", 16), ("resnet18", 64), ("resnet50", 64), ("iresnet50", 64),
             ("timm/vit_small_patch16_224", 64), ("timm/convnext_tiny", 64)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", type=int, default=64, help="image size (the demo's: 64)")
    ap.add_argument("--batch", type=int, default=64, help="the demo's per-worker batch")
    ap.add_argument("--queue-size", type=int, default=65536)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--only", nargs="*", help="model.arch names to run (default: all)")
    args = ap.parse_args(argv)
    rows, results = [], {}
    for arch, width in BACKBONES:
        if args.only and arch not in args.only:
            continue
        tag = f"{arch.replace('/', '_')}_w{width}"
        r = method_overhead.main(["--device", args.device, "--arch", arch, "--width", str(width),
                                  "--size", str(args.size), "--batch", str(args.batch),
                                  "--queue-size", str(args.queue_size), "--precision", args.precision,
                                  "--rounds", str(args.rounds), "--per-round", "1", "--warmup", "1",
                                  "--profile-steps", "1", "--tag", f"backbone_{tag}", "--no-plot"])
        med = r["median_step_seconds"]
        ips = {k: args.batch / v for k, v in med.items()}
        results[tag] = {"arch": arch, "width": width, "median_step_seconds": med, "images_per_second": ips,
                        "hncl_over_baseline": med["hncl"] / med["baseline"]}
        name = arch if width == 64 or arch.startswith("timm/") else f"{arch} (width {width}, the demo's)"
        rows.append([name, round(ips["baseline"], 1), round(ips["hncl"], 1), round(med["hncl"] / med["baseline"], 3)])
    write("backbones", {"config": vars(args), "backbones": results})
    print(table(rows, ["backbone", "baseline images/s", "HNCL images/s", "HNCL step / baseline step"]))
    return results


if __name__ == "__main__":
    main()
