import itertools

import numpy as np
import pytest

from steadyvla.data.sampler import DataPosition, ResumableBatchSampler, decode_sample_key


def _indices(keys):
    return [decode_sample_key(k)[1] for k in keys]


def test_epoch_covers_every_index_once_and_order_depends_on_seed_and_epoch():
    s = ResumableBatchSampler(23, 4, seed=1)
    pos, seen = DataPosition(), []
    while pos.epoch == 0:
        seen += _indices(s.local_keys(pos))
        pos = s.advance(pos)
    assert sorted(seen) == list(range(23))
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
    assert sorted(seen) == list(range(n))
