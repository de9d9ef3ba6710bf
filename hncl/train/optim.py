"""Optimisers (SGD, AdamW, LARS from timm; layer-wise lr decay for timm encoders) and the
warm-up + cosine learning-rate schedule (in samples)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import torch

from hncl.config import OptimizerName


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """No weight decay on biases and norm layers, as in SimCLR/BYOL/NNCLR (timm's LARS then also
    skips its trust-ratio adaptation for them: it adapts only where weight_decay != 0)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def layer_decay_groups(encoder: torch.nn.Module, weight_decay: float, layer_decay: float, lr: float) -> List[dict]:
    """A timm encoder's parameters by depth, as BEiT / MAE fine-tune ViTs: block i (0-based) of L
    at lr x layer_decay^(L-1-i), the embeddings below at layer_decay^L; no weight decay on biases, norms and the
    embeddings timm names (pos_embed, cls_token). Layer ids come from timm's group_matcher."""
    from timm.optim import param_groups_layer_decay

    skip = encoder.no_weight_decay() if hasattr(encoder, "no_weight_decay") else ()
    groups = param_groups_layer_decay(encoder, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    return [{"params": g["params"], "weight_decay": g["weight_decay"], "lr": lr * g["lr_scale"]} for g in groups]


def build_optimizer(model: torch.nn.Module, optim_cfg, global_batch: int) -> torch.optim.Optimizer:
    name = OptimizerName(optim_cfg.name)
    lr = optim_cfg.lr * (global_batch / 256 if optim_cfg.scale_lr else 1.0)
    if optim_cfg.layer_decay is None:
        groups = param_groups(model, optim_cfg.weight_decay)
    else:  # the encoder by depth; the projector and predictor on top, at the full lr
        heads = torch.nn.ModuleList([m for n, m in model.named_children() if n != "encoder"])
        groups = layer_decay_groups(model.encoder, optim_cfg.weight_decay, optim_cfg.layer_decay, lr) + \
            param_groups(heads, optim_cfg.weight_decay)
    if name is OptimizerName.sgd:
        return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum)
    if name is OptimizerName.adamw:
        return torch.optim.AdamW(groups, lr=lr)
    if name is OptimizerName.lars:
        from timm.optim import Lars

        return Lars(groups, lr=lr, momentum=optim_cfg.momentum)
    raise ValueError(f"unknown optimizer {name.value!r}")


@dataclass(frozen=True)
class SampleSchedule:
    """Linear warm-up from ~0 to the base lr, then cosine decay to 0, as a function of the samples
    trained (not of steps): the lr at a point of training is the same whatever the world size
    and the global batch did before it. `factor(samples, batch)` is the lr factor of the step that
    trains samples [samples, samples + batch)."""

    total_samples: int
    warmup_samples: int

    def factor(self, samples: int, batch: int) -> float:
        if samples < self.warmup_samples:
            return min(1.0, (samples + batch) / self.warmup_samples)
        progress = (samples - self.warmup_samples) / max(1, self.total_samples - self.warmup_samples)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
