"""The encoders hncl pretrains: image -> pooled feature vector, each in its own key layout.

- `resnet18`, `resnet50`: torchvision's ResNet (hncl.core.model.ResNetEncoder), any base width.
- `iresnet18`, `iresnet50`: the IResNet of face recognition (ArcFace / insightface's
  `arcface_torch` layout: pre-activation blocks with PReLU, a stride-1 stem, a BN-FC-BN
  embedding head), so insightface checkpoints load as they are. Its feature is the 512-d
  embedding; the head's FC is sized for the image (7 x 7 cells at 112 px).
- `timm/NAME`: any timm model (`timm.list_models()`), built with no classifier (its pooled
  feature, `num_features` wide) and, where the family takes one, for the run's image size.
Nothing is downloaded: weights come from `model.init_weights` (a file in the family's layout).
"""

from __future__ import annotations

import difflib
from typing import Optional

import torch
import torch.nn as nn

IRESNET_LAYERS = {"iresnet18": [2, 2, 2, 2], "iresnet50": [3, 4, 14, 3]}
TORCHVISION = ("resnet18", "resnet50")
TIMM_PREFIX = "timm/"


def check_arch(arch: str) -> Optional[str]:
    """Why `arch` names no encoder hncl can build (None when it does)."""
    if arch in TORCHVISION or arch in IRESNET_LAYERS:
        return None
    if arch.startswith(TIMM_PREFIX):
        import timm

        name = arch[len(TIMM_PREFIX):]
        if timm.is_model(name):
            return None
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        return f"no timm model '{name}'" + (f" (did you mean {', '.join(TIMM_PREFIX + c for c in close)}?)"
                                            if close else " (timm.list_models() names them)")
    return (f"allowed values: {', '.join(TORCHVISION + tuple(IRESNET_LAYERS))}, or timm/NAME for any timm model "
            f"(e.g. timm/vit_small_patch16_224, timm/convnext_tiny)")


def build_encoder(arch: str, width: int = 64, stem: str = "imagenet", image_size: int = 112) -> nn.Module:
    """The encoder for `arch`, with `arch`, `out_dim` and `classifier_keys` (the key prefixes of a
    classifier that checkpoints of the family carry and the encoder has not) set on it. width and
    stem shape the torchvision ResNets (width: IResNet's too); image_size: IResNet's embedding
    and the ViT-like timm families."""
    why = check_arch(arch)
    if why:
        raise ValueError(f"model.arch={arch!r}: {why}")
    if arch in TORCHVISION:
        from hncl.core.model import ResNetEncoder

        encoder = ResNetEncoder(arch, width, stem)
        encoder.classifier_keys = ("fc.",)
        return encoder
    if arch in IRESNET_LAYERS:
        encoder = IResNet(IRESNET_LAYERS[arch], width=width, image_size=image_size)
    else:  # model.width and model.stem are the ResNets': a timm model is as timm defines it
        encoder = _timm_encoder(arch[len(TIMM_PREFIX):], image_size)
    encoder.arch = arch
    return encoder


def check_image_size(encoder: nn.Module, image_size: int) -> Optional[str]:
    """Why `encoder` cannot take image_size x image_size images, or None. A ViT cuts the pixels
    past the last whole patch without a word, so its patch size must divide the image; any
    other misfit (a convnet whose strides leave nothing) shows in one forward of a blank image."""
    patch = getattr(getattr(encoder, "patch_embed", None), "patch_size", None)
    if patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        if image_size % ph or image_size % pw:
            return f"its patches are {ph} x {pw} px: the image size must be a multiple of {ph}"
    was_training = encoder.training
    try:
        with torch.no_grad():
            encoder.eval()(torch.zeros(1, 3, image_size, image_size))
    except Exception as e:  # noqa: BLE001 -- any failure is the answer; its first line says which
        return f"a {image_size} x {image_size} image fails in the encoder: {str(e).strip().splitlines()[0][:200]}"
    finally:
        encoder.train(was_training)
    return None


def _timm_encoder(name: str, image_size: int) -> nn.Module:
    import timm

    try:  # ViT-like families are built for an image size (their position embeddings)
        model = timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size)
    except TypeError:  # convolutional ones take any size
        model = timm.create_model(name, pretrained=False, num_classes=0)
    model.out_dim = model.num_features
    head = model.pretrained_cfg.get("classifier", "head")
    heads = head if isinstance(head, (list, tuple)) else (head,)
    model.classifier_keys = tuple(h + "." for h in heads)
    return model


class IBlock(nn.Module):
    """IResNet's basic block: BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """Face-recognition ResNet in insightface's key layout (conv1, bn1, prelu, layer1-4, bn2, fc,
    features). width: channels of the first stage (64 = the published networks); the embedding is
    8 x width wide, as the last stage."""

    def __init__(self, layers, width: int = 64, image_size: int = 112):
        super().__init__()
        if image_size % 16:
            raise ValueError(f"IResNet needs an image size divisible by 16, got {image_size}")
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.prelu = nn.PReLU(width)
        stages, inplanes = [], width
        for i, blocks in enumerate(layers):
            planes = width * 2 ** i
            stages.append(nn.Sequential(IBlock(inplanes, planes, 2), *[IBlock(planes, planes) for _ in range(blocks - 1)]))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(inplanes)
        self.dropout = nn.Dropout(0.0)
        cells = (image_size // 16) ** 2
        self.fc = nn.Linear(inplanes * cells, inplanes)
        # insightface freezes this BatchNorm's scale at 1 for recognition; here it trains (every
        # parameter of an encoder trains alike: DDP, ZeRO and the optimiser's groups stay plain)
        self.features = nn.BatchNorm1d(inplanes)
        self.out_dim, self.width = inplanes, width
        self.classifier_keys = ()  # fc and features are the embedding, not a classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))
