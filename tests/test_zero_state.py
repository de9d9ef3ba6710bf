"""A ZeRO-1/2 optimiser saved on 2 ranks and loaded on 1 (hncl/train/zero_state.py) is the same
optimiser: the next step there gives the weights the 2-rank run's next step gives (AdamW: its
moments and step count matter)."""

import os

import pytest
import torch

from hncl.core.dist import spawn_gloo


def _batch(step: int) -> torch.Tensor:
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(100 + step))


def _zero(micro_batch: int, stage: int):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                   dist_init_required=False)
    return model, engine


def _step(engine, x: torch.Tensor) -> None:
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    engine.step()


def _weights(model) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).clone() for name, p in model.named_parameters()}


def _train_save_and_step(path: str, stage: int) -> dict:
    import torch.distributed as dist

    from hncl.train.zero_state import save_consolidated

    rank, world = dist.get_rank(), dist.get_world_size()
    model, engine = _zero(8 // world, stage)
    for step in range(3):
        _step(engine, _batch(step).chunk(world)[rank])
    save_consolidated(model, engine.optimizer, path)
    _step(engine, _batch(3).chunk(world)[rank])
    return _weights(model)


def _load_and_step(path: str, stage: int) -> dict:
    from hncl.train.zero_state import load_consolidated

    model, engine = _zero(8, stage)
    load_consolidated(model, engine.optimizer, path)
    _step(engine, _batch(3))
    return _weights(model)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_state_saved_on_two_ranks_steps_on_one_as_it_would_have_on_two(tmp_path, monkeypatch, stage):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    path = str(tmp_path / "zero_consolidated.pt")
    on_two = spawn_gloo(_train_save_and_step, 2, path, stage)[0]
    assert os.path.exists(path)
    (on_one,) = spawn_gloo(_load_and_step, 1, path, stage)
    fresh = spawn_gloo(_train_save_and_step, 1, str(tmp_path / "other.pt"), stage)[0]  # 1 rank from the start
    for name, weight in on_two.items():
        assert torch.allclose(on_one[name], weight, atol=1e-6), name
        assert torch.allclose(fresh[name], weight, atol=1e-6), name  # ZeRO on 1 or 2 ranks: one optimiser
    # a load that lost the moments (fresh optimiser state) would not match
    assert any(not torch.allclose(_fresh_step(name, path), on_two[name], atol=1e-6) for name in ["0.weight"])


def _fresh_step(name: str, path: str) -> torch.Tensor:
    """The weights after one step from the saved weights with a new optimiser (moments lost)."""
    saved = torch.load(path, weights_only=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model.load_state_dict(saved["module"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    model(_batch(3)).pow(2).mean().backward()
    optimizer.step()
    return dict(model.named_parameters())[name].detach()
