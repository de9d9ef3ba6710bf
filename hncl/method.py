"""One HNCL training step: model + neighbour queue + loss (no Ray, no optimiser).

    z1, p1, z2, p2 = model(x1, x2)
    nn = queue.lookup(heatmap descriptor | z, id)       # before this batch is enqueued
    nb = batch_heatmap_neighbours(heatmap descriptor)   # optional (batch_neighbours > 0)
    loss = HNCLLoss(z, p, nn, nb)
    queue.enqueue(heatmap descriptor, z1, id)

With batch_neighbours = n > 0, each sample's n nearest heatmaps within the global batch are
positives too: fresh embeddings with gradient through both sides, where the queue's are stored
and detached. On the demo's data this is what makes heatmap neighbours teach expression (README).

`model` may be the DDP-wrapped module; the queue is kept beside it, never inside it (see
hncl.queue for why).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from hncl import dist as hdist
from hncl.loss import HNCLLoss
from hncl.queue import ShardedNeighborQueue, topk_stable


@torch.no_grad()
def batch_heatmap_neighbours(desc: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] global-batch indices of each local sample's n nearest heatmap descriptors among
    all ranks' samples (itself excluded; -1 where the global batch is too small)."""
    local = F.normalize(desc.float(), dim=1)
    sizes = hdist.gather_sizes(desc.shape[0], desc.device)
    desc_all = hdist.all_gather_rows(local, sizes)
    offset = sum(sizes[: hdist.rank()])
    sim = local @ desc_all.T
    own = torch.arange(desc.shape[0], device=desc.device) + offset
    sim[torch.arange(desc.shape[0], device=desc.device), own] = float("-inf")
    m = min(n, desc_all.shape[0] - 1)
    val, idx = topk_stable(sim, m) if m > 0 else (sim[:, :0], sim[:, :0].long())
    idx = torch.where(torch.isfinite(val), idx, torch.full_like(idx, -1))
    if m < n:
        idx = torch.cat([idx, idx.new_full((idx.shape[0], n - m), -1)], dim=1)
    return idx


class HNCL:
    def __init__(self, model: torch.nn.Module, queue: Optional[ShardedNeighborQueue], loss: HNCLLoss,
                 topk: int = 1, batch_neighbours: int = 0, descriptor: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None):
        self.model = model
        # mixed precision for the network only: neighbour search and loss stay in float32
        self.autocast = autocast or contextlib.nullcontext
        self.queue = queue
        self.loss = loss
        self.topk = topk
        if batch_neighbours and (queue is None or queue.nn_space != "heatmap"):
            raise ValueError("batch_neighbours are heatmap neighbours: they need a heatmap queue")
        self.batch_neighbours = batch_neighbours
        self.descriptor = descriptor  # stored heatmaps -> descriptors, on the device
        self.nn_space = queue.nn_space if queue is not None else "none"

    def _descriptors(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        if "desc" in batch:
            return batch["desc"]
        if self.descriptor is None or "heatmap" not in batch:
            raise ValueError("nn_space='heatmap' needs batch['desc'] or batch['heatmap'] plus a descriptor")
        return self.descriptor(batch["heatmap"])

    def training_step(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """batch: x1, x2 (views [B,3,H,W]), id [B] int64, optional label [B] (-1 = none), and for
        heatmap neighbours desc [B,Dh] or heatmap. Returns (this rank's loss, global metrics)."""
        with self.autocast(), record_function("hncl/model_forward"):
            outputs = self.model(batch["x1"], batch["x2"])
        z1, p1, z2, p2 = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in outputs)
        ids = batch["id"]
        labels = batch.get("label")
        metrics: Dict[str, float] = {}
        if self.queue is None:
            with record_function("hncl/loss"):
                out = self.loss(z1, z2, p1, p2)
            return out.loss, out.terms

        with record_function("hncl/descriptor"):
            desc = self._descriptors(batch) if self.nn_space == "heatmap" else None
        k = self.topk
        with record_function("hncl/queue_lookup"):
            if self.nn_space == "heatmap":
                n1 = self.queue.lookup(desc, ids, k)
                n2 = n1  # one heatmap per image: both views share its neighbours
            else:
                n1 = self.queue.lookup(z1.detach(), ids, k)
                n2 = self.queue.lookup(z2.detach(), ids, k)
        batch_pos = None
        if self.batch_neighbours:
            with record_function("hncl/batch_neighbours"):
                batch_pos = batch_heatmap_neighbours(desc, self.batch_neighbours)
        with record_function("hncl/loss"):
            out = self.loss(z1, z2, p1, p2, n1.embeddings, n1.valid, n2.embeddings, n2.valid, batch_pos)
        metrics.update(out.terms)
        with record_function("hncl/neighbour_metrics"):
            metrics.update(self._neighbour_metrics(n1, labels, batch_pos))
        with record_function("hncl/queue_enqueue"):
            self.queue.enqueue(desc, z1.detach(), ids, labels)
        return out.loss, metrics

    def _neighbour_metrics(self, n, labels: Optional[torch.Tensor],
                           batch_pos: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """Queue fill, mean neighbour score and (labels known) the label purity of the queue's and
        the in-batch positives, global."""
        valid = n.valid
        stats = [valid.sum(), torch.where(valid, n.scores, torch.zeros_like(n.scores)).sum(),
                 (self.queue.ids >= 0).sum()]
        if labels is not None:
            labels = labels.to(n.labels.device)
            known = valid & (n.labels >= 0) & (labels.unsqueeze(1) >= 0)
            stats += [known.sum(), (known & (n.labels == labels.unsqueeze(1))).sum()]
            if batch_pos is not None:
                mine = labels.to(batch_pos.device)
                pos_labels = torch.where(batch_pos >= 0, hdist.all_gather_rows(mine)[batch_pos.clamp(min=0)], -1)
                known_b = (pos_labels >= 0) & (mine.unsqueeze(1) >= 0)
                stats += [known_b.sum(), (known_b & (pos_labels == mine.unsqueeze(1))).sum()]
        s = hdist.all_reduce_sum(torch.stack([t.double() for t in stats]))
        out = {"queue_fill": float(s[2]) / self.queue.capacity,
               "nn_score": float(s[1] / s[0]) if s[0] > 0 else float("nan")}
        if labels is not None:
            out["nn_purity"] = float(s[4] / s[3]) if s[3] > 0 else float("nan")
            if batch_pos is not None:
                out["batch_nn_purity"] = float(s[6] / s[5]) if s[5] > 0 else float("nan")
        return out


def build_hncl(cfg, model: torch.nn.Module, device: torch.device | str = "cpu",
               descriptor: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
               key_dim: Optional[int] = None, autocast=None) -> HNCL:
    """HNCL from a validated config (hncl.config.Config). Call after the process group is up.
    `key_dim` (the shard set's descriptor size) overrides cfg.descriptor.dim."""
    me = cfg.method
    nn_space = str(getattr(me.nn_space, "value", me.nn_space))
    loss = HNCLLoss(me.temperature, me.view_weight, me.nn_weight if nn_space != "none" else 0.0)
    queue = None
    if nn_space != "none" and me.nn_weight > 0:
        dtype = getattr(torch, str(getattr(me.queue_dtype, "value", me.queue_dtype)))
        queue = ShardedNeighborQueue(me.queue_size, cfg.model.proj_out,
                                     (key_dim or cfg.descriptor.dim) if nn_space == "heatmap" else None,
                                     nn_space=nn_space, dtype=dtype, device=device)
    return HNCL(model, queue, loss, topk=me.topk, batch_neighbours=me.batch_neighbours if nn_space == "heatmap" else 0,
                descriptor=descriptor, autocast=autocast)
