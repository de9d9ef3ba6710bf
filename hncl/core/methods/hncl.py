"""HNCL: heatmap neighbour contrastive learning (Liu et al., IEEE TMM 2025). NNCLR with the
neighbour search moved from the learned embedding into facial-landmark-heatmap space, where
expression lives and identity, lighting and pose mostly do not.

    h        = descriptor(stored landmark heatmaps)        (fixed, from the shard set; optionally
                                                            whitened: descriptor.whiten)
    nn       = the queue entries nearest to h (top-k), their stored embeddings (no gradient)
    nb       = each face's n heatmap-nearest faces within the global batch (method.batch_neighbours)
    loss     = 1/2 [NCE(z1, p2) + NCE(z2, p1)]                         (the two views)
             + lambda 1/2 [NCE(nn, p2) + NCE(nn, p1)]                   (queue neighbours)
             + lambda 1/2 [NCE(z1, p2[nb]) + NCE(z2, p1[nb])]           (in-batch neighbours, each
                                                                        pulled in, or any of them:
                                                                        method.batch_pool; equally,
                                                                        or weighted by heatmap
                                                                        similarity: method.
                                                                        batch_weight_temperature)
    queue.enqueue(h, z1)

One heatmap per image: both views share its neighbours. The in-batch term is the project's
own addition (README, Demo): unlike a stored queue entry, those embeddings are fresh and carry
gradient on both sides; with the queue term alone HNCL only tied the two-view baseline.

Example (one process)::

    >>> import torch
    >>> from hncl.config import load_config
    >>> from hncl.core.methods import build_method
    >>> from hncl.core.model import HNCLModel
    >>> cfg = load_config("configs/debug.yaml", ["method.queue_size=64", "method.batch_neighbours=1",
    ...                                          "descriptor.dim=2"])
    >>> model = HNCLModel("resnet18", width=8, proj_hidden=16, proj_out=cfg.model.proj_out, pred_hidden=16)
    >>> hncl = build_method(cfg, model)  # in training, descriptor= maps stored heatmaps to desc
    >>> x = torch.randn(4, 3, 32, 32)
    >>> batch = {"x1": x, "x2": x.flip(-1), "id": torch.arange(4), "label": torch.tensor([0, 0, 1, 1]),
    ...          "desc": torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])}
    >>> loss, metrics = hncl.training_step(batch)
    >>> metrics["batch_nn_purity"]  # each face's in-batch heatmap neighbour is its pair
    1.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from hncl.core import dist as hdist
from hncl.core.loss import Pool, Predictions, neighbour_term, positives_term, report, view_term
from hncl.core.methods.base import QueueConfig, QueueMethod
from hncl.core.topk import topk_stable


def _nearest(queries: torch.Tensor, keys: torch.Tensor, offset: int, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """[Q, n] indices of each query's n most similar keys, query i being keys[offset + i] itself
    (excluded), -1 where there are fewer than n others; and their similarities (-inf there)."""
    sim = queries @ keys.T
    own = torch.arange(queries.shape[0], device=queries.device) + offset
    sim[torch.arange(queries.shape[0], device=queries.device), own] = float("-inf")
    m = max(0, min(n, keys.shape[0] - 1))  # (no keys at all: none to find, not n + 1 columns)
    val, idx = topk_stable(sim, m) if m > 0 else (sim[:, :0], sim[:, :0].long())
    idx = torch.where(torch.isfinite(val), idx, torch.full_like(idx, -1))
    if m < n:
        idx = torch.cat([idx, idx.new_full((idx.shape[0], n - m), -1)], dim=1)
        val = torch.cat([val, val.new_full((val.shape[0], n - m), float("-inf"))], dim=1)
    return idx, val


@torch.no_grad()
def batch_heatmap_neighbours(desc: torch.Tensor, n: int, mutual: bool = False,
                             with_similarity: bool = False):
    """[B, n] global-batch indices of each local sample's n nearest heatmap descriptors among
    all ranks' samples (itself excluded; -1 where the global batch is too small). mutual: keep a
    neighbour only if this sample is also among that neighbour's n nearest (-1 otherwise).
    with_similarity: also their descriptor cosines [B, n] (-inf where the index is -1)."""
    local = F.normalize(desc.float(), dim=1)
    sizes = hdist.gather_sizes(desc.shape[0], desc.device)
    desc_all = hdist.all_gather_rows(local, sizes)
    offset = sum(sizes[: hdist.rank()])
    if not mutual:
        idx, sim = _nearest(local, desc_all, offset, n)
    else:
        # every sample's lists from the one gathered matrix, so both directions agree on every rank
        everyone, sim_all = _nearest(desc_all, desc_all, 0, n)
        mine, sim = everyone[offset: offset + desc.shape[0]], sim_all[offset: offset + desc.shape[0]]
        own = torch.arange(desc.shape[0], device=desc.device) + offset
        back = (everyone[mine.clamp(min=0)] == own.view(-1, 1, 1)).any(dim=2)  # am I in my neighbour's list?
        idx = torch.where((mine >= 0) & back, mine, torch.full_like(mine, -1))
        sim = sim.masked_fill(idx < 0, float("-inf"))
    return (idx, sim) if with_similarity else idx


def similarity_weights(sim: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, n] weights of each anchor's neighbours: softmax(cosine / temperature) over its valid
    ones (sim -inf = none; a row without any is all zeros)."""
    return torch.nan_to_num(torch.softmax(sim / temperature, dim=1), nan=0.0)


@dataclass
class HNCLConfig(QueueConfig):
    nn_weight: float = 1.0  # lambda, the weight of the heatmap-neighbour terms
    # also take each sample's top-n heatmap neighbours in the current global batch as positives
    # (gradient through both sides, unlike the queue's stored embeddings). 0 = queue only.
    batch_neighbours: int = 0
    # the in-batch heatmap neighbours are not negatives of the two-view term (false negatives)
    exclude_neighbours: bool = False
    # keep an in-batch neighbour only if the anchor is among its batch_neighbours nearest too:
    # fewer, surer positives when heatmap neighbours are noisy (#24)
    mutual_neighbours: bool = False
    # how the in-batch neighbours are pulled in: each (every one, the mean of their -log p) or any
    # (MIL-NCE: the anchor has to match some of them, so neighbours of another expression, 65% of
    # them on realistic faces, get little pull)
    batch_pool: Pool = Pool.each
    # > 0: the in-batch neighbours are soft positives, neighbour j of anchor i weighing
    # softmax_j(heatmap cosine(i, j) / T) (with pool each: a cross-entropy against the heatmaps'
    # graded similarity, not n equal pulls); 0: every neighbour counts the same
    batch_weight_temperature: float = 0.0

    @staticmethod
    def validate(me, check) -> None:
        QueueConfig.validate(me, check)
        check(me.nn_weight > 0, "method.nn_weight", me.nn_weight,
              "must be > 0 for method.name=hncl (hncl without its heatmap terms is method.name=simclr)")
        check(me.batch_neighbours >= 0, "method.batch_neighbours", me.batch_neighbours, "must be >= 0")
        # without in-batch neighbours there is nothing to exclude: the setting would do nothing
        check(not me.exclude_neighbours or me.batch_neighbours >= 1, "method.exclude_neighbours", True,
              "needs method.batch_neighbours >= 1 (it keeps the in-batch neighbours out of the negatives)")
        check(not me.mutual_neighbours or me.batch_neighbours >= 1, "method.mutual_neighbours", True,
              "needs method.batch_neighbours >= 1 (it filters the in-batch neighbours)")
        check(me.batch_pool is Pool.each or me.batch_neighbours >= 1, "method.batch_pool", me.batch_pool.value,
              "needs method.batch_neighbours >= 1 (it pools the in-batch neighbours)")
        # below ~1e-38 cosine / T overflows float32 and every weight of a row becomes 0 (an infinite
        # "any" loss); far above that the weights are already one-hot on the nearest
        check(me.batch_weight_temperature == 0 or me.batch_weight_temperature >= 1e-6, "method.batch_weight_temperature",
              me.batch_weight_temperature, "must be 0 (the in-batch neighbours weigh the same) or >= 1e-06")
        check(me.batch_weight_temperature == 0 or me.batch_neighbours >= 1, "method.batch_weight_temperature",
              me.batch_weight_temperature, "needs method.batch_neighbours >= 1 (it weights the in-batch neighbours)")


class HNCL(QueueMethod):
    name = "hncl"
    Config = HNCLConfig

    def __init__(self, cfg, model, key_dim=None, **kwargs):
        # the search keys are the shard set's descriptors; a descriptor.dim set in the config was
        # checked against the set before the run started (hncl.infra.preflight.pretrain)
        descriptor = kwargs.get("descriptor")
        # (no set, descriptors given in the batch: descriptor.dim, else make-shards' default of 64)
        key_dim = key_dim or getattr(descriptor, "dim", None) or cfg.descriptor.dim or 64
        super().__init__(cfg, model, key_dim=key_dim, **kwargs)
        whiten = int(getattr(cfg.descriptor, "whiten", 0) or 0)
        if whiten:  # the queue's keys are whitened descriptors: a resume must search the same space
            self.queue.key_space = f"descriptor.whiten={whiten}"
        self.nn_weight = float(cfg.method.nn_weight)
        self.batch_neighbours = int(cfg.method.batch_neighbours)
        self.exclude_neighbours = bool(cfg.method.exclude_neighbours)
        self.mutual_neighbours = bool(cfg.method.mutual_neighbours)
        self.batch_pool = Pool(cfg.method.batch_pool)
        self.batch_weight_temperature = float(cfg.method.batch_weight_temperature)

    def training_step(self, batch):
        z1, p1, z2, p2 = self.forward(batch)
        ids, labels = batch["id"], batch.get("label")
        desc = self.descriptors(batch)
        with record_function("hncl/queue_lookup"):
            n = self.queue.lookup(desc, ids, self.topk)  # before this batch is enqueued
        batch_pos = weights = None
        if self.batch_neighbours:
            with record_function("hncl/batch_neighbours"):
                batch_pos, sim = batch_heatmap_neighbours(desc, self.batch_neighbours, self.mutual_neighbours,
                                                          with_similarity=True)
                if self.batch_weight_temperature > 0:
                    weights = similarity_weights(sim, self.batch_weight_temperature)
        with record_function("hncl/loss"):
            preds = Predictions.gather(p1, p2)
            excluded = batch_pos if self.exclude_neighbours else None  # not repelled as negatives
            terms = {"loss_view": view_term(z1, z2, preds, self.temperature, excluded)}
            terms["loss_nn"] = neighbour_term(n.embeddings, n.valid, n.embeddings, n.valid, preds, self.temperature)
            loss = terms["loss_view"] + self.nn_weight * terms["loss_nn"]
            if batch_pos is not None:
                terms["loss_batch_nn"] = positives_term(z1, z2, preds, batch_pos, self.temperature, self.batch_pool,
                                                             weights)
                loss = loss + self.nn_weight * terms["loss_batch_nn"]
            terms["loss"] = loss
            metrics = report(terms)
        with record_function("hncl/neighbour_metrics"):
            metrics.update(self.neighbour_metrics(n, labels, batch_pos, weights))
        with record_function("hncl/queue_enqueue"):
            self.queue.enqueue(desc, z1.detach(), ids, labels)
        return loss, metrics
