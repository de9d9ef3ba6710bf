"""Encoder = torchvision's ResNet: same keys, loads torchvision weights, configurable width."""

import os

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from hncl.core.model import HNCLModel, ResNetEncoder, load_encoder_weights


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_width_64_is_exactly_torchvision(arch):
    ours = ResNetEncoder(arch)
    ref = getattr(torchvision.models, arch)()
    ref_keys = {k: v.shape for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == ref_keys
    assert ours.out_dim == ref.fc.in_features


def test_loads_torchvision_state_dict_and_matches_its_features(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.resnet18().eval()
    ref.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    for source in ("dict", "pth", "safetensors"):
        enc = ResNetEncoder("resnet18").eval()
        state = {f"module.{k}": v for k, v in ref.state_dict().items()}  # DDP-style prefix
        state["fc.weight"] = torch.zeros(1000, 512)  # a classifier is dropped, not an error
        if source == "pth":
            torch.save({"state_dict": state}, tmp_path / "w.pth")
            state = str(tmp_path / "w.pth")
        elif source == "safetensors":
            save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
            state = str(tmp_path / "w.safetensors")
        load_encoder_weights(enc, state)
        with torch.no_grad():
            assert torch.equal(enc(x), ref(x)), source


def test_wrong_weights_and_pickles_are_refused(tmp_path):
    enc = ResNetEncoder("resnet18", width=16)
    with pytest.raises(ValueError, match="wrong shapes|do not fit"):
        load_encoder_weights(enc, torchvision.models.resnet18().state_dict())
    with pytest.raises(ValueError, match="missing"):
        load_encoder_weights(enc, torchvision.models.resnet50().state_dict())
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": _Custom()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="pickled objects are refused"):
        load_encoder_weights(enc, str(tmp_path / "evil.pth"))


class _Custom:
    pass


def test_small_model_shapes_and_two_view_forward():
    m = HNCLModel("resnet18", width=16, stem="small", proj_hidden=32, proj_out=24, pred_hidden=48)
    assert m.encoder.out_dim == 128
    z1, p1, z2, p2 = m(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert z1.shape == p1.shape == z2.shape == p2.shape == (4, 24)
    # NNCLR heads: 3-layer projector ending in BatchNorm, 2-layer predictor ending in Linear
    assert sum(isinstance(l, torch.nn.Linear) for l in m.projector) == 3
    assert isinstance(m.projector[-1], torch.nn.BatchNorm1d)
    assert sum(isinstance(l, torch.nn.Linear) for l in m.predictor) == 2
    assert isinstance(m.predictor[-1], torch.nn.Linear)


# --- other backbones: timm models and face-recognition IResNets (hncl.core.backbones) ----------------
FAMILIES = [("timm/test_vit", 32), ("timm/test_convnext", 32), ("iresnet18", 32)]


@pytest.mark.parametrize("arch, size", FAMILIES)
def test_every_family_trains_and_loads_its_own_checkpoint_layout(arch, size, tmp_path):
    """The projector attaches to the backbone's pooled feature whatever its width; a checkpoint in
    the family's own layout (timm's with its classifier head, insightface's) loads and gives the
    features of the network it came from."""
    import timm

    from hncl.core.backbones import build_encoder

    torch.manual_seed(0)
    model = HNCLModel(arch, width=8, stem="small", proj_hidden=32, proj_out=16, pred_hidden=32, image_size=size)
    x1, x2 = torch.randn(4, 3, size, size), torch.randn(4, 3, size, size)
    z1, p1, z2, p2 = model(x1, x2)
    assert z1.shape == p2.shape == (4, 16)
    (z1.sum() + p2.sum()).backward()
    assert all(p.grad is not None for p in model.encoder.parameters())  # every encoder weight trains

    if arch.startswith("timm/"):
        sized = {"img_size": size} if "vit" in arch else {}
        source = timm.create_model(arch[5:], pretrained=False, num_classes=7, **sized)  # with its classifier head
        with torch.no_grad():
            want = source.forward_head(source.forward_features(x1), pre_logits=True)
    else:
        source = build_encoder(arch, 8, "small", size)
        want = source.eval()(x1)
    path = str(tmp_path / "native.safetensors")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    encoder = build_encoder(arch, 8, "small", size)
    load_encoder_weights(encoder, path)
    with torch.no_grad():
        assert torch.allclose(encoder.eval()(x1), want, atol=1e-6)


def test_iresnet_has_insightfaces_layout_and_a_wrong_family_is_named():
    """iresnet50 at 112 px in the published network's shapes (43.6 M parameters, a 512-d embedding
    from 512 x 7 x 7 cells), so insightface's checkpoints load key for key; weights of another
    family are refused in one line listing what is missing and unexpected."""
    from hncl.core.backbones import build_encoder
    from hncl.core.model import WeightsError

    r50 = build_encoder("iresnet50", 64, "imagenet", 112)
    shapes = {k: tuple(v.shape) for k, v in r50.state_dict().items()}
    assert sum(p.numel() for p in r50.parameters()) == 43_590_848
    assert shapes["conv1.weight"] == (64, 3, 3, 3) and shapes["prelu.weight"] == (64,)
    assert shapes["layer1.0.downsample.0.weight"] == (64, 64, 1, 1) and shapes["layer3.13.conv2.weight"] == (256, 256, 3, 3)
    assert shapes["fc.weight"] == (512, 512 * 7 * 7) and shapes["features.running_var"] == (512,)
    assert not any(k.startswith("layer3.14.") for k in shapes) and r50.out_dim == 512

    vit = build_encoder("timm/test_vit", 64, "small", 32)
    convnext = build_encoder("timm/test_convnext", 64, "small", 32).state_dict()
    with pytest.raises(WeightsError) as err:
        load_encoder_weights(vit, convnext)
    msg, mine = str(err.value), set(vit.state_dict())
    assert "timm/test_vit" in msg and "\n" not in msg
    assert f"{len(mine - set(convnext))} missing ['blocks." in msg and f"{len({k for k in convnext if not k.startswith(vit.classifier_keys)} - mine)} unexpected ['" in msg


@pytest.mark.parametrize("arch, size", FAMILIES)
def test_every_family_predicts_and_exports(arch, size, tmp_path):
    """A classifier of each family, saved as `hncl finetune` saves one, predicts on image files
    what the PyTorch model gives on the same preprocessed pixels, and exports to TorchScript and
    ONNX within tolerance (timm's ViT attention and ConvNeXt's LayerNorm trace like the ResNets)."""
    import numpy as np
    from PIL import Image

    from hncl.commands.export import export
    from hncl.commands.predict import predict
    from hncl.core.classifier import FERClassifier, preprocess, save_classifier

    torch.manual_seed(1)
    model = FERClassifier(arch, 8, "small", num_classes=3, image_size=size).eval()
    spec = {"arch": arch, "width": 8, "stem": "small"}
    path = save_classifier(model, str(tmp_path / "clf"), spec, ["happy", "sad", "neutral"], size)
    assert os.stat(path).st_mode & 0o777 == 0o644  # readable by others, as encoder.safetensors
    pixels = np.random.default_rng(0).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)  # not square, not the size
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"face{i}.png")
    rows = predict(str(tmp_path / "clf"), str(tmp_path))
    with torch.no_grad():
        want = model(preprocess(torch.from_numpy(pixels).permute(0, 3, 1, 2), size)).softmax(1)
    for row, w in zip(rows, want):
        assert row["status"] == "ok" and row["expression"] == ["happy", "sad", "neutral"][int(w.argmax())]
        assert list(row["probabilities"].values()) == pytest.approx(w.tolist(), abs=1e-5)
    report = export(str(tmp_path / "clf"), str(tmp_path / "export"))
    assert report["input"] == [None, 3, size, size]
    assert report["torchscript_max_abs_diff"] <= report["tolerance"] and report["onnx_max_abs_diff"] <= report["tolerance"]
