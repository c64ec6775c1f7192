"""Laws of smoothing, symmetric quantization and the plain quantized products (DESIGN.md §1)."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as R
from strategies import group_sizes, matrices


@settings(max_examples=200)
@given(x=matrices(), w=matrices(), alpha=st.floats(0.0, 1.0))
def test_smoothing_preserves_the_product(x, w, alpha):
    k = min(x.shape[1], w.shape[1])
    x, w = x[:, :k], w[:, :k]
    s = R.smooth_scales(np.abs(x).max(axis=0), np.abs(w).max(axis=0), alpha=alpha)
    exact = x @ w.T
    smoothed = (x / s) @ (w * s).T
    # float64: each term picks up a few ulps from the divide and multiply by s.
    bound = 1e-12 * (np.abs(x) @ np.abs(w).T) + 1e-300
    assert np.all(np.abs(smoothed - exact) <= bound)


@settings(max_examples=200)
@given(x=matrices(), bits=st.sampled_from([4, 8]), group_size=group_sizes)
def test_activation_codes_lie_on_the_grid_and_reconstruct_within_half_a_step(x, bits, group_size):
    qx, sx = R.quantize_activations(x, bits=bits, group_size=group_size)
    qmax = 2 ** (bits - 1) - 1
    assert qx.dtype == np.int8 and qx.shape == x.shape
    assert qx.min(initial=0) >= -qmax - 1 and qx.max(initial=0) <= qmax
    expected_scale_shape = (x.shape[0],) if group_size is None else (x.shape[0], -(-x.shape[1] // group_size))
    assert sx.shape == expected_scale_shape and np.all(np.isfinite(sx)) and np.all(sx >= 0)
    # The scale is float32-exact by contract.
    assert np.array_equal(sx, sx.astype(np.float32).astype(np.float64))
    err = np.abs(R.dequantize(qx, sx, group_size) - x)
    step = R.dequantize(np.ones_like(qx), sx, group_size)
    # Half a step, plus float32's rounding of x and of x / scale (a few ulps of |x|).
    assert np.all(err <= 0.5 * step * (1 + 1e-6) + 1e-6 * np.abs(x))


@settings(max_examples=200)
@given(x=matrices(kinds=("ties",)))
def test_activation_ties_round_half_to_even(x):
    qx, sx = R.quantize_activations(x)
    ratio = x / sx[:, None]  # exact: the scale is a power of two
    assert np.array_equal(qx, np.rint(ratio).astype(np.int8))
    assert np.all(qx[:, 1:] % 2 == 0)  # every non-pivot element is a tie, so every code is even


@settings(max_examples=100)
@given(x=matrices(), group_size=group_sizes)
def test_zero_rows_get_zero_scale_and_zero_codes(x, group_size):
    x = x.copy()
    x[0] = 0.0
    qx, sx = R.quantize_activations(x, group_size=group_size)
    assert np.all(qx[0] == 0) and np.all(sx[0] == 0) and np.all(np.isfinite(sx))


@settings(max_examples=200)
@given(w=matrices(), group_size=group_sizes)
def test_weight_quantization_never_clips(w, group_size):
    q, s = R.quantize_weights(w, group_size=group_size)
    assert q.min(initial=0) >= -7 and q.max(initial=0) <= 7  # symmetric: -8 is never needed
    err = np.abs(R.dequantize(q, s, group_size) - w)
    assert np.all(err <= 0.5 * R.dequantize(np.ones_like(q), s, group_size) * (1 + 1e-12) + 1e-300)


@settings(max_examples=150)
@given(x=matrices(max_cols=40), w=matrices(max_cols=40), act_group=group_sizes)
def test_w4a4_error_is_bounded_by_the_two_scales(x, w, act_group):
    k = min(x.shape[1], w.shape[1])
    x, w = x[:, :k], w[:, :k]
    qx, sx = R.quantize_activations(x, group_size=act_group)
    qw, sw = R.quantize_weights(w)
    y = R.w4a4_matmul(qx, sx, qw, sw, act_group_size=act_group)
    w_hat = R.dequantize(qw, sw)
    step_x = R.dequantize(np.ones_like(qx), sx, act_group)
    # x.w - x^.w^ = x (w - w^) + (x - x^) w^ with |w - w^| <= Δw/2 and |x - x^| <= Δx/2 (+ float32 slack).
    ex = 0.5 * step_x * (1 + 1e-6) + 1e-6 * np.abs(x)
    bound = np.abs(x) @ (0.5 * sw[:, None] * np.ones_like(w)).T + ex @ np.abs(w_hat).T
    assert np.all(np.abs(y - x @ w.T) <= bound * (1 + 1e-9) + 1e-12)


@settings(max_examples=150)
@given(x=matrices(max_cols=40), w=matrices(max_cols=40), g=st.sampled_from([1, 3, 8, 16]))
def test_grouped_w4a4_equals_rescaled_integer_partial_sums(x, w, g):
    """The law a grouped GEMM follows: rescale each group's int32 partial sum, then add."""
    k = min(x.shape[1], w.shape[1])
    qx, sx = R.quantize_activations(x[:, :k], group_size=g)
    qw, sw = R.quantize_weights(w[:, :k])
    y = R.w4a4_matmul(qx, sx, qw, sw, act_group_size=g)
    acc = np.zeros(y.shape)
    for j in range(sx.shape[1]):
        part = qx[:, j * g : (j + 1) * g].astype(np.int64) @ qw[:, j * g : (j + 1) * g].astype(np.int64).T
        acc += sx[:, j : j + 1] * part
    acc *= sw[None, :]
    assert np.allclose(y, acc, rtol=1e-12, atol=1e-12 * np.abs(acc).max(initial=0.0))
