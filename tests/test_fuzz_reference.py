"""Property: every `reference` function, given adversarial arguments (wrong ranks and shapes, odd
dtypes, NaN/Inf, huge and subnormal values, uint64 codes above 2**63, fractional codes, bad
scalars), either raises ValueError naming one of its arguments, or returns a finite result that
obeys the function's law; never another exception, never a NaN (DESIGN.md §7).

Each argument is drawn valid (shapes consistent with the others) or, with some probability,
from the adversarial pool; the law checked on success is stated beside each function.
"""
from __future__ import annotations

import os
import re

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import reference as R

# ZQ_FUZZ_EXAMPLES raises the count for a longer hunt (CI keeps the default: seconds).
FUZZ = settings(max_examples=int(os.environ.get("ZQ_FUZZ_EXAMPLES", 60)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = [np.int8, np.int16, np.int64, np.uint8, np.uint64, np.float16, np.float32, np.float64, np.bool_,
          np.complex128]
SPECIAL_FLOATS = [np.nan, np.inf, -np.inf, 1e300, -1e300, 3.5e38, 5e-324, 0.5, 1.5, -2.5, 0.0, -0.0]
BAD_SCALARS = [None, 0, -1, 1, 2, 3, 4, 7, 8, 9, 2.5, float("nan"), float("inf"), "4", True, np.int64(4), 10**20]


def adversarial_array(draw, rank=None):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    r = draw(st.integers(0, 3)) if rank is None or draw(st.integers(0, 3)) == 0 else rank
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=r, max_size=r)))
    if dtype.kind == "f":  # drawn in float64, then cast: the specials overflow float16/32 to Inf on purpose
        arr = draw(hnp.arrays(np.float64, shape, elements=st.sampled_from(SPECIAL_FLOATS) | st.floats(-10, 10)))
        with np.errstate(over="ignore", invalid="ignore"):
            return arr.astype(dtype)
    if dtype.kind == "c":
        return draw(hnp.arrays(dtype, shape, elements=st.complex_numbers(max_magnitude=10, allow_nan=False)))
    if dtype.kind == "b":
        return draw(hnp.arrays(dtype, shape))
    info = np.iinfo(dtype)
    edge = [int(info.min), int(info.max), 0, -8, 7, 8, -9, 127, -128, 2**31 if info.max >= 2**31 else 0]
    edge = [v for v in edge if info.min <= v <= info.max]
    return draw(hnp.arrays(dtype, shape, elements=st.sampled_from(edge) | st.integers(max(int(info.min), -20),
                                                                                        min(int(info.max), 20))))


def maybe(draw, valid, rank=None, p_fuzz=0.3):
    """(value, fuzzed?): the valid value, or with probability ~p_fuzz an adversarial one."""
    if draw(st.floats(0, 1)) < p_fuzz:
        if draw(st.booleans()):
            return adversarial_array(draw, rank), True
        return draw(st.sampled_from(BAD_SCALARS)), True
    return valid, False


def names_one_of(msg, names):
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", msg) for n in names)


def call(fn, names, *args):
    """fn(*args): its result, or None after checking a ValueError names one of `names`."""
    try:
        with np.errstate(all="ignore"):
            return fn(*args)
    except ValueError as exc:
        assert names_one_of(str(exc), names), f"{fn.__name__}: {exc!r} names none of {names}"
        return None


def finite(*arrays):
    for a in arrays:
        a = np.asarray(a)
        assert np.issubdtype(a.dtype, np.number) and not np.issubdtype(a.dtype, np.complexfloating), a.dtype
        assert np.all(np.isfinite(a)), "a silent NaN/Inf in a result"


def dims(draw):
    return draw(st.integers(1, 6)), draw(st.integers(1, 7)), draw(st.integers(1, 9))


def real_matrix(draw, shape, scale=3.0):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = rng.standard_normal(shape) * scale
    if a.size and draw(st.booleans()):
        a.flat[draw(st.integers(0, a.size - 1))] *= 1e4  # one huge outlier
    if a.size and draw(st.booleans()):
        a[0] = 0.0  # an all-zero row
    return a


# ------------------------------------------------------------------------------- quantization
@FUZZ
@given(st.data())
def test_quantize_activations_refuses_or_bounds_the_error(data):
    d = data.draw
    m, _, k = dims(d)
    x, _ = maybe(d, real_matrix(d, (m, k)), rank=2)
    bits, _ = maybe(d, d(st.sampled_from([4, 8])))
    g, _ = maybe(d, d(st.sampled_from([None, 1, 3, 4, 32])))
    out = call(R.quantize_activations, ["x", "bits", "group_size"], x, bits, g)
    if out is None:
        return
    qx, s = out
    finite(qx, s)
    x32 = np.asarray(x).astype(np.float32).astype(np.float64)
    per = s[:, None] if s.ndim == 1 else np.repeat(s, min(g, max(1, x32.shape[1])), axis=1)[:, : x32.shape[1]]
    qmax = 2 ** (int(bits) - 1) - 1
    assert np.all(np.abs(qx) <= qmax + 1) and np.all(s >= 0)
    assert np.all(np.abs(x32 - qx * per) <= per * (0.5 + 1e-6))  # no code clips: |x| <= 7 * scale


@FUZZ
@given(st.data())
def test_quantize_weights_and_dequantize(data):
    d = data.draw
    _, n, k = dims(d)
    w, _ = maybe(d, real_matrix(d, (n, k)), rank=2)
    g, _ = maybe(d, d(st.sampled_from([None, 1, 2, 5])))
    out = call(R.quantize_weights, ["w", "bits", "group_size"], w, 4, g)
    if out is None:
        return
    q, s = out
    finite(q, s)
    deq = call(R.dequantize, ["q", "scale", "group_size"], q, s, g)
    finite(deq)
    k = q.shape[1]
    per = s[:, None] if s.ndim == 1 else np.repeat(s, min(g, max(k, 1)), axis=1)[:, :k]
    assert np.all(np.abs(np.asarray(w, np.float64) - deq) <= per * (0.5 + 1e-9))


@FUZZ
@given(st.data())
def test_dequantize_and_products_on_hand_built_codes(data):
    d = data.draw
    m, n, k = dims(d)
    rng = np.random.default_rng(d(st.integers(0, 2**32 - 1)))
    qx, _ = maybe(d, rng.integers(-8, 8, (m, k)).astype(np.int8), rank=2)
    sx, _ = maybe(d, rng.uniform(0, 2, m), rank=1)
    qw, _ = maybe(d, rng.integers(-8, 8, (n, k)).astype(np.int8), rank=2)
    sw, _ = maybe(d, rng.uniform(0, 2, n), rank=1)
    y = call(R.w4a4_matmul, ["qx", "sx", "qw", "sw"], qx, sx, qw, sw)
    if y is not None:
        finite(y)
        expect = (np.asarray(qx, np.float64) * np.asarray(sx, np.float64)[:, None]) @ (
            np.asarray(qw, np.float64) * np.asarray(sw, np.float64)[:, None]).T
        assert np.allclose(y, expect, rtol=1e-12, atol=0)
    x, _ = maybe(d, real_matrix(d, (m, k)), rank=2)
    y = call(R.w4a16_matmul, ["x", "qw", "sw", "group_size"], x, qw, sw)
    if y is not None:
        finite(y)


@FUZZ
@given(st.data())
def test_smooth_scales_are_positive_and_finite(data):
    d = data.draw
    k = d(st.integers(1, 9))
    rng = np.random.default_rng(d(st.integers(0, 2**32 - 1)))
    a, _ = maybe(d, np.abs(rng.standard_normal(k)) * 10, rank=1)
    w, _ = maybe(d, np.abs(rng.standard_normal(k)), rank=1)
    alpha, _ = maybe(d, d(st.sampled_from([0.0, 0.5, 0.85, 1.0])))
    eps, _ = maybe(d, 1e-5)
    s = call(R.smooth_scales, ["act_absmax", "weight_absmax", "alpha", "eps"], a, w, alpha, eps)
    if s is not None:
        finite(s)
        assert np.all(s > 0)


# ------------------------------------------------------------------------------- codes
@FUZZ
@given(st.data())
def test_int4_packing_and_bit_split_round_trip_or_refuse(data):
    d = data.draw
    n, k2 = d(st.integers(1, 4)), d(st.integers(1, 4))
    rng = np.random.default_rng(d(st.integers(0, 2**32 - 1)))
    q, _ = maybe(d, rng.integers(-8, 8, (n, 2 * k2)).astype(np.int8))
    p = call(R.pack_int4, ["q", "K"], q)
    if p is not None:
        assert np.array_equal(R.unpack_int4(p), np.asarray(q).astype(np.int64))
    p2, _ = maybe(d, rng.integers(0, 256, (n, k2)).astype(np.uint8))
    u = call(R.unpack_int4, ["p"], p2)
    if u is not None:
        assert np.array_equal(R.pack_int4(u), p2)
    big, _ = maybe(d, rng.integers(-2000, 2000, (n, 2 * k2)))
    low_bits, _ = maybe(d, 4)
    out = call(R.bit_split, ["q", "low_bits"], big, low_bits)
    if out is not None:
        lo, hi = out
        assert np.array_equal(R.bit_join(lo, hi, low_bits).astype(np.int64), np.asarray(big).astype(np.int64))


@FUZZ
@given(st.data())
def test_zipper_matmul_on_hand_built_codes(data):
    d = data.draw
    m, n, k = dims(d)
    codes = R.zipper_quantize(real_matrix(d, (n, k), scale=1.0), outlier_ratio=0.2)
    q_low, _ = maybe(d, codes.q_low, rank=2)
    q_high, _ = maybe(d, codes.q_high, rank=2)
    scale, _ = maybe(d, codes.scale, rank=1)
    x, _ = maybe(d, real_matrix(d, (m, k)), rank=2)
    act_bits, _ = maybe(d, d(st.sampled_from([4, None])))
    hand = R.ZipperCodes(q_low=q_low, q_high=q_high, scale=scale)
    y = call(R.zipper_matmul, ["x_smoothed", "codes", "act_bits", "act_group_size"], x, hand, act_bits)
    if y is None:
        return
    finite(y)
    if act_bits is None:
        w = np.asarray(scale, np.float64)[:, None] * (np.asarray(q_low, np.float64) + 16 * np.asarray(q_high, np.float64))
        expect = np.asarray(x, np.float64) @ w.T
        assert np.allclose(y, expect, rtol=1e-9, atol=1e-9 * np.abs(np.asarray(x, np.float64)).sum())


@FUZZ
@given(st.data())
def test_pattern_lut_products_agree_or_refuse(data):
    d = data.draw
    m, n, k = dims(d)
    rng = np.random.default_rng(d(st.integers(0, 2**32 - 1)))
    q_high = rng.integers(-2, 3, (n, k)) * (rng.random((n, k)) < 0.4)
    qh, _ = maybe(d, q_high.astype(np.int8), rank=2)
    g, _ = maybe(d, d(st.sampled_from([1, 3, 4])))
    lut = call(R.build_pattern_lut, ["q_high", "group_size"], qh, g)
    x, _ = maybe(d, real_matrix(d, (m, k)), rank=2)
    if lut is None:
        return
    fields = {f: getattr(lut, f) for f in ("indptr", "entry_ids", "entry_groups", "patterns", "pattern_groups",
                                           "group_size", "shape")}
    victim = d(st.sampled_from([None] + sorted(fields)))
    if victim is not None:
        fields[victim], _ = maybe(d, fields[victim], p_fuzz=1.0)
    hand = R.PatternLUT(**fields)
    y = call(R.lut_matmul, ["x", "lut"], x, hand)
    direct = call(R.sparse_matmul, ["x", "q_high"], x, qh)
    if y is not None:
        finite(y)
        if direct is not None and victim is None:
            tol = 1e-9 * (np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(qh, np.float64)).T) + 1e-300
            assert np.all(np.abs(y - direct) <= tol)
    st_ = call(R.lut_stats, ["lut"], hand)
    if st_ is not None:
        assert st_["E"] >= 0 and st_["U"] >= 0


@FUZZ
@given(st.data())
def test_mosaic_quantize_and_matmul_on_hand_built_codes(data):
    d = data.draw
    m, n, k = dims(d)
    w, _ = maybe(d, real_matrix(d, (n, k)), rank=2)
    h, _ = maybe(d, np.abs(real_matrix(d, (1, k)))[0], rank=1)
    density, _ = maybe(d, d(st.sampled_from([0.0, 0.3, 1.0])))
    block, _ = maybe(d, d(st.sampled_from([(2, 2), (4, 3), (64, 64)])))
    gs, _ = maybe(d, d(st.sampled_from([None, 2])))
    codes = call(R.mosaic_quantize, ["w", "hdiag", "density", "block", "group_size"], w, h, density, block, gs)
    if codes is None:
        return
    fields = {f: getattr(codes, f) for f in ("q_base", "scale_base", "block_index", "q_res", "scale_res", "block",
                                             "group_size")}
    victim = d(st.sampled_from([None] + sorted(fields)))
    if victim is not None:
        fields[victim], _ = maybe(d, fields[victim], p_fuzz=1.0)
    hand = R.MosaicCodes(**fields)
    x, _ = maybe(d, real_matrix(d, (m, k)), rank=2)
    y = call(R.mosaic_matmul, ["x", "codes", "act_bits", "act_group_size"], x, hand, None)
    if y is not None:
        finite(y)
        wd = R.mosaic_dequantize(hand)
        finite(wd)
        assert np.allclose(y, np.asarray(x, np.float64) @ wd.T, rtol=1e-12, atol=0)
        if victim is None:  # the weight error never exceeds the base's half step
            base = R.dequantize(codes.q_base, codes.scale_base, codes.group_size)
            assert np.all(np.abs(wd - np.asarray(w, np.float64)) <= np.abs(base - np.asarray(w, np.float64)) + 1e-9)
