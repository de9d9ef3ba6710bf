"""The FER classifier (pretrained encoder + linear head) and how it is stored and fed.

Stored as `classifier.safetensors` (tensors only) + `classifier.json` (architecture, classes,
input size and normalisation), so loading never unpickles anything.

Inputs: RGB faces, aligned as in the shards when possible (make_shards / `hncl predict --align
dlib`), else centre-cropped to a square; resized to `image_size` (bilinear, antialiased), scaled
to [0, 1] and normalised with mean 0.5, std 0.25 per channel.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hncl.config import Stem
from hncl.core.backbones import build_encoder
from hncl.core.model import load_encoder_weights
from hncl.data.augment import MEAN, STD
from hncl.errors import InputError


class FERClassifier(nn.Module):
    def __init__(self, arch: str = "resnet18", width: int = 64, stem: str = "imagenet", num_classes: int = 7,
                 image_size: int = 112):
        super().__init__()
        self.encoder = build_encoder(arch, width, stem, image_size)
        self.head = nn.Linear(self.encoder.out_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def encoder_spec(init: Optional[str], model_cfg) -> dict:
    """Architecture of the encoder to build: from encoder.json beside a pretraining run's
    encoder.safetensors when there is one, else from the model config. (The image size is the
    run's data.image_size: an encoder built for one, a ViT's position embeddings, names it.)"""
    spec = {"arch": str(model_cfg.arch), "width": int(model_cfg.width), "stem": Stem(model_cfg.stem).value}
    if init and init.endswith(".safetensors"):
        meta = os.path.join(os.path.dirname(init), "encoder.json")
        if os.path.exists(meta):
            with open(meta) as f:
                info = json.load(f)
            spec.update({k: info[k] for k in ("arch", "width", "stem")})
    return spec


def build_classifier(init: Optional[str], model_cfg, num_classes: int,
                     image_size: int = 112) -> Tuple[FERClassifier, dict]:
    spec = encoder_spec(init, model_cfg)
    model = FERClassifier(spec["arch"], spec["width"], spec["stem"], num_classes, image_size)
    if init and init != "none":
        load_encoder_weights(model.encoder, init)
    return model, spec


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> normalised float [B, 3, size, size] (centre square crop first)."""
    h, w = images.shape[-2:]
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        images = images[..., top:top + s, left:left + s]
    x = images.float() / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def save_classifier(model: FERClassifier, folder: str, spec: dict, classes: List[str], image_size: int) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "classifier.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path)
    os.chmod(path, 0o644)  # safetensors writes 0600; a classifier is meant to be shared like the encoder
    with open(os.path.join(folder, "classifier.json"), "w") as f:
        json.dump({**spec, "classes": classes, "num_classes": len(classes), "image_size": image_size,
                   "normalize": {"mean": list(MEAN), "std": list(STD)}}, f, indent=1)
    return path


def load_classifier(path: str) -> Tuple[FERClassifier, dict]:
    """A classifier from classifier.safetensors (or its folder) + classifier.json."""
    if os.path.isdir(path):
        path = os.path.join(path, "classifier.safetensors")
    meta_path = os.path.join(os.path.dirname(path), "classifier.json")
    if not os.path.exists(path) or not os.path.exists(meta_path):
        raise InputError(f"no classifier at {path} (needs classifier.safetensors and classifier.json; "
                                f"made by `hncl finetune`)")
    with open(meta_path) as f:
        meta = json.load(f)
    model = FERClassifier(meta["arch"], meta["width"], meta["stem"], meta["num_classes"], meta["image_size"])
    model.load_state_dict(load_file(path))
    return model.eval(), meta
