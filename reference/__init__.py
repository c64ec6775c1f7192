"""The numpy oracle: the executable definition of every format and product of zqkernels.

Pure numpy, float64 / int64 inside (activation quantization in IEEE float32, see `quant`).
Kernels are correct when they match it. Names and meanings follow DESIGN.md §7.
"""
from .hadamard import block_hadamard, hadamard_block_size, hadamard_matmul, hadamard_matrix, hadamard_quantize
from .int4 import pack_int4, unpack_int4
from .lut import PatternLUT, build_pattern_lut, lut_matmul, lut_stats, lut_table, sparse_matmul
from .mosaic import MosaicCodes, mosaic_dequantize, mosaic_matmul, mosaic_quantize
from .quant import (
    dequantize,
    quantize_activations,
    quantize_weights,
    smooth_scales,
    w4a4_matmul,
    w4a16_matmul,
)
from .zipper import (
    OUTLIER_CHANNEL_SCORES,
    ZipperCodes,
    bit_join,
    bit_split,
    select_outlier_channels,
    zipper_matmul,
    zipper_quantize,
    zipper_quantize_channels,
)

__all__ = [
    "OUTLIER_CHANNEL_SCORES",
    "MosaicCodes",
    "PatternLUT",
    "ZipperCodes",
    "bit_join",
    "bit_split",
    "block_hadamard",
    "build_pattern_lut",
    "dequantize",
    "hadamard_block_size",
    "hadamard_matmul",
    "hadamard_matrix",
    "hadamard_quantize",
    "lut_matmul",
    "lut_stats",
    "lut_table",
    "mosaic_dequantize",
    "mosaic_matmul",
    "mosaic_quantize",
    "pack_int4",
    "quantize_activations",
    "quantize_weights",
    "smooth_scales",
    "sparse_matmul",
    "unpack_int4",
    "w4a4_matmul",
    "w4a16_matmul",
    "zipper_matmul",
    "select_outlier_channels",
    "zipper_quantize",
    "zipper_quantize_channels",
]
