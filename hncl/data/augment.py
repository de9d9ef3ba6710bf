"""Two augmented views per face (torchvision.transforms.v2), the usual contrastive recipe
scaled for faces: mild crops (an expression must survive the crop), flips, colour and blur.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def view_transform(size: int, min_scale: float = 0.6) -> v2.Compose:
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(min_scale, 1.0), ratio=(0.85, 1.18), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.3)], p=0.8),  # no hue: 6x slower, and unnatural skin
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.3),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


class TwoViews:
    """uint8 [B, 3, H, W] -> two float views [B, 3, size, size], each image augmented on its own."""

    def __init__(self, size: int, min_scale: float = 0.6):
        self.transform = view_transform(size, min_scale)

    def __call__(self, images: torch.Tensor):
        v1 = torch.stack([self.transform(im) for im in images])
        v2_ = torch.stack([self.transform(im) for im in images])
        return v1, v2_
