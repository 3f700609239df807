"""T5 span corruption (kd_engine/data/span_corruption.py): pure functions, checked by reconstruction."""
import pytest
import torch

from kd_engine.data.span_corruption import noise_mask, sentinel_ids, span_corrupt
from kd_engine.errors import KDError

S = [1000 - i for i in range(100)]  # sentinel ids
EOS = 1


def reconstruct(inputs, targets):
    """Put each sentinel's span from the targets back in place of the sentinel in the inputs."""
    spans, cur = {}, None
    for t in targets[:-1]:
        if t in S:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    out = []
    for t in inputs[:-1]:
        out += spans[t] if t in S else [t]
    return out


@pytest.mark.parametrize("length", [2, 3, 10, 57, 512])
def test_mask_density_and_spans(length):
    g = torch.Generator().manual_seed(length)
    m = noise_mask(length, 0.15, 3.0, g)
    n_noise = sum(m)
    assert len(m) == length and 1 <= n_noise <= length - 1
    assert n_noise == min(max(round(length * 0.15), 1), length - 1)
    assert not m[0]  # T5 interleaves non-noise first
    starts = sum(1 for i, x in enumerate(m) if x and (i == 0 or not m[i - 1]))
    assert starts == min(max(round(n_noise / 3.0), 1), n_noise, length - n_noise)


def test_corruption_is_invertible_and_marks_spans():
    ids = list(range(10, 110)) + [EOS]
    g = torch.Generator().manual_seed(0)
    inp, tgt = span_corrupt(ids, S, EOS, 0.15, 3.0, g)
    assert inp[-1] == EOS and tgt[-1] == EOS and EOS not in inp[:-1] + tgt[:-1]
    assert reconstruct(inp, tgt) == ids[:-1]
    used = [t for t in inp if t in S]
    assert used == S[:len(used)] and [t for t in tgt if t in S] == used  # <X0>, <X1>, ... in order, both sides
    assert len(tgt) - 1 - len(used) == 15  # 15% of the 100 tokens are in the targets
    # same generator seed -> same corruption; another seed -> another one
    again = span_corrupt(ids, S, EOS, 0.15, 3.0, torch.Generator().manual_seed(0))
    other = span_corrupt(ids, S, EOS, 0.15, 3.0, torch.Generator().manual_seed(1))
    assert again == (inp, tgt) and other != (inp, tgt)


def test_hand_example_and_sentinel_shortage():
    # mask for 8 tokens at density 0.25, span 2: 2 noise tokens in 1 span
    ids = [5, 6, 7, 8, 9, 10, 11, 12]
    g = torch.Generator().manual_seed(3)
    m = noise_mask(8, 0.25, 2.0, torch.Generator().manual_seed(3))
    inp, tgt = span_corrupt(ids, S, None, 0.25, 2.0, g)
    i = m.index(True)
    assert inp == ids[:i] + [S[0]] + ids[i + 2:] and tgt == [S[0]] + ids[i:i + 2]
    # with no sentinel left, spans stay in the input
    inp, tgt = span_corrupt(ids, [], None, 0.25, 2.0, torch.Generator().manual_seed(3))
    assert inp == ids and tgt == []


def test_sentinel_ids_from_a_tokenizer_and_a_clear_error():
    class Tok:
        unk_token_id = 2
        vocab = {"<extra_id_0>": 99, "<extra_id_1>": 98}

        def convert_tokens_to_ids(self, t):
            return self.vocab.get(t, self.unk_token_id)

    assert sentinel_ids(Tok(), 2) == [99, 98] and sentinel_ids(Tok()) == [99, 98]
    with pytest.raises(KDError, match="extra_id_2"):
        sentinel_ids(Tok(), 3)
    Tok.vocab = {}
    with pytest.raises(KDError, match="extra_id_0"):
        sentinel_ids(Tok())
