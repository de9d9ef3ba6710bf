"""The heatmap descriptor: what HNCL compares to find expression neighbours.

    pooled heatmap uint8 [68, R, R] -> (inner 51 points) -> flatten -> L2
        -> minus mean, times PCA components [d, Dh] -> L2  => [Dh]

Dropping the 17 jaw-line points removes face shape (= identity) from the comparison; the PCA is
fitted once per shard set (by make_shards) on a sample of its heatmaps and stored beside the
shards as descriptor.npz, so every worker applies the same projection, on its own device.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from hncl.heatmaps.render import INNER_POINTS

FORMAT_VERSION = 1


def flatten_heatmaps(pooled: torch.Tensor, inner_only: bool) -> torch.Tensor:
    """[B, 68, R, R] (uint8 or float) -> [B, P*R*R] float32, each row L2-normalised."""
    x = pooled.float()
    if inner_only:
        x = x[:, list(INNER_POINTS)]
    return F.normalize(x.flatten(1), dim=1)


@dataclass
class HeatmapDescriptor:
    mean: torch.Tensor  # [d]
    components: torch.Tensor  # [d, Dh], orthonormal columns
    resolution: int
    inner_only: bool

    @property
    def dim(self) -> int:
        return self.components.shape[1]

    @classmethod
    def fit(cls, pooled: Union[torch.Tensor, np.ndarray], dim: int = 256, inner_only: bool = True,
            max_samples: int = 4096, seed: int = 0) -> "HeatmapDescriptor":
        """Exact PCA (SVD) on up to `max_samples` heatmaps, chosen with `seed`. Deterministic:
        each component's sign is fixed so its largest-magnitude entry is positive."""
        pooled = torch.as_tensor(pooled)
        if pooled.dim() != 4:
            raise ValueError(f"expected pooled heatmaps [N, 68, R, R], got shape {tuple(pooled.shape)}")
        n = pooled.shape[0]
        if n > max_samples:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_samples]
            pooled = pooled[idx.sort().values]
        x = flatten_heatmaps(pooled, inner_only).double()
        if dim > min(x.shape):
            raise ValueError(f"descriptor.dim={dim} needs at least {dim} heatmaps (and features) to fit; "
                             f"got {x.shape[0]} heatmaps of {x.shape[1]} features")
        mean = x.mean(0)
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
        comp = vh[:dim].T  # [d, Dh]
        signs = comp.gather(0, comp.abs().argmax(0, keepdim=True)).sign()
        comp = comp * torch.where(signs == 0, torch.ones_like(signs), signs)
        return cls(mean.float(), comp.float().contiguous(), int(pooled.shape[-1]), inner_only)

    def to(self, device) -> "HeatmapDescriptor":
        return HeatmapDescriptor(self.mean.to(device), self.components.to(device), self.resolution, self.inner_only)

    def __call__(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, 68, R, R] stored heatmaps (any device) -> [B, Dh] unit descriptors."""
        if pooled.shape[-1] != self.resolution:
            raise ValueError(f"heatmaps are {pooled.shape[-1]}x{pooled.shape[-1]} but the descriptor was fitted "
                             f"on {self.resolution}x{self.resolution}")
        x = flatten_heatmaps(pooled, self.inner_only)
        return F.normalize((x - self.mean) @ self.components, dim=1)

    # -- descriptor.npz ----------------------------------------------------------------------
    def save(self, path_or_file) -> None:
        np.savez(path_or_file, mean=self.mean.cpu().numpy(), components=self.components.cpu().numpy(),
                 resolution=self.resolution, inner_only=self.inner_only, format_version=FORMAT_VERSION)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.save(buf)
        return buf.getvalue()

    @classmethod
    def load(cls, path_or_file) -> "HeatmapDescriptor":
        with np.load(path_or_file, allow_pickle=False) as z:  # plain arrays only: no pickles
            if int(z["format_version"]) != FORMAT_VERSION:
                raise ValueError(f"descriptor file format {int(z['format_version'])} is not supported "
                                 f"(expected {FORMAT_VERSION})")
            return cls(torch.from_numpy(z["mean"]), torch.from_numpy(z["components"]),
                       int(z["resolution"]), bool(z["inner_only"]))

    def spec(self) -> dict:
        return {"resolution": self.resolution, "inner_only": self.inner_only, "dim": self.dim,
                "input_dim": int(self.mean.shape[0]), "format_version": FORMAT_VERSION}
