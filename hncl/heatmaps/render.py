"""Landmark heatmaps: rendering from points, pooling for storage, and reading peaks back.

Conventions shared by every extractor (and FAN's own):
- 68 points, iBUG order; coordinates (x, y) in pixels of the face image with the origin at the
  top-left *corner* (pixel (i, j) covers x in [j, j+1), y in [i, i+1); its centre is (j+.5, i+.5)).
- Heatmaps are 68 x 64 x 64 for the whole face crop (FAN's output for a 256 x 256 crop), so a
  point maps to heatmap coordinates by x * 64 / image_size.
- Rendered peaks are unnormalised Gaussians exp(-d^2 / 2 sigma^2) with sigma = 1.5 heatmap
  pixels (6 pixels of a 256 crop): about the spread of a trained FAN's output on aligned faces,
  and wide enough that the pooled R = 16 maps still vary smoothly with the point's position, so
  small geometry changes give small descriptor changes.
- Storage: average-pooled to R x R, each point's map scaled to peak 1, quantised to uint8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HEATMAP_SIZE = 64
SIGMA = 1.5
N_POINTS = 68
INNER_POINTS = tuple(range(17, 68))  # everything but the jaw line (0..16)


def render_heatmaps(landmarks: torch.Tensor, image_size: float, size: int = HEATMAP_SIZE,
                    sigma: float = SIGMA) -> torch.Tensor:
    """Gaussian heatmaps for a batch of point sets: [B, 68, 2] -> [B, 68, size, size], float32.
    Vectorised over batch and points; non-finite points give an all-zero map."""
    pts = torch.as_tensor(landmarks, dtype=torch.float32)
    if pts.dim() == 2:
        pts = pts.unsqueeze(0)
    pts = pts * (size / float(image_size))
    centres = torch.arange(size, dtype=torch.float32, device=pts.device) + 0.5
    gx = torch.exp(-((centres.view(1, 1, -1) - pts[..., 0:1]) ** 2) / (2 * sigma**2))  # [B, P, W]
    gy = torch.exp(-((centres.view(1, 1, -1) - pts[..., 1:2]) ** 2) / (2 * sigma**2))  # [B, P, H]
    hm = gy.unsqueeze(-1) * gx.unsqueeze(-2)  # separable Gaussian: [B, P, H, W]
    return torch.nan_to_num(hm, nan=0.0)


def pool_heatmaps(heatmaps: torch.Tensor, resolution: int = 16) -> torch.Tensor:
    """[B, 68, 64, 64] float -> [B, 68, R, R] uint8: average-pool, scale each map to peak 1."""
    if HEATMAP_SIZE % resolution:
        raise ValueError(f"resolution must divide {HEATMAP_SIZE}, got {resolution}")
    pooled = F.avg_pool2d(heatmaps.float().clamp(min=0), HEATMAP_SIZE // resolution)
    peak = pooled.amax(dim=(-2, -1), keepdim=True)
    pooled = torch.where(peak > 0, pooled / peak.clamp(min=1e-12), torch.zeros_like(pooled))
    return (pooled * 255).round().to(torch.uint8)


def heatmap_peaks(heatmaps: torch.Tensor) -> torch.Tensor:
    """Argmax of each map in heatmap coordinates (pixel centre): [B, P, H, W] -> [B, P, 2] (x, y)."""
    b, p, h, w = heatmaps.shape
    flat = heatmaps.reshape(b, p, h * w).argmax(dim=-1)
    return torch.stack([(flat % w).float() + 0.5, (flat // w).float() + 0.5], dim=-1)
