"""The demo end to end on v1 shards and on v2 shards, same seed: are its numbers the same?

`hncl demo` builds its shard sets with make_shards; here it runs twice, once with the sets in
format v1 and once in v2 (the default), and compares every number the two runs report
(report.json: probe and kNN accuracy, macro-F1, neighbour purities) and every logged training
value (each method's metrics.jsonl: losses, neighbour scores, purities, step by step), except
times and throughput.

    python benchmarks/demo_formats.py [--quick] [--debug] [--seed 0] [--out /tmp/demo-formats]

Ray mode starts a Ray instance of its own (address="local"), never attaching to another one on
the machine. Writes benchmarks/results/demo_formats.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write  # noqa: E402

from hncl.commands.demo import METHODS, run_demo  # noqa: E402
import hncl.data.make_shards as make_shards_module  # noqa: E402

TIMING = ("time", "seconds", "images_per_s", "samples_per_s", "throughput", "wall", "elapsed")


def _numbers(obj, prefix="") -> Dict[str, object]:
    """Flatten to path -> value, dropping anything about time."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not any(t in str(k) for t in TIMING):
                out.update(_numbers(v, f"{prefix}{k}."))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(_numbers(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = obj
    return out


def run(out: str, version: int, args) -> Dict[str, object]:
    real = make_shards_module.make_shards

    def with_format(job, *a, **kw):
        return real(dataclasses.replace(job, format_version=version), *a, **kw)

    make_shards_module.make_shards = with_format  # hncl.commands.demo imports it at call time
    try:
        t = time.time()
        run_demo(out, seed=args.seed, quick=args.quick, debug=args.debug, log=lambda m: print(f"  [v{version}] {m}",
                                                                                             flush=True))
        print(f"  [v{version}] {time.time() - t:.0f} s", flush=True)
    finally:
        make_shards_module.make_shards = real
    formats = {split: json.load(open(os.path.join(out, "shards", split, "manifest.json")))["format"]
               for split in ("train", "test")}
    assert set(formats.values()) == {f"hncl-shards/{version}"}, formats
    numbers = _numbers(json.load(open(os.path.join(out, "report.json"))))
    for name in METHODS:
        with open(os.path.join(out, "runs", name, "metrics.jsonl")) as f:
            rows: List[dict] = [json.loads(line) for line in f]
        numbers.update(_numbers(rows, f"{name}.metrics."))
    return numbers


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/demo-formats")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--debug", action="store_true", help="one process, no Ray")
    args = ap.parse_args(argv)
    if not args.debug:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    got = {v: run(os.path.join(args.out, f"v{v}"), v, args) for v in (1, 2)}
    keys = sorted(set(got[1]) | set(got[2]))
    differ = {k: [got[1].get(k), got[2].get(k)] for k in keys if got[1].get(k) != got[2].get(k)}
    report = {name: {k: got[2].get(f"{name}.{k}") for k in ("linear_acc", "knn_acc", "neighbour_purity",
                                                             "batch_neighbour_purity", "embedding_purity")}
              for name in METHODS}
    write("demo_formats", {"config": vars(args), "numbers_compared": len(keys), "differ": differ, "report_v2": report})
    print(f"{len(keys)} numbers compared (report.json + every metrics.jsonl row, times excluded): "
          f"{'all identical' if not differ else f'{len(differ)} differ'}")
    for k, (a, b) in list(differ.items())[:20]:
        print(f"  {k}: v1 {a}  v2 {b}")
    print(json.dumps(report, indent=1))
    return differ


if __name__ == "__main__":
    main()
