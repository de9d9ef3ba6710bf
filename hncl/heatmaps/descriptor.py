"""The heatmap descriptor: what HNCL compares to find expression neighbours.

    pooled heatmap uint8 [68, R, R] -> (inner 51 points) -> flatten -> L2
        -> minus mean, times PCA components [d, Dh] -> L2  => [Dh]

Dropping the 17 jaw-line points removes face shape (= identity) from the comparison; the PCA is
fitted once per shard set (by make_shards) on a sample of its heatmaps and stored beside the
shards as descriptor.npz, so every worker applies the same projection, on its own device.

The file also keeps each component's variance, so a run can search neighbours in the *whitened*
space of the first k components (`descriptor.whiten`, `whitened(k)`): the few directions of
largest variance in aligned landmark heatmaps are head pose and face shape (out-of-plane rotation
moves every point at once), and in a plain cosine they outweigh the smaller displacements of
brows, lids and lips that an expression makes. Scaled to unit variance each counts the same
(README, Demo: purer heatmap neighbours on validation identities).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional, Union

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


# a component whose variance is below this share of the largest is whitened as if it had this
# much: dividing by a near-zero spread would blow up numerical noise (tiny or degenerate sets)
MIN_RELATIVE_VARIANCE = 1e-6


@dataclass
class HeatmapDescriptor:
    mean: torch.Tensor  # [d]
    components: torch.Tensor  # [d, Dh], orthonormal columns (whitened: scaled, see whitened())
    resolution: int
    inner_only: bool
    # [Dh] variance of the fitting sample along each component (None: a file made before it was kept)
    variances: Optional[torch.Tensor] = None

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
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        comp = vh[:dim].T  # [d, Dh]
        signs = comp.gather(0, comp.abs().argmax(0, keepdim=True)).sign()
        comp = comp * torch.where(signs == 0, torch.ones_like(signs), signs)
        variances = s[:dim] ** 2 / max(1, x.shape[0] - 1)
        return cls(mean.float(), comp.float().contiguous(), int(pooled.shape[-1]), inner_only, variances.float())

    def whitened(self, k: int) -> "HeatmapDescriptor":
        """The descriptor in the first k components, each scaled to unit variance on the fitting
        sample: cosines then weigh every direction of heatmap variation alike, not head pose and
        face shape (the largest) above expression. A file without variances cannot be whitened."""
        if self.variances is None:
            raise ValueError("this descriptor.npz keeps no component variances (made before they were kept): "
                             "build the shard set again with hncl make-shards to whiten its descriptor")
        if not 1 <= k <= self.dim:
            raise ValueError(f"cannot whiten {k} components: the descriptor has {self.dim} (1..{self.dim})")
        var = self.variances[:k].double()
        var = var.clamp(min=float(var.max()) * MIN_RELATIVE_VARIANCE)
        comp = (self.components[:, :k].double() / var.sqrt()).float().contiguous()
        return HeatmapDescriptor(self.mean, comp, self.resolution, self.inner_only, torch.ones_like(self.variances[:k]))

    def to(self, device) -> "HeatmapDescriptor":
        variances = None if self.variances is None else self.variances.to(device)
        return HeatmapDescriptor(self.mean.to(device), self.components.to(device), self.resolution, self.inner_only,
                                 variances)

    def __call__(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, 68, R, R] stored heatmaps (any device) -> [B, Dh] unit descriptors."""
        if pooled.shape[-1] != self.resolution:
            raise ValueError(f"heatmaps are {pooled.shape[-1]}x{pooled.shape[-1]} but the descriptor was fitted "
                             f"on {self.resolution}x{self.resolution}")
        x = flatten_heatmaps(pooled, self.inner_only)
        return F.normalize((x - self.mean) @ self.components, dim=1)

    # -- descriptor.npz ----------------------------------------------------------------------
    def save(self, path_or_file) -> None:
        # variances is an extra array of the same format: readers before it ignore it
        extra = {} if self.variances is None else {"variances": self.variances.cpu().numpy()}
        np.savez(path_or_file, mean=self.mean.cpu().numpy(), components=self.components.cpu().numpy(),
                 resolution=self.resolution, inner_only=self.inner_only, format_version=FORMAT_VERSION, **extra)

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
            variances = torch.from_numpy(z["variances"]) if "variances" in z.files else None
            return cls(torch.from_numpy(z["mean"]), torch.from_numpy(z["components"]),
                       int(z["resolution"]), bool(z["inner_only"]), variances)

    def spec(self) -> dict:
        return {"resolution": self.resolution, "inner_only": self.inner_only, "dim": self.dim,
                "input_dim": int(self.mean.shape[0]), "format_version": FORMAT_VERSION}
