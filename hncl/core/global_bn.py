"""BatchNorm over the global batch on any device and backend (plain PyTorch, any process group).

With per-rank BatchNorm each rank normalises its own samples with its own batch statistics, so
every embedding carries a signature of the rank that made it. A contrastive loss over the
global batch can use it: both views of an image sit on one rank, so negatives from other ranks
are told apart by the signature, and positives from another rank (HNCL's in-batch heatmap
neighbours) are pushed apart by it. SimCLR's "global BN" and torch's SyncBatchNorm remove it,
but torch's SyncBatchNorm runs on GPUs only; this module does the same on CPU ranks over gloo
(model.sync_bn=true on a CPU cluster). On CUDA the engine keeps torch's SyncBatchNorm.

Statistics are combined exactly (per-rank mean and variance pooled with their counts, ranks of
different sizes included), and gradients flow through them: each rank's input gradient is that
of the sum of every rank's loss, as in torch's SyncBatchNorm, so DDP's averaged gradients equal
those of one process on the whole batch.
"""

from __future__ import annotations

import torch

from hncl.core import dist as hdist


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm{1,2,3}d whose training statistics are the global batch's (all ranks). In eval
    mode, or in a single process, it is plain BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects [N, C, ...] input, got {x.dim()} dimensions")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and hdist.is_distributed() and hdist.world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1]
        stats_dtype = torch.float64 if x.device.type == "cpu" else torch.float32
        xs = x.to(stats_dtype)
        mean = xs.sum(dims) / max(count, 1)  # an empty rank contributes nothing
        var = ((xs - mean.view(shape)) ** 2).sum(dims) / max(count, 1)
        local = torch.cat([mean.new_tensor([float(count)]), mean, var]).unsqueeze(0)
        # [W, 1 + 2C], one row per rank, with gradient through the statistics
        every, _ = hdist.all_gather_with_grad(local, sizes=(1,) * hdist.world_size())
        counts, means, variances = every[:, :1], every[:, 1:1 + x.shape[1]], every[:, 1 + x.shape[1]:]
        total = counts.sum()
        if total.item() < 2:
            raise ValueError(f"GlobalBatchNorm needs more than one value per channel in the global batch, got {int(total.item())}")
        g_mean = (counts * means).sum(0) / total
        g_var = (counts * (variances + (means - g_mean) ** 2)).sum(0) / total  # pooled, biased
        if self.track_running_stats:
            self._update_running_stats(g_mean.detach(), g_var.detach() * total / (total - 1))
        y = (xs - g_mean.view(shape)) * torch.rsqrt(g_var.view(shape) + self.eps)
        y = y.to(x.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        # momentum None: a cumulative average, as torch's BatchNorm does
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), momentum)


def convert_global_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm*d in `module` replaced by a GlobalBatchNorm with the same parameters,
    buffers and settings (like torch's SyncBatchNorm.convert_sync_batchnorm)."""
    out = module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert_global_batchnorm(child))
    return out

