"""The data epoch plan and stream position (hncl/data/epoch_plan.py), computed from sample counts
alone: every sample once per epoch over all readers, equal shares, and a position that a resume on
another number of readers continues with each remaining sample once."""

import numpy as np
import pytest

from hncl.data.epoch_plan import StreamState

ODD = [50, 50, 50, 50, 31]  # make-shards' usual set: the last shard short


def emitted(state, epoch):
    plan = state.plan(epoch)
    return [plan.emission(r) for r in range(plan.readers)]


@pytest.mark.parametrize("counts, readers", [(ODD, 4), (ODD, 7), ([1000] * 10 + [1], 16), ([3, 2], 8)])
def test_every_sample_once_per_epoch_in_equal_shares_and_no_reader_drifts(counts, readers):
    n = sum(counts)
    state = StreamState.start(counts, seed=3, readers=readers, block=40)
    totals = np.zeros(readers, dtype=int)
    for epoch in range(6):
        shares = emitted(state, epoch)
        assert sorted(np.concatenate(shares).tolist()) == list(range(n)), epoch
        sizes = np.array([len(s) for s in shares])
        assert sizes.max() - sizes.min() <= 1
        totals += sizes
        assert totals.max() - totals.min() <= 1  # the extra samples go round: no reader runs ahead
    assert [s.tolist() for s in emitted(state, 0)] != [s.tolist() for s in emitted(state, 1)]  # dealt anew
    if n < readers:  # more readers than samples: empty shares, but every reader gets its turn
        assert (totals > 0).all()


def test_a_position_resumed_on_other_numbers_of_readers_trains_each_remaining_sample_once():
    n = sum(ODD)
    state = StreamState.start(ODD, seed=1, readers=4, block=16)
    # readers part-way through epoch 2, one already into epoch 3 (shares differ by a sample)
    state.positions = [(2, 10), (2, 57), (3, 4), (2, 0)]
    done = {e: state.trained(e) for e in (2, 3)}
    spans = emitted(state, 2)
    expect2 = set(spans[0][:10].tolist()) | set(spans[1][:57].tolist()) | set(spans[2].tolist())
    assert set(np.flatnonzero(done[2]).tolist()) == expect2
    assert set(np.flatnonzero(done[3]).tolist()) == set(emitted(state, 3)[2][:4].tolist())
    for readers in (1, 3, 4, 9):
        resized = state.resized(readers)
        assert resized.positions == [(2, 0)] * readers
        for epoch in (2, 3):
            rest = np.concatenate(emitted(resized, epoch))
            assert not done[epoch][rest].any()  # nothing trained twice
            assert sorted(rest.tolist() + np.flatnonzero(done[epoch]).tolist()) == list(range(n))
        assert sorted(np.concatenate(emitted(resized, 4)).tolist()) == list(range(n))  # then whole epochs
    # resized twice (4 -> 3 readers, part of the rest trained, -> 2): still each sample once
    three = state.resized(3)
    three.positions = [(2, 5), (2, 0), (3, 1)]
    two = StreamState.from_json(three.resized(2).to_json())
    for epoch in (2, 3):
        before = three.trained(epoch)
        rest = np.concatenate(emitted(two, epoch))
        assert not before[rest].any() and before.sum() + len(rest) == n


def test_the_state_round_trips_through_json_and_a_same_size_resume_keeps_the_order():
    state = StreamState.start(ODD, seed=7, readers=3, block=25).resized(2)  # plans with exclusions
    state.positions = [(0, 3), (0, 8)]
    state.turn = 1
    back = StreamState.from_json(state.to_json())
    assert back.positions == state.positions and back.turn == 1 and back.readers == 2
    for epoch in (0, 1):
        assert [e.tolist() for e in emitted(back, epoch)] == [e.tolist() for e in emitted(state, epoch)]


def test_positions_through_several_resizes_and_a_new_shuffle_buffer_train_each_sample_once_per_epoch():
    """Random runs: readers emit arbitrary parts of their shares, the state goes through JSON and
    is resized (e.g. 2 -> 1 -> 2 ranks after a node loss, where the smaller run stops while still
    in the interrupted epoch's rest) or gets another shuffle block, and every (sample, epoch) is
    emitted at most once, every epoch before the last reached whole."""
    rng = np.random.default_rng(0)
    counts = [10, 10, 7]
    n = sum(counts)
    for trial in range(60):
        state = StreamState.start(counts, seed=trial, readers=int(rng.integers(1, 5)), block=int(rng.integers(1, 9)))
        seen = []
        for _ in range(4):
            for r, (epoch, k) in enumerate(state.positions):  # each reader emits some of its stream
                for _ in range(int(rng.integers(0, 12))):
                    order = state.plan(epoch).emission(r)
                    if k >= len(order):
                        epoch, k = epoch + 1, 0
                        continue
                    seen.append((int(order[k]), epoch))
                    k += 1
                state.positions[r] = (epoch, k)
            state = StreamState.from_json(state.to_json())
            if rng.random() < 0.3:
                state = state.reblocked(int(rng.integers(1, 9)))
            else:
                state = state.resized(int(rng.integers(1, 5)))
        assert len(seen) == len(set(seen)), trial
        last = max(e for _, e in seen) if seen else 0
        for epoch in range(min(e for e, _ in state.positions)):
            assert sorted(i for i, e in seen if e == epoch) == list(range(n)), (trial, epoch, last)
