"""CPU kernels (Numba): ZipperQuant's pattern lookup table and its direct-CSR baseline."""
from .lut import (
    CsrHigh,
    LutArrays,
    default_token_tile,
    lut_build,
    lut_matmul,
    lut_report,
    lut_stats,
    prepare_csr,
    prepare_lut,
    sparse_matmul,
)

__all__ = [
    "CsrHigh",
    "LutArrays",
    "default_token_tile",
    "lut_build",
    "lut_matmul",
    "lut_report",
    "lut_stats",
    "prepare_csr",
    "prepare_lut",
    "sparse_matmul",
]
