"""The Numba pattern-LUT kernels equal the oracle (DESIGN.md §2.5): `zqkernels.cpu.lut` vs `reference`.

float64: exactly equal on integer-valued inputs (every partial sum is an integer below 2**53, so
any summation order gives the same bits); otherwise within 1e-12 of the absolute sum
`|x| @ |q_high|.T` (the scale at which reordering a float64 sum can err).
float32: within `(terms + 2) * 2**-23` times that absolute sum, `terms` being the longest chain of
roundings in one output (group_size multiply-adds into a table entry, then one add per entry of
the row; for the direct product, one multiply-add per nonzero): the textbook bound
gamma_n = n*u/(1-n*u) with u = 2**-24, with a factor 2 to spare.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as R
from strategies import examples
from zqkernels.cpu import lut as L

REPO = Path(__file__).resolve().parents[1]


@st.composite
def high_codes(draw, max_rows=40, max_cols=70):
    """q_high-like int8 [N, K]: sparse, or column-concentrated (what smoothing makes), or dense,
    with all-zero rows, K not a multiple of the group, shapes down to 1 x 1."""
    n = draw(st.integers(1, max_rows))
    k = draw(st.integers(1, max_cols))
    kind = draw(st.sampled_from(["sparse", "columns", "dense", "all_zero", "palette"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = np.zeros((n, k), dtype=np.int8)
    if kind == "sparse":
        mask = rng.random((n, k)) < 0.1
        q[mask] = rng.choice([-7, -2, -1, 1, 2, 7], size=mask.sum())
    elif kind == "columns":
        cols = rng.choice(k, size=min(k, 1 + rng.integers(4)), replace=False)
        q[:, cols] = rng.choice([-1, 0, 1, 3], size=(n, cols.size))
    elif kind == "dense":
        q[:] = rng.integers(-8, 8, size=(n, k))
    elif kind == "palette":  # few distinct patterns, high reuse
        palette = rng.integers(-3, 4, size=(3, k))
        q[:] = palette[rng.integers(3, size=n)]
    if kind != "all_zero" and q.size and draw(st.booleans()):
        q.flat[rng.integers(q.size)] = draw(st.sampled_from([-128, 127]))  # the int8 ends
    if n > 1 and draw(st.booleans()):
        q[rng.random(n) < 0.3] = 0  # empty CSR rows
    return q


def _x(data, m, k, integers):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    if integers:
        return rng.integers(-1000, 1001, size=(m, k)).astype(np.float64)
    kind = data.draw(st.sampled_from(["normal", "outlier", "heavy", "zero_rows"]))
    x = rng.standard_normal((m, k))
    if kind == "outlier":
        x[rng.integers(m), rng.integers(k)] = 1e5
    elif kind == "heavy":
        x = rng.standard_t(1.5, size=(m, k))
    elif kind == "zero_rows":
        x[rng.random(m) < 0.5] = 0.0
    return x


def _abs_sum(x, q):
    return np.abs(x) @ np.abs(q.astype(np.float64)).T


def _poisoned(m, n, dtype):
    return np.full((m, n), np.nan, dtype=dtype)  # any element the kernel forgets stays NaN


tiles = st.sampled_from([None, 1, 2, 3, 8, 64])
group_sizes = st.sampled_from([1, 2, 3, 4, 8])


@settings(max_examples=examples(150))
@given(q=high_codes(), g=group_sizes, m=st.integers(1, 70), tile=tiles, data=st.data())
def test_lut_matmul_equals_reference_exactly_on_integers(q, g, m, tile, data):
    x = _x(data, m, q.shape[1], integers=True)
    lut = R.build_pattern_lut(q, group_size=g)
    out = _poisoned(m, q.shape[0], np.float64)
    y = L.lut_matmul(x, L.prepare_lut(lut), out=out, token_tile=tile)
    assert y is out
    assert np.array_equal(y, R.lut_matmul(x, lut))
    ys = L.sparse_matmul(x, L.prepare_csr(q), out=_poisoned(m, q.shape[0], np.float64), token_tile=tile)
    assert np.array_equal(ys, R.sparse_matmul(x, q))


@settings(max_examples=examples(150))
@given(q=high_codes(), g=group_sizes, m=st.integers(1, 70), tile=tiles, data=st.data())
def test_lut_matmul_float64_within_1e12_of_reference(q, g, m, tile, data):
    x = _x(data, m, q.shape[1], integers=False)
    lut = R.build_pattern_lut(q, group_size=g)
    bound = 1e-12 * _abs_sum(x, q)  # reordering a float64 sum errs by a few ulps of the abs sum
    y = L.lut_matmul(x, L.prepare_lut(lut), token_tile=tile)
    assert np.all(np.abs(y - R.lut_matmul(x, lut)) <= bound)
    ys = L.sparse_matmul(x, L.prepare_csr(q), token_tile=tile)
    assert np.all(np.abs(ys - R.sparse_matmul(x, q)) <= bound)


@settings(max_examples=examples(150))
@given(q=high_codes(), g=group_sizes, m=st.integers(1, 70), tile=tiles, data=st.data())
def test_float32_variants_within_stated_rounding_bound(q, g, m, tile, data):
    x32 = _x(data, m, q.shape[1], integers=False).astype(np.float32)
    x64 = x32.astype(np.float64)  # the same values: only the arithmetic differs
    la = L.prepare_lut(R.build_pattern_lut(q, group_size=g))
    ref = R.sparse_matmul(x64, q)
    y = L.lut_matmul(x32, la, out=_poisoned(m, q.shape[0], np.float32), token_tile=tile)
    assert y.dtype == np.float32
    max_entries = int(np.diff(la.indptr).max()) if q.shape[0] else 0
    bound = (g + max_entries + 2) * 2.0**-23 * _abs_sum(x64, q)
    assert np.all(np.abs(y - ref) <= bound)
    ys = L.sparse_matmul(x32, L.prepare_csr(q), token_tile=tile)
    max_nnz = int((q != 0).sum(axis=1).max())
    assert np.all(np.abs(ys - ref) <= (max_nnz + 2) * 2.0**-23 * _abs_sum(x64, q))


@settings(max_examples=examples(100))
@given(q=high_codes(), g=group_sizes, m=st.integers(1, 20), data=st.data())
def test_lut_build_equals_reference_table(q, g, m, data):
    integers = data.draw(st.booleans())
    x = _x(data, m, q.shape[1], integers=integers)
    lut = R.build_pattern_lut(q, group_size=g)
    t = L.lut_build(x, L.prepare_lut(lut))
    ref = R.lut_table(x, lut)
    if integers:
        assert np.array_equal(t, ref)
    else:
        cols = np.minimum(lut.pattern_groups[:, None] * g + np.arange(g), q.shape[1] - 1)
        mask = (lut.pattern_groups[:, None] * g + np.arange(g)) < q.shape[1]
        absw = np.abs(lut.patterns.astype(np.float64)) * mask  # int8 abs(-128) wraps
        bound = 1e-12 * np.einsum("mui,ui->mu", np.abs(x)[:, cols], absw)
        assert np.all(np.abs(t - ref) <= bound)


@settings(max_examples=examples(100))
@given(q=high_codes(max_rows=20, max_cols=40), m=st.integers(1, 40), tile=tiles, data=st.data())
def test_row_scale_is_fused_exactly(q, m, tile, data):
    """The hybrid passes 16 * Δ_n as row_scale: out = row_scale[n] * (x @ q_high.T)[:, n], one rounding."""
    x = _x(data, m, q.shape[1], integers=True)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    scale = rng.uniform(0.1, 10.0, size=q.shape[0])
    expect = R.lut_matmul(x, R.build_pattern_lut(q)) * scale  # the integer sum is exact: one rounding each
    assert np.array_equal(L.lut_matmul(x, L.prepare_lut(R.build_pattern_lut(q)), row_scale=scale, token_tile=tile), expect)
    assert np.array_equal(L.sparse_matmul(x, L.prepare_csr(q), row_scale=scale, token_tile=tile), expect)


def test_reuse_pays_on_column_concentrated_outliers_and_stats_report_it():
    rng = np.random.default_rng(0)
    q = np.zeros((512, 64), dtype=np.int8)
    q[:, 8:12] = rng.choice([-1, 1], size=(512, 4))  # one outlier group, 16 possible patterns
    lut = R.build_pattern_lut(q, group_size=4)
    stats = L.lut_stats(lut)
    assert stats["E"] == 512 and stats["U"] <= 16 and stats["reuse"] >= 32
    assert stats["kernel_bytes"] == L.prepare_lut(lut).nbytes > 0
    assert stats["nnz"] == np.count_nonzero(q) and stats["nnz_per_entry"] == stats["nnz"] / stats["E"]
    assert L.lut_report({"o": lut})[0] == {"layer": "o", **stats}
    x = rng.integers(-9, 10, size=(3, 64)).astype(np.float64)
    assert np.array_equal(L.lut_matmul(x, L.prepare_lut(lut)), x @ q.T.astype(np.float64))


def test_default_token_tile_is_128_bytes_of_tokens_at_most_m():
    assert [L.default_token_tile(m, 4) for m in (1, 7, 64, 4096)] == [1, 7, 32, 32]
    assert [L.default_token_tile(m, 8) for m in (1, 7, 64, 4096)] == [1, 7, 16, 16]


def test_zero_tokens_and_empty_table():
    la = L.prepare_lut(R.build_pattern_lut(np.zeros((3, 5), dtype=np.int8)))
    assert L.lut_matmul(np.zeros((0, 5)), la).shape == (0, 3)
    assert np.array_equal(L.lut_matmul(np.ones((2, 5)), la), np.zeros((2, 3)))


# ------------------------------------------------------------------------------- bad input
Q = np.array([[0, 1, 0, 2, 0], [3, 0, 0, 0, -1]], dtype=np.int8)
LA = L.prepare_lut(R.build_pattern_lut(Q))
CSR = L.prepare_csr(Q)
X = np.ones((4, 5))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: L.lut_matmul(X.astype(np.float16), LA), "dtype"),
        (lambda: L.lut_matmul(X.astype(np.int64), LA), "dtype"),
        (lambda: L.lut_matmul(np.ones((4, 10))[:, ::2], LA), "contiguous"),
        (lambda: L.lut_matmul(np.asfortranarray(np.ones((5, 4)).T.copy(order="F")), LA), "contiguous"),
        (lambda: L.lut_matmul(np.ones(5), LA), "rank"),
        (lambda: L.lut_matmul(np.ones((4, 6)), LA), "built for K=5"),  # a table for another shape
        (lambda: L.lut_matmul(X, LA, out=np.empty((4, 3))), "out"),
        (lambda: L.lut_matmul(X, LA, out=np.empty((4, 2), dtype=np.float32)), "out"),
        (lambda: L.lut_matmul(X, LA, out=np.empty((2, 4)).T), "out"),
        (lambda: L.lut_matmul(X, LA, row_scale=np.ones(3)), "row_scale"),
        (lambda: L.lut_matmul(X, LA, token_tile=0), "token_tile"),
        (lambda: L.lut_matmul(X.tolist(), LA), "numpy"),
        (lambda: L.lut_build(np.ones((4, 4)), LA), "K=5"),
        (lambda: L.sparse_matmul(np.ones((4, 6)), CSR), "K=5"),
        (lambda: L.sparse_matmul(X.astype(np.float16), CSR), "dtype"),
        (lambda: L.prepare_csr(Q.astype(np.float64)), "q_high"),
        (lambda: L.prepare_lut(object()), "PatternLUT"),
        (lambda: L.prepare_lut(R.PatternLUT(LA.indptr, np.array([0, 1, 9], np.int32), np.zeros(3, np.int32),
                                            np.ones((3, 4), np.int8), np.zeros(3, np.int32), 4, (2, 5))),
         "entry_ids"),
        (lambda: L.prepare_lut(R.PatternLUT(np.array([0, 2, 1]), np.zeros(3, np.int32), np.zeros(3, np.int32),
                                            np.ones((1, 4), np.int8), np.zeros(1, np.int32), 4, (2, 5))),
         "indptr"),
        (lambda: L.prepare_lut(R.PatternLUT(np.array([0, 1, 1]), np.zeros(1, np.int32), np.zeros(1, np.int32),
                                            np.ones((1, 4), np.int8), np.array([2], np.int32), 4, (2, 5))),
         "pattern_groups"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_second_process_loads_compiled_kernels_from_cache(tmp_path):
    """cache=True: after one process compiled them, another one loads them instead of compiling."""
    script = textwrap.dedent(
        """
        import numpy as np, reference as R
        from zqkernels.cpu import lut as L
        q = np.eye(6, dtype=np.int8)
        x = np.ones((3, 6))
        L.lut_matmul(x, L.prepare_lut(R.build_pattern_lut(q)))
        L.sparse_matmul(x, L.prepare_csr(q))
        k = L._lut_matmul_kernel.stats, L._sparse_matmul_kernel.stats
        print(sum(len(s.cache_hits) for s in k), sum(len(s.cache_misses) for s in k))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    runs = [subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    hits, misses = (int(v) for v in runs[1].stdout.split())
    assert hits >= 2 and misses == 0, runs[1].stdout


@settings(max_examples=examples(100))
@given(q=high_codes(), g=group_sizes)
def test_stats_count_nonzeros_and_entries(q, g):
    stats = L.lut_stats(R.build_pattern_lut(q, group_size=g))
    assert stats["nnz"] == np.count_nonzero(q)
    assert stats["E"] <= stats["nnz"] <= g * stats["E"]  # a stored pattern holds 1..g nonzeros


@pytest.mark.parametrize("n, k, g", [(3, 40, 4), (60, 300, 4), (50, 700, 8)])
def test_index_arrays_take_the_widths_the_bits_count_charges(n, k, g):
    """Entry ids in the smallest unsigned width holding U - 1 (uint8 up to 256 patterns, uint16
    beyond), CSR columns in the width holding K - 1, offsets int32: the bits-per-weight count's
    widths (`reference.lut.uint_bytes`); on integer inputs both products still equal the oracle."""
    rng = np.random.default_rng(n + k)
    q = rng.integers(-8, 8, size=(n, k)).astype(np.int8)
    q[rng.random((n, k)) < 0.5] = 0
    lut = R.build_pattern_lut(q, group_size=g)
    la, csr = L.prepare_lut(lut), L.prepare_csr(q)
    u = lut.patterns.shape[0]
    assert la.entry_ids.dtype.itemsize == R.lut.uint_bytes(max(u - 1, 0)) and la.entry_ids.dtype.kind == "u"
    assert csr.indices.dtype.itemsize == R.lut.uint_bytes(k - 1) and csr.indices.dtype.kind == "u"
    assert la.indptr.dtype == np.int32 and csr.indptr.dtype == np.int32 and la.pattern_cols.dtype == np.int32
    assert (u > 256) == (la.entry_ids.dtype == np.uint16) or u > 65536
    x = rng.integers(-1000, 1001, size=(5, k)).astype(np.float64)
    ref = R.lut_matmul(x, lut)
    assert np.array_equal(L.lut_matmul(x, la), ref)
    assert np.array_equal(L.sparse_matmul(x, csr), ref)
