import itertools

import numpy as np
import pytest

from steadyvla.data.sampler import DataPosition, ResumableBatchSampler, decode_sample_key


def _indices(keys):
    return [decode_sample_key(k)[1] for k in keys]


def _epoch(samplers, pos):
    """Every rank's local index lists for each global batch until the epoch ends; and the next position."""
    batches = []
    epoch = pos.epoch
    while pos.epoch == epoch:
        batches.append([_indices(s.local_keys(pos)) for s in samplers])
        pos = samplers[0].advance(pos)
    return batches, pos


def test_epoch_covers_every_index_and_order_depends_on_seed_and_epoch():
    s = ResumableBatchSampler(23, 4, seed=1)
    batches, _ = _epoch([s], DataPosition())
    seen = [i for ranks in batches for i in ranks[0]]
    assert len(seen) == 24 and set(seen) == set(range(23))  # the last batch wraps one index around
    assert seen[:23] == list(s.permutation(0)) and seen[23] == s.permutation(0)[0]
    assert not np.array_equal(s.permutation(0), s.permutation(1))
    assert not np.array_equal(s.permutation(0), ResumableBatchSampler(23, 4, seed=2).permutation(0))


@pytest.mark.parametrize("cut", [0, 1, 5, 6, 13])
def test_restart_from_saved_position_continues_the_same_stream(cut):
    full = list(itertools.islice(iter(ResumableBatchSampler(17, 3, seed=5)), 20))
    s = ResumableBatchSampler(17, 3, seed=5)
    pos = DataPosition()
    for _ in range(cut):
        pos = s.advance(pos)
    saved = DataPosition.from_dict(pos.to_dict())
    resumed = list(itertools.islice(iter(ResumableBatchSampler(17, 3, seed=5, start=saved)), 20 - cut))
    assert resumed == full[cut:]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_world_size_change_mid_epoch_covers_each_index_once(before, after):
    n, batch = 40, 3
    samplers = [ResumableBatchSampler(n, batch, seed=9, rank=r, world_size=before) for r in range(before)]
    pos, seen = DataPosition(), []
    for _ in range(3):
        for s in samplers:
            seen += _indices(s.local_keys(pos))
        pos = samplers[0].advance(pos)
    samplers = [ResumableBatchSampler(n, batch, seed=9, rank=r, world_size=after) for r in range(after)]
    while pos.epoch == 0:
        for s in samplers:
            seen += _indices(s.local_keys(pos))
        pos = samplers[0].advance(pos)
    assert set(seen) == set(range(n))
    done, after_batch = 3 * before * batch, after * batch
    assert len(seen) == done + after_batch * -(-(n - done) // after_batch)  # wrapped, never skipped


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5])
def test_every_rank_always_gets_a_full_local_batch(world, batch):
    for n in [1, 2, 3, 5, 7, 8, 9, 16, 23, 40, 73]:
        samplers = [ResumableBatchSampler(n, batch, seed=n, rank=r, world_size=world) for r in range(world)]
        pos = DataPosition()
        for epoch in range(2):
            batches, pos = _epoch(samplers, pos)
            assert pos == DataPosition(epoch + 1, 0)
            assert len(batches) == -(-n // (batch * world))
            assert all(len(local) == batch for ranks in batches for local in ranks), (n, batch, world)
            seen = [i for ranks in batches for local in ranks for i in local]
            assert set(seen) == set(range(n))
            # the same global batches from fresh samplers started at any position (restart)
            again = [ResumableBatchSampler(n, batch, seed=n, rank=r, world_size=world,
                                           start=DataPosition(epoch, batch * world)) for r in range(world)]
            if len(batches) > 1:
                assert [_indices(k) for k in (next(iter(s)) for s in again)] == batches[1]


def test_73_samples_batch_4_two_ranks_rank_1_is_never_empty():
    samplers = [ResumableBatchSampler(73, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    last = DataPosition(0, 72)
    assert [len(s.local_keys(last)) for s in samplers] == [4, 4]
    assert samplers[0].advance(last) == DataPosition(1, 0)


def test_global_batch_depends_only_on_position_and_global_size():
    """After a world-size change with the same global batch, each position yields the same samples."""
    two = [ResumableBatchSampler(31, 3, seed=4, rank=r, world_size=2) for r in range(2)]
    one = ResumableBatchSampler(31, 6, seed=4)
    pos = DataPosition()
    while pos.epoch < 2:
        assert sorted(i for s in two for i in _indices(s.local_keys(pos))) == sorted(_indices(one.local_keys(pos)))
        pos = one.advance(pos)
