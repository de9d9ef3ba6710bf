"""Two augmented views per face (torchvision.transforms.v2), the usual contrastive recipe
scaled for faces: mild crops (an expression must survive the crop), flips, colour and blur.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def view_transform(size: int, min_scale: float = 0.6, colour: float = 0.4, grayscale: float = 0.2,
                   hue: float = 0.0) -> v2.Compose:
    """colour: brightness and contrast jitter (saturation 3/4 of it); hue: hue jitter (0 by
    default: 6x slower on CPU); grayscale: probability. Colour is an identity cue (skin, hair,
    background) that expression does not need."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(min_scale, 1.0), ratio=(0.85, 1.18), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(colour, colour, 0.75 * colour, hue)], p=0.8),
        v2.RandomGrayscale(p=grayscale),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.3),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


class BatchViews:
    """The same recipe as view_transform, applied to a whole uint8 batch [B, 3, H, W] in one
    kornia call per view (each image still gets its own random parameters). Runs wherever the
    batch is: in a loader worker, or on the GPU after the copy (then the loader only decodes)."""

    def __init__(self, size: int, min_scale: float = 0.6, colour: float = 0.4, grayscale: float = 0.2,
                 hue: float = 0.0):
        import kornia.augmentation as K

        self.augment = K.AugmentationSequential(
            K.RandomResizedCrop((size, size), scale=(min_scale, 1.0), ratio=(0.85, 1.18)),
            K.RandomHorizontalFlip(),
            K.ColorJitter(colour, colour, 0.75 * colour, hue, p=0.8),
            K.RandomGrayscale(p=grayscale),
            K.RandomGaussianBlur((5, 5), (0.1, 1.5), p=0.3),
        )
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(STD).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor):
        x = images.float().div_(255)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return tuple((self.augment(x) - mean) / std for _ in range(2))
