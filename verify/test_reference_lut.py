"""Pattern lookup table laws (DESIGN.md §2.5)."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as R
from strategies import codes, matrices


@settings(max_examples=200)
@given(q=codes(-7, 7, max_cols=50), g=st.sampled_from([1, 2, 3, 4, 8]), data=st.data())
def test_lut_equals_direct_sparse_product_exactly_on_integers(q, g, data):
    x = data.draw(matrices(shape=(data.draw(st.integers(1, 6)), q.shape[1]), kinds=("integers", "all_zero")))
    lut = R.build_pattern_lut(q, group_size=g)
    # Integer-valued float64 sums below 2**53 are exact in any order.
    assert np.array_equal(R.lut_matmul(x, lut), R.sparse_matmul(x, q))
    assert np.array_equal(R.sparse_matmul(x, q), x @ q.T.astype(np.float64))


@settings(max_examples=200)
@given(q=codes(-7, 7, max_cols=50), g=st.sampled_from([1, 3, 4]), data=st.data())
def test_lut_equals_direct_sparse_product_on_floats(q, g, data):
    x = data.draw(matrices(shape=(data.draw(st.integers(1, 6)), q.shape[1])))
    lut = R.build_pattern_lut(q, group_size=g)
    ref = R.sparse_matmul(x, q)
    # float64, summed in another order: a few ulps of the absolute sum.
    bound = 1e-12 * (np.abs(x) @ np.abs(q).T.astype(np.float64)) + 1e-300
    assert np.all(np.abs(R.lut_matmul(x, lut) - ref) <= bound)


@settings(max_examples=200)
@given(q=codes(-7, 7, max_cols=50), g=st.sampled_from([1, 3, 4, 8]))
def test_table_rebuilds_q_high_and_counts_each_pattern_once(q, g):
    lut = R.build_pattern_lut(q, group_size=g)
    n, k = q.shape
    rebuilt = np.zeros((n, -(-k // g) * g), dtype=np.int64)
    for row in range(n):
        for e in range(lut.indptr[row], lut.indptr[row + 1]):
            j = lut.entry_groups[e]
            assert lut.pattern_groups[lut.entry_ids[e]] == j
            rebuilt[row, j * g : (j + 1) * g] = lut.patterns[lut.entry_ids[e]]
    assert np.array_equal(rebuilt[:, :k], q) and not rebuilt[:, k:].any()
    keys = {(int(j), tuple(p)) for j, p in zip(lut.pattern_groups, lut.patterns)}
    assert len(keys) == lut.patterns.shape[0]  # a dictionary: no entry twice
    assert all(any(p) for p in lut.patterns)  # zero patterns are never stored
    stats = R.lut_stats(lut)
    assert stats["E"] == int(np.any((np.pad(q, ((0, 0), (0, rebuilt.shape[1] - k))) != 0).reshape(n, -1, g), axis=2).sum())
    assert stats["U"] == lut.patterns.shape[0]
    assert stats["reuse"] == (stats["E"] / stats["U"] if stats["U"] else 0.0)


def test_reuse_grows_when_outliers_share_columns():
    """Column-concentrated outliers (what smoothing produces) repeat patterns across rows."""
    rng = np.random.default_rng(0)
    q = np.zeros((256, 64), dtype=np.int64)
    q[:, [5, 6, 40]] = rng.choice([-1, 1], size=(256, 3))
    stats = R.lut_stats(R.build_pattern_lut(q, group_size=4))
    assert stats["E"] == 2 * 256 and stats["U"] <= 4 + 2 and stats["reuse"] >= 64
