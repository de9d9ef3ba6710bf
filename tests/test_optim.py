"""Optimisers and the learning-rate schedule."""

import math

import pytest
import torch

from hncl.config import load_config
from hncl.train.optim import SampleSchedule, build_optimizer, param_groups


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_optimizers_scale_lr_and_skip_decay_on_norms_and_biases(name):
    cfg = load_config(None, [f"optim.name={name}", "optim.lr=0.2", "optim.weight_decay=0.01"]).optim
    model = _model()
    opt = build_optimizer(model, cfg, global_batch=512)
    assert [g["lr"] for g in opt.param_groups] == [0.4, 0.4]  # 0.2 x 512 / 256
    decay, no_decay = opt.param_groups
    assert all(p.ndim == 2 for p in decay["params"]) and decay["weight_decay"] == 0.01
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(16, 4)).pow(2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    # The bias of the Linear in front of the BatchNorm has a zero gradient (BN removes any
    # constant shift), ~1e-8 in float32 rounding: whether it moves depends on the thread count.
    # Every parameter with a real gradient must move, by the optimiser's own rule.
    first_bias = model[0].bias
    assert grads[1].abs().max() < 1e-6 and first_bias is list(model.parameters())[1]
    for (pname, p), old, g in zip(model.named_parameters(), before, grads):
        if p is first_bias:
            continue
        assert not torch.equal(old, p.detach()), f"{pname} did not change after opt.step()"
        if name == "sgd":  # first step: momentum buffer = gradient (+ decoupled-from-nothing decay)
            wd = 0.01 if p.ndim == 2 else 0.0
            assert torch.allclose(p.detach(), old - 0.4 * (g + wd * old), rtol=0, atol=1e-6), pname
    assert sum(len(g["params"]) for g in param_groups(model, 0.1)) == len(list(model.parameters()))


def test_warmup_then_cosine_to_zero_in_samples_whatever_the_batch_did():
    sched = SampleSchedule(total_samples=12 * 64, warmup_samples=4 * 64)
    lrs = [sched.factor(step * 64, 64) for step in range(12)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)])
    assert sched.factor(12 * 64, 64) == pytest.approx(0.0, abs=1e-12)
    # a run whose global batch halved after 6 steps (a resume on half the ranks, per-rank batch
    # kept) has the same lr at every sample count from then on
    samples = 6 * 64
    while samples < 12 * 64:
        assert sched.factor(samples, 32) == pytest.approx(0.5 * (1 + math.cos(math.pi * (samples / 64 - 4) / 8)))
        samples += 32


def test_layer_decay_gives_each_vit_layer_its_lr_and_every_parameter_one_group():
    """optim.layer_decay on a timm ViT: block i (0-based) of L at lr x d^(L-1-i), the patch
    embedding and the tokens below them at d^L, the projector and predictor at the full lr, no weight decay on
    biases, norms, pos_embed and cls_token; every parameter in exactly one group."""
    from omegaconf import OmegaConf

    from hncl.core.model import HNCLModel
    from hncl.train.optim import build_optimizer

    model = HNCLModel("timm/test_vit", proj_hidden=16, proj_out=8, pred_hidden=16, image_size=32)
    blocks = len(model.encoder.blocks)
    cfg = OmegaConf.create({"name": "adamw", "lr": 0.1, "scale_lr": False, "weight_decay": 0.05, "momentum": 0.9,
                            "layer_decay": 0.5})
    opt = build_optimizer(model, cfg, global_batch=256)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(lr_of) == len(list(model.parameters()))
    enc = model.encoder
    assert lr_of[id(enc.patch_embed.proj.weight)] == pytest.approx(0.1 * 0.5 ** blocks)
    assert lr_of[id(enc.cls_token)] == pytest.approx(0.1 * 0.5 ** blocks) and wd_of[id(enc.cls_token)] == 0
    for i, block in enumerate(enc.blocks):
        assert lr_of[id(block.attn.qkv.weight)] == pytest.approx(0.1 * 0.5 ** (blocks - 1 - i))
        assert wd_of[id(block.attn.qkv.weight)] == 0.05 and wd_of[id(block.attn.qkv.bias)] == 0
    assert lr_of[id(model.projector[0].weight)] == 0.1 and lr_of[id(model.predictor[0].weight)] == 0.1
    # the schedule scales every group from its own base lr, and the lr reported is the base lr's
    from hncl.train.engine import Engine

    engine = Engine(load_config("configs/debug.yaml").dist, model, opt, None, torch.device("cpu"), alone=True)
    engine.step(sum(p.sum() for p in model.parameters()) * 0, lr_factor=0.25)
    after = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert all(after[k] == pytest.approx(0.25 * lr_of[k]) for k in lr_of)
    assert engine.lr == pytest.approx(0.025)
