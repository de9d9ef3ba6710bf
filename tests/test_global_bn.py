"""GlobalBatchNorm (model.sync_bn on CPU ranks): W gloo ranks holding parts of a batch give what
one process's BatchNorm gives on the whole batch: outputs, input and parameter gradients,
running statistics."""

import pytest
import torch

from hncl.core.global_bn import GlobalBatchNorm, convert_global_batchnorm

SIZES = (3, 5)  # ranks of different sizes: the statistics are pooled with their counts


def _batch():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(sum(SIZES), 6, 4, 4, generator=g) * 3 + 1.5
    w = torch.randn(sum(SIZES), 6, 4, 4, generator=g)  # the loss's weights: sum(w * y)
    return x, w


def _reference_bn(momentum=0.3):
    bn = torch.nn.BatchNorm2d(6, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, 6))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    return bn


def _steps(bn, x, w, steps=2):
    """Two training steps (running statistics move twice), then one eval forward."""
    grads = []
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        bn.zero_grad()
        y = bn(x)
        (y * w).sum().backward()
        grads.append((y.detach(), x.grad.clone(), bn.weight.grad.clone(), bn.bias.grad.clone()))
    bn.eval()
    return grads, bn.running_mean.clone(), bn.running_var.clone(), bn(x.detach()), int(bn.num_batches_tracked)


def _on_rank(sizes, momentum):
    import torch.distributed as dist

    x, w = _batch()
    start = sum(sizes[: dist.get_rank()])
    rows = slice(start, start + sizes[dist.get_rank()])
    bn = convert_global_batchnorm(torch.nn.Sequential(_reference_bn(momentum)))[0]
    assert isinstance(bn, GlobalBatchNorm)
    return _steps(bn, x[rows], w[rows])


# uneven ranks; and a rank whose share is empty, with momentum None (a cumulative average)
@pytest.mark.parametrize("sizes,momentum", [(SIZES, 0.3), ((0, sum(SIZES)), None)])
def test_two_ranks_equal_one_process_batchnorm(run_distributed, sizes, momentum):
    x, w = _batch()
    ref_grads, ref_mean, ref_var, ref_eval, ref_tracked = _steps(_reference_bn(momentum), x, w)
    parts = run_distributed(_on_rank, 2, sizes, momentum)
    for step, (y, gx, gw, gb) in enumerate(ref_grads):
        ys = [p[0][step] for p in parts]
        torch.testing.assert_close(torch.cat([t[0] for t in ys]), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([t[1] for t in ys]), gx, rtol=1e-4, atol=1e-5)  # the stats' gradient crosses ranks
        # each rank's parameter gradient is its share; DDP's sum (x 1/W for its mean) is the whole batch's
        torch.testing.assert_close(sum(t[2] for t in ys), gw, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sum(t[3] for t in ys), gb, rtol=1e-4, atol=1e-5)
    for _, mean, var, evaluated, tracked in parts:  # running statistics are the global batch's (unbiased)
        torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=1e-6)
        assert tracked == ref_tracked == 2
    torch.testing.assert_close(torch.cat([p[3] for p in parts]), ref_eval, rtol=1e-5, atol=1e-5)


def test_one_process_is_plain_batchnorm_and_conversion_keeps_parameters():
    x, w = _batch()
    ref = _reference_bn()
    model = convert_global_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(6, 6, 1), _reference_bn()))
    assert isinstance(model[1], GlobalBatchNorm) and isinstance(model[0], torch.nn.Conv2d)
    assert torch.equal(model[1].weight, ref.weight) and model[1].momentum == 0.3
    torch.testing.assert_close(_steps(model[1], x, w)[3], _steps(ref, x, w)[3])


def _ddp_step_with_engine_sync_bn():
    """The engine's prepare_model with model.sync_bn on CPU ranks, under DDP: one SGD step."""
    import torch.distributed as dist

    from hncl.config import load_config
    from hncl.train.engine import prepare_model

    x, w = _batch()
    rows = slice(4 * dist.get_rank(), 4 * dist.get_rank() + 4)
    model = prepare_model(_small_model(), load_config("configs/debug.yaml").dist, torch.device("cpu"), sync_bn=True)
    kinds = {type(m).__name__ for m in model.modules()}
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    # each rank's loss is its share: their mean over ranks is the one-process loss (DDP averages)
    (ddp(x[rows]) * w[rows, :5, 0, 0]).sum().mul(dist.get_world_size() / len(x)).backward()
    opt.step()
    return kinds, [p.detach().clone() for p in model.parameters()]


def _small_model():
    torch.manual_seed(0)
    # a conv stage and a projector-like head: BatchNorm2d and BatchNorm1d both converted
    return torch.nn.Sequential(torch.nn.Conv2d(6, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                               torch.nn.Conv2d(6, 6, 1), torch.nn.Flatten(), torch.nn.Linear(96, 5),
                               torch.nn.BatchNorm1d(5))


def test_engine_sync_bn_on_cpu_ranks_trains_like_one_process(run_distributed):
    """model.sync_bn=true on a CPU (gloo) DDP run: torch's SyncBatchNorm would refuse the CPU
    tensors; the engine's GlobalBatchNorm makes 2 ranks of 4 step exactly like one process of 8."""
    x, w = _batch()
    ref = _small_model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    (ref(x) * w[:, :5, 0, 0]).sum().div(len(x)).backward()
    opt.step()
    for kinds, params in run_distributed(_ddp_step_with_engine_sync_bn, 2):
        assert "GlobalBatchNorm" in kinds and not kinds & {"BatchNorm1d", "BatchNorm2d", "SyncBatchNorm"}
        for p, q in zip(params, ref.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6)
