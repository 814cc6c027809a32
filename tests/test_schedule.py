"""The binary-counter schedule: exact coverage, the mirror's ordering, exact row counts."""

import numpy as np
import pytest

from rt_jax.ops.schedule import fenwick_blocks, lowbit, mirror_blocks, rows_moved


def _coverage(n: int, blocks) -> np.ndarray:
    """How often each (query, key) pair is covered."""
    counts = np.zeros((n, n), np.int8)
    for blk in blocks:
        counts[blk.query_start : blk.query_stop, blk.key_start : blk.key_stop] += 1
    return counts


def _slow_lowbit(m: int) -> int:
    t = 1
    while m % (2 * t) == 0:
        t *= 2
    return t


def test_lowbit_matches_definition():
    for m in range(1, 5000):
        assert lowbit(m) == _slow_lowbit(m)
    with pytest.raises(ValueError):
        lowbit(0)


@pytest.mark.parametrize("schedule", [fenwick_blocks, mirror_blocks])
def test_every_causal_pair_exactly_once_up_to_1024(schedule):
    lower = np.tril(np.ones((1024, 1024), np.int8), -1)
    for n in range(0, 1025):
        blocks = schedule(n)
        assert len(blocks) == max(n - 1, 0)
        assert np.array_equal(_coverage(n, blocks), lower[:n, :n]), f"n={n}"


@pytest.mark.parametrize("schedule", [fenwick_blocks, mirror_blocks])
def test_every_causal_pair_exactly_once_random_large(schedule):
    rng = np.random.default_rng(0)
    for n in [int(v) for v in rng.integers(1025, 4097, size=3)] + [4096]:
        counts = _coverage(n, schedule(n))
        assert np.array_equal(counts, np.tril(np.ones((n, n), np.int8), -1)), n


def test_blocks_respect_causality_of_the_recurrence():
    """Forward block m only uses finished keys (< m) and only feeds unfinished queries (>= m);
    the mirror runs m downwards, so a key's gradient is complete before its position is reached."""
    for n in (1, 2, 7, 64, 100, 513):
        fwd = fenwick_blocks(n)
        assert [b.step for b in fwd] == list(range(1, n))
        for b in fwd:
            t = _slow_lowbit(b.step)
            assert (b.key_start, b.key_stop) == (b.step - t, b.step)
            assert (b.query_start, b.query_stop) == (b.step, min(b.step + t, n))
            assert b.size == t * (b.query_stop - b.query_start)
        mirror = mirror_blocks(n)
        assert [b.step for b in mirror] == list(range(n - 1, 0, -1))
        for s in range(n):
            # Every block touching key s comes (in mirror order) before any block whose step <= s.
            steps = [b.step for b in mirror if b.key_start <= s < b.key_stop]
            assert all(m > s for m in steps)


def _brute_rows(n: int, leaf: int) -> dict[str, int]:
    n_leaves = (n + leaf - 1) // leaf
    key_rows = query_rows = 0
    for m in range(1, n_leaves):
        t = _slow_lowbit(m)
        key_rows += t * leaf
        query_rows += min(t, n_leaves - m) * leaf
    local = n if leaf > 1 else 0
    naive = sum(t for t in range(n))  # query t re-reads keys 0..t-1
    return {"key_rows": key_rows + local, "query_state_rows": query_rows, "naive_key_rows": naive}


def test_rows_moved_exact():
    for n in list(range(0, 130)) + [511, 512, 1000, 1024, 4096]:
        for leaf in (1, 2, 16, 32):
            assert rows_moved(n, leaf) == _brute_rows(n, leaf), (n, leaf)
    # Closed form at powers of two: (N/2) log2 N rows each way (2304 at N = 512).
    for k in range(1, 13):
        n = 2**k
        r = rows_moved(n)
        assert r["key_rows"] == r["query_state_rows"] == (n // 2) * k
    assert rows_moved(512)["naive_key_rows"] == 512 * 511 // 2


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        fenwick_blocks(-1)
    with pytest.raises(ValueError):
        rows_moved(10, leaf=0)
