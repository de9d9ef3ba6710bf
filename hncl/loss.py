"""HNCL loss: InfoNCE with global negatives, plus heatmap-neighbour positives.

    L = view_weight * 1/2 [NCE(z1, p2) + NCE(z2, p1)]
      + nn_weight   * 1/2 [NCE(nn1, p2) + NCE(nn2, p1)]
      + nn_weight   * 1/2 [NCE(z1, p2[nb]) + NCE(z2, p1[nb])]      (batch_neighbours > 0)

NCE(a, b): for each local anchor a_i, cross-entropy over the cosine logits a_i . b_j / tau
against every b_j of the *global* batch (all ranks), the positive being b_i. nn1/nn2 are the
queue neighbours looked up for view 1/2: the same heatmap neighbours for both views in HNCL
(search by the view-independent heatmap), each view's own embedding neighbours in NNCLR. With
k > 1 neighbours each valid one is a positive: a sample's term is the mean over its valid
neighbours, and samples with none (queue still filling) are left out of the mean rather than
given a garbage target. nb: each sample's heatmap neighbours within the global batch itself,
positives whose embeddings are fresh and carry gradient (multi_positive_nce).

Each rank returns a loss whose average over ranks is the loss of one process on the whole
global batch, and whose gradient, averaged over ranks by DDP, is that process's gradient (the
predictions are gathered with a gradient-carrying all-gather; means are over global counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from hncl import dist as hdist


def nce_per_sample(anchors: torch.Tensor, candidates: torch.Tensor, offset: int,
                   temperature: float) -> torch.Tensor:
    """Per-anchor InfoNCE. anchors [B, k, D] (or [B, D]); candidates [N, D] is the global
    batch and anchor i's positive is candidates[offset + i]. Returns [B, k] (or [B])."""
    squeeze = anchors.dim() == 2
    if squeeze:
        anchors = anchors.unsqueeze(1)
    b, k, d = anchors.shape
    logits = F.normalize(anchors, dim=-1).reshape(b * k, d) @ F.normalize(candidates, dim=-1).T
    target = (torch.arange(b, device=anchors.device) + offset).repeat_interleave(k)
    loss = F.cross_entropy(logits / temperature, target, reduction="none").reshape(b, k)
    return loss.squeeze(1) if squeeze else loss


def multi_positive_nce(anchors: torch.Tensor, candidates: torch.Tensor, positives: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """Per-anchor InfoNCE with several positives: anchors [B, D], candidates [N, D] (the global
    batch), positives [B, n] indices into candidates (-1 = none). Returns [B] = the mean over a
    sample's valid positives of -log softmax(anchor . candidates / T)[positive]; 0 where none."""
    logits = F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T
    logp = F.log_softmax(logits / temperature, dim=1)
    valid = positives >= 0
    picked = logp.gather(1, positives.clamp(min=0)) * valid
    return -picked.sum(1) / valid.sum(1).clamp(min=1)


def _global_mean(per_sample: torch.Tensor, include: torch.Tensor):
    """Sum of the included local terms divided by the included count over all ranks, times W:
    averaging this over ranks gives the mean over the global batch. Returns (term, count)."""
    count = hdist.all_reduce_sum(include.sum().to(per_sample.dtype).reshape(1))[0]
    total = (per_sample * include).sum()
    return total * hdist.world_size() / count.clamp(min=1), count


@dataclass
class LossOutput:
    loss: torch.Tensor  # this rank's share; mean over ranks = global loss
    terms: Dict[str, float]  # global values, identical on every rank


class HNCLLoss:
    def __init__(self, temperature: float = 0.1, view_weight: float = 1.0, nn_weight: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.view_weight = view_weight
        self.nn_weight = nn_weight

    def __call__(self, z1: torch.Tensor, z2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor,
                 nn1: Optional[torch.Tensor] = None, valid1: Optional[torch.Tensor] = None,
                 nn2: Optional[torch.Tensor] = None, valid2: Optional[torch.Tensor] = None,
                 batch_positives: Optional[torch.Tensor] = None) -> LossOutput:
        """z*: projections [B, D]; p*: predictions [B, D]; nn*: neighbour embeddings [B, k, D]
        (no gradient) with valid* [B, k]. nn2/valid2 default to nn1/valid1 (HNCL).
        batch_positives [B, n]: indices into the global batch of each sample's in-batch heatmap
        neighbours (-1 = none); each is a positive for both views, gradient on both sides."""
        tau = self.temperature
        p1_all, offset = hdist.all_gather_with_grad(p1)
        p2_all, _ = hdist.all_gather_with_grad(p2)
        everyone = torch.ones(z1.shape[0], dtype=torch.bool, device=z1.device)
        per_view = 0.5 * (nce_per_sample(z1, p2_all, offset, tau) + nce_per_sample(z2, p1_all, offset, tau))
        view_term, _ = _global_mean(per_view, everyone)
        loss = self.view_weight * view_term
        terms = {"loss_view": view_term}

        if nn1 is not None and self.nn_weight > 0:
            if valid1 is None:
                raise ValueError("neighbour embeddings need their valid mask")
            nn2 = nn1 if nn2 is None else nn2
            valid2 = valid1 if valid2 is None else valid2
            nn_terms = []
            for nn, valid, p_all in ((nn1, valid1, p2_all), (nn2, valid2, p1_all)):
                per_pair = nce_per_sample(nn.to(p_all.dtype), p_all, offset, tau)  # [B, k]
                n_valid = valid.sum(dim=1)
                per_sample = (per_pair * valid).sum(dim=1) / n_valid.clamp(min=1)
                term, count = _global_mean(per_sample, n_valid > 0)
                nn_terms.append(term)
            nn_term = 0.5 * (nn_terms[0] + nn_terms[1])
            loss = loss + self.nn_weight * nn_term
            terms["loss_nn"] = nn_term
        if batch_positives is not None and self.nn_weight > 0:
            per_sample = 0.5 * (multi_positive_nce(z1, p2_all, batch_positives, tau)
                                + multi_positive_nce(z2, p1_all, batch_positives, tau))
            term, _ = _global_mean(per_sample, (batch_positives >= 0).any(dim=1))
            loss = loss + self.nn_weight * term
            terms["loss_batch_nn"] = term
        # Report global values (one packed all-reduce): the rank shares average to them.
        terms["loss"] = loss
        names = list(terms)
        packed = hdist.all_reduce_sum(torch.stack([terms[n].detach().double().reshape(()) for n in names]))
        reported = {n: float(v) / hdist.world_size() for n, v in zip(names, packed)}
        return LossOutput(loss=loss, terms=reported)
