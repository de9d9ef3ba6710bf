"""Face alignment: a similarity transform that puts the eyes and nose at canonical positions.

Heatmaps of *unaligned* crops mostly encode where the face sits in the crop (translation,
scale, roll), not its expression: on synthetic faces the heatmap-neighbour expression purity is
0.43 unaligned and 0.97 aligned (docs/HEATMAPS.md). So shards store aligned faces, and their
heatmaps are the aligned ones. The transform is fitted (Umeyama, least squares) on points that
expressions barely move — the four eye corners and the nine nose points — so expression
geometry (brows, lids, mouth) is preserved, not normalised away.

Coordinates are corner-origin pixels (hncl.heatmaps.render). Warps run batched with
grid_sample on any device, for images and for 64 x 64 heatmaps alike.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

REFERENCE_POINTS = (36, 39, 42, 45, 27, 28, 29, 30, 31, 32, 33, 34, 35)
# Canonical positions of REFERENCE_POINTS as fractions of the crop: eyes at 42% height, nose tip
# at 58%, leaving room for raised brows above and an open jaw below.
TEMPLATE = np.array([
    [0.290, 0.420], [0.415, 0.420], [0.585, 0.420], [0.710, 0.420],  # eye corners 36, 39, 42, 45
    [0.500, 0.415], [0.500, 0.470], [0.500, 0.525], [0.500, 0.580],  # nose bridge 27..30
    [0.440, 0.615], [0.470, 0.625], [0.500, 0.630], [0.530, 0.625], [0.560, 0.615],  # nose base 31..35
], dtype=np.float64)


def similarity_to_template(landmarks: np.ndarray, out_size: int) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping the reference
    points of `landmarks` [68, 2] onto the template in an out_size crop. Returns 2x3 (src -> dst)."""
    src = np.asarray(landmarks, dtype=np.float64)[list(REFERENCE_POINTS)]
    dst = TEMPLATE * out_size
    if not np.isfinite(src).all():
        raise ValueError("cannot align a face with missing reference landmarks")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd(d.T @ s / len(src))
    flip = np.diag([1.0, -1.0 if np.linalg.det(u) * np.linalg.det(vt) < 0 else 1.0])
    rot = u @ flip @ vt
    scale = float((sig * np.diag(flip)).sum() / (s ** 2).sum() * len(src))
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def apply_affine(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.asarray(points, dtype=np.float64) @ m[:, :2].T + m[:, 2]


def warp(batch: torch.Tensor, m: torch.Tensor, out_size: int, src_scale: float = 1.0,
         dst_scale: float = 1.0) -> torch.Tensor:
    """Warp [B, C, H, W] by affines m [B, 2, 3] given in image pixels (src -> dst).

    `src_scale`/`dst_scale` are image pixels per grid pixel of the input/output grids, so the
    same image-space transform warps 64 x 64 heatmaps of a crop (scale = crop_size / 64)."""
    b, _, h, w = batch.shape
    m = m.to(batch.device, torch.float64)
    a, t = m[:, :, :2], m[:, :, 2]
    a_inv = torch.linalg.inv(a)
    centres = (torch.arange(out_size, device=batch.device, dtype=torch.float64) + 0.5) * dst_scale
    gy, gx = torch.meshgrid(centres, centres, indexing="ij")
    dst = torch.stack([gx, gy], -1).reshape(1, -1, 2) - t.unsqueeze(1)  # [B, N, 2]
    src = dst @ a_inv.transpose(1, 2) / src_scale  # input-grid pixels
    norm = torch.stack([src[..., 0] / w, src[..., 1] / h], -1) * 2 - 1  # align_corners=False
    grid = norm.reshape(b, out_size, out_size, 2).to(batch.dtype if batch.is_floating_point() else torch.float32)
    return F.grid_sample(batch.float() if not batch.is_floating_point() else batch, grid, mode="bilinear",
                         padding_mode="border", align_corners=False)


def align_faces(images: np.ndarray, landmarks: np.ndarray, out_size: int):
    """Aligned uint8 crops [B, S, S, 3], their landmarks [B, 68, 2] and the affines [B, 2, 3]."""
    ms = np.stack([similarity_to_template(p, out_size) for p in landmarks])
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    out = warp(x, torch.from_numpy(ms), out_size).round().clamp(0, 255).to(torch.uint8)
    pts = np.stack([apply_affine(p, m) for p, m in zip(landmarks, ms)]).astype(np.float32)
    return out.permute(0, 2, 3, 1).numpy(), pts, ms
