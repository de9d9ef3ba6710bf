"""Method overhead: one HNCL training step against the two-view baseline's, same everything else.

Same model, batch, data and optimiser; HNCL adds the heatmap descriptor, the neighbour lookup in
a full queue of Q entries (default 65,536), the neighbour loss term and the enqueue. Whole steps
(forward, loss, backward, SGD) are timed alternately for `--rounds` rounds; then one profiled
pass splits each step into its parts (torch.profiler ranges named hncl/* in hncl/methods, plus
backward, optimiser and the collectives inside lookup and loss).

    python benchmarks/method_overhead.py                        # CPU, W=1, ResNet-18/16 @ 64 px
    python benchmarks/method_overhead.py --world 2              # 2 gloo processes
    python benchmarks/method_overhead.py --device cuda --width 64 --size 112 --batch 256 --precision bf16

Writes benchmarks/results/method_overhead[_<tag>].json and .png.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Dict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import interleaved, median, table, write  # noqa: E402

from hncl.config import load_config  # noqa: E402
from hncl.core import dist as hdist  # noqa: E402
from hncl.core.dist import spawn_gloo  # noqa: E402
from hncl.core.methods import build_method  # noqa: E402
from hncl.core.model import HNCLModel  # noqa: E402
from hncl.heatmaps.descriptor import HeatmapDescriptor  # noqa: E402
from hncl.heatmaps.render import INNER_POINTS  # noqa: E402

PARTS = ("hncl/model_forward", "hncl/descriptor", "hncl/queue_lookup", "hncl/loss", "hncl/neighbour_metrics",
         "hncl/queue_enqueue", "hncl/backward", "hncl/optimizer")
COLLECTIVE_MARKS = ("gloo:", "nccl:", "c10d::", "all_gather", "allgather", "all_to_all", "alltoall", "allreduce")


def random_descriptor(dim: int, resolution: int = 16, seed: int = 0) -> HeatmapDescriptor:
    """A descriptor with the real shape (inner 51 points x R x R -> dim): random orthonormal
    components cost exactly what fitted ones do."""
    d = len(INNER_POINTS) * resolution * resolution
    comp, _ = torch.linalg.qr(torch.randn(d, dim, generator=torch.Generator().manual_seed(seed)))
    return HeatmapDescriptor(torch.zeros(d), comp.contiguous(), resolution, True)


class CommCounter:
    """Bytes this rank sends per collective, attributed to the hncl function that issued it
    (torch.distributed's Python collectives are wrapped while active; DDP's gradient all-reduce
    runs in C++ and is counted separately from the parameter sizes)."""

    NAMES = ("all_gather", "all_reduce", "all_to_all_single")

    def __init__(self):
        self.bytes: Dict[str, int] = {}
        self.calls: Dict[str, int] = {}

    def _where(self) -> str:
        import inspect

        for frame in inspect.stack()[2:]:
            path = frame.filename.replace(os.sep, "/")
            if "/hncl/" in path and not path.endswith("hncl/core/dist.py"):
                return f"{os.path.basename(path)[:-3]}.{frame.function}"
            if path.endswith("hncl/core/dist.py") and frame.function == "backward":
                return "dist.all_gather_with_grad.backward"
        return "other"

    def __enter__(self):
        import torch.distributed as dist

        self._orig = {n: getattr(dist, n) for n in self.NAMES}

        def wrap(name, fn):
            def counted(*a, **kw):
                tensor = a[1] if name in ("all_gather", "all_to_all_single") else a[0]
                key = f"{name} <- {self._where()}"
                self.bytes[key] = self.bytes.get(key, 0) + tensor.numel() * tensor.element_size()
                self.calls[key] = self.calls.get(key, 0) + 1
                return fn(*a, **kw)
            return counted

        for n, fn in self._orig.items():
            setattr(dist, n, wrap(n, fn))
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for n, fn in self._orig.items():
            setattr(dist, n, fn)


def measure(args: argparse.Namespace) -> Dict:
    """Runs on every rank; returns this rank's timings (seconds per step) and breakdown."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    torch.manual_seed(hdist.rank())
    model = HNCLModel(args.arch, args.width, args.stem, proj_hidden=args.proj_hidden, proj_out=args.proj_out,
                      pred_hidden=args.proj_hidden, image_size=args.size).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if hdist.is_distributed():
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16"
                else contextlib.nullcontext)
    descriptor = random_descriptor(args.desc_dim).to(device)
    settings = {"method.temperature": 0.2, "model.proj_out": args.proj_out, "descriptor.dim": args.desc_dim,
                "dist.num_workers": hdist.world_size()}
    own = {"simclr": {}, "hncl": {"method.queue_size": args.queue_size, "method.topk": args.topk,
                                  "method.batch_neighbours": args.batch_neighbours}}
    methods = {name: build_method(load_config(None, [f"{k}={v}" for k, v in {**settings, **own[m], "method.name": m}.items()]),
                                  model, device, descriptor=descriptor, autocast=autocast)
               for name, m in (("baseline", "simclr"), ("hncl", "hncl"))}
    queue = methods["hncl"].queue
    gen = torch.Generator().manual_seed(100 + hdist.rank())
    slots = queue.slots
    queue.enqueue(torch.randn(slots, args.desc_dim, generator=gen), torch.randn(slots, args.proj_out, generator=gen),
                  torch.arange(slots) + 10**9 + hdist.rank() * slots)  # a full queue, as in steady state
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    b, s = args.batch, args.size
    x = torch.rand(b, 3, s, s, generator=gen).to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    # distinct heatmaps and fresh sample ids every step, as from a large dataset: reusing one
    # batch would fill the queue with copies of the same keys (exact ties in every search)
    heatmaps = [torch.randint(0, 256, (b, 68, 16, 16), dtype=torch.uint8, generator=gen).to(device)
                for _ in range(args.pool)]
    counter = {"step": 0}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def next_batch() -> Dict[str, torch.Tensor]:
        i = counter["step"]
        counter["step"] += 1
        ids = torch.arange(b, device=device) + (i * hdist.world_size() + hdist.rank()) * b
        return {"x1": x, "x2": x.flip(-1), "id": ids, "heatmap": heatmaps[i % args.pool]}

    def step(method):
        batch = next_batch()
        opt.zero_grad(set_to_none=True)
        out, _ = method.training_step(batch)
        with record_function("hncl/backward"):
            out.backward()
        with record_function("hncl/optimizer"):
            opt.step()

    for _ in range(args.warmup):
        for m in methods.values():
            step(m)
    times = interleaved({k: (lambda m=m: step(m)) for k, m in methods.items()}, args.rounds, args.per_round, sync)
    breakdown = {}
    for name, m in methods.items():
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
            for _ in range(args.profile_steps):
                step(m)
            sync()
        breakdown[name] = _parts(prof, args.profile_steps, device.type == "cuda")
    comm = {}
    if hdist.is_distributed():
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        for name, m in methods.items():
            with CommCounter() as comm_counter:
                for _ in range(args.profile_steps):
                    step(m)
            comm[name] = {"bytes_per_step": {k: v / args.profile_steps for k, v in comm_counter.bytes.items()},
                          "calls_per_step": {k: v / args.profile_steps for k, v in comm_counter.calls.items()},
                          "ddp_gradient_allreduce_bytes_per_step": grad_bytes}
    return {"times": times, "breakdown": breakdown, "comm": comm}


def _parts(prof, steps: int, cuda: bool) -> Dict[str, float]:
    """Milliseconds per step in each named range (wall time of the range on the host; on GPU
    the device time of the kernels launched inside it is reported by the GPU suite's totals)."""
    out = {p.split("/")[1]: 0.0 for p in PARTS}
    out["collectives"] = 0.0
    for e in prof.key_averages():
        if e.key in PARTS:
            out[e.key.split("/")[1]] += e.cpu_time_total / 1000 / steps
        elif any(mark in e.key for mark in COLLECTIVE_MARKS) and "record_param_comms" not in e.key:
            out["collectives"] += e.cpu_time_total / 1000 / steps
    return out


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--world", type=int, default=1, help="gloo processes (CPU only)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / world)")
    ap.add_argument("--arch", default="resnet18", help="model.arch: resnet18/50, iresnet18/50, timm/NAME")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--stem", default="imagenet")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64, help="per process")
    ap.add_argument("--proj-hidden", type=int, default=512)
    ap.add_argument("--proj-out", type=int, default=128)
    ap.add_argument("--queue-size", type=int, default=65536)
    ap.add_argument("--desc-dim", type=int, default=64, help="descriptor.dim (default config: 64)")
    ap.add_argument("--pool", type=int, default=64, help="distinct heatmap batches cycled through")
    ap.add_argument("--topk", type=int, default=1)
    ap.add_argument("--batch-neighbours", type=int, default=5)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--per-round", type=int, default=2)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.world)
    if args.world > 1:
        per_rank = spawn_gloo(measure, args.world, args, threads=threads)
    else:
        torch.set_num_threads(threads)
        per_rank = [measure(args)]
    # a step is as slow as its slowest rank
    steps = {k: [max(r["times"][k][i] for r in per_rank) for i in range(len(per_rank[0]["times"][k]))]
             for k in ("baseline", "hncl")}
    med = {k: median(v) for k, v in steps.items()}
    overhead = med["hncl"] / med["baseline"] - 1
    parts = per_rank[0]["breakdown"]
    rows = [[p, round(parts["baseline"][p], 2), round(parts["hncl"][p], 2)] for p in parts["hncl"]]
    rows.append(["whole step (median, timed without profiler)", round(med["baseline"] * 1000, 2),
                 round(med["hncl"] * 1000, 2)])
    name = "method_overhead" + (f"_{args.tag}" if args.tag else "")
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("tag", "no_plot")}, "threads": threads,
              "step_seconds": steps, "median_step_seconds": med, "overhead": overhead,
              "breakdown_ms_per_step_rank0": parts, "comm_rank0": per_rank[0]["comm"]}
    write(name, result)
    if not args.no_plot:
        _plot(parts, med, overhead, args, name)
    print(table(rows, ["part (ms per step, rank 0)", "baseline", "HNCL"]))
    for name, c in per_rank[0]["comm"].items():
        print(table([[k, int(v), c["calls_per_step"][k]] for k, v in sorted(c["bytes_per_step"].items())]
                    + [["DDP gradient all-reduce (C++)", c["ddp_gradient_allreduce_bytes_per_step"], "buckets"]],
                    [f"{name}: collective <- caller", "bytes sent per step (rank 0)", "calls"]))
    print(f"HNCL step / baseline step = {med['hncl'] / med['baseline']:.3f}  (overhead {overhead * 100:+.1f}%, "
          f"Q={args.queue_size}, W={args.world}, {args.device})")
    return result


def _plot(parts, med, overhead, args, name) -> None:
    from hncl.evaluate.plots import plt

    keys = [k for k in parts["hncl"] if k != "collectives" and (parts["hncl"][k] > 0 or parts["baseline"][k] > 0)]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, method in enumerate(("baseline", "hncl")):
        left = 0.0
        for j, k in enumerate(keys):
            v = parts[method][k]
            ax.barh(i, v, left=left, color=plt.cm.tab10(j), label=k if i == 1 else None)
            left += v
    ax.set_yticks([0, 1], ["baseline", "HNCL"])
    ax.set_xlabel("ms per training step (profiled, rank 0)")
    ax.set_title(f"HNCL overhead {overhead * 100:+.1f}% (median whole step), Q={args.queue_size}, "
                 f"W={args.world}, {args.device}")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    fig.savefig(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
