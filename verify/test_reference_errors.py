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
