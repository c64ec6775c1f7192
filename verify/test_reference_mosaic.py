"""MosaicQuant laws (DESIGN.md §3)."""
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as R
from strategies import matrices

blocks = st.tuples(st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 3, 4, 8, 16]))


def _hdiag(draw_x):
    return np.mean(draw_x**2, axis=0)


@settings(max_examples=100)
@given(w=matrices(max_rows=24, max_cols=40), block=blocks, data=st.data())
def test_density_zero_is_the_base_product(w, block, data):
    x = data.draw(matrices(shape=(data.draw(st.integers(1, 5)), w.shape[1])))
    codes = R.mosaic_quantize(w, _hdiag(x), density=0.0, block=block)
    assert codes.block_index.shape == (0, 2)
    for act_bits in (4, None):
        qb_only = R.mosaic_matmul(x, codes, act_bits=act_bits)
        if act_bits is None:
            base = x @ R.dequantize(codes.q_base, codes.scale_base).T
        else:
            qx, sx = R.quantize_activations(x)
            base = R.w4a4_matmul(qx, sx, codes.q_base, codes.scale_base)
        assert np.allclose(qb_only, base, rtol=1e-12, atol=1e-12 * np.abs(base).max(initial=0.0))


@settings(max_examples=100)
@given(w=matrices(max_rows=24, max_cols=40), block=blocks, data=st.data())
def test_weight_error_never_grows_with_density(w, block, data):
    x = data.draw(matrices(shape=(4, w.shape[1])))
    h = _hdiag(x)
    previous_plain = previous_weighted = np.inf
    previous_err = None
    for density in (0.0, 0.01, 0.05, 0.2, 0.5, 1.0):
        codes = R.mosaic_quantize(w, h, density=density, block=block)
        err = np.abs(w - R.mosaic_dequantize(codes))
        plain, weighted = float((err**2).sum()), float((h * err**2).sum())
        assert plain <= previous_plain * (1 + 1e-12) + 1e-300
        assert weighted <= previous_weighted * (1 + 1e-12) + 1e-300
        if previous_err is not None:  # elementwise: 0 is always a candidate residual code
            assert np.all(err <= previous_err * (1 + 1e-12) + 1e-300)
        previous_plain, previous_weighted, previous_err = plain, weighted, err


@settings(max_examples=150)
@given(w=matrices(max_rows=24, max_cols=40), block=blocks, density=st.floats(0.0, 1.0), data=st.data())
def test_keeps_the_top_density_fraction_of_blocks(w, block, density, data):
    x = data.draw(matrices(shape=(3, w.shape[1])))
    h = _hdiag(x)
    codes = R.mosaic_quantize(w, h, density=density, block=block)
    n, k = w.shape
    bn, bk = block
    n_blocks = math.ceil(n / bn) * math.ceil(k / bk)
    assert len(codes.block_index) == min(n_blocks, math.ceil(density * n_blocks - 1e-9))
    flat = codes.block_index[:, 0] * math.ceil(k / bk) + codes.block_index[:, 1]
    assert np.all(np.diff(flat) > 0)  # row-major, each block once
    assert codes.q_res.shape == (len(flat), bn, bk) and codes.scale_res.shape == (len(flat), bn)
    assert codes.q_res.min(initial=0) >= -8 and codes.q_res.max(initial=0) <= 7
    # Every residual element past the matrix edge is zero.
    for (rb, cb), q in zip(codes.block_index, codes.q_res):
        rows, cols = min(bn, n - rb * bn), min(bk, k - cb * bk)
        assert not q[rows:].any() and not q[:, cols:].any()


def test_ties_keep_the_lower_block_index():
    w = np.zeros((8, 8))  # zero residual everywhere: every block scores 0
    codes = R.mosaic_quantize(w, np.ones(8), density=0.5, block=(4, 4))
    assert codes.block_index.tolist() == [[0, 0], [0, 1]]


def test_the_most_error_critical_block_is_kept_first():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 8)) * 0.01
    w[4:, 4:] = rng.standard_normal((4, 4))  # large residual here
    w[:, 0] = 1.0  # fixes the per-row base scale so the small blocks are coarse too
    h = np.ones(8)
    codes = R.mosaic_quantize(w, h, density=0.25, block=(4, 4))
    assert [1, 1] in codes.block_index.tolist()
