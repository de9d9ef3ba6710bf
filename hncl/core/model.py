"""Encoder, NNCLR projector and predictor.

The built-in encoder is torchvision's own ResNet class built with a configurable base width, so
at width 64 it is exactly torchvision's resnet18/resnet50 (same modules, same state-dict keys) and
external torchvision-keyed weights load directly; smaller widths give CPU-sized test models.
IResNet and any timm model are the other encoders (hncl.core.backbones); the projector attaches to
whatever width the encoder's feature has.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from hncl.config import Stem
from hncl.errors import InputError, UserError

_ARCHS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}


class ResNetEncoder(ResNet):
    """torchvision ResNet with base width `width` and no classifier: image -> feature vector."""

    def __init__(self, arch: str = "resnet18", width: int = 64, stem: str = "imagenet"):
        if arch not in _ARCHS:
            raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {arch!r}")
        block, layers = _ARCHS[arch]
        super().__init__(block, layers)  # builds the standard network; re-built below if width != 64
        if width != 64 or stem != "imagenet":
            self._rebuild(block, layers, width, stem)
        self.arch, self.width, self.stem = arch, width, stem
        self.out_dim = 8 * width * block.expansion
        self.fc = nn.Identity()  # type: ignore[assignment]

    def _rebuild(self, block, layers, width: int, stem: str) -> None:
        # Same construction as torchvision's ResNet.__init__, with `width` in place of 64.
        self.inplanes = width
        if stem == "small":
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()  # type: ignore[assignment]
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        self.bn1 = self._norm_layer(width)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def mlp(in_dim: int, hidden: int, out_dim: int, layers: int, last_bn: bool) -> nn.Sequential:
    """Linear-BN-ReLU blocks, then a final Linear (+ BN): NNCLR's projector and predictor."""
    mods = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        dim = hidden
    mods.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim))
    return nn.Sequential(*mods)


class HNCLModel(nn.Module):
    """encoder f -> projector g -> z ; predictor q(z) -> p. forward(x1, x2) runs both views in
    one call (one DDP forward per step; each view keeps its own BatchNorm statistics)."""

    def __init__(self, arch: str = "resnet18", width: int = 64, stem: str = "imagenet",
                 proj_layers: int = 3, proj_hidden: int = 2048, proj_out: int = 256,
                 pred_hidden: int = 4096, image_size: int = 112):
        super().__init__()
        from hncl.core.backbones import build_encoder

        self.encoder = build_encoder(arch, width, stem, image_size)
        self.projector = mlp(self.encoder.out_dim, proj_hidden, proj_out, proj_layers, last_bn=True)
        self.predictor = mlp(proj_out, pred_hidden, proj_out, 2, last_bn=False)
        self.embed_dim = proj_out

    @classmethod
    def from_config(cls, model_cfg, image_size: int = 112) -> "HNCLModel":
        m = cls(arch=str(model_cfg.arch), width=model_cfg.width, stem=Stem(model_cfg.stem).value,
                proj_layers=model_cfg.proj_layers, proj_hidden=model_cfg.proj_hidden,
                proj_out=model_cfg.proj_out, pred_hidden=model_cfg.pred_hidden, image_size=image_size)
        if model_cfg.init_weights:
            load_encoder_weights(m.encoder, model_cfg.init_weights)
        return m

    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        z = self.projector(self.encoder(x))
        return z, self.predictor(z)

    def forward(self, x1: torch.Tensor, x2: Optional[torch.Tensor] = None):
        z1, p1 = self.project(x1)
        if x2 is None:
            return z1, p1
        z2, p2 = self.project(x2)
        return z1, p1, z2, p2


class WeightsError(UserError, ValueError):
    """A weights file that cannot be read, or does not fit the encoder."""


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Tensors from .safetensors or a torch file, never unpickling arbitrary objects."""
    if not os.path.exists(path):
        raise InputError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read weights from {path} as a plain tensor state dict "
                         f"(pickled objects are refused): {str(e).splitlines()[0]}") from None
    for key in ("state_dict", "model", "encoder"):  # common checkpoint nestings
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return obj


def load_encoder_weights(encoder: nn.Module, source) -> None:
    """Load weights in the encoder's own key layout (torchvision, insightface IResNet, timm; a
    path or a dict) into it.

    Strips 'module.' / 'encoder.' / 'backbone.' prefixes and the family's classifier (torchvision's
    'fc.*', timm's head); every other key must match, otherwise the error lists what is missing
    or extra."""
    state = read_state_dict(source) if isinstance(source, str) else dict(source)
    classifier = tuple(getattr(encoder, "classifier_keys", ("fc.",)))
    cleaned = {}
    for k, v in state.items():
        for prefix in ("module.", "encoder.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if not (classifier and k.startswith(classifier)):
            cleaned[k] = v
    mine = encoder.state_dict()
    own = {k for k in mine if not (classifier and k.startswith(classifier))}
    missing, extra = sorted(own - cleaned.keys()), sorted(cleaned.keys() - own)
    what = f"{getattr(encoder, 'arch', type(encoder).__name__)}" + \
        (f" width {encoder.width}" if not str(getattr(encoder, "arch", "")).startswith("timm/") else "")
    if missing or extra:
        raise WeightsError(f"encoder weights do not fit {what}: "
                           f"{len(missing)} missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                           f"{len(extra)} unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    bad = [k for k in own if cleaned[k].shape != mine[k].shape]
    if bad:
        raise WeightsError(f"encoder weights have wrong shapes for {bad[:5]} ({what})")
    encoder.load_state_dict(cleaned, strict=False)
