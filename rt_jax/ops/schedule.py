"""The binary-counter (Fenwick) tiling schedule of the Recurrent Transformer, as plain data.

After position (or leaf) m-1 is finished, its persistent keys complete the block [m - T, m) with
T = lowbit(m), the largest power of two dividing m. That block is merged into the online-softmax state
of the next T queries [m, m + T) (truncated at n). Over m = 1..n-1 these blocks cover every strictly
causal (query, key) pair exactly once. The backward pass uses the same blocks in reverse order (the
mirror): once queries [m, m + T) have their attention-output gradients, they are pushed into the keys
[m - T, m).

The functions take a unit count n (positions, or leaves of ``leaf`` positions each) and return Python
data, so any implementation (jnp, Pallas, a traffic model) can use them.
"""

from __future__ import annotations

import dataclasses


def lowbit(m: int) -> int:
    """Largest power of two dividing m (m > 0)."""
    if m <= 0:
        raise ValueError(f"lowbit needs a positive integer, got {m}")
    return m & -m


@dataclasses.dataclass(frozen=True)
class Block:
    """Keys [key_start, key_stop) merged into queries [query_start, query_stop)."""

    step: int
    key_start: int
    key_stop: int
    query_start: int
    query_stop: int

    @property
    def size(self) -> int:
        """Number of (query, key) pairs in the block."""
        return (self.key_stop - self.key_start) * (self.query_stop - self.query_start)


def fenwick_blocks(n: int) -> list[Block]:
    """Forward schedule: block m (m = 1..n-1) is keys [m - T, m) x queries [m, min(m + T, n))."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    blocks = []
    for m in range(1, n):
        t = lowbit(m)
        blocks.append(Block(m, m - t, m, m, min(m + t, n)))
    return blocks


def mirror_blocks(n: int) -> list[Block]:
    """Backward schedule: the forward blocks in reverse order (m = n-1 down to 1)."""
    return fenwick_blocks(n)[::-1]


def rows_moved(n: int, leaf: int = 1) -> dict[str, int]:
    """Exact key and query-state rows a schedule over n positions touches, per (batch, head).

    With ``leaf`` > 1 the schedule runs on ceil(n / leaf) leaves; each leaf's own causal pairs are
    done locally (its keys read once). Naive = the token-by-token loop re-reading every earlier key.
    """
    if leaf < 1:
        raise ValueError(f"leaf must be >= 1, got {leaf}")
    n_leaves = -(-n // leaf)
    key_rows = query_rows = 0
    for blk in fenwick_blocks(n_leaves):
        key_rows += (blk.key_stop - blk.key_start) * leaf
        query_rows += (blk.query_stop - blk.query_start) * leaf
    local_rows = n if leaf > 1 else 0
    return {
        "key_rows": key_rows + local_rows,
        "query_state_rows": query_rows,
        "naive_key_rows": n * (n - 1) // 2,
    }
