"""Synthetic task generators: determinism, vocabularies, and targets recomputed independently."""

import itertools

import numpy as np
import pytest

from rt_jax.data.synthetic import TASKS, make_batch


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("seq_len", [16, 65])
def test_shapes_vocab_and_determinism(name, seq_len):
    a = make_batch(name, seed=3, batch=5, seq_len=seq_len)
    b = make_batch(name, seed=3, batch=5, seq_len=seq_len)
    c = make_batch(name, seed=4, batch=5, seq_len=seq_len)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.inputs, c.inputs)
    vocab = TASKS[name].vocab_size
    for arr in (a.inputs, a.targets):
        assert arr.shape == (5, seq_len) and arr.dtype == np.int32
        assert arr.min() >= 0 and arr.max() < vocab
    assert a.mask.dtype == bool and a.mask.any()


def test_state_tracking_targets():
    p = make_batch("parity", 0, 4, 50)
    for b in range(4):
        running = 0
        for t in range(50):
            running ^= int(p.inputs[b, t])
            assert p.targets[b, t] == running
    m = make_batch("mod5", 0, 4, 50)
    np.testing.assert_array_equal(m.targets, np.cumsum(m.inputs, axis=1) % 5)


def test_s5_targets_compose_permutations():
    perms = list(itertools.permutations(range(5)))
    batch = make_batch("s5", 1, 3, 20)
    for b in range(3):
        state = tuple(range(5))
        for t in range(20):
            x = perms[batch.inputs[b, t]]
            state = tuple(x[state[i]] for i in range(5))
            assert perms[batch.targets[b, t]] == state


def test_recall_scored_positions_are_determined_by_context():
    batch = make_batch("recall", 2, 8, 64)
    for b in range(8):
        seq, seen = batch.inputs[b], {}
        for t in range(63):
            if batch.mask[b, t]:
                key = int(seq[t])
                assert key in seen and seen[key] == batch.targets[b, t]
            if seq[t] < 16 and t + 1 < 64:
                seen[int(seq[t])] = int(seq[t + 1])


def test_copy_tasks_reproduce_data_in_order():
    c = make_batch("copy", 5, 2, 33)
    half = 16
    np.testing.assert_array_equal(c.targets[:, half : 2 * half], c.inputs[:, :half])
    assert c.mask[:, half : 2 * half].all() and c.mask.sum() == 2 * half
    s = make_batch("selective_copy", 5, 2, 64)
    for b in range(2):
        copied = s.targets[b][s.mask[b]]
        data = s.inputs[b][s.inputs[b] < 16][: len(copied)]
        assert len(copied) == 15  # min(16, (64 - 1) // 4) data tokens
        np.testing.assert_array_equal(copied, data)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown task"):
        make_batch("sorting", 0, 1, 8)
    with pytest.raises(ValueError, match="seq_len"):
        make_batch("fuzzy_recall", 0, 1, 4)
