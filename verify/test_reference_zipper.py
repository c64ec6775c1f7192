"""ZipperQuant laws: the exact bit split and the grid that never clips (DESIGN.md §2.2-2.4)."""
import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

import reference as R
from strategies import codes, matrices


@settings(max_examples=300)
@given(q=codes(-2039, 2039), low_bits=st.sampled_from([4]))
@example(q=np.array([[-8, 7, -9, 8, 119, -119, 0]]), low_bits=4)
def test_join_after_split_is_identity_and_inliers_have_no_high_part(q, low_bits):
    q_low, q_high = R.bit_split(q, low_bits=low_bits)
    assert q_low.dtype == np.int8 and q_high.dtype == np.int8
    assert q_low.min() >= -8 and q_low.max() <= 7
    assert np.array_equal(R.bit_join(q_low, q_high, low_bits=low_bits), q)
    inlier = (q >= -8) & (q <= 7)
    assert np.array_equal(q_high == 0, inlier)


@settings(max_examples=200)
@given(q=codes(-128 * 4 - 2, 127 * 4 + 1), low_bits=st.integers(1, 6))
def test_split_is_exact_for_any_low_width(q, low_bits):
    half = 2 ** (low_bits - 1)
    q = np.clip(q, -128 * 2**low_bits - half, 127 * 2**low_bits + half - 1)
    q_low, q_high = R.bit_split(q, low_bits=low_bits)
    assert q_low.min() >= -half and q_low.max() <= half - 1
    assert np.array_equal(q_low.astype(np.int64) + 2**low_bits * q_high.astype(np.int64), q)


@settings(max_examples=200)
@given(
    w=matrices(max_cols=64),
    outlier_ratio=st.sampled_from([0.0, 0.005, 0.01, 0.05, 0.25, 1.0]),
    high_bits=st.sampled_from([1, 2, 4, 8]),
)
def test_zipper_quantize_never_clips(w, outlier_ratio, high_bits):
    c = R.zipper_quantize(w, outlier_ratio=outlier_ratio, high_bits=high_bits)
    q_max = 7 + 16 * (2 ** (high_bits - 1) - 1)
    q = R.bit_join(c.q_low, c.q_high)
    assert np.all(np.abs(q) <= q_max)
    err = np.abs(w - c.scale[:, None] * q)
    assert np.all(err <= 0.5 * c.scale[:, None] * (1 + 1e-9) + 1e-300)
    assert np.all(c.scale[np.all(w == 0, axis=1)] == 0)


@settings(max_examples=100)
@given(x=matrices(max_cols=40), w=matrices(max_cols=40), act_group=st.sampled_from([None, 4, 32]))
def test_zipper_with_no_high_part_is_the_plain_w4a4_product(x, w, act_group):
    k = min(x.shape[1], w.shape[1])
    x, w = x[:, :k], w[:, :k]
    c = R.zipper_quantize(w, outlier_ratio=0.0)  # Δ = max / 7: every code an inlier
    assert not c.q_high.any()
    qx, sx = R.quantize_activations(x, group_size=act_group)
    plain = R.w4a4_matmul(qx, sx, c.q_low, c.scale, act_group_size=act_group)
    assert np.allclose(R.zipper_matmul(x, c, act_group_size=act_group), plain, rtol=1e-12, atol=1e-300)


@settings(max_examples=100)
@given(x=matrices(max_cols=40), w=matrices(max_cols=40))
def test_zipper_product_is_low_part_plus_sixteen_times_high_part(x, w):
    k = min(x.shape[1], w.shape[1])
    x, w = x[:, :k], w[:, :k]
    c = R.zipper_quantize(w, outlier_ratio=0.05)
    qx, sx = R.quantize_activations(x)
    low = R.w4a4_matmul(qx, sx, c.q_low, c.scale)
    high = 16 * c.scale[None, :] * R.sparse_matmul(x, c.q_high)
    y = R.zipper_matmul(x, c)
    assert np.allclose(y, low + high, rtol=1e-10, atol=1e-10 * np.abs(y).max(initial=0.0))
    # With float activations the product is exactly that of the dequantized weight.
    y16 = R.zipper_matmul(x, c, act_bits=None)
    deq = c.scale[:, None] * R.bit_join(c.q_low, c.q_high)
    assert np.allclose(y16, x @ deq.T, rtol=1e-10, atol=1e-10 * np.abs(y16).max(initial=0.0))
