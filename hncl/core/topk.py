"""Exact top-k over cosine scores: the order one process holding every key would give, ties
included, whatever the layout of the keys (hncl.core.queue's guarantee rests on it).

A batched matmul may round the scores of two identical keys 1-2 ulp apart, so the matmul only
selects candidates: `top_k_exact` re-decides every ordering on pair scores recomputed on their
own, and `topk_stable` orders equal scores by index. On CPU, long rows are cut in chunks first
(a chunk's best m scores, then the top-k of those): faster than one full sort.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CHUNK = 256


def _top_m(scores: torch.Tensor, m: int):
    """Values and columns of each row's m largest scores (any order among equal values). On CPU
    with long rows, two stages: the m chunks of 256 columns with the largest maxima hold every
    value above the m-th largest, then one top-m over those m*256 columns (5x faster than
    torch.topk over 65,536 columns; ties at the m-th value are resolved by topk_stable)."""
    n = scores.shape[1]
    if scores.device.type != "cpu" or n < 16 * _CHUNK or m * _CHUNK * 2 > n:
        return scores.topk(m, dim=1)
    pad = (-n) % _CHUNK
    if pad:
        scores = F.pad(scores, (0, pad), value=float("-inf"))
    chunks = scores.view(scores.shape[0], -1, _CHUNK)
    best = chunks.amax(dim=2).topk(m, dim=1).indices  # [N, m] chunk numbers
    cols = (best.unsqueeze(-1) * _CHUNK + torch.arange(_CHUNK, device=scores.device)).flatten(1)
    v, j = scores.gather(1, cols).topk(m, dim=1)
    i = cols.gather(1, j)
    # padding can only be picked when a row has fewer than m real columns above -inf: keep it in range
    return v, torch.where(i < n, i, torch.zeros_like(i))


def _pair_scores(q: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """q[rows] . keys[cols], each pair on its own: the same arithmetic for a key wherever it sits
    (a matmul's rounding depends on the column's position in the kernel's blocks)."""
    return (q[rows] * keys[cols]).sum(-1)


def _matmul_tolerance(dim: int, dtype: torch.dtype) -> float:
    """A bound on |matmul score - pair score| for unit vectors: each sum of `dim` products is
    within dim * eps of the exact value (Higham's gamma_n), so the two within 2 dim eps."""
    return 4.0 * dim * torch.finfo(dtype).eps


def top_k_exact(q: torch.Tensor, keys: torch.Tensor, scores: torch.Tensor, k: int):
    """Row-wise top-k of the pair scores q . keys[j] ordered by (score desc, column asc), exact
    under ties. `scores` = q @ keys.T (-inf where a column is masked) only selects candidates.
    Returns (pair scores [N, k'], columns [N, k']) with k' = min(k, columns)."""
    n_rows, n = scores.shape
    k = min(k, n)
    m = min(n, 2 * k + 8)
    if n_rows == 0 or k == 0:
        return scores.new_zeros((n_rows, k)), torch.zeros((n_rows, k), dtype=torch.int64, device=scores.device)
    v, i = _top_m(scores, m)
    rows = torch.arange(n_rows, device=scores.device).unsqueeze(1).expand_as(i)
    e = torch.where(torch.isfinite(v), _pair_scores(q, keys, rows, i), torch.full_like(v, float("-inf")))
    i, order = i.sort(dim=1)
    e, v = e.gather(1, order), v.gather(1, order)
    e, order = e.sort(dim=1, descending=True, stable=True)
    i, v = i.gather(1, order), v.gather(1, order)
    e_k, i_k = e[:, :k].clone(), i[:, :k].clone()
    if m < n:
        # a column outside the candidates has a matmul score <= the smallest candidate's; it could
        # still reach the k-th pair score only within the rounding bound: decide those rows anew
        tol = _matmul_tolerance(q.shape[1], q.dtype)
        kth = e_k[:, -1]
        unsure = (torch.isfinite(kth) & (v.min(dim=1).values >= kth - tol)).nonzero().squeeze(1)
        if unsure.numel():
            window = scores[unsure] >= (kth[unsure] - tol).unsqueeze(1)
            r, c = window.nonzero(as_tuple=True)
            exact = torch.full(window.shape, float("-inf"), dtype=e.dtype, device=e.device)
            exact[r, c] = _pair_scores(q, keys, unsure[r], c)
            e_k[unsure], i_k[unsure] = topk_stable(exact, k)
    return e_k, i_k


def topk_stable(scores: torch.Tensor, k: int, margin: int = 8):
    """Row-wise top-k ordered by (score desc, column asc), exact under ties.

    torch.topk picks arbitrarily among equal scores, so we take a few extra candidates and order
    them ourselves. Rows whose tie at the k-th score may extend past the candidates (many copies
    of one key: a queue larger than the dataset stores an image once per epoch) are repaired
    without sorting the row: the tie block is filled with the lowest columns holding the k-th
    score, one masked top-k over the row.
    """
    n = scores.shape[1]
    k = min(k, n)
    m = min(n, 2 * k + margin)
    v, i = _top_m(scores, m)
    i, order = i.sort(dim=1)
    v = v.gather(1, order)
    v, order = v.sort(dim=1, descending=True, stable=True)
    i = i.gather(1, order)
    v_k, i_k = v[:, :k].clone(), i[:, :k].clone()
    if m < n and k > 0:
        kth = v_k[:, -1]
        unsure = (v[:, -1] == kth) & torch.isfinite(kth)
        if bool(unsure.any()):
            rows = unsure.nonzero().squeeze(1)
            sub, kth_r = scores[rows], kth[rows].unsqueeze(1)
            above = (sub > kth_r).sum(dim=1, keepdim=True)  # < k, all among the candidates, in order
            cols = torch.arange(n, device=scores.device).expand_as(sub)
            tied = torch.where(sub == kth_r, cols, torch.full_like(cols, n)).topk(k, dim=1, largest=False).values
            pos = torch.arange(k, device=scores.device).unsqueeze(0)
            fill = tied.gather(1, (pos - above).clamp(min=0))
            i_k[rows] = torch.where(pos < above, i_k[rows], fill)
    return v_k, i_k
