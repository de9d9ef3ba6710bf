"""Encoder = torchvision's ResNet: same keys, loads torchvision weights, configurable width."""

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from hncl.model import HNCLModel, ResNetEncoder, load_encoder_weights


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
