"""One prepared GPU run: the numbers docs/PERFORMANCE.md needs from a GPU, in a few minutes.

  1. method overhead: HNCL vs two-view baseline step (ResNet-18 @ 112 px, batch 256, Q=65,536, bf16)
  2. queue lookup on one GPU against Q (65k .. 1M entries), torch search
  4. heatmap extraction: batched FAN vs face-alignment's per-image loop (random weights)
  +  pretraining images/s: ResNet-18 @ 112 px and ResNet-50 @ 224 px, bf16 + channels_last,
     HNCL and the baseline

No network access needed (synthetic inputs, random weights). Every part is bounded and runs in
its own try block; a table is printed last and everything goes to
benchmarks/results/gpu_suite.json (plus each part's own JSON/PNG).

    python benchmarks/gpu_suite.py            # on a GPU machine: well under 10 minutes on an H100
    python benchmarks/gpu_suite.py --smoke    # tiny sizes on CPU: checks the script itself
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import heatmap_extraction  # noqa: E402
import method_overhead  # noqa: E402
from _common import machine, median, table, write  # noqa: E402

from hncl.core.queue import ShardedNeighborQueue  # noqa: E402


def queue_lookup(device: str, sizes: List[int], batch: int, rounds: int) -> Dict[str, float]:
    out = {}
    for q in sizes:
        queue = ShardedNeighborQueue(q, 128, 256, device=device)
        gen = torch.Generator().manual_seed(0)
        for start in range(0, q, 65536):
            m = min(65536, q - start)
            queue.enqueue(torch.randn(m, 256, generator=gen), torch.randn(m, 128, generator=gen), torch.arange(m) + start)
        desc = torch.randn(batch, 256, device=device)
        ids = torch.arange(batch, device=device) + 10**9
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        queue.lookup(desc, ids, 5)
        times = []
        for _ in range(rounds):
            sync()
            t = time.perf_counter()
            queue.lookup(desc, ids, 5)
            sync()
            times.append(time.perf_counter() - t)
        out[str(q)] = median(times) * 1000
        print(f"  queue lookup Q={q}: {out[str(q)]:.2f} ms for {batch} queries", flush=True)
        del queue
    return out


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (checks the script, numbers mean nothing)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        sys.exit("gpu_suite: no CUDA device visible (use --smoke to check the script on CPU)")
    dev = "cuda" if cuda else "cpu"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    common = ["--device", dev, "--no-plot"] + (["--precision", "bf16"] if cuda else [])
    big = not args.smoke
    parts = {
        "overhead_r18_112": lambda: method_overhead.main(common + (
            ["--width", "64", "--size", "112", "--batch", "256", "--proj-hidden", "2048", "--proj-out", "256",
             "--rounds", "10", "--per-round", "3", "--warmup", "5", "--tag", "gpu_r18_112"] if big else
            ["--width", "8", "--size", "32", "--batch", "8", "--queue-size", "1024", "--rounds", "1", "--per-round", "1",
             "--warmup", "1", "--profile-steps", "1", "--tag", "smoke"])),
        "overhead_r50_224": lambda: method_overhead.main(common + (
            ["--arch", "resnet50", "--width", "64", "--size", "224", "--batch", "128", "--proj-hidden", "2048",
             "--proj-out", "256", "--rounds", "6", "--per-round", "2", "--warmup", "3", "--profile-steps", "2",
             "--tag", "gpu_r50_224"] if big else
            ["--arch", "resnet50", "--width", "8", "--size", "32", "--batch", "4", "--queue-size", "1024",
             "--rounds", "1", "--per-round", "1", "--warmup", "1", "--profile-steps", "1", "--tag", "smoke50"])),
        "queue_lookup_ms": lambda: queue_lookup(dev, [65536, 262144, 1048576] if big else [4096], 256 if big else 16,
                                                20 if big else 2),
        "heatmap_extraction": lambda: heatmap_extraction.main(
            ["--device", dev] + (["--faces", "256", "--batch", "64", "--rounds", "2"] if big else
                                 ["--faces", "2", "--batch", "2", "--rounds", "1", "--size", "64", "--tag", "smoke"])),
    }
    results, errors = {}, {}
    t_all = time.time()
    for name, run in parts.items():
        t = time.time()
        print(f"[gpu_suite] {name} ...", flush=True)
        try:
            results[name] = run()
        except Exception:  # one broken part must not lose the others' numbers
            errors[name] = traceback.format_exc()
            print(errors[name], flush=True)
        print(f"[gpu_suite] {name}: {time.time() - t:.0f}s", flush=True)
    rows = []
    for key, label, batch in (("overhead_r18_112", "ResNet-18 @ 112 px", 256), ("overhead_r50_224", "ResNet-50 @ 224 px", 128)):
        r = results.get(key)
        if r:
            med = r["median_step_seconds"]
            b = r["config"]["batch"]
            rows.append([f"{label}: baseline images/s", round(b / med["baseline"], 1)])
            rows.append([f"{label}: HNCL images/s", round(b / med["hncl"], 1)])
            rows.append([f"{label}: HNCL overhead", f"{r['overhead'] * 100:+.1f}%"])
    for q, ms in (results.get("queue_lookup_ms") or {}).items():
        rows.append([f"queue lookup, Q={q}, {256 if big else 16} queries, k=5", f"{ms:.2f} ms"])
    ex = results.get("heatmap_extraction")
    if ex:
        base = ex["fan per image (face-alignment, flip_input=False)"]
        rows.append(["FAN batched faces/s", round(ex["fan batched"], 1)])
        rows.append(["FAN batched / face-alignment per image", f"{ex['fan batched'] / base:.1f}x"])
    write("gpu_suite" + ("_smoke" if args.smoke else ""),
          {"results": {k: v for k, v in results.items() if k == "queue_lookup_ms" or k == "heatmap_extraction"},
           "summary": rows, "errors": errors, "seconds": time.time() - t_all, "machine": machine()})
    print(table(rows, [f"GPU suite ({machine().get('gpu', 'CPU smoke run')})", "value"]))
    return {"results": results, "errors": errors}


if __name__ == "__main__":
    main()
