"""Synthetic face rendering speed on one core (faces/s), for 112 and 128 px faces.

    python benchmarks/synthetic_speed.py [--n 600]

Writes benchmarks/results/synthetic_speed.json. Rendering is PIL + NumPy in one thread.
"""

import argparse
import json
import os
import time

from hncl.data.synthetic import SyntheticFaces


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    result = {}
    for size in (112, 128):
        ds = SyntheticFaces(args.n // 10, 10, size=size, seed=0)
        ds[0]  # warm-up
        t = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        result[f"faces_per_s_{size}px"] = len(ds) / (time.perf_counter() - t)
        print(f"{size}px: {result[f'faces_per_s_{size}px']:.0f} faces/s (one core)")
    with open(os.path.join(args.out, "synthetic_speed.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
