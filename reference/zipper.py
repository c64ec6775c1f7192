"""ZipperQuant: bit-based inlier-outlier disaggregation (DESIGN.md §2.2-2.4).

Every integer weight splits exactly as `q = q_low + 16 * q_high`: the dense low part (4-bit,
every element) runs as a W4A4 GEMM; the sparse high part (nonzero only on outliers) multiplies
high-precision activations, through the pattern table of `reference.lut`.
"""
from dataclasses import dataclass

import numpy as np

from .quant import dequantize, quantize_activations
from .validation import (
    as_float_matrix,
    as_int_codes,
    as_scales,
    check_bits,
    check_group_size,
    check_product,
    check_unit_interval,
)


@dataclass(frozen=True)
class ZipperCodes:
    """`W' ≈ scale[:, None] * (q_low + 16 * q_high)`; q_low in [-8, 7], q_high sparse."""

    q_low: np.ndarray  # int8 [N, K]
    q_high: np.ndarray  # int8 [N, K]
    scale: np.ndarray  # float64 [N], Δ_n

    @property
    def shape(self):
        return self.q_low.shape


def check_zipper_codes(codes, name="codes"):
    """(q_low, q_high, scale) of a `ZipperCodes` (or any object with its fields), checked: integer
    codes in range (q_low [-8, 7], q_high int8), one finite scale per row. Hand-built codes with
    fractional, out-of-range or non-finite values are refused, never used as they are."""
    for field in ("q_low", "q_high", "scale"):
        if not hasattr(codes, field):
            raise ValueError(f"{name} must be a ZipperCodes, it has no field {field!r}")
    q_low = as_int_codes(f"{name}.q_low", codes.q_low, -8, 7, rank=2)
    q_high = as_int_codes(f"{name}.q_high", codes.q_high, -128, 127, rank=2)
    if q_high.shape != q_low.shape:
        raise ValueError(f"{name}.q_high shape {q_high.shape} does not match {name}.q_low shape {q_low.shape}")
    scale = as_scales(f"{name}.scale", codes.scale, (q_low.shape[0],))
    return q_low, q_high, scale


def _check_low_bits(low_bits):
    return check_bits("low_bits", low_bits, allowed=range(1, 9))


def bit_split(q, low_bits=4):
    """Exact split `q_low = ((q + 2**(b-1)) mod 2**b) - 2**(b-1)`, `q_high = (q - q_low) / 2**b`.

    `q_low` lies in [-2**(b-1), 2**(b-1) - 1] and `q_high == 0` exactly where q already does.
    Returns (q_low int8, q_high int8); raises ValueError if q_high would not fit int8.
    """
    b = _check_low_bits(low_bits)
    codes = as_int_codes("q", q, -(2**31), 2**31 - 1)
    half, full = 2 ** (b - 1), 2**b
    q_low = np.mod(codes + half, full) - half
    q_high = (codes - q_low) // full
    if q_high.size and (q_high.min() < -128 or q_high.max() > 127):
        raise ValueError(f"q too large for an int8 high part with low_bits={b}")
    return q_low.astype(np.int8), q_high.astype(np.int8)


def bit_join(q_low, q_high, low_bits=4):
    """`q = q_low + 2**low_bits * q_high` (int32), the exact inverse of `bit_split`."""
    b = _check_low_bits(low_bits)
    lo = as_int_codes("q_low", q_low, -(2 ** (b - 1)), 2 ** (b - 1) - 1)
    hi = as_int_codes("q_high", q_high, -128, 127)
    if lo.shape != hi.shape:
        raise ValueError(f"q_low shape {lo.shape} does not match q_high shape {hi.shape}")
    return (lo + (2**b) * hi).astype(np.int32)


def zipper_quantize(w_smoothed, outlier_ratio=0.01, high_bits=4):
    """Per-row grid whose 4-bit range holds the inliers, then the exact bit split.

    `Δ_n = max(quantile(|W'[n,:]|, 1 - outlier_ratio) / 7, max|W'[n,:]| / Q)` with
    `Q = 7 + 16 * (2**(high_bits-1) - 1)`; `q = rint(W' / Δ_n)` so `|q| <= Q` and nothing clips:
    every weight lies within Δ_n / 2 of `Δ_n * q`. An all-zero row gets Δ = 0 and codes 0.
    """
    w = as_float_matrix("w_smoothed", w_smoothed)
    outlier_ratio = check_unit_interval("outlier_ratio", outlier_ratio)
    high_bits = check_bits("high_bits", high_bits, allowed=range(1, 9))
    q_max = 7 + 16 * (2 ** (high_bits - 1) - 1)
    a = np.abs(w)
    inlier_edge = np.quantile(a, 1.0 - float(outlier_ratio), axis=1) if w.shape[1] else np.zeros(w.shape[0])
    row_max = a.max(axis=1) if w.shape[1] else np.zeros(w.shape[0])
    scale = np.maximum(inlier_edge / 7.0, row_max / q_max)
    ratio = np.divide(w, scale[:, None], out=np.zeros_like(w), where=scale[:, None] > 0)
    # rint(max / (max / Q)) is Q up to one ulp of the quotient; the clip never moves a code.
    q = np.clip(np.rint(ratio), -q_max, q_max).astype(np.int64)
    q_low, q_high = bit_split(q)
    return ZipperCodes(q_low=q_low, q_high=q_high, scale=scale)


OUTLIER_CHANNEL_SCORES = ("absmax", "hessian")


def select_outlier_channels(w_smoothed, channel_fraction=None, n_channels=None, score="absmax", hdiag=None):
    """The input channels of a smoothed weight that hold its outliers, ascending int64 [C].

    C = n_channels, or ceil(channel_fraction * K). score "absmax": the channels of largest
    `max_n |W'[n, k]|` (SmoothQuant moves activation outliers into whole weight columns);
    "hessian": of largest `hdiag[k] * max_n W'[n, k]**2`, the output error a column's outliers
    cost under the calibration Hessian diagonal of X' (`hdiag`, required). Ties keep the lower
    channel index.
    """
    w = as_float_matrix("w_smoothed", w_smoothed)
    k = w.shape[1]
    if (channel_fraction is None) == (n_channels is None):
        raise ValueError("give exactly one of channel_fraction and n_channels")
    if n_channels is None:
        c = int(np.ceil(check_unit_interval("channel_fraction", channel_fraction) * k))
    else:
        if isinstance(n_channels, bool) or not isinstance(n_channels, (int, np.integer)) or not 0 <= n_channels <= k:
            raise ValueError(f"n_channels must be an integer in [0, K={k}], got {n_channels!r}")
        c = int(n_channels)
    if score not in OUTLIER_CHANNEL_SCORES:
        raise ValueError(f"score must be one of {OUTLIER_CHANNEL_SCORES}, got {score!r}")
    col = np.abs(w).max(axis=0) if w.shape[0] else np.zeros(k)
    if score == "hessian":
        if hdiag is None:
            raise ValueError("score='hessian' needs hdiag, the Hessian diagonal of X' [K]")
        h = as_float_matrix("hdiag", hdiag, rank=1)
        if h.shape != (k,) or np.any(h < 0):
            raise ValueError(f"hdiag must be a non-negative [K={k}] vector, got shape {h.shape}")
        col = h * col**2
    order = np.argsort(-col, kind="stable")  # stable: ties keep the lower index
    return np.sort(order[:c]).astype(np.int64)


def zipper_quantize_channels(w_smoothed, channels, high_bits=4):
    """The channel-structured ZipperQuant grid: the high part lives in the given channels only.

    `Δ_n = max(max_{k not in C} |W'[n,k]| / 7, max_k |W'[n,k]| / Q)`, `q = rint(W' / Δ_n)`: every
    weight outside the channels C has |q| <= 7 (no high part, no clipping), the C channels keep
    codes up to ±Q; `q = q_low + 16 q_high` exactly and `q_high` is nonzero only in C. An
    all-zero row gets Δ = 0 and codes 0.
    """
    w = as_float_matrix("w_smoothed", w_smoothed)
    high_bits = check_bits("high_bits", high_bits, allowed=range(1, 9))
    n, k = w.shape
    ch = np.asarray(channels)
    if ch.ndim != 1 or not np.issubdtype(ch.dtype, np.integer) and ch.size:
        raise ValueError(f"channels must be a 1-D integer array, got shape {ch.shape} dtype {ch.dtype}")
    ch = ch.astype(np.int64)
    if ch.size and (ch.min() < 0 or ch.max() >= k or np.any(np.diff(ch) <= 0)):
        raise ValueError(f"channels must be ascending distinct indices in [0, K={k})")
    q_max = 7 + 16 * (2 ** (high_bits - 1) - 1)
    a = np.abs(w)
    outside = np.ones(k, dtype=bool)
    outside[ch] = False
    inlier_edge = a[:, outside].max(axis=1) if outside.any() and n else np.zeros(n)
    row_max = a.max(axis=1) if k else np.zeros(n)
    scale = np.maximum(inlier_edge / 7.0, row_max / q_max)
    ratio = np.divide(w, scale[:, None], out=np.zeros_like(w), where=scale[:, None] > 0)
    q = np.clip(np.rint(ratio), -q_max, q_max).astype(np.int64)
    q_low, q_high = bit_split(q)
    return ZipperCodes(q_low=q_low, q_high=q_high, scale=scale)


def zipper_matmul(x_smoothed, codes, act_bits=4, act_group_size=None):
    """`Y = scale_m * Δ_n * (qx @ q_low.T) + 16 * Δ_n * (X' @ q_high.T)`, float64.

    The low part uses 4-bit activations (`act_bits=None`: the float activations, a W4A16 low
    part); the high part always uses the high-precision activations `X'`.
    """
    x = as_float_matrix("x_smoothed", x_smoothed)
    q_low, q_high, scale = check_zipper_codes(codes)
    n, k = q_low.shape
    if x.shape[1] != k:
        raise ValueError(f"x_smoothed has K={x.shape[1]} but codes were built for K={k}")
    act_group_size = check_group_size("act_group_size", act_group_size)
    if act_bits is None:
        x_low = x
    else:
        act_bits = check_bits("act_bits", act_bits)
        if np.abs(x).max(initial=0.0) > np.finfo(np.float32).max:
            raise ValueError("x_smoothed holds values beyond the float32 range (4-bit activations are float32)")
        qx, sx = quantize_activations(x, bits=act_bits, group_size=act_group_size)
        x_low = dequantize(qx, sx, act_group_size)
    with np.errstate(over="ignore", invalid="ignore"):
        low = x_low @ (q_low.astype(np.float64) * scale[:, None]).T
        high = 16.0 * scale[None, :] * (x @ q_high.astype(np.float64).T)
        y = low + high
    return check_product(y, "x_smoothed @ codes")
