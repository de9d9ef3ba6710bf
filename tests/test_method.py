"""Methods and loss terms: NNCLR parity, the SimCLR baseline, HNCL's neighbour terms and
metrics, supervised positives, the registry, DDP with per-rank queues."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hncl.config import ConfigError, load_config
from hncl.core.loss import Predictions, multi_positive_nce, nce_per_sample, neighbour_term, positives_term, view_term
from hncl.core.methods import METHODS, build_method, method_class
from hncl.core.methods.hncl import HNCL, batch_heatmap_neighbours
from hncl.core.methods.nnclr import NNCLR
from hncl.core.methods.simclr import SimCLR
from hncl.core.methods.supervised import Supervised
from hncl.core.model import HNCLModel

TAU = 0.15


def method_cfg(name, **over):
    """A config for a method on the tiny model (proj_out 12)."""
    base = {"method.name": name, "method.temperature": TAU, "model.proj_out": 12}
    return load_config(None, [f"{k}={v}" for k, v in {**base, **over}.items()])


def tiny_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return HNCLModel("resnet18", width=8, stem="small", proj_hidden=16, proj_out=12, pred_hidden=16).to(dtype)


def nnclr_reference_loss(z1, z2, p1, p2, support, tau):
    """NNCLR (Dwibedi et al. 2021, eq. 1, symmetrised) written from the paper: NN(z) is the
    support-set element of highest cosine similarity to z; the positive for NN(z1_i) is p2_i and
    the negatives are the other p2_j (cross-view), and vice versa."""
    s = F.normalize(support, dim=1)

    def nn(z):
        return s[(F.normalize(z, dim=1) @ s.T).argmax(dim=1)]

    def nce(a, b):
        logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / tau
        return F.cross_entropy(logits, torch.arange(a.shape[0]))

    return 0.5 * (nce(nn(z1), p2) + nce(nn(z2), p1))


def test_nnclr_parity_loss_and_gradients_float64():
    model = tiny_model(torch.float64)
    gen = torch.Generator().manual_seed(1)
    support = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    x1, x2 = (torch.randn(6, 3, 16, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    ids = torch.arange(1000, 1006)

    step = NNCLR(method_cfg("nnclr", **{"method.queue_size": 40, "method.queue_dtype": "float64"}), model)
    queue = step.queue
    queue.enqueue(None, support, torch.arange(40))
    loss, metrics = step.training_step({"x1": x1, "x2": x2, "id": ids})
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    z1, p1, z2, p2 = model(x1, x2)
    ref = nnclr_reference_loss(z1, z2, p1, p2, support, TAU)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-6 and abs(metrics["loss"] - ref.item()) < 1e-6
    for name, param in model.named_parameters():
        assert torch.allclose(ours[name], param.grad, atol=1e-6, rtol=0), name
    assert any(g.abs().sum() > 0 for g in ours.values())
    # the step enqueued z1 of this batch, FIFO over the oldest entries
    assert sorted(queue.ids[:6].tolist()) == ids.tolist()


def test_two_view_baseline_is_symmetric_infonce():
    gen = torch.Generator().manual_seed(2)
    z1, z2, p1, p2 = (torch.randn(5, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    term = view_term(z1, z2, Predictions.gather(p1, p2), TAU)
    logits = F.normalize(z1, dim=1) @ F.normalize(p2, dim=1).T / TAU
    by_hand = -torch.log_softmax(logits, dim=1).diagonal().mean()
    logits = F.normalize(z2, dim=1) @ F.normalize(p1, dim=1).T / TAU
    by_hand = 0.5 * (by_hand - torch.log_softmax(logits, dim=1).diagonal().mean())
    assert abs(term.item() - by_hand.item()) < 1e-12
    # the SimCLR method is exactly that term on the model's outputs, and nothing else
    model = tiny_model(torch.float64)
    x = torch.randn(5, 3, 16, 16, generator=gen, dtype=torch.float64)
    loss, metrics = SimCLR(method_cfg("simclr"), model).training_step({"x1": x, "x2": x.flip(-1), "id": torch.arange(5)})
    z1, p1, z2, p2 = model(x, x.flip(-1))
    assert loss.item() == view_term(z1, z2, Predictions.gather(p1, p2), TAU).item() and set(metrics) == {"loss", "loss_view"}


def test_topk_neighbour_term_averages_valid_neighbours_and_skips_empty_samples():
    gen = torch.Generator().manual_seed(3)
    z1, z2, p1, p2 = (torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(4))
    nn = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64)
    valid = torch.tensor([[True, True], [True, False], [False, False]])
    preds = Predictions.gather(p1, p2)
    term = neighbour_term(nn, valid, nn, valid, preds, TAU)
    pairs2 = nce_per_sample(nn, p2, 0, TAU)  # [3, 2]
    pairs1 = nce_per_sample(nn, p1, 0, TAU)
    per_sample = [0.5 * (pairs2[0].mean() + pairs1[0].mean()), 0.5 * (pairs2[1, 0] + pairs1[1, 0])]
    expected = (per_sample[0] + per_sample[1]) / 2  # sample 2 has no neighbour: left out
    assert abs(term.item() - expected.item()) < 1e-12
    empty = neighbour_term(nn, torch.zeros_like(valid), nn, torch.zeros_like(valid), preds, TAU)
    assert empty.item() == 0.0  # no NaN from 0/0


def test_training_step_metrics_purity_and_fill():
    model = tiny_model()
    step = HNCL(method_cfg("hncl", **{"method.queue_size": 8, "descriptor.dim": 4, "method.topk": 2}), model)
    keys = torch.eye(4).repeat(2, 1)  # slot j has descriptor e_(j mod 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    step.queue.enqueue(keys, torch.randn(8, 12), torch.arange(8), labels)
    x = torch.randn(4, 3, 16, 16)
    batch = {"x1": x, "x2": x.flip(-1), "id": torch.arange(100, 104), "desc": torch.eye(4)[[0, 1, 2, 2]],
             "label": torch.tensor([0, 1, 3, -1])}
    loss, m = step.training_step(batch)
    # queries 0,1 find two same-label neighbours; query 2 (label 3) finds two label-2 ones;
    # query 3 has no label and does not count
    assert m["nn_purity"] == pytest.approx(4 / 6)
    assert m["nn_score"] == pytest.approx(1.0)
    assert m["queue_fill"] == 1.0
    assert torch.isfinite(loss) and set(m) >= {"loss", "loss_view", "loss_nn"}


def test_multi_positive_nce_matches_a_hand_written_reference():
    gen = torch.Generator().manual_seed(4)
    anchors, cands = torch.randn(3, 5, generator=gen), torch.randn(6, 5, generator=gen)
    positives = torch.tensor([[1, 4], [0, -1], [-1, -1]])
    got = multi_positive_nce(anchors, cands, positives, TAU)
    a, c = F.normalize(anchors, dim=1), F.normalize(cands, dim=1)
    want = []
    for i, pos in enumerate(positives.tolist()):
        pos = [j for j in pos if j >= 0]
        denom = sum(torch.exp(a[i] @ c[j] / TAU) for j in range(6))
        want.append(-sum(torch.log(torch.exp(a[i] @ c[j] / TAU) / denom) for j in pos) / len(pos) if pos else 0.0)
    assert torch.allclose(got, torch.tensor([float(w) for w in want]), atol=1e-5)
    # pool "any" (MIL-NCE): -log of the positives' summed probability; the same from a mask, and
    # never more than "each" (log of a sum >= mean of logs), equal with one positive
    any_ = multi_positive_nce(anchors, cands, positives, TAU, pool="any")
    want_any = []
    for i, pos in enumerate(positives.tolist()):
        pos = [j for j in pos if j >= 0]
        denom = sum(torch.exp(a[i] @ c[j] / TAU) for j in range(6))
        want_any.append(-torch.log(sum(torch.exp(a[i] @ c[j] / TAU) for j in pos) / denom) if pos else 0.0)
    assert torch.allclose(any_, torch.tensor([float(w) for w in want_any]), atol=1e-5)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, [1, 4]] = mask[1, 0] = True
    assert torch.allclose(multi_positive_nce(anchors, cands, mask, TAU, pool="any"), any_, atol=1e-6)
    assert any_[0] < got[0] and torch.allclose(any_[1:], got[1:])



def test_weighted_positives_are_a_soft_target_or_a_mixture():
    """weights: "each" = cross-entropy against the weights, "any" = -log sum_j w_j p_j, written
    out by hand; equal weights give the unweighted "each" exactly and "any" plus log(n)."""
    gen = torch.Generator().manual_seed(8)
    anchors, cands = torch.randn(3, 5, generator=gen, dtype=torch.float64), torch.randn(6, 5, generator=gen,
                                                                                      dtype=torch.float64)
    positives = torch.tensor([[1, 4, 2], [0, -1, 5], [-1, -1, -1]])
    weights = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.0, 0.75], [0.0, 0.0, 0.0]], dtype=torch.float64)
    a, c = F.normalize(anchors, dim=1), F.normalize(cands, dim=1)
    p = torch.softmax(a @ c.T / TAU, dim=1)
    want_each = [-sum(w * torch.log(p[i, j]) for j, w in zip(pos, ws) if j >= 0)
                 for i, (pos, ws) in enumerate(zip(positives.tolist(), weights.tolist()))]
    want_any = [-torch.log(sum(w * p[i, j] for j, w in zip(pos, ws) if j >= 0)) if i < 2 else torch.tensor(0.0)
                for i, (pos, ws) in enumerate(zip(positives.tolist(), weights.tolist()))]
    got_each = multi_positive_nce(anchors, cands, positives, TAU, "each", weights)
    got_any = multi_positive_nce(anchors, cands, positives, TAU, "any", weights)
    assert torch.allclose(got_each, torch.stack([torch.as_tensor(w, dtype=torch.float64) for w in want_each]), atol=1e-12)
    assert torch.allclose(got_any, torch.stack([torch.as_tensor(w, dtype=torch.float64) for w in want_any]), atol=1e-12)
    valid = positives >= 0
    equal = valid / valid.sum(1, keepdim=True).clamp(min=1)
    assert torch.allclose(multi_positive_nce(anchors, cands, positives, TAU, "each", equal),
                          multi_positive_nce(anchors, cands, positives, TAU, "each"), atol=1e-12)
    log_n = torch.log(valid.sum(1).clamp(min=1).double())
    assert torch.allclose(multi_positive_nce(anchors, cands, positives, TAU, "any", equal),
                          multi_positive_nce(anchors, cands, positives, TAU, "any") + log_n * valid.any(1), atol=1e-12)
    with pytest.raises(ValueError, match="indices"):
        multi_positive_nce(anchors, cands, valid.new_ones(3, 6), TAU, "each", weights)


def test_batch_heatmap_neighbours_brute_force_and_small_batches():
    gen = torch.Generator().manual_seed(5)
    desc = torch.randn(9, 6, generator=gen)
    got = batch_heatmap_neighbours(desc, 3)
    sim = F.normalize(desc, dim=1) @ F.normalize(desc, dim=1).T
    sim.fill_diagonal_(float("-inf"))
    assert torch.equal(got, sim.argsort(dim=1, descending=True)[:, :3])
    # mutual: j stays in i's list only if i is in j's list too, in place, -1 where dropped
    mutual = batch_heatmap_neighbours(desc, 3, mutual=True)
    want = [[j if i in got[j].tolist() else -1 for j in got[i].tolist()] for i in range(9)]
    assert mutual.tolist() == want and 0 < (mutual >= 0).sum() < 27  # some kept, some dropped
    assert batch_heatmap_neighbours(desc[:2], 3).tolist() == [[1, -1, -1], [0, -1, -1]]
    assert batch_heatmap_neighbours(desc[:2], 3, mutual=True).tolist() == [[1, -1, -1], [0, -1, -1]]
    assert batch_heatmap_neighbours(desc[:1], 2).tolist() == [[-1, -1]]
    assert batch_heatmap_neighbours(desc[:0], 2).shape == (0, 2)  # an empty batch: no rows, still n columns
    # with their cosines, -inf where there is no neighbour (also where mutual dropped one)
    idx, cos = batch_heatmap_neighbours(desc, 3, with_similarity=True)
    assert torch.equal(idx, got) and torch.allclose(cos, sim.gather(1, got))
    idx, cos = batch_heatmap_neighbours(desc, 3, mutual=True, with_similarity=True)
    assert torch.equal(idx, mutual) and torch.equal(torch.isinf(cos), mutual < 0)
    assert torch.allclose(cos[mutual >= 0], sim.gather(1, got)[mutual >= 0])
    idx, cos = batch_heatmap_neighbours(desc[:2], 3, with_similarity=True)
    assert idx.tolist() == [[1, -1, -1], [0, -1, -1]] and torch.isinf(cos[:, 1:]).all() and torch.isfinite(cos[:, 0]).all()


def _batch_neighbours_on_ranks(desc):
    rank = dist.get_rank()
    mine = desc[rank * 4:(rank + 1) * 4]
    return batch_heatmap_neighbours(mine, 3), batch_heatmap_neighbours(mine, 3, mutual=True)


def test_batch_heatmap_neighbours_index_the_global_batch(run_distributed):
    """Two ranks of 4 find the same global-batch indices as one process holding all 8 (also
    the mutual ones, whose check needs the other rank's lists)."""
    desc = torch.randn(8, 6, generator=torch.Generator().manual_seed(6))
    parts = run_distributed(_batch_neighbours_on_ranks, 2, desc)
    assert torch.equal(torch.cat([p[0] for p in parts]), batch_heatmap_neighbours(desc, 3))
    assert torch.equal(torch.cat([p[1] for p in parts]), batch_heatmap_neighbours(desc, 3, mutual=True))


def test_batch_neighbour_positives_are_in_the_loss_and_report_their_purity():
    model = tiny_model()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    # samples 0,1 share a heatmap, 2,3 share another: each one's in-batch neighbour is its pair
    batch = {"x1": x, "x2": x.flip(-1), "id": torch.arange(4), "desc": torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.1, 1]]),
             "label": torch.tensor([0, 0, 1, 2])}
    cfg = method_cfg("hncl", **{"method.queue_size": 8, "descriptor.dim": 2, "method.batch_neighbours": 1})
    loss, m = HNCL(cfg, model).training_step(batch)
    assert m["batch_nn_purity"] == pytest.approx(0.5)  # 0<->1 agree, 2<->3 do not
    # the term is the pairs' multi-positive InfoNCE, and it is part of the loss (empty queue: no nn term)
    with torch.no_grad():
        z1, p1, z2, p2 = model(x, x.flip(-1))
    pos = torch.tensor([[1], [0], [3], [2]])
    want = 0.5 * (multi_positive_nce(z1, p2, pos, TAU) + multi_positive_nce(z2, p1, pos, TAU)).mean()
    assert m["loss_batch_nn"] == pytest.approx(float(want), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(m["loss_view"] + m["loss_batch_nn"], rel=1e-5)
    # the options for noisy neighbours reach the term: mutual neighbours only, pooled as "any"
    cfg = method_cfg("hncl", **{"method.queue_size": 8, "descriptor.dim": 2, "method.batch_neighbours": 2,
                                "method.mutual_neighbours": True, "method.batch_pool": "any"})
    _, m = HNCL(cfg, model).training_step(batch)
    pos = batch_heatmap_neighbours(batch["desc"], 2, mutual=True)
    want = 0.5 * (multi_positive_nce(z1, p2, pos, TAU, "any") + multi_positive_nce(z2, p1, pos, TAU, "any"))
    assert m["loss_batch_nn"] == pytest.approx(float(want[(pos >= 0).any(1)].mean()), rel=1e-5)
    # soft positives: every other face of the batch, weighted by softmax(heatmap cosine / T)
    cfg = method_cfg("hncl", **{"method.queue_size": 8, "descriptor.dim": 2, "method.batch_neighbours": 3,
                                "method.batch_weight_temperature": 0.1})
    _, m = HNCL(cfg, model).training_step(batch)
    d = F.normalize(batch["desc"], dim=1)
    cos = d @ d.T
    others = torch.tensor([[j for j in range(4) if j != i] for i in range(4)])
    w = torch.softmax(cos.gather(1, others) / 0.1, dim=1)
    want = 0.5 * (multi_positive_nce(z1, p2, others, TAU, "each", w) + multi_positive_nce(z2, p1, others, TAU, "each", w))
    assert m["loss_batch_nn"] == pytest.approx(float(want.mean()), rel=1e-5)
    same = (batch["label"][others] == batch["label"].view(-1, 1)).float()
    assert m["batch_nn_purity"] == pytest.approx(float((w * same).sum() / 4), rel=1e-5)  # weighted purity
    # with one neighbour per anchor its weight is 1: the unweighted term exactly
    one = {"method.queue_size": 8, "descriptor.dim": 2, "method.batch_neighbours": 1}
    _, soft = HNCL(method_cfg("hncl", **one, **{"method.batch_weight_temperature": 0.1}), model).training_step(batch)
    _, hard = HNCL(method_cfg("hncl", **one), model).training_step(batch)
    assert soft["loss_batch_nn"] == pytest.approx(hard["loss_batch_nn"], rel=1e-6)


def test_supervised_positives_are_the_label_mates_of_the_global_batch():
    model = tiny_model(torch.float64)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 3, 16, 16, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, -1, 1])
    loss, m = Supervised(method_cfg("supervised"), model).training_step(
        {"x1": x, "x2": x.flip(-1), "id": torch.arange(5), "label": labels})
    z1, p1, z2, p2 = model(x, x.flip(-1))
    pos = torch.tensor([[0, 2], [1, 4], [0, 2], [3, -1], [1, 4]])  # itself (the other view) + same label
    want = 0.5 * (multi_positive_nce(z1, p2, pos, TAU) + multi_positive_nce(z2, p1, pos, TAU)).mean()
    view = view_term(z1, z2, Predictions.gather(p1, p2), TAU)
    assert m["loss_supervised"] == pytest.approx(want.item(), abs=1e-12)
    assert m["loss_view"] == pytest.approx(view.item(), abs=1e-12)
    # the two-view term plus the label-mates term (SupCon alone did not learn in the demo's budget)
    assert abs(loss.item() - (view + want).item()) < 1e-12
    assert torch.equal(view + positives_term(z1, z2, Predictions.gather(p1, p2), pos, TAU), loss)


def test_registry_builds_every_method_by_name_and_old_settings_say_what_to_write():
    assert set(METHODS) == {"simclr", "nnclr", "hncl", "supervised"}
    for name in METHODS:
        cfg = method_cfg(name, **({"method.queue_size": 64} if name in ("nnclr", "hncl") else {}))
        method = build_method(cfg, tiny_model())
        assert isinstance(method, method_class(name)) and method.name == name
        assert (method.state_name == "queue") == (name in ("nnclr", "hncl"))
    cfg = load_config("configs/debug.yaml", ["method.queue_dtype=float16", "model.proj_out=12"])
    h = build_method(cfg, tiny_model())
    assert h.queue.keys.shape == (1024, 64) and h.queue.values.dtype == torch.float16
    assert build_method(method_cfg("nnclr"), tiny_model()).queue.keys is None  # searches the embeddings
    for old, new in (("method.nn_space=none", "method.name=simclr"), ("method.view_weight=0", "method.name")):
        with pytest.raises(ConfigError, match=new):
            load_config("configs/debug.yaml", [old])
    with pytest.raises(ConfigError, match="method.name.*allowed values: simclr, nnclr, hncl, supervised"):
        load_config(None, ["method.name=byol"])


def _ddp_steps():
    rank = dist.get_rank()
    model = torch.nn.parallel.DistributedDataParallel(tiny_model(seed=0))
    # 16 slots per rank: room for all 12 entries
    step = HNCL(method_cfg("hncl", **{"method.queue_size": 32, "descriptor.dim": 4}), model)
    queue = step.queue
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(rank)
    for i in range(3):
        x = torch.randn(4, 3, 16, 16, generator=gen)
        batch = {"x1": x, "x2": x + 0.1, "id": torch.arange(4) + 100 * rank + 10 * i,
                 "desc": torch.randn(4, 4, generator=gen)}
        loss, _ = step.training_step(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    return queue.ids.clone(), params


def test_ddp_keeps_each_ranks_own_queue_slice(run_distributed):
    (ids0, w0), (ids1, w1) = run_distributed(_ddp_steps, 2)
    assert torch.equal(w0, w1)  # DDP kept the replicas in sync...
    assert set(ids0[ids0 >= 0].tolist()) == {0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23}
    assert set(ids1[ids1 >= 0].tolist()) == {100, 101, 102, 103, 110, 111, 112, 113, 120, 121, 122, 123}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_modules_example_runs(name, monkeypatch):
    """Every method module carries a runnable example in its docstring (from the repo root)."""
    import doctest
    import importlib
    import os

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    module = importlib.import_module(METHODS[name].split(":")[0])
    result = doctest.testmod(module, raise_on_error=False, report=True)
    assert result.attempted >= 5 and result.failed == 0
