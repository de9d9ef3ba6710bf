"""The contrastive loss terms the methods are built from (plain PyTorch, any process group).

    view term      1/2 [NCE(z1, p2) + NCE(z2, p1)]                     (SimCLR/NNCLR's two views)
    neighbour term 1/2 [NCE(nn1, p2) + NCE(nn2, p1)]                   (queue neighbours: NNCLR, HNCL)
    positives term 1/2 [NCE(z1, p2[P]) + NCE(z2, p1[P])]               (several positives per anchor:
                                                                        HNCL's in-batch heatmap
                                                                        neighbours, label-mates)

NCE(a, b): for each local anchor a_i, cross-entropy over the cosine logits a_i . b_j / tau
against every b_j of the *global* batch (all ranks), the positive being b_i. With k > 1
neighbours each valid one is a positive: a sample's term is the mean over its valid neighbours,
and samples with none (queue still filling) are left out of the mean rather than given a
garbage target. The positives term takes, per anchor, indices into the global batch (-1 = none)
or a boolean mask over it; those embeddings are fresh and carry gradient. Its pool "each" pulls
in every positive; "any" (MIL-NCE) asks only that the anchor match some of them, which is what
noisy positives (realistic faces' heatmap neighbours) need. Positives given as indices may carry
weights (a soft target over them, e.g. from heatmap similarity) instead of counting equally.

Each term is this rank's share: its average over ranks is the term of one process on the whole
global batch, and its gradient, averaged over ranks by DDP, is that process's gradient (the
predictions are gathered with a gradient-carrying all-gather; means are over global counts).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from hncl.core import dist as hdist


def nce_per_sample(anchors: torch.Tensor, candidates: torch.Tensor, offset: int,
                   temperature: float, not_negatives: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-anchor InfoNCE. anchors [B, k, D] (or [B, D]); candidates [N, D] is the global
    batch and anchor i's positive is candidates[offset + i]. not_negatives [B, n]: candidates
    left out of anchor i's denominator (-1 = none), e.g. faces known to share its expression.
    Returns [B, k] (or [B])."""
    squeeze = anchors.dim() == 2
    if squeeze:
        anchors = anchors.unsqueeze(1)
    b, k, d = anchors.shape
    logits = F.normalize(anchors, dim=-1).reshape(b * k, d) @ F.normalize(candidates, dim=-1).T
    if not_negatives is not None:
        drop = torch.zeros(b, candidates.shape[0], dtype=torch.bool, device=logits.device)
        rows = torch.arange(b, device=logits.device).unsqueeze(1).expand_as(not_negatives)
        ok = not_negatives >= 0
        drop[rows[ok], not_negatives[ok]] = True
        drop[torch.arange(b, device=logits.device), torch.arange(b, device=logits.device) + offset] = False
        logits = logits.masked_fill(drop.repeat_interleave(k, dim=0), float("-inf"))
    target = (torch.arange(b, device=anchors.device) + offset).repeat_interleave(k)
    loss = F.cross_entropy(logits / temperature, target, reduction="none").reshape(b, k)
    return loss.squeeze(1) if squeeze else loss


class Pool(str, enum.Enum):
    """How a term with several positives per anchor pools them (multi_positive_nce)."""

    each = "each"  # every positive pulled in: the mean of their -log p
    any = "any"  # some of them matched is enough: -log of their summed p (MIL-NCE)


def multi_positive_nce(anchors: torch.Tensor, candidates: torch.Tensor, positives: torch.Tensor,
                       temperature: float, pool: Pool = Pool.each,
                       weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-anchor InfoNCE with several positives: anchors [B, D], candidates [N, D] (the global
    batch), positives [B, n] indices into candidates (-1 = none) or a bool mask [B, N]. Returns
    [B]; 0 where a sample has none.
      pool "each": the mean over its positives of -log softmax(anchor . candidates / T)[positive]
                   (every positive is pulled in);
      pool "any":  -log of the summed softmax mass on its positives (MIL-NCE): matching some of
                   them is enough, so positives that do not belong (noisy neighbours) get little pull.
    weights [B, n] (index positives only; each valid row sums to 1): how much each positive counts,
    instead of equally: "each" becomes a cross-entropy against that soft target, -sum_j w_j log p_j;
    "any" the likelihood of a mixture, -log sum_j w_j p_j.
    """
    pool = Pool(pool)
    logits = F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T
    logp = F.log_softmax(logits / temperature, dim=1)
    if weights is not None:
        if positives.dtype == torch.bool:
            raise ValueError("weights go with positives given as indices [B, n], not as a mask")
        valid = positives >= 0
        picked = logp.gather(1, positives.clamp(min=0))
        if pool is Pool.each:
            return -(picked * weights).masked_fill(~valid, 0.0).sum(1)
        mass = torch.logsumexp((picked + weights.log()).masked_fill(~valid, float("-inf")), dim=1)
        return torch.where(valid.any(dim=1), -mass, torch.zeros_like(mass))
    if positives.dtype != torch.bool:
        valid = positives >= 0
        if pool is Pool.each:
            picked = logp.gather(1, positives.clamp(min=0)) * valid
            return -picked.sum(1) / valid.sum(1).clamp(min=1)
        rows = torch.arange(positives.shape[0], device=positives.device).unsqueeze(1).expand_as(positives)
        mask = torch.zeros_like(logp, dtype=torch.bool)
        mask[rows[valid], positives[valid]] = True  # (an index listed twice counts once)
        positives = mask
    if pool is Pool.each:
        return -(logp * positives).sum(1) / positives.sum(1).clamp(min=1)
    mass = torch.logsumexp(logp.masked_fill(~positives, float("-inf")), dim=1)
    return torch.where(positives.any(dim=1), -mass, torch.zeros_like(mass))


def _global_mean(per_sample: torch.Tensor, include: torch.Tensor) -> torch.Tensor:
    """Sum of the included local terms divided by the included count over all ranks, times W:
    averaging this over ranks gives the mean over the global batch."""
    count = hdist.all_reduce_sum(include.sum().to(per_sample.dtype).reshape(1))[0]
    total = (per_sample * include).sum()
    return total * hdist.world_size() / count.clamp(min=1)


@dataclass
class Predictions:
    """Both views' predictions of the whole global batch, gathered once per step with gradient;
    `offset` is where this rank's rows start."""

    p1: torch.Tensor
    p2: torch.Tensor
    offset: int

    @classmethod
    def gather(cls, p1: torch.Tensor, p2: torch.Tensor) -> "Predictions":
        p1_all, offset = hdist.all_gather_with_grad(p1)
        p2_all, _ = hdist.all_gather_with_grad(p2)
        return cls(p1_all, p2_all, offset)


def view_term(z1: torch.Tensor, z2: torch.Tensor, preds: Predictions, temperature: float,
              not_negatives: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The two views of each image as positives: 1/2 [NCE(z1, p2) + NCE(z2, p1)]; optionally
    without some candidates (indices into the global batch) among an anchor's negatives."""
    everyone = torch.ones(z1.shape[0], dtype=torch.bool, device=z1.device)
    per_view = 0.5 * (nce_per_sample(z1, preds.p2, preds.offset, temperature, not_negatives)
                      + nce_per_sample(z2, preds.p1, preds.offset, temperature, not_negatives))
    return _global_mean(per_view, everyone)


def neighbour_term(nn1: torch.Tensor, valid1: torch.Tensor, nn2: torch.Tensor, valid2: torch.Tensor,
                   preds: Predictions, temperature: float) -> torch.Tensor:
    """Stored neighbours as positives: nn* [B, k, D] (no gradient) with valid* [B, k], the
    neighbours looked up for view 1 / 2 (the same ones in HNCL, each view's own in NNCLR)."""
    terms = []
    for nn, valid, p_all in ((nn1, valid1, preds.p2), (nn2, valid2, preds.p1)):
        per_pair = nce_per_sample(nn.to(p_all.dtype), p_all, preds.offset, temperature)  # [B, k]
        n_valid = valid.sum(dim=1)
        per_sample = (per_pair * valid).sum(dim=1) / n_valid.clamp(min=1)
        terms.append(_global_mean(per_sample, n_valid > 0))
    return 0.5 * (terms[0] + terms[1])


def positives_term(z1: torch.Tensor, z2: torch.Tensor, preds: Predictions, positives: torch.Tensor,
                   temperature: float, pool: Pool = Pool.each, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Several positives per anchor among the global batch (indices [B, n], -1 = none, or a
    bool mask [B, N]), for both views, pooled and weighted as multi_positive_nce says; anchors
    with none are left out of the mean."""
    per_sample = 0.5 * (multi_positive_nce(z1, preds.p2, positives, temperature, pool, weights)
                        + multi_positive_nce(z2, preds.p1, positives, temperature, pool, weights))
    has = positives.any(dim=1) if positives.dtype == torch.bool else (positives >= 0).any(dim=1)
    return _global_mean(per_sample, has)


def report(terms: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Global values of this rank's term shares (one packed all-reduce): what every rank logs."""
    names = list(terms)
    packed = hdist.all_reduce_sum(torch.stack([terms[n].detach().double().reshape(()) for n in names]))
    return {n: float(v) / hdist.world_size() for n, v in zip(names, packed)}
