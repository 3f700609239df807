"""Length-planned inference batches (kd_engine/teachers/batching.py): exact, optimal, and the same answers."""
import itertools
import random

import pytest
import torch

from kd_engine.errors import KDError
from kd_engine.teachers.batching import overhead_tokens_for, pad_batch, sorted_batches


def cost(batches, lengths, overhead):
    """Token-forwards of padded batches (each padded to its longest row) plus overhead per forward."""
    return sum(len(b) * max(lengths[i] for i in b.tolist()) + overhead for b in batches)


def brute_force_best(lengths, batch_size, overhead):
    """Minimum cost over every way of cutting the longest-first order into contiguous batches."""
    s = sorted(lengths, reverse=True)
    n, best = len(s), float("inf")
    for mask in itertools.product([0, 1], repeat=n - 1):
        cuts = [0] + [i + 1 for i, m in enumerate(mask) if m] + [n]
        sizes = [b - a for a, b in zip(cuts[:-1], cuts[1:])]
        if max(sizes) > batch_size:
            continue
        best = min(best, sum((b - a) * s[a] + overhead for a, b in zip(cuts[:-1], cuts[1:])))
    return best


def check_partition(batches, n, batch_size, lengths):
    flat = torch.cat(batches).tolist()
    assert sorted(flat) == list(range(n))  # every row exactly once
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # still longest first


def test_zero_overhead_keeps_fixed_cuts():
    lengths = [5, 9, 9, 1, 7, 3, 9]
    batches = sorted_batches(lengths, 3)
    assert [b.tolist() for b in batches] == [[1, 2, 6], [4, 0, 5], [3]]  # stable: equal lengths in input order


@pytest.mark.parametrize("seed", range(12))
def test_planned_cuts_are_optimal(seed):
    rng = random.Random(seed)
    n, bs, overhead = rng.randint(2, 10), rng.randint(1, 5), rng.choice([1, 8, 32])
    lengths = [rng.choice([1, 2, 5, 40, 120]) for _ in range(n)]
    batches = sorted_batches(lengths, bs, overhead)
    check_partition(batches, n, bs, lengths)
    fixed = sorted_batches(lengths, bs)
    planned_cost, fixed_cost = cost(batches, lengths, overhead), cost(fixed, lengths, overhead)
    assert planned_cost <= fixed_cost
    if planned_cost < fixed_cost:  # the plan ran: it must be the optimum
        assert planned_cost == brute_force_best(lengths, bs, overhead)


def test_wide_lengths_are_split_and_similar_lengths_are_not():
    wide = [115, 90, 70] + [20] * 29
    planned = sorted_batches(wide, 32, 32)
    assert len(planned) > 1 and cost(planned, wide, 32) < cost(sorted_batches(wide, 32), wide, 32) / 2
    similar = [50] * 63 + [51]  # fixed cuts pad < 2 %: kept as they are
    assert [b.tolist() for b in sorted_batches(similar, 32, 32)] == [b.tolist() for b in sorted_batches(similar, 32)]


def test_bad_arguments_and_edges():
    with pytest.raises(KDError, match="batch size"):
        sorted_batches([1, 2], 0)
    with pytest.raises(KDError, match="overhead_tokens"):
        sorted_batches([1, 2], 2, -1)
    assert sorted_batches([], 4, 32) == []
    assert [b.tolist() for b in sorted_batches([0, 0, 3], 2, 32)] == [[2], [0, 1]]  # empty rows pad nothing
    assert overhead_tokens_for(torch.device("cpu")) < overhead_tokens_for(torch.device("meta"))
    ids, mask = pad_batch([[4, 5], [], [6]], 0, "left")
    assert ids.tolist() == [[4, 5], [0, 0], [0, 6]] and mask.tolist() == [[1, 1], [0, 0], [0, 1]]


def test_planned_batches_give_the_same_logits():
    """A classifier's logits in planned batches equal one padded batch's (rows in input order)."""
    from transformers import BertConfig, BertForSequenceClassification

    from kd_engine.teachers.zero_shot import batched_logits

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64,
                                                     num_labels=3)).eval()
    g = torch.Generator().manual_seed(1)
    lens = [100, 80, 60] + [5] * 13
    ids = [torch.randint(1, 50, (n,), generator=g).tolist() for n in lens]
    assert len(sorted_batches(lens, 16, overhead_tokens_for(torch.device("cpu")))) > 1  # the plan splits here
    got = batched_logits(model, ids, None, 0, "right", 16)
    with torch.inference_mode():
        x, m = pad_batch(ids, 0, "right")
        ref = model(input_ids=x, attention_mask=m).logits.float()
    assert got.shape == (16, 3)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)
