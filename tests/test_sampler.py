"""The resumable batch sampler: disjoint and complete over ranks, deterministic, length grouping, exact resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kd_engine.data import ResumableBatchSampler, infinite_batches
from kd_engine.errors import KDError


def _all(s):
    return [b for b in s]


@pytest.mark.parametrize("group", [False, True])
def test_sampler_ranks_disjoint_and_complete(group):
    n, bs, ws = 103, 4, 3
    lengths = np.random.default_rng(0).integers(1, 100, n).tolist()
    per_rank = [_all(ResumableBatchSampler(n, bs, rank=r, world_size=ws, lengths=lengths, group_by_length=group))
                for r in range(ws)]
    assert all(len(b) == n // (bs * ws) for b in per_rank)
    assert all(len(x) == bs for b in per_rank for x in b)
    flat = [i for b in per_rank for x in b for i in x]
    assert len(flat) == len(set(flat)) == (n // (bs * ws)) * bs * ws  # disjoint, only the tail dropped
    # no drop_last: every example appears, ranks get the same number of full batches (wrapped)
    per_rank = [_all(ResumableBatchSampler(n, bs, rank=r, world_size=ws, lengths=lengths, group_by_length=group,
                                           drop_last=False)) for r in range(ws)]
    assert {len(b) for b in per_rank} == {9}
    assert set(i for b in per_rank for x in b for i in x) == set(range(n))


def test_sampler_deterministic_and_epochs_differ():
    a = ResumableBatchSampler(50, 5, seed=3)
    b = ResumableBatchSampler(50, 5, seed=3)
    e0 = _all(a)
    assert e0 == _all(b)
    assert e0 != _all(ResumableBatchSampler(50, 5, seed=4))
    assert (a.epoch, a.position) == (1, 0)
    e1 = _all(a)
    assert e1 != e0 and sorted(sum(e1, [])) == sorted(sum(e0, []))
    # the permutation is torch's randperm under seed + epoch
    assert sum(e1, []) == torch.randperm(50, generator=torch.Generator().manual_seed(4)).tolist()


def test_sampler_length_grouping_groups():
    n, bs = 2000, 8
    lengths = np.random.default_rng(1).integers(1, 512, n)
    def spread(batches):
        return float(np.mean([lengths[b].std() for b in batches]))
    grouped = _all(ResumableBatchSampler(n, bs, lengths=lengths.tolist(), group_by_length=True))
    plain = _all(ResumableBatchSampler(n, bs, lengths=lengths.tolist()))
    assert spread(grouped) < 0.2 * spread(plain)
    assert lengths[grouped[0]].max() == lengths.max()  # longest batch first
    # still shuffled between epochs
    s = ResumableBatchSampler(n, bs, lengths=lengths.tolist(), group_by_length=True)
    s.set_epoch(1)
    assert _all(s) != grouped
    # lengths straight from a datasets column (read through Arrow, not row by row)
    import datasets

    col = datasets.Dataset.from_dict({"length": lengths.tolist()})["length"]
    assert _all(ResumableBatchSampler(n, bs, lengths=col, group_by_length=True)) == grouped


@pytest.mark.parametrize("group,ws", [(False, 1), (True, 2)])
def test_sampler_exact_mid_epoch_resume(group, ws):
    n, bs = 97, 3
    lengths = list(range(1, n + 1))
    for rank in range(ws):
        kw = dict(rank=rank, world_size=ws, seed=7, lengths=lengths, group_by_length=group)
        straight = ResumableBatchSampler(n, bs, **kw)
        full = _all(straight) + _all(straight)  # two epochs

        s = ResumableBatchSampler(n, bs, **kw)
        it = iter(s)
        got = [next(it) for _ in range(3)]
        state = json.loads(json.dumps(s.state_dict()))  # survives a checkpoint round trip
        assert state["epoch"] == 0 and state["position"] == 3
        fresh = ResumableBatchSampler(n, bs, **kw)
        fresh.load_state_dict(state)
        fresh.set_epoch(0)  # same epoch: keeps the resumed position
        rest = _all(fresh)
        assert got + rest == full[:len(straight)]
        assert (fresh.epoch, fresh.position) == (1, 0)
        assert _all(fresh) == full[len(straight):]  # rollover into the next epoch


def test_sampler_state_at_epoch_end_and_infinite():
    s = ResumableBatchSampler(10, 2, seed=0)
    gen = infinite_batches(s)
    first = [next(gen) for _ in range(5)]
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["position"] == 0
    more = [next(gen) for _ in range(7)]
    assert sorted(sum(first, [])) == list(range(10))
    assert sorted(sum(more[:5], [])) == list(range(10)) and more[:5] != first
    assert s.state_dict()["epoch"] == 2 and s.state_dict()["position"] == 2
    # a state saved with position == len (old-style end of epoch) resumes at the next epoch
    t = ResumableBatchSampler(10, 2, seed=0)
    t.load_state_dict({"epoch": 0, "position": 5, "seed": 0, "num_examples": 10, "world_size": 1})
    assert _all(t) == [] and (t.epoch, t.position) == (1, 0)
    assert _all(t) == more[:5]


def test_sampler_bad_state_and_sizes():
    s = ResumableBatchSampler(20, 2, world_size=2)
    with pytest.raises(KDError, match=r"num_examples=30, this run has num_examples=20"):
        s.load_state_dict({"epoch": 0, "position": 1, "seed": 42, "num_examples": 30, "world_size": 2})
    with pytest.raises(KDError, match=r"world_size=4, this run has world_size=2"):
        s.load_state_dict({"epoch": 0, "position": 1, "seed": 42, "num_examples": 20, "world_size": 4})
    with pytest.raises(KDError, match="fewer than one global batch"):
        ResumableBatchSampler(5, 4, world_size=2)
    with pytest.raises(KDError, match="group_by_length needs"):
        ResumableBatchSampler(5, 1, group_by_length=True)
    assert len(ResumableBatchSampler(5, 4, world_size=2, drop_last=False)) == 1
