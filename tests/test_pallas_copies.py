"""No whole-buffer copy inside the Pallas layer's leaf loops, in the compiled v5e HLO.

Compiles the layer's forward + backward (impl="pallas", the in-place Fenwick kernels) with libtpu
for v5e:2x2 from this CPU, one sequence per chip, and counts every copy inside the while loops
that call kernels (``experiments.bench_traffic.leaf_loop_copies``). Allowed: copies up to one
leaf slice (one leaf of one sequence's widest float32 activation, the MLP hidden), the per-leaf
slices the scans take of their inputs. Before the in-place kernels every Fenwick call copied the
whole leaf-major K/V buffers and the state (124 MB of copies per layer step at N = 1024).
"""

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest

from experiments.bench_traffic import hlo_copy_row


@pytest.mark.parametrize("n", [256, 1024])
def test_leaf_loops_copy_at_most_one_leaf_slice(n):
    row = hlo_copy_row(n, heads=2, head_dim=64, leaf=32)
    assert row["leaf_loops"] == 3  # forward scan, backward recompute, reverse scan
    assert row["copies_over_slice_executed"] == 0, row
    assert row["largest_copy_bytes"] <= row["leaf_slice_bytes"]
    # what is left is per-leaf traffic: a small fraction of the kernels' own bytes
    assert row["copies_over_kernel_bytes"] < 0.25, row
