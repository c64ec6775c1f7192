"""Bad input to the oracle raises ValueError naming the argument (DESIGN.md §7)."""
import numpy as np
import pytest

import reference as R

RNG = np.random.default_rng(0)
W = RNG.standard_normal((6, 8))
X = RNG.standard_normal((3, 8))


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: R.quantize_activations(np.ones(8)), "x"),
        (lambda: R.quantize_activations(np.array([[1.0, np.nan]])), "x"),
        (lambda: R.quantize_activations(np.array([[1.0, np.inf]])), "x"),
        (lambda: R.quantize_activations(X, group_size=0), "group_size"),
        (lambda: R.quantize_activations(X, bits=1), "bits"),
        (lambda: R.quantize_weights(np.ones((2, 2, 2))), "w"),
        (lambda: R.quantize_weights(W, group_size=-4), "group_size"),
        (lambda: R.smooth_scales(np.ones(3), np.ones(4)), "act_absmax"),
        (lambda: R.smooth_scales(np.ones(3), np.ones(3), alpha=1.5), "alpha"),
        (lambda: R.smooth_scales(-np.ones(3), np.ones(3)), "act_absmax"),
        (lambda: R.pack_int4(np.zeros((2, 3), dtype=np.int8)), "K"),
        (lambda: R.pack_int4(np.array([[8, 0]])), "q"),
        (lambda: R.pack_int4(np.array([[0.5, 0.0]])), "q"),
        (lambda: R.unpack_int4(np.zeros((2, 2), dtype=np.int8)), "p"),
        (lambda: R.bit_join(np.array([9]), np.array([0])), "q_low"),
        (lambda: R.bit_join(np.zeros(3, dtype=np.int8), np.zeros(2, dtype=np.int8)), "q_low"),
        (lambda: R.bit_split(np.array([10**6])), "q"),
        (lambda: R.zipper_quantize(W, outlier_ratio=-0.1), "outlier_ratio"),
        (lambda: R.zipper_quantize(W, high_bits=9), "high_bits"),
        (lambda: R.zipper_quantize(np.where(W > 0, np.nan, W)), "w_smoothed"),
        (lambda: R.zipper_matmul(np.ones((2, 5)), R.zipper_quantize(W)), "x_smoothed"),
        (lambda: R.build_pattern_lut(np.array([[200, 0]])), "q_high"),
        (lambda: R.build_pattern_lut(np.zeros((2, 4), dtype=np.int8), group_size=0), "group_size"),
        (lambda: R.lut_matmul(np.ones((2, 5)), R.build_pattern_lut(np.zeros((2, 4), dtype=np.int8))), "x"),
        (lambda: R.sparse_matmul(np.ones((2, 5)), np.zeros((2, 4), dtype=np.int8)), "x"),
        (lambda: R.mosaic_quantize(W, np.ones(8), density=1.5), "density"),
        (lambda: R.mosaic_quantize(W, np.ones(8), density=-0.01), "density"),
        (lambda: R.mosaic_quantize(W, np.ones(7)), "hdiag"),
        (lambda: R.mosaic_quantize(W, -np.ones(8)), "hdiag"),
        (lambda: R.mosaic_quantize(W, np.ones(8), block=(0, 4)), "block"),
        (lambda: R.mosaic_matmul(np.ones((2, 5)), R.mosaic_quantize(W, np.ones(8))), "x"),
        (lambda: R.dequantize(np.zeros((2, 4), dtype=np.int8), np.ones(3)), "scale"),
        (lambda: R.dequantize(np.zeros((2, 4), dtype=np.int8), np.ones((2, 3)), group_size=2), "scale"),
        (lambda: R.w4a4_matmul(np.zeros((2, 4), dtype=np.int8), np.ones(2), np.zeros((2, 5), dtype=np.int8), np.ones(2)), "qx"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


ZC = R.zipper_quantize(W * np.array([1, 1, 40, 1, 1, 1, 1, 1.0]), outlier_ratio=0.2)
MC = R.mosaic_quantize(RNG.standard_normal((6, 70)), np.ones(70), density=0.5, block=(4, 32))
LUT = R.build_pattern_lut(ZC.q_high)
X70 = RNG.standard_normal((3, 70))


def _zc(**change):
    return R.ZipperCodes(**{**dict(q_low=ZC.q_low, q_high=ZC.q_high, scale=ZC.scale), **change})


def _mc(**change):
    fields = dict(q_base=MC.q_base, scale_base=MC.scale_base, block_index=MC.block_index, q_res=MC.q_res,
                  scale_res=MC.scale_res, block=MC.block, group_size=MC.group_size)
    return R.MosaicCodes(**{**fields, **change})


def _lut(**change):
    fields = dict(indptr=LUT.indptr, entry_ids=LUT.entry_ids, entry_groups=LUT.entry_groups, patterns=LUT.patterns,
                  pattern_groups=LUT.pattern_groups, group_size=LUT.group_size, shape=LUT.shape)
    return R.PatternLUT(**{**fields, **change})


def _with(a, index, value, dtype=None):
    a = np.array(a, dtype=dtype if dtype is not None else np.asarray(a).dtype)
    a[index] = value
    return a


U64_WRAP = np.array([[2**64 - 1, 0]], dtype=np.uint64)  # -1 once cast to int64


@pytest.mark.parametrize(
    "call, name",
    [
        # non-finite scales and values (DESIGN.md §7: refused, never NaN output)
        (lambda: R.dequantize(np.ones((2, 4), np.int8), np.array([1.0, np.nan])), "scale holds NaN"),
        (lambda: R.dequantize(np.ones((2, 4), np.int8), np.array([1.0, np.inf])), "scale holds NaN"),
        (lambda: R.dequantize(np.ones((2, 4), np.int8), np.array([[1.0, 1.0], [np.nan, 1.0]]), group_size=2),
         "scale holds NaN"),
        (lambda: R.dequantize(np.ones((2, 4), np.int8), np.array(["a", "b"])), "scale must be a real"),
        (lambda: R.dequantize(np.full((2, 4), 7, np.int8), np.array([1e308, 1.0])), "overflows"),
        (lambda: R.w4a4_matmul(np.ones((2, 4), np.int8), np.array([np.nan, 1.0]), np.ones((3, 4), np.int8),
                               np.ones(3)), "sx holds NaN"),
        (lambda: R.w4a4_matmul(np.ones((2, 4), np.int8), np.ones(2), np.ones((3, 4), np.int8),
                               np.array([1.0, np.inf, 1.0])), "sw holds NaN"),
        (lambda: R.w4a4_matmul(np.ones((2, 4)), np.ones(2), np.ones((3, 4), np.int8), np.ones(3)), "qx"),
        (lambda: R.w4a16_matmul(np.ones((2, 4)), np.ones((3, 4), np.int8), np.array([1.0, np.nan, 1.0])), "sw"),
        (lambda: R.w4a16_matmul(np.full((2, 4), 1e300), np.full((3, 4), 7, np.int8), np.full(3, 1e10)), "overflows"),
        (lambda: R.smooth_scales(np.ones(3), np.ones(3), alpha="high"), "alpha"),
        (lambda: R.smooth_scales(np.ones(3), np.ones(3), alpha=float("nan")), "alpha"),
        (lambda: R.smooth_scales(np.ones(3), np.ones(3), eps=float("nan")), "eps"),
        (lambda: R.smooth_scales(np.full(3, 1e308), np.full(3, 1e-320), alpha=0.5, eps=1e-320), "factors"),
        (lambda: R.zipper_quantize(W, outlier_ratio=float("nan")), "outlier_ratio"),
        (lambda: R.zipper_quantize(W, outlier_ratio="a few"), "outlier_ratio"),
        (lambda: R.mosaic_quantize(W, np.ones(8), density=float("nan")), "density"),
        (lambda: R.mosaic_quantize(W * 1e200, np.full(8, 1e200), density=0.5, block=(2, 4)), "hdiag"),
        # hand-built ZipperCodes: integer codes in range, finite scales, or refused
        (lambda: R.zipper_matmul(X, _zc(scale=_with(ZC.scale, 0, np.nan))), "codes.scale holds NaN"),
        (lambda: R.zipper_matmul(X, _zc(scale=_with(ZC.scale, 0, np.inf))), "codes.scale holds NaN"),
        (lambda: R.zipper_matmul(X, _zc(scale=ZC.scale[:-1])), "codes.scale must have shape"),
        (lambda: R.zipper_matmul(X, _zc(q_low=_with(ZC.q_low, (0, 0), 0.5, np.float64))), "codes.q_low must hold integer"),
        (lambda: R.zipper_matmul(X, _zc(q_high=_with(ZC.q_high, (0, 0), 0.5, np.float64))), "codes.q_high must hold integer"),
        (lambda: R.zipper_matmul(X, _zc(q_low=_with(ZC.q_low, (0, 0), 9, np.int64))), "codes.q_low holds codes outside"),
        (lambda: R.zipper_matmul(X, _zc(q_high=_with(ZC.q_high, (0, 0), 2**64 - 1, np.uint64))),
         "codes.q_high holds codes outside"),
        (lambda: R.zipper_matmul(X, _zc(q_high=ZC.q_high[:, :-1])), "codes.q_high shape"),
        (lambda: R.zipper_matmul(X, None), "codes must be a ZipperCodes"),
        (lambda: R.zipper_matmul(X, ZC, act_bits=1), "act_bits"),
        (lambda: R.zipper_matmul(np.full((2, 8), 1e39), ZC), "x_smoothed holds values beyond the float32"),
        (lambda: R.zipper_matmul(X, _zc(scale=np.full(6, 1e307))), "overflows"),
        # uint64 codes must not wrap to small negatives (2**64 - 1 would become -1)
        (lambda: R.pack_int4(U64_WRAP), "outside"),
        (lambda: R.bit_split(U64_WRAP), "outside"),
        (lambda: R.bit_join(U64_WRAP, np.zeros((1, 2), np.int8)), "q_low"),
        (lambda: R.dequantize(U64_WRAP, np.ones(1)), "outside"),
        (lambda: R.build_pattern_lut(U64_WRAP), "q_high"),
        (lambda: R.sparse_matmul(np.ones((1, 2)), U64_WRAP), "q_high"),
        (lambda: R.pack_int4(np.array([[True, False]])), "integer"),
        # hand-built MosaicCodes
        (lambda: R.mosaic_matmul(X70, _mc(scale_base=_with(MC.scale_base, 0, np.nan))), "codes.scale_base holds NaN"),
        (lambda: R.mosaic_matmul(X70, _mc(scale_res=_with(MC.scale_res, (0, 0), np.inf))), "codes.scale_res holds NaN"),
        (lambda: R.mosaic_matmul(X70, _mc(q_base=MC.q_base.astype(np.float32) + 0.5)), "codes.q_base must hold integer"),
        (lambda: R.mosaic_matmul(X70, _mc(q_res=MC.q_res.astype(np.float64))), "codes.q_res must hold integer"),
        (lambda: R.mosaic_matmul(X70, _mc(q_res=MC.q_res.astype(np.uint64) + np.uint64(2**63))), "codes.q_res holds codes"),
        (lambda: R.mosaic_matmul(X70, _mc(block_index=MC.block_index + 5)), "codes.block_index"),
        (lambda: R.mosaic_matmul(X70, _mc(block_index=MC.block_index.astype(np.float64))), "codes.block_index"),
        (lambda: R.mosaic_matmul(X70, _mc(q_res=MC.q_res[:, :2])), "codes.q_res must have shape"),
        (lambda: R.mosaic_matmul(X70, _mc(block=(0, 32))), "codes.block"),
        (lambda: R.mosaic_matmul(X70, _mc(group_size=5)), "codes.scale_base must have shape"),
        (lambda: R.mosaic_matmul(X70, "codes"), "codes must be a MosaicCodes"),
        (lambda: R.mosaic_dequantize(_mc(scale_base=_with(MC.scale_base, 1, -np.inf))), "codes.scale_base holds NaN"),
        (lambda: R.mosaic_matmul(X70, MC, act_bits=0), "act_bits"),
        # hand-built PatternLUT
        (lambda: R.lut_matmul(X, _lut(patterns=LUT.patterns.astype(np.float64) + 0.5)), "lut.patterns must hold integer"),
        (lambda: R.lut_matmul(X, _lut(entry_ids=LUT.entry_ids + 1000)), "lut.entry_ids"),
        (lambda: R.lut_matmul(X, _lut(entry_ids=LUT.entry_ids.astype(np.float64))), "lut.entry_ids"),
        (lambda: R.lut_matmul(X, _lut(pattern_groups=LUT.pattern_groups + 7)), "lut.pattern_groups"),
        (lambda: R.lut_matmul(X, _lut(indptr=LUT.indptr[::-1].copy())), "lut.indptr"),
        (lambda: R.lut_matmul(X, _lut(group_size=0)), "lut.group_size"),
        (lambda: R.lut_table(X, _lut(shape=(6,))), "lut.shape"),
        (lambda: R.lut_stats(object()), "lut must be a PatternLUT"),
    ],
)
def test_non_finite_and_hand_built_input_is_refused_naming_the_argument(call, name):
    with np.errstate(all="raise"):  # a refused input must not first compute through NaN/Inf
        with pytest.raises(ValueError, match=name):
            call()


def test_integer_codes_of_any_integer_dtype_are_accepted_when_in_range():
    """The checks refuse what is wrong, not what is merely another integer dtype."""
    q = np.array([[-8, 7, 0, 3]])
    for dtype in (np.int8, np.int16, np.int64, np.uint8):
        codes = np.abs(q).astype(dtype) if np.issubdtype(dtype, np.unsignedinteger) else q.astype(dtype)
        codes = np.minimum(codes, 7) if np.issubdtype(dtype, np.unsignedinteger) else codes
        assert np.array_equal(R.unpack_int4(R.pack_int4(codes)), codes.astype(np.int8))
    big = np.array([[2**40, -(2**40)]], dtype=np.int64)
    with pytest.raises(ValueError, match="outside"):
        R.dequantize(big, np.ones(1))
    y = R.zipper_matmul(X, _zc(q_low=ZC.q_low.astype(np.int64), q_high=ZC.q_high.astype(np.int16)))
    assert np.array_equal(y, R.zipper_matmul(X, ZC))
