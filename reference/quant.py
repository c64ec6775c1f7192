"""Smoothing, symmetric quantization and the plain quantized products (DESIGN.md §1).

Weights are quantized offline in float64. Activation quantization is defined in IEEE float32
arithmetic (absmax, scale = absmax / qmax, code = rint(x / scale)), because that is what a GPU
kernel computes: with float32 as the definition a kernel can match the oracle's codes bit for bit,
ties at rounding boundaries included.
"""
import numpy as np

from .validation import (
    as_float_matrix,
    as_int_codes,
    check_bits,
    check_group_size,
    check_product,
    check_unit_interval,
    n_groups,
)

_FLOAT32_MAX = float(np.finfo(np.float32).max)


def smooth_scales(act_absmax, weight_absmax, alpha=0.5, eps=1e-5):
    """SmoothQuant factors `s_k = max(a_k, eps)**alpha / max(w_k, eps)**(1 - alpha)`.

    `X / s` and `W * s` then give the same product as `X` and `W` in exact arithmetic; a larger
    `alpha` moves more of the activations' range into the weights.
    """
    a = as_float_matrix("act_absmax", act_absmax, rank=1)
    w = as_float_matrix("weight_absmax", weight_absmax, rank=1)
    if a.shape != w.shape:
        raise ValueError(f"act_absmax shape {a.shape} does not match weight_absmax shape {w.shape}")
    if np.any(a < 0) or np.any(w < 0):
        raise ValueError("act_absmax and weight_absmax must be non-negative")
    alpha = check_unit_interval("alpha", alpha)
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)) or not (
            0.0 < float(eps) < np.inf):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        s = np.maximum(a, eps) ** alpha / np.maximum(w, eps) ** (1.0 - alpha)
    if not np.all(np.isfinite(s) & (s > 0)):
        raise ValueError("act_absmax and weight_absmax give factors beyond float64 (overflow or underflow)")
    return s


def _expand_groups(scale, k, group_size):
    """Scale per row [R] or per row and group [R, G] -> one scale per element [R, k]."""
    if scale.ndim == 1:
        return scale[:, None]
    # A group wider than the row is one group: repeat by at most k (group_size may be huge).
    return np.repeat(scale, min(group_size, max(k, 1)), axis=1)[:, :k]


def quantize_activations(x, bits=4, group_size=None):
    """Per-token (or per-token, per-group) symmetric quantization in IEEE float32.

    `scale_m = float32(max_k |x[m,k]|) / float32(2**(bits-1) - 1)` and
    `qx = clip(rint(float32(x) / scale_m), -2**(bits-1), 2**(bits-1) - 1)`, round half to even.
    With `group_size = g` each token has one scale per group of g channels (the last group may be
    short). A row (group) of zeros gets scale 0 and codes 0, never NaN.
    Returns (qx int8 [M, K], scale float64 [M] or [M, ceil(K/g)]) with float32-exact scales.
    """
    x = as_float_matrix("x", x)
    bits = check_bits("bits", bits)
    group_size = check_group_size("group_size", group_size)
    if x.size and np.abs(x).max() > _FLOAT32_MAX:
        raise ValueError("x holds values beyond the float32 range")
    m, k = x.shape
    qmax = 2 ** (bits - 1) - 1
    x32 = x.astype(np.float32)
    # K = 0: one empty group (scale 0); a group wider than the row: one group of K.
    g = max(k, 1) if group_size is None else min(group_size, max(k, 1))
    ng = n_groups(k, group_size)
    padded = np.zeros((m, ng * g), dtype=np.float32)
    padded[:, :k] = np.abs(x32)
    absmax = padded.reshape(m, ng, g).max(axis=2)  # [M, G]
    scale32 = absmax / np.float32(qmax)
    per_elem = _expand_groups(scale32 if group_size else scale32[:, 0], k, g)
    ratio = np.divide(x32, per_elem, out=np.zeros_like(x32), where=per_elem > 0)
    qx = np.clip(np.rint(ratio), -qmax - 1, qmax).astype(np.int8)
    scale = scale32.astype(np.float64)
    return qx, (scale if group_size else scale[:, 0])


def quantize_weights(w, bits=4, group_size=None):
    """Symmetric round-to-nearest per output channel (or per group of input channels), float64.

    `scale = absmax / (2**(bits-1) - 1)`, `q = rint(w / scale)` (so |q| <= qmax, nothing clips);
    an all-zero row (group) gets scale 0 and codes 0.
    Returns (q int8 [N, K], scale float64 [N] or [N, ceil(K/g)]).
    """
    w = as_float_matrix("w", w)
    bits = check_bits("bits", bits)
    group_size = check_group_size("group_size", group_size)
    n, k = w.shape
    qmax = 2 ** (bits - 1) - 1
    # K = 0: one empty group (scale 0); a group wider than the row: one group of K.
    g = max(k, 1) if group_size is None else min(group_size, max(k, 1))
    ng = n_groups(k, group_size)
    padded = np.zeros((n, ng * g))
    padded[:, :k] = np.abs(w)
    scale = padded.reshape(n, ng, g).max(axis=2) / qmax
    per_elem = _expand_groups(scale if group_size else scale[:, 0], k, g)
    ratio = np.divide(w, per_elem, out=np.zeros_like(w), where=per_elem > 0)
    q = np.clip(np.rint(ratio), -qmax - 1, qmax).astype(np.int8)
    return q, (scale if group_size else scale[:, 0])


def dequantize(q, scale, group_size=None):
    """`q * scale` with a scale per row ([R]) or per row and group ([R, ceil(K/g)]), float64."""
    return _dequantize(q, scale, group_size, "q", "scale", "group_size")


def _dequantize(q, scale, group_size, q_name, scale_name, group_name):
    """`dequantize` with the caller's argument names in its errors."""
    q = as_int_codes(q_name, q, -(2**31), 2**31 - 1, rank=2)
    scale = np.asarray(scale)
    if not (np.issubdtype(scale.dtype, np.floating) or np.issubdtype(scale.dtype, np.integer)):
        raise ValueError(f"{scale_name} must be a real numeric array, got dtype {scale.dtype}")
    scale = scale.astype(np.float64, copy=False)
    group_size = check_group_size(group_name, group_size)
    r, k = q.shape
    if group_size is None:
        if scale.shape != (r,):
            raise ValueError(f"{scale_name} must have shape ({r},) for per-row scales, got {scale.shape}")
    elif scale.shape != (r, n_groups(k, group_size)):
        raise ValueError(
            f"{scale_name} must have shape ({r}, {n_groups(k, group_size)}) for {group_name} {group_size}, "
            f"got {scale.shape}"
        )
    if not np.all(np.isfinite(scale)):
        raise ValueError(f"{scale_name} holds NaN or Inf")
    with np.errstate(over="ignore", invalid="ignore"):
        out = q * (scale[:, None] if group_size is None else _expand_groups(scale, k, group_size))
    return check_product(out, f"{q_name} * {scale_name}")


def w4a4_matmul(qx, sx, qw, sw, act_group_size=None, weight_group_size=None):
    """Quantized product `dequantize(qx, sx) @ dequantize(qw, sw).T` in float64.

    Equal to `sx_m * sw_n * (qx @ qw.T)` with per-token and per-channel scales; with group scales
    each group's integer partial sum is rescaled before it is added, as a GEMM kernel does.
    """
    qx = np.asarray(qx)
    qw = np.asarray(qw)
    if qx.ndim != 2 or qw.ndim != 2 or qx.shape[1] != qw.shape[1]:
        raise ValueError(f"qx {qx.shape} and qw {qw.shape} must be [M, K] and [N, K]")
    xd = _dequantize(qx, sx, act_group_size, "qx", "sx", "act_group_size")
    wd = _dequantize(qw, sw, weight_group_size, "qw", "sw", "weight_group_size")
    with np.errstate(over="ignore", invalid="ignore"):
        y = xd @ wd.T
    return check_product(y, "qx @ qw.T with scales sx, sw")


def w4a16_matmul(x, qw, sw, group_size=None):
    """Weight-only product `x @ dequantize(qw, sw).T` with float activations, float64."""
    x = as_float_matrix("x", x)
    qw = np.asarray(qw)
    if qw.ndim != 2 or x.shape[1] != qw.shape[1]:
        raise ValueError(f"x {x.shape} and qw {qw.shape} must be [M, K] and [N, K]")
    wd = _dequantize(qw, sw, group_size, "qw", "sw", "group_size")
    with np.errstate(over="ignore", invalid="ignore"):
        y = x @ wd.T
    return check_product(y, "x @ qw.T with scales sw")
