"""The torch weight quantizers (`zqkernels.quantizers`) against the oracle, bit for bit.

RTN, the ZipperQuant grid and split and the MosaicQuant base, residual, scores and kept blocks
must equal `reference/` exactly on the same float64 input: integer codes, scales and block lists
compared with `array_equal`, ties at rounding boundaries included (both sides round half to even,
so no code may differ at a tie either). The one inexact function is `smooth_scales` (pow is not
correctly rounded), bounded by `quantizers.SMOOTH_RTOL`. Inputs are the adversaries of
`strategies.matrices` (exact ties, zero rows, one huge outlier, heavy tails, integers, all-zero,
N = 1, K not a multiple of the group or block) plus blocks built to tie on purpose. Every test
runs on the CPU, and on CUDA too where there is one.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import reference as R
from reference.mosaic import _blocked
from strategies import codes as code_matrices
from strategies import group_sizes, matrices
from zqkernels import quantizers as Q
from zqkernels.layouts import DenseInt4, MosaicBlocks, ZipperHighGPU

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

outlier_ratios = st.one_of(st.sampled_from([0.0, 1e-12, 0.01, 0.05, 0.25, 0.5, 1.0]), st.floats(0.0, 1.0))
densities = st.one_of(st.sampled_from([0.0, 1e-9, 0.05, 0.3, 0.5, 1.0]), st.floats(0.0, 1.0))
mosaic_blocks = st.tuples(st.sampled_from([1, 2, 3, 8, 16]), st.sampled_from([1, 3, 4, 8, 16, 64]))


def assert_equal(ours, oracle, *fields):
    for f in fields:
        a, b = np.asarray(getattr(ours, f)), np.asarray(getattr(oracle, f))
        assert a.dtype == b.dtype and a.shape == b.shape, (f, a.dtype, b.dtype, a.shape, b.shape)
        np.testing.assert_array_equal(a, b, err_msg=f)  # exact: codes, scales, block lists


@st.composite
def hdiags(draw, k):
    """A Hessian diagonal: means of squares, with zero channels, one dominant channel, or all equal."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["mean_square", "zeros_in", "dominant", "constant", "all_zero"]))
    h = np.mean(rng.standard_normal((4, k)) ** 2, axis=0)
    if kind == "zeros_in":
        h[rng.random(k) < 0.5] = 0.0
    elif kind == "dominant":
        h[rng.integers(k)] = 1e6
    elif kind == "constant":
        h = np.ones(k)
    elif kind == "all_zero":
        h = np.zeros(k)
    return h


# ------------------------------------------------------------------ RTN

@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=250)
@given(w=matrices(max_rows=12, max_cols=70), bits=st.integers(2, 8), group_size=group_sizes)
@example(w=np.zeros((1, 1)), bits=4, group_size=None)
@example(w=np.array([[0.5, 1.5, 2.5, -3.5, 7.0]]), bits=4, group_size=None)  # every code a tie
def test_quantize_weights_equals_the_oracle(device, w, bits, group_size):
    q, s = Q.quantize_weights(torch.from_numpy(w).to(device), bits=bits, group_size=group_size)
    rq, rs = R.quantize_weights(w, bits=bits, group_size=group_size)
    assert q.device.type == device and q.dtype == torch.int8 and s.dtype == torch.float64
    np.testing.assert_array_equal(q.cpu().numpy(), rq)
    np.testing.assert_array_equal(s.cpu().numpy(), rs)  # float64, exact


# ------------------------------------------------------------------ ZipperQuant

@st.composite
def quantile_cases(draw):
    """Rows and a quantile q whose virtual index (K-1)·q sits on an integer, on a half (where
    numpy's lerp switches form) or anywhere, over rows with many repeated values."""
    a = np.abs(draw(matrices(max_rows=6, max_cols=40)))
    k = a.shape[1]
    j = draw(st.integers(0, max(k - 2, 0)))
    frac = draw(st.sampled_from([0.0, 0.5, None]))
    q = draw(st.floats(0.0, 1.0)) if frac is None or k == 1 else min(1.0, (j + frac) / (k - 1))
    return a, q


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=300)
@given(case=quantile_cases())
@example(case=(np.array([[1.0, 2.0, 3.0, 4.0]]), 0.5))  # gamma exactly 0.5
@example(case=(np.array([[3.0]]), 0.95))  # K = 1
def test_row_quantile_is_numpys_linear_quantile(device, case):
    a, q = case
    ours = Q.row_quantile(torch.from_numpy(a).to(device), q).cpu().numpy()
    np.testing.assert_array_equal(ours, np.quantile(a, q, axis=1))  # exact, every row


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=300)
@given(w=matrices(max_rows=10, max_cols=70), outlier_ratio=outlier_ratios, high_bits=st.integers(1, 8))
@example(w=np.zeros((3, 5)), outlier_ratio=0.05, high_bits=4)
@example(w=np.array([[1e5, 0.5, -0.5, 1.5, 0.0]]), outlier_ratio=0.2, high_bits=8)  # one huge outlier
def test_zipper_codes_equal_the_oracle(device, w, outlier_ratio, high_bits):
    codes = Q.zipper_quantize(torch.from_numpy(w).to(device), outlier_ratio=outlier_ratio, high_bits=high_bits)
    assert codes.q_low.device.type == device
    oracle = R.zipper_quantize(w, outlier_ratio=outlier_ratio, high_bits=high_bits)
    assert_equal(codes.to_reference(), oracle, "q_low", "q_high", "scale")


# ------------------------------------------------------------------ MosaicQuant

@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=120)
@given(data=st.data(), bn=st.sampled_from([1, 2, 5, 16, 64]), bk=st.sampled_from([1, 3, 8, 9, 64, 130, 300]))
def test_block_sum_adds_in_numpys_order(device, data, bn, bk):
    # The scores are sums; their order of additions is numpy's, so equal to the oracle's bits.
    n = data.draw(st.integers(1, 3 * bn))
    k = data.draw(st.integers(1, 3 * bk))
    x = np.abs(data.draw(matrices(shape=(n, k)))) * data.draw(st.sampled_from([1.0, 1e-3, 1e12]))
    nbr, nbc = -(-n // bn), -(-k // bk)
    padded = np.zeros((nbr * bn, nbc * bk))
    padded[:n, :k] = x
    ours = Q._numpy_block_sum(torch.from_numpy(padded).to(device).view(nbr, bn, nbc, bk))
    np.testing.assert_array_equal(ours.cpu().numpy(), _blocked(x, bn, bk).sum(axis=(2, 3)))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=250)
@given(data=st.data(), w=matrices(max_rows=40, max_cols=70), density=densities, block=mosaic_blocks,
       group_size=group_sizes)
def test_mosaic_codes_equal_the_oracle(device, data, w, density, block, group_size):
    h = data.draw(hdiags(w.shape[1]))
    codes = Q.mosaic_quantize(torch.from_numpy(w).to(device), h, density=density, block=block, group_size=group_size)
    assert codes.q_base.device.type == device
    oracle = R.mosaic_quantize(w, h, density=density, block=block, group_size=group_size)
    ours = codes.to_reference()
    assert_equal(ours, oracle, "q_base", "scale_base", "block_index", "q_res", "scale_res")
    assert ours.block == oracle.block and ours.group_size == oracle.group_size


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40)
@given(seed=st.integers(0, 2**32 - 1), tiles=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       block=st.sampled_from([(2, 3), (4, 4), (8, 16)]), density=densities)
def test_equal_block_scores_keep_the_lower_block_index(device, seed, tiles, block, density):
    # One block repeated over the whole grid with a column-periodic Hessian: every block's score is
    # the same number, so the kept blocks are exactly the first ceil(density * blocks) row-major.
    rng = np.random.default_rng(seed)
    (tr, tc), (bn, bk) = tiles, block
    w = np.tile(rng.standard_normal((bn, bk)), (tr, tc))
    h = np.tile(rng.random(bk), tc)
    codes = Q.mosaic_quantize(torch.from_numpy(w).to(device), h, density=density, block=block).to_reference()
    n_keep = min(tr * tc, math.ceil(density * tr * tc - 1e-9))
    np.testing.assert_array_equal(codes.block_index[:, 0] * tc + codes.block_index[:, 1], np.arange(n_keep))
    assert_equal(codes, R.mosaic_quantize(w, h, density=density, block=block), "block_index", "q_res", "scale_res")


# ------------------------------------------------------------------ dequantization, table statistics

@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=150)
@given(w=matrices(max_rows=12, max_cols=70), bits=st.integers(2, 8), group_size=group_sizes)
def test_dequantize_equals_the_oracle(device, w, bits, group_size):
    q, s = R.quantize_weights(w, bits=bits, group_size=group_size)
    ours = Q.dequantize(torch.from_numpy(q).to(device), torch.from_numpy(s).to(device), group_size)
    assert ours.device.type == device and ours.dtype == torch.float64
    np.testing.assert_array_equal(ours.cpu().numpy(), R.dequantize(q, s, group_size))  # exact: one multiply


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=150)
@given(data=st.data(), w=matrices(max_rows=40, max_cols=70), density=densities, block=mosaic_blocks,
       group_size=group_sizes)
def test_mosaic_dequantize_equals_the_oracle(device, data, w, density, block, group_size):
    h = data.draw(hdiags(w.shape[1]))
    codes = Q.mosaic_quantize(torch.from_numpy(w).to(device), h, density=density, block=block, group_size=group_size)
    ours = Q.mosaic_dequantize(codes)
    assert ours.device.type == device
    np.testing.assert_array_equal(ours.cpu().numpy(), R.mosaic_dequantize(codes.to_reference()))  # exact


@st.composite
def high_parts(draw):
    """q_high as ZipperQuant makes it (sparse, a few nonzero codes up to +-Q) or any int8 codes,
    K not a multiple of the table's group."""
    kind = draw(st.sampled_from(["zipper", "codes", "nibble"]))
    if kind == "zipper":
        w = draw(matrices(max_rows=16, max_cols=70))
        return R.zipper_quantize(w, outlier_ratio=draw(st.sampled_from([0.0, 0.05, 0.3, 1.0])),
                                 high_bits=draw(st.sampled_from([2, 4, 8]))).q_high
    lo, hi = (-128, 127) if kind == "codes" else (-8, 7)
    return draw(code_matrices(lo, hi, max_rows=16, max_cols=70)).astype(np.int8)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=300)
@given(q_high=high_parts(), group_size=st.sampled_from([1, 2, 3, 4, 5, 7, 8, 16, 256]))
@example(q_high=np.zeros((3, 5), dtype=np.int8), group_size=4)  # an empty table
@example(q_high=np.array([[1, 1, 1, 1, 0, 0, 0, 0]], dtype=np.int8), group_size=4)  # a pattern without a 0
@example(q_high=np.zeros((2, 0), dtype=np.int8), group_size=4)  # K = 0
def test_pattern_lut_stats_equal_the_oracles_table_statistics(device, q_high, group_size):
    ours = Q.pattern_lut_stats(torch.from_numpy(q_high).to(device), group_size=group_size)
    oracle = R.lut_stats(R.build_pattern_lut(q_high, group_size=group_size))
    assert ours == oracle  # integer counts and bytes; E/U and the mean are the same one division


# ------------------------------------------------------------------ smoothing

@st.composite
def absmax_pairs(draw):
    """(act_absmax, weight_absmax) over 1-64 channels spanning 18 decades, a fifth of them 0."""
    k = draw(st.integers(1, 64))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pair = np.abs(rng.standard_normal((2, k))) * 10.0 ** rng.uniform(-9, 9, size=(2, k))
    pair[rng.random((2, k)) < 0.2] = 0.0  # below eps: clamped
    return pair[0], pair[1]


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=120)
@given(pair=absmax_pairs(), alpha=st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.85, 1.0]), st.floats(0.0, 1.0)),
       eps=st.sampled_from([1e-5, 1e-8, 1.0]))
def test_smooth_scales_within_pow_rounding_of_the_oracle(device, pair, alpha, eps):
    a, w = pair
    ours = Q.smooth_scales(torch.from_numpy(a).to(device), torch.from_numpy(w).to(device), alpha=alpha, eps=eps)
    oracle = R.smooth_scales(a, w, alpha=alpha, eps=eps)
    assert ours.device.type == device and ours.dtype == torch.float64
    ours = ours.cpu().numpy()
    if alpha in (0.0, 1.0):  # x**0 and x**1 are exact: no pow rounding to allow for
        np.testing.assert_array_equal(ours, oracle)
    # tolerance: SMOOTH_RTOL (8 ulp) relative, pow's rounding on both sides plus the division
    assert np.all(np.abs(ours - oracle) <= Q.SMOOTH_RTOL * oracle)


# ------------------------------------------------------------------ plumbing

@settings(max_examples=30)
@given(w=matrices(max_rows=20, max_cols=80, min_cols=2, even_cols=True), group_size=st.sampled_from([None, 2, 32]),
       data=st.data())
def test_codes_feed_the_layouts(w, group_size, data):
    wt = torch.from_numpy(w)
    q, s = Q.quantize_weights(wt, group_size=group_size)
    dense = DenseInt4.from_codes(q.numpy(), s.numpy(), group_size, "cpu")
    np.testing.assert_array_equal(dense.to_codes()[0], R.quantize_weights(w, group_size=group_size)[0])
    z = Q.zipper_quantize(wt, outlier_ratio=0.05).to_reference()
    rz = R.zipper_quantize(w, outlier_ratio=0.05)
    np.testing.assert_array_equal(DenseInt4.from_codes(z.q_low, z.scale, None, "cpu").to_codes()[0], rz.q_low)
    np.testing.assert_array_equal(ZipperHighGPU.from_codes(z.q_high, z.scale, "cpu").to_codes()[0], rz.q_high)
    h = data.draw(hdiags(w.shape[1]))
    m = Q.mosaic_quantize(wt, h, density=0.3, block=(4, 8), group_size=group_size).to_reference()
    back = MosaicBlocks.from_codes(m, "cpu").to_codes()
    rm = R.mosaic_quantize(w, h, density=0.3, block=(4, 8), group_size=group_size)
    assert_equal(back, rm, "q_base", "block_index", "q_res")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int32])
def test_any_real_input_dtype_is_quantized_as_its_float64_value(dtype):
    w = torch.randn(8, 40, generator=torch.Generator().manual_seed(0)).mul(20).to(dtype)
    w64 = w.to(torch.float64).numpy()
    q, s = Q.quantize_weights(w, group_size=8)
    rq, rs = R.quantize_weights(w64, group_size=8)
    np.testing.assert_array_equal(q.numpy(), rq)
    np.testing.assert_array_equal(s.numpy(), rs)
    assert_equal(Q.zipper_quantize(w).to_reference(), R.zipper_quantize(w64), "q_low", "q_high", "scale")
    h = np.linspace(0.0, 2.0, 40)
    assert_equal(Q.mosaic_quantize(w, h, 0.5, (4, 8)).to_reference(), R.mosaic_quantize(w64, h, 0.5, (4, 8)),
                 "q_base", "scale_base", "block_index", "q_res", "scale_res")


W = np.ones((4, 6))
BAD_ARGUMENTS = [
    (lambda: Q.quantize_weights(np.ones(6)), "w must have rank 2"),
    (lambda: Q.quantize_weights(np.array([[1.0, np.nan]])), "w holds NaN or Inf"),
    (lambda: Q.quantize_weights(torch.tensor([[1.0, float("inf")]])), "w holds NaN or Inf"),
    (lambda: Q.quantize_weights(np.array([["a"]])), "w must be a real numeric array"),
    (lambda: Q.quantize_weights(torch.ones(2, 2, dtype=torch.bool)), "w must be a real numeric array"),
    (lambda: Q.quantize_weights(W, bits=1), "bits must be an integer"),
    (lambda: Q.quantize_weights(W, bits=4.0), "bits must be an integer"),
    (lambda: Q.quantize_weights(W, group_size=0), "group_size must be None or a positive integer"),
    (lambda: Q.zipper_quantize(W, outlier_ratio=1.5), "outlier_ratio must lie in"),
    (lambda: Q.zipper_quantize(W, high_bits=9), "high_bits must be an integer"),
    (lambda: Q.zipper_quantize(np.ones((2, 2, 2))), "w_smoothed must have rank 2"),
    (lambda: Q.mosaic_quantize(W, np.ones(5)), "hdiag has 5 entries"),
    (lambda: Q.mosaic_quantize(W, -np.ones(6)), "hdiag must be non-negative"),
    (lambda: Q.mosaic_quantize(W, np.ones(6), density=-0.1), "density must lie in"),
    (lambda: Q.mosaic_quantize(W, np.ones(6), block=(0, 4)), "block must be a pair"),
    (lambda: Q.mosaic_quantize(W, np.ones(6), block=64), "block must be a pair"),
    (lambda: Q.mosaic_quantize(W, np.ones(6), group_size=-1), "group_size must be None"),
    (lambda: Q.mosaic_quantize(np.array([[1e200, 3.3e199, -5.1e199, 2.2e199]]), np.ones(4), 0.5, (1, 4)),
     "overflows float64 in the block scores"),  # the oracle refuses the same weight
    (lambda: Q.smooth_scales(np.ones(3), np.ones(4)), "does not match weight_absmax"),
    (lambda: Q.smooth_scales(-np.ones(3), np.ones(3)), "must be non-negative"),
    (lambda: Q.smooth_scales(np.ones(3), np.ones(3), alpha=2.0), "alpha must lie in"),
    (lambda: Q.smooth_scales(np.ones(3), np.ones(3), eps=0.0), "eps must be a positive finite number"),
    (lambda: Q.smooth_scales(np.ones((3, 1)), np.ones(3)), "must have rank 1"),
    (lambda: Q.pattern_lut_stats(torch.ones(2, 4)), "q_high must be an integer tensor"),
    (lambda: Q.pattern_lut_stats(torch.ones(2, 4, dtype=torch.int16) * 300), "q_high holds codes outside"),
    (lambda: Q.pattern_lut_stats(torch.ones(2, 4, dtype=torch.int8), group_size=257), "group_size must be an integer"),
    (lambda: Q.dequantize(torch.ones(2, 4), torch.ones(2)), "q must be an integer tensor"),
    (lambda: Q.dequantize(torch.ones(2, 4, dtype=torch.int8), torch.ones(3)), "scale must have shape"),
]


@pytest.mark.parametrize("call, message", BAD_ARGUMENTS, ids=[m for _, m in BAD_ARGUMENTS])
def test_bad_arguments_raise_value_error_naming_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_group_wider_than_the_row_is_one_group_as_in_the_oracle():
    w = np.random.default_rng(4).standard_normal((3, 10))
    q, s = Q.quantize_weights(w, group_size=2**40)
    q0, s0 = R.quantize_weights(w, group_size=2**40)
    np.testing.assert_array_equal(q.cpu().numpy(), q0)  # exact
    np.testing.assert_array_equal(s.cpu().numpy(), s0)
