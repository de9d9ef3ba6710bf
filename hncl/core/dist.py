"""torch.distributed helpers that also work in a single plain process (world size 1).

Batches may differ in size across ranks (the last batch of an evaluation pass, say), so the
gathers exchange sizes first and pad; in the common equal-size case that costs one tiny extra
collective.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import socket
import sys
import tempfile
from typing import Any, Callable, List, Tuple

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count at n for the block, then back to what it was: library
    calls (make_shards, a debug training run) must not change the caller's process for good."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def local_process_group(backend: str, env: dict):
    """A process group for this process when none exists (torchrun/Ray made none), with the
    torch.distributed variables in `env` set only where missing; on exit the group is destroyed
    and the variables restored, so an in-process run leaves no trace in its caller."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if k not in os.environ})
    created = not dist.is_initialized()
    try:
        if created:
            dist.init_process_group(backend)
        yield
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gather_sizes(n: int, device: torch.device) -> List[int]:
    """Every rank's local row count, in rank order."""
    if not is_distributed():
        return [n]
    local = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(out, local)
    return [int(t.item()) for t in out]


def _all_gather_padded(x: torch.Tensor, sizes: List[int]) -> torch.Tensor:
    """Concatenate every rank's ``x`` (rows may differ per rank, given by ``sizes``)."""
    biggest = max(sizes)
    if x.shape[0] < biggest:
        pad = x.new_zeros((biggest - x.shape[0],) + tuple(x.shape[1:]))
        x = torch.cat([x, pad])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def all_gather_rows(x: torch.Tensor, sizes: List[int] | None = None) -> torch.Tensor:
    """All-gather along dim 0 without gradient. Identity in a single process."""
    if not is_distributed():
        return x
    sizes = sizes if sizes is not None else gather_sizes(x.shape[0], x.device)
    return _all_gather_padded(x.detach(), sizes)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for our rows and returns only them.

    Each rank's loss uses all ranks' rows (as negatives), so the gradient of the total loss
    w.r.t. our rows is the sum over ranks: an all-reduce, then our slice. This is what makes
    the W-rank loss's gradients equal those of one process on the concatenated batch.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: Tuple[int, ...]):  # type: ignore[override]
        ctx.sizes = sizes
        return _all_gather_padded(x, list(sizes))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: rank()])
        return grad[start : start + ctx.sizes[rank()]], None


def all_gather_with_grad(x: torch.Tensor, sizes: Tuple[int, ...] | None = None) -> Tuple[torch.Tensor, int]:
    """All-gather along dim 0, differentiable. Returns (gathered, offset of our rows). sizes:
    every rank's row count when the caller knows it (saves one collective)."""
    if not is_distributed():
        return x, 0
    sizes = tuple(sizes) if sizes is not None else tuple(gather_sizes(x.shape[0], x.device))
    return _GatherWithGrad.apply(x, sizes), sum(sizes[: rank()])


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's picklable `obj`, in rank order ([obj] in a single process)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (no gradient); returns a new tensor."""
    x = x.detach().clone()
    if is_distributed():
        dist.all_reduce(x)
    return x


def _spawn_entry(rank_: int, world: int, port: int, threads: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank_),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank_), OMP_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    faulthandler.enable()  # a C++ abort (gloo, DeepSpeed ops) prints the Python stack that led to it
    dist.init_process_group("gloo", rank=rank_, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        torch.save(fn(*args), os.path.join(out_dir, f"result_{rank_}.pt"))
        dist.barrier()  # rank 0 hosts the store: it must not tear it down while another rank still uses it
    finally:
        dist.destroy_process_group()
    # The result is on disk and the group closed: skip the interpreter's teardown, where a library's
    # static C++ thread objects have aborted a finished rank ("terminate called without an active
    # exception", seen once in CI with DeepSpeed on gloo).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_gloo(fn: Callable, world: int, *args: Any, threads: int = 1) -> List[Any]:
    """Run fn(*args) in `world` fresh processes joined in a gloo group on 127.0.0.1 (used by the
    tests and benchmarks). Returns the results in rank order; a failing rank raises here with
    its traceback. fn must be importable (a module-level function)."""
    with tempfile.TemporaryDirectory() as out_dir:
        torch.multiprocessing.start_processes(_spawn_entry, args=(world, free_port(), threads, out_dir, fn, args),
                                              nprocs=world, join=True, start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"result_{r}.pt"), weights_only=False) for r in range(world)]
