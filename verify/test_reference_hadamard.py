"""Laws of the Hadamard rotation (reference/hadamard.py): orthogonal, its own inverse, leaves the
float product unchanged, spreads an outlier evenly over its block; the rotated RTN product equals
the plain product with the weight rotated back."""
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import reference as R
from strategies import matrices

blocks = st.sampled_from([1, 2, 4, 8, 16, 32])


@st.composite
def rotated_pair(draw):
    """(x [M, K], w [N, K], block) with K a multiple of the block; M may be 1."""
    b = draw(blocks)
    k = b * draw(st.integers(1, 4))
    m = draw(st.integers(1, 6))
    n = draw(st.integers(1, 6))
    return draw(matrices(shape=(m, k))), draw(matrices(shape=(n, k))), b


@settings(max_examples=50)
@given(b=st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 256, 512]))
def test_hadamard_matrix_is_orthogonal_and_its_own_inverse(b):
    h = R.hadamard_matrix(b)
    assert h.shape == (b, b) and np.array_equal(h, h.T)
    assert np.all(np.abs(np.abs(h) * np.sqrt(b) - 1.0) <= 1e-15)
    # b products of ±1/sqrt(b) summed: a few float64 ulps of 1.
    assert np.max(np.abs(h @ h - np.eye(b))) <= 8 * b * np.finfo(np.float64).eps


def _norm_bound(x, w, b):
    """Float64 error of (X R)(W R)^T against X W^T: each rotated entry carries up to ~log2(b) + 1
    roundings of size eps * (its block's 2-norm), the product K more; 16 eps * (b + K) * ||x|| ||w||
    covers both with room."""
    k = x.shape[1]
    eps = np.finfo(np.float64).eps
    return 16 * eps * (b + k) * np.linalg.norm(x, axis=1)[:, None] * np.linalg.norm(w, axis=1)[None, :] + 1e-300


@settings(max_examples=300)
@given(pair=rotated_pair())
@example(pair=(np.array([[1e5, 1.0, -1.0, 0.0]]), np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]), 4))
def test_rotation_leaves_the_float_product_unchanged(pair):
    x, w, b = pair
    exact = x @ w.T
    rotated = R.block_hadamard(x, b) @ R.block_hadamard(w, b).T
    assert np.all(np.abs(rotated - exact) <= _norm_bound(x, w, b))


@settings(max_examples=200)
@given(pair=rotated_pair())
def test_rotating_twice_is_the_identity(pair):
    x, _, b = pair
    back = R.block_hadamard(R.block_hadamard(x, b), b)
    scale = np.abs(x).max(axis=1, keepdims=True)
    # two rotations of b terms each: a few ulps of the row's largest entry per term.
    assert np.all(np.abs(back - x) <= 8 * b * np.finfo(np.float64).eps * scale)


@settings(max_examples=100)
@given(b=blocks, nblk=st.integers(1, 4), where=st.integers(0, 10**6), value=st.floats(1e-3, 1e6))
def test_an_outlier_spreads_evenly_over_its_block(b, nblk, where, value):
    k = b * nblk
    x = np.zeros((1, k))
    j = where % k
    x[0, j] = value
    xr = R.block_hadamard(x, b)[0]
    blk = slice((j // b) * b, (j // b + 1) * b)
    assert np.allclose(np.abs(xr[blk]), value / np.sqrt(b), rtol=1e-14, atol=0)
    outside = np.ones(k, bool)
    outside[blk] = False
    assert np.all(xr[outside] == 0.0)


@settings(max_examples=200)
@given(pair=rotated_pair(), bits=st.sampled_from([4, 5, 6]), wgroup=st.sampled_from([None, 2, 4, 8]))
def test_rotated_rtn_equals_the_plain_product_with_the_weight_rotated_back(pair, bits, wgroup):
    x, w, b = pair
    q, s = R.hadamard_quantize(w, b, bits=bits, group_size=wgroup)
    assert q.dtype == np.int8 and np.abs(q).max(initial=0) <= 2 ** (bits - 1) - 1
    w_hat = R.block_hadamard(R.dequantize(q, s, wgroup), b)  # W_hat R^T, R symmetric
    got = R.hadamard_matmul(x, q, s, b, act_bits=None, weight_group_size=wgroup)
    assert np.all(np.abs(got - x @ w_hat.T) <= _norm_bound(x, w_hat, b))


@settings(max_examples=100)
@given(pair=rotated_pair(), agroup=st.sampled_from([None, 4, 8]))
def test_quantized_product_uses_the_activation_codes_of_the_rotated_input(pair, agroup):
    x, w, b = pair
    q, s = R.hadamard_quantize(w, b)
    qx, sx = R.quantize_activations(R.block_hadamard(x, b), bits=4, group_size=agroup)
    expect = R.dequantize(qx, sx, agroup) @ R.dequantize(q, s).T
    got = R.hadamard_matmul(x, q, s, b, act_bits=4, act_group_size=agroup)
    assert np.array_equal(got, expect)


@settings(max_examples=100)
@given(k=st.integers(1, 10**6), cap=st.sampled_from([None, 1, 8, 64, 512]))
def test_block_size_is_the_largest_power_of_two_dividing_k(k, cap):
    b = R.hadamard_block_size(k, cap)
    assert b & (b - 1) == 0 and k % b == 0
    assert (cap is not None and b == cap) or k % (2 * b) != 0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="b must be a positive power of two"):
        R.hadamard_matrix(12)
    with pytest.raises(ValueError, match="block 8 does not divide K=12"):
        R.block_hadamard(np.ones((2, 12)), 8)
    with pytest.raises(ValueError, match="block must be a positive power of two"):
        R.block_hadamard(np.ones((2, 12)), 3)
    with pytest.raises(ValueError, match="x holds NaN"):
        R.block_hadamard(np.array([[np.nan, 1.0]]), 2)
    with pytest.raises(ValueError, match="max_block"):
        R.hadamard_block_size(64, 48)
    with pytest.raises(ValueError, match="must be \\[M, K\\] and \\[N, K\\]"):
        R.hadamard_matmul(np.ones((1, 4)), np.ones((2, 8), np.int8), np.ones(2), 4)
