"""The shared fixtures work against real components."""

import torch
import torch.distributed as dist

from hncl.core import dist as hdist


def _rank_sum_and_gather():
    r, w = dist.get_rank(), dist.get_world_size()
    t = torch.tensor([float(r + 1)])
    dist.all_reduce(t)
    # variable-size gather: rank r contributes r + 1 rows holding r
    rows = torch.full((r + 1, 2), float(r))
    gathered = hdist.all_gather_rows(rows)
    return r, w, float(t.item()), gathered


def test_run_distributed_real_gloo_processes(run_distributed):
    results = run_distributed(_rank_sum_and_gather, 3)
    assert [r[0] for r in results] == [0, 1, 2]
    assert all(r[1] == 3 for r in results)
    assert all(r[2] == 6.0 for r in results)  # 1 + 2 + 3
    expected = torch.tensor([[0.0, 0.0], [1, 1], [1, 1], [2, 2], [2, 2], [2, 2]])
    for r in results:
        assert torch.equal(r[3], expected)


def test_s3_endpoint_real_roundtrip(s3):
    fs, bucket = s3
    payload = bytes(range(256)) * 4096  # 1 MiB
    with fs.open(f"{bucket}/dir/blob.bin", "wb") as f:
        f.write(payload)
    assert fs.ls(f"{bucket}/dir") == [f"{bucket}/dir/blob.bin"]
    with fs.open(f"{bucket}/dir/blob.bin", "rb") as f:
        f.seek(1000)
        assert f.read(10) == payload[1000:1010]  # ranged read
    assert fs.cat(f"{bucket}/dir/blob.bin") == payload


def _ray_train_loop(config):
    r = dist.get_rank()
    t = torch.tensor([float(r + 1)])
    dist.all_reduce(t)
    return {"rank_sum": float(t.item()), "world": dist.get_world_size()}


def test_ray_local_runs_a_two_worker_torch_trainer(ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(_ray_train_loop, scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                           run_config=RunConfig(name="infra", storage_path=str(tmp_path)))
    result = trainer.fit()
    assert result.error is None
    # Train V2 returns rank 0's return value: a gloo all-reduce across two Ray workers, 1 + 2.
    assert result.return_value == {"rank_sum": 3.0, "world": 2}
