import random

import pytest

from training.packing import pack_by_tokens, pack_stream


def test_greedy_in_order():
    assert pack_by_tokens([3, 4, 2, 5, 1], 7) == [[0, 1], [2, 3], [4]]
    assert pack_by_tokens([7, 7], 7) == [[0], [1]]
    assert pack_by_tokens([], 10) == []


def test_oversized_sequence_gets_its_own_batch():
    assert pack_by_tokens([2, 20, 3], 8) == [[0], [1], [2]]
    assert pack_by_tokens([20], 8) == [[0]]
    assert pack_by_tokens([20, 1, 1], 8) == [[0], [1, 2]]


def test_properties_on_random_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(1, 50) for _ in range(500)]
    batches = pack_by_tokens(lengths, 64)
    assert [i for b in batches for i in b] == list(range(len(lengths)))  # every index once, in order
    for b in batches:
        assert sum(lengths[i] for i in b) <= 64 or len(b) == 1
    for a, b in zip(batches, batches[1:]):  # greedy: the next sequence did not fit
        assert sum(lengths[i] for i in a) + lengths[b[0]] > 64


def test_stream_matches_list_form_and_is_lazy():
    rows = [[0] * n for n in (5, 1, 9, 3, 3)]
    assert [[len(r) for r in b] for b in pack_stream(iter(rows), 9)] == [[5, 1], [9], [3, 3]]

    def endless():
        while True:
            yield [0, 0]

    first = next(pack_stream(endless(), 6))
    assert len(first) == 3


def test_rejects_nonpositive_budget():
    with pytest.raises(ValueError):
        pack_by_tokens([1], 0)
