"""ShardedNeighborQueue: W real gloo ranks must equal one process holding the union of slices."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hncl.core.loss import Predictions, neighbour_term, positives_term, report, view_term
from hncl.core.methods.hncl import batch_heatmap_neighbours, similarity_weights
from hncl.core.queue import ShardedNeighborQueue, reshard_states
from hncl.core.topk import top_k_exact, topk_stable

Q, K, DH, DE = 24, 3, 6, 5
STEPS = 7


# --- an independent reference: plain per-rank FIFO lists, brute force over the union ------------
class ReferenceQueue:
    def __init__(self, capacity, world_size):
        self.w, self.s = world_size, capacity // world_size
        self.keys = np.zeros((capacity, DH))
        self.vals = np.zeros((capacity, DE))
        self.ids = -np.ones(capacity, dtype=np.int64)
        self.ptr = [0] * world_size

    def enqueue(self, r, keys, vals, ids):
        for key, val, i in zip(keys, vals, ids):
            g = r * self.s + self.ptr[r]
            self.keys[g] = key / np.linalg.norm(key)
            self.vals[g] = val / np.linalg.norm(val)
            self.ids[g] = i
            self.ptr[r] = (self.ptr[r] + 1) % self.s

    def lookup(self, queries, ids, k):
        out = []
        for q, i in zip(queries, ids):
            score = self.keys @ (q / np.linalg.norm(q))
            ok = (self.ids >= 0) & (self.ids != i)
            cand = [(-score[g], g) for g in range(len(score)) if ok[g]]
            cand.sort()  # score desc, then global slot asc
            out.append([(g, -s) for s, g in cand[:k]])
        return out


def hncl_loss(z1, z2, p1, p2, nn, valid, in_batch, lam=0.7, tau=0.2):
    """HNCL's loss from its terms (as hncl.core.methods.hncl composes them): (rank share, global
    terms). in_batch = (indices, weights) of the in-batch neighbours; they enter twice: pulled in
    equally and as weighted soft positives (method.batch_weight_temperature)."""
    preds = Predictions.gather(p1, p2)
    in_batch, weights = in_batch
    terms = {"loss_view": view_term(z1, z2, preds, tau), "loss_nn": neighbour_term(nn, valid, nn, valid, preds, tau),
             "loss_batch_nn": positives_term(z1, z2, preds, in_batch, tau),
             "loss_batch_soft": positives_term(z1, z2, preds, in_batch, tau, weights=weights)}
    loss = terms["loss_view"] + lam * terms["loss_nn"] + lam * (terms["loss_batch_nn"] + terms["loss_batch_soft"])
    terms["loss"] = loss
    return loss, report(terms)


def _stream(rank, step, kind):
    """Rank `rank`'s batch at `step`: sizes differ per rank and do not divide Q/W; ids come from a
    small pool so a sample meets its own earlier copy in the queue."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    b = 5 + rank
    if kind == "ties":  # one-hot descriptors: exact ties everywhere, decided by slot index
        desc = F.one_hot(torch.randint(0, DH, (b,), generator=g), DH).double()
    else:
        desc = torch.randn(b, DH, generator=g, dtype=torch.float64)
    emb = torch.randn(b, DE, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 30, (b,), generator=g)
    z = torch.randn(2, b, DE, generator=g, dtype=torch.float64)
    p = torch.randn(2, b, DE, generator=g, dtype=torch.float64)
    return desc, emb, ids, z, p


def _sharded_run(kind, exchange):
    rank = dist.get_rank()
    queue = ShardedNeighborQueue(Q, DE, DH, dtype=torch.float64, exchange=exchange)
    assert queue.values.shape[0] == queue.keys.shape[0] == Q // dist.get_world_size()
    records = []
    for step in range(STEPS):
        desc, emb, ids, z, p = _stream(rank, step, kind)
        nb = queue.lookup(desc, ids, K)
        z1, z2 = (t.clone().requires_grad_() for t in z)
        p1, p2 = (t.clone().requires_grad_() for t in p)
        in_batch, cos = batch_heatmap_neighbours(desc, 2, with_similarity=True)  # indices into the global (uneven) batch
        in_batch = (in_batch, similarity_weights(cos, 0.3))
        loss, terms = hncl_loss(z1, z2, p1, p2, nb.embeddings, nb.valid, in_batch)
        loss.backward()
        records.append(dict(slots=nb.slots, ids=nb.ids, scores=nb.scores, valid=nb.valid, emb=nb.embeddings,
                            loss=loss.detach(), terms=terms,
                            grads=[t.grad for t in (z1, z2, p1, p2)]))
        queue.enqueue(desc, emb, ids)
    return records


@pytest.mark.parametrize("world_size, kind, exchange", [
    (2, "random", "all_gather"), (3, "random", "auto"), (3, "ties", "all_to_all")])
def test_sharded_lookup_and_loss_equal_single_process_union(run_distributed, world_size, kind, exchange):
    assert_equal_to_single_process_union(run_distributed(_sharded_run, world_size, kind, exchange), world_size, kind)


def assert_equal_to_single_process_union(results, world_size, kind):
    """results[r] = _sharded_run's records on rank r (here, or on the ranks of a Ray cluster:
    tests/test_multinode.py) against the reference holding every rank's slice."""
    ref = ReferenceQueue(Q, world_size)
    saw_self, saw_invalid, saw_full = False, False, False
    for step in range(STEPS):
        batches = [_stream(r, step, kind) for r in range(world_size)]
        nb_all = []
        for r, (desc, emb, ids, z, p) in enumerate(batches):
            got = results[r][step]
            expect = ref.lookup(desc.numpy(), ids.numpy(), K)
            for i, row in enumerate(expect):
                n = len(row)
                assert got["valid"][i].sum() == n
                assert got["slots"][i, :n].tolist() == [g for g, _ in row], (step, r, i)
                assert got["ids"][i, :n].tolist() == [int(ref.ids[g]) for g, _ in row]
                assert torch.allclose(got["scores"][i, :n], torch.tensor([s for _, s in row], dtype=torch.float64),
                                      atol=1e-12)
                assert torch.allclose(got["emb"][i, :n], torch.from_numpy(ref.vals[[g for g, _ in row]]), atol=1e-12)
                assert (got["emb"][i, n:] == 0).all() and (got["slots"][i, n:] == -1).all()
                saw_invalid |= n < K
                saw_self |= bool(((ref.ids == int(ids[i])) & (ref.ids >= 0)).any())
            nb_all.append((got["emb"], got["valid"]))
        saw_full |= bool((ref.ids >= 0).all())
        # single process on the concatenated global batch, with the reference's neighbours
        z1, z2, p1, p2 = (torch.cat([b[3][j] if j < 2 else b[4][j - 2] for b in batches]).requires_grad_()
                          for j in range(4))
        in_batch, cos = batch_heatmap_neighbours(torch.cat([b[0] for b in batches]), 2, with_similarity=True)
        in_batch = (in_batch, similarity_weights(cos, 0.3))
        loss, terms = hncl_loss(z1, z2, p1, p2, torch.cat([e for e, _ in nb_all]), torch.cat([v for _, v in nb_all]),
                                in_batch)
        loss.backward()
        rank_losses = torch.stack([results[r][step]["loss"] for r in range(world_size)])
        assert torch.allclose(rank_losses.mean(), loss.detach(), atol=1e-12)
        for name, value in terms.items():
            # the soft term's weights come from float32 cosines (the neighbour search's precision),
            # computed per rank on its rows: a rank's matmul of other shape rounds otherwise (how
            # much depends on the CPU's kernels: 1e-9 to 3e-8 of the term measured), so the bound is
            # float32's: eps (1.2e-7) / T of the weights, well below any wrong weight or term
            tol = 1e-9 if name not in ("loss_batch_soft", "loss") else 1e-6 * abs(value)
            assert all(abs(results[r][step]["terms"][name] - value) < tol for r in range(world_size)), name
        # DDP averages gradients over ranks: rank r's gradient / W must be the reference's rows of r
        # (to float32's precision where the soft weights enter, as above: up to 5e-8 of the largest)
        start = 0
        for r, b in enumerate(batches):
            rows = slice(start, start + b[0].shape[0])
            for got_g, ref_t in zip(results[r][step]["grads"], (z1, z2, p1, p2)):
                assert torch.allclose(got_g / world_size, ref_t.grad[rows], atol=1e-6 * float(ref_t.grad.abs().max()))
            start += b[0].shape[0]
        for r, (desc, emb, ids, _, _) in enumerate(batches):
            ref.enqueue(r, desc.numpy(), emb.numpy(), ids.numpy())
    assert saw_self and saw_invalid and saw_full  # the stream exercised every case


def test_topk_stable_orders_ties_by_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0] + [0.0] * 30, [0.5] * 35])
    v, i = topk_stable(scores, 2, margin=0)
    assert i.tolist() == [[1, 2], [0, 1]]
    assert v.tolist() == [[3.0, 3.0], [0.5, 0.5]]
    gen = torch.Generator().manual_seed(0)
    rnd = torch.randint(0, 4, (50, 40), generator=gen).float()
    v, i = topk_stable(rnd, 5, margin=1)
    ref_v, ref_i = rnd.sort(dim=1, descending=True, stable=True)
    assert torch.equal(i, ref_i[:, :5]) and torch.equal(v, ref_v[:, :5])
    # long rows with hundreds of copies of each score (a queue holding each image many times)
    rnd = torch.randint(0, 5, (20, 3000), generator=gen).float()
    rnd[::3, 1234] = 9.0  # one clear winner in some rows, then the tie block
    rnd[1, :] = float("-inf")
    long_random = torch.randn(6, 70000, generator=gen)  # the chunked CPU path, padded (70000 % 256 != 0)
    long_random[0, 69999] = 50.0  # the best score in the padded last chunk
    long_ties = torch.randint(0, 3, (6, 65536), generator=gen).float()
    long_ties[2, :] = float("-inf")
    long_ties[2, 100] = 1.0  # one real column; the others are empty slots
    for scores in (long_random, long_ties):
        for k in (1, 5):
            v, i = topk_stable(scores, k)
            ref_v, ref_i = scores.sort(dim=1, descending=True, stable=True)
            assert torch.equal(v, ref_v[:, :k])
            finite = torch.isfinite(ref_v[:, :k])
            assert torch.equal(i[finite], ref_i[:, :k][finite]) and int(i.max()) < scores.shape[1]
    for k in (1, 3):
        v, i = topk_stable(rnd, k)
        ref_v, ref_i = rnd.sort(dim=1, descending=True, stable=True)
        assert torch.equal(i[2:], ref_i[2:, :k]) and torch.equal(v, ref_v[:, :k])


def test_empty_and_partly_filled_queue():
    q = ShardedNeighborQueue(8, DE, DH)
    nb = q.lookup(torch.randn(4, DH), torch.arange(4), k=3)
    assert not nb.valid.any() and (nb.slots == -1).all() and (nb.embeddings == 0).all()
    assert torch.isinf(nb.scores).all()
    q.enqueue(torch.randn(2, DH), torch.randn(2, DE), torch.tensor([10, 11]))
    nb = q.lookup(torch.randn(4, DH), torch.arange(4), k=3)
    assert nb.valid.sum(1).tolist() == [2, 2, 2, 2]
    assert sorted(nb.ids[0, :2].tolist()) == [10, 11]
    nb = q.lookup(torch.randn(1, DH), torch.tensor([0]), k=20)  # k > capacity
    assert nb.embeddings.shape == (1, 20, DE) and nb.valid.sum() == 2
    assert q.fill_fraction() == 2 / 8


def test_self_exclusion_by_sample_id():
    q = ShardedNeighborQueue(16, DE, DH)
    key = torch.randn(1, DH)
    q.enqueue(key, torch.randn(1, DE), torch.tensor([7]))  # "earlier epoch" copy of sample 7
    q.enqueue(-key, torch.randn(1, DE), torch.tensor([8]))  # the worst possible match
    assert q.lookup(key, torch.tensor([7]), 1).ids.item() == 8  # not itself, despite score 1
    other = q.lookup(key, torch.tensor([9]), 1)
    assert other.ids.item() == 7 and abs(other.scores.item() - 1.0) < 1e-6


def test_enqueue_wraps_for_any_batch_size():
    q = ShardedNeighborQueue(5, DE, DH)
    q.enqueue(torch.randn(3, DH), torch.randn(3, DE), torch.tensor([0, 1, 2]))
    q.enqueue(torch.randn(4, DH), torch.randn(4, DE), torch.tensor([3, 4, 5, 6]))  # wraps
    assert q.ids.tolist() == [5, 6, 2, 3, 4] and q.ptr == 2
    q.enqueue(torch.randn(12, DH), torch.randn(12, DE), torch.arange(100, 112))  # B > slots
    assert sorted(q.ids.tolist()) == [107, 108, 109, 110, 111]
    assert q.ptr == (2 + 12) % 5
    assert q.ids[(q.ptr - 1) % 5] == 111  # newest entry just behind the write pointer


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage(dtype):
    gen = torch.Generator().manual_seed(3)
    keys, vals = torch.randn(32, DH, generator=gen), torch.randn(32, DE, generator=gen)
    q = ShardedNeighborQueue(32, DE, DH, dtype=dtype)
    q.enqueue(keys, vals, torch.arange(32))
    assert q.keys.dtype == dtype and q.values.dtype == dtype
    queries = torch.randn(6, DH, generator=gen)
    nb = q.lookup(queries, torch.full((6,), -5), k=2)
    stored_keys = F.normalize(keys, dim=1).to(dtype).float()
    scores = F.normalize(queries, dim=1) @ stored_keys.T
    ref_v, ref_i = scores.sort(dim=1, descending=True, stable=True)
    assert torch.equal(nb.slots, ref_i[:, :2])
    assert torch.allclose(nb.scores, ref_v[:, :2], atol=1e-6)
    assert torch.equal(nb.embeddings, F.normalize(vals, dim=1).to(dtype).float()[ref_i[:, :2]])


def test_state_dict_roundtrip_and_wrong_world_size():
    q = ShardedNeighborQueue(10, DE, DH)
    q.enqueue(torch.randn(13, DH), torch.randn(13, DE), torch.arange(13), torch.arange(13) % 7)
    state = q.state_dict()
    fresh = ShardedNeighborQueue(10, DE, DH)
    fresh.load_state_dict(state)
    x = torch.randn(4, DH)
    a, b = q.lookup(x, torch.arange(4), 3), fresh.lookup(x, torch.arange(4), 3)
    assert torch.equal(a.slots, b.slots) and torch.equal(a.labels, b.labels) and fresh.ptr == q.ptr
    with pytest.raises(ValueError, match="capacity"):
        ShardedNeighborQueue(20, DE, DH).load_state_dict(state)
    two_rank = dict(state, world_size=2)
    with pytest.raises(ValueError, match="world_size=2.*reshard"):
        fresh.load_state_dict(two_rank)


def test_reshard_keeps_newest_entries_in_fifo_order():
    # two old slices of 4, rank 0 holds ids 0..5 (ptr 2), rank 1 holds 100..102 (ptr 3)
    slices = []
    for r, ids in enumerate([list(range(6)), [100, 101, 102]]):
        states = {"capacity": 8, "world_size": 2, "rank": r}
        q_ids = torch.full((4,), -1, dtype=torch.int64)
        for j, i in enumerate(ids):
            q_ids[j % 4] = i
        states.update(ptr=len(ids) % 4, ids=q_ids, labels=q_ids.clone(),
                      values=q_ids.float().unsqueeze(1).repeat(1, DE), keys=q_ids.float().unsqueeze(1).repeat(1, DH))
        slices.append(states)
    (one,) = reshard_states(slices, world_size=1)
    kept = one["ids"][one["ids"] >= 0].tolist()
    assert sorted(kept) == [2, 3, 4, 5, 100, 101, 102]  # every valid entry survives
    assert torch.equal(one["values"][:, 0], one["ids"].float().clamp(min=0) * (one["ids"] >= 0))
    q = ShardedNeighborQueue(8, DE, DH)
    q.load_state_dict(one)  # loadable as a single-process queue
    small = reshard_states(slices, world_size=1, capacity=4)[0]["ids"].tolist()
    assert 5 in small and 102 in small and 2 not in small  # newest survive a shrink


def test_queue_is_not_a_module_so_ddp_cannot_broadcast_it():
    q = ShardedNeighborQueue(8, DE, DH)
    holder = torch.nn.Linear(2, 2)
    holder.queue = q
    assert not isinstance(q, torch.nn.Module)
    assert set(holder.state_dict()) == {"weight", "bias"} and not list(holder.buffers())


# --- exactness that does not rest on the matmul's rounding ------------------------------------
def _duplicates_run(world):
    """A queue where every key is stored several times (one image enqueued once per epoch)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    gen = torch.Generator().manual_seed(11)
    distinct = torch.randn(7, 51, generator=gen, dtype=torch.float64)  # odd width: no aligned blocks
    queue = ShardedNeighborQueue(84, DE, 51, dtype=torch.float64)
    for step in range(12):  # the keys land at many positions of every slice
        rows = torch.randperm(7, generator=gen)
        values = torch.randn(7, DE, generator=gen, dtype=torch.float64)
        if step % world == rank:
            queue.enqueue(distinct[rows], values, step * 10 + rows)
    queries = distinct[torch.tensor([0, 3, 3, 6])] + 1e-3 * torch.randn(4, 51, generator=gen, dtype=torch.float64)
    mine = queries[rank::world]
    nb = queue.lookup(mine, torch.full((len(mine),), -1), 9)
    return nb.slots, nb.scores, queue.state_dict(), queries


@pytest.mark.parametrize("world", [2, 3])
def test_duplicate_keys_tie_exactly_and_the_lowest_global_slot_wins(run_distributed, world):
    """9 neighbours among up to 12 copies of the best key in W slices: the W ranks return what
    one process holding the union returns, slot for slot, with bit-identical scores (rtol=0),
    and the copies are taken in global slot order."""
    results = run_distributed(_duplicates_run, world, world)
    union = ShardedNeighborQueue(84, DE, 51, dtype=torch.float64)
    states = [r[2] for r in results]
    for name in ("keys", "values", "ids", "labels"):
        getattr(union, name).copy_(torch.cat([st[name] for st in states]))
    queries = results[0][3]
    ref = union.lookup(queries, torch.full((4,), -1), 9)
    for r, (slots, scores, _, _) in enumerate(results):
        assert torch.equal(slots, ref.slots[r::world]) and torch.equal(scores, ref.scores[r::world])
    best = union.keys[ref.slots]  # each query's 9 neighbours: copies of its own distinct key ...
    assert (best == best[:, :1]).all() and (ref.scores == ref.scores[:, :1]).all()
    assert torch.equal(ref.slots, ref.slots.sort(dim=1).values)  # ... the lowest global slots first
    copies = (union.keys.unsqueeze(0) == best[:, :1]).all(-1)  # [4, Q]: where each key is stored
    first9 = torch.stack([row.nonzero().squeeze(1)[:9] for row in copies])
    assert torch.equal(ref.slots, first9)


def test_top_k_exact_repairs_rows_whose_cut_falls_inside_the_rounding_bound():
    gen = torch.Generator().manual_seed(12)
    keys = F.normalize(torch.randn(5000, 64, generator=gen), dim=1)
    keys[1000:1100] = keys[7]  # 101 copies of one key, far more than the 2k+8 candidates
    q = keys[7:8] + 1e-4 * torch.randn(3, 64, generator=gen)
    q = F.normalize(q, dim=1)
    # a BLAS may round identical columns differently by position (1-2 ulp): model that, and worse
    scores = q @ keys.T + 2e-7 * torch.randn(3, 5000, generator=gen)
    old_v, old_i = topk_stable(scores, 20)
    assert old_i[0].tolist() != [7] + list(range(1000, 1019))  # ordering by the matmul gets the copies wrong
    v, i = top_k_exact(q, keys, scores, 20)
    exact = (q.unsqueeze(1) * keys.unsqueeze(0)).sum(-1)  # every pair on its own
    ref_v, ref_i = exact.sort(dim=1, descending=True, stable=True)
    assert torch.equal(i, ref_i[:, :20]) and torch.equal(v, ref_v[:, :20])
    assert i[0].tolist() == [7] + list(range(1000, 1019))


def test_float64_queue_is_float64_precise():
    gen = torch.Generator().manual_seed(13)
    keys, vals = torch.randn(6, DH, generator=gen, dtype=torch.float64), torch.randn(6, DE, generator=gen,
                                                                                     dtype=torch.float64)
    q = ShardedNeighborQueue(6, DE, DH, dtype=torch.float64)
    q.enqueue(keys, vals, torch.arange(6))
    assert torch.equal(q.keys, F.normalize(keys, dim=1)) and torch.equal(q.values, F.normalize(vals, dim=1))
    query = torch.randn(2, DH, generator=gen, dtype=torch.float64)
    nb = q.lookup(query, torch.tensor([-1, -1]), 6)
    want = (F.normalize(query, dim=1).unsqueeze(1) * q.keys[nb.slots]).sum(-1)
    assert torch.allclose(nb.scores, want, rtol=0, atol=1e-15)  # not float32's 1e-7


def _lookup_with_an_empty_rank():
    rank = dist.get_rank()
    q = ShardedNeighborQueue(8, DE, DH)
    q.enqueue(torch.eye(DH)[:4] * (rank + 1), torch.randn(4, DE), torch.arange(4) + 10 * rank)
    queries = torch.eye(DH)[:3] if rank == 1 else torch.zeros(0, DH)
    nb = q.lookup(queries, torch.full((queries.shape[0],), -1), 2)
    return nb.slots, nb.valid


def test_lookup_accepts_an_empty_local_batch_on_any_rank(run_distributed):
    (s0, v0), (s1, v1) = run_distributed(_lookup_with_an_empty_rank, 2)
    assert s0.shape == (0, 2) and v0.shape == (0, 2)
    assert v1.all() and s1[:, 0].tolist() == [0, 1, 2]  # each one-hot query's key, rank 0's copy (lower slot)
    single = ShardedNeighborQueue(8, DE, DH)
    assert single.lookup(torch.zeros(0, DH), torch.zeros(0, dtype=torch.int64), 3).slots.shape == (0, 3)


def test_keys_of_another_space_are_refused_on_resume_and_kept_by_reshard():
    """A queue whose keys are whitened descriptors (descriptor.whiten) must not resume from one
    holding plain descriptors, or the other way round: same shapes, incomparable keys."""
    whitened = ShardedNeighborQueue(8, DE, DH, key_space="descriptor.whiten=16")
    whitened.enqueue(torch.randn(5, DH), torch.randn(5, DE), torch.arange(5), torch.arange(5))
    state = whitened.state_dict()
    assert state["key_space"] == "descriptor.whiten=16"
    with pytest.raises(ValueError, match="keys are descriptor.whiten=16; this run's are the default descriptor"):
        ShardedNeighborQueue(8, DE, DH).load_state_dict(state)
    plain = ShardedNeighborQueue(8, DE, DH)
    assert "key_space" not in plain.state_dict()  # checkpoints of the default space look as before
    with pytest.raises(ValueError, match="keys are the default descriptor; this run's are descriptor.whiten=8"):
        ShardedNeighborQueue(8, DE, DH, key_space="descriptor.whiten=8").load_state_dict(plain.state_dict())
    (one,) = reshard_states([state], world_size=1, capacity=4)
    again = ShardedNeighborQueue(4, DE, DH, key_space="descriptor.whiten=16")
    again.load_state_dict(one)
    assert again.ids[again.ids >= 0].tolist() == [1, 2, 3, 4]
