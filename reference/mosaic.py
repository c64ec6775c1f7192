"""MosaicQuant: dense 4-bit base plus a sparse 4-bit residual on error-critical blocks (DESIGN.md §3).

Blocks are ranked by the output error their residual removes, weighted by the diagonal of the
calibration Hessian `h_k = mean_m X'[m,k]**2`; the top `density` fraction is kept. Residual
quantization can only shrink each element's error (0 is always a candidate code), so the weight
error never grows as density grows.
"""
import math
from dataclasses import dataclass

import numpy as np

from .quant import dequantize, quantize_activations, quantize_weights
from .validation import (
    as_float_matrix,
    as_int_codes,
    as_scales,
    check_bits,
    check_block,
    check_group_size,
    check_product,
    check_unit_interval,
    n_groups,
)


@dataclass(frozen=True)
class MosaicCodes:
    q_base: np.ndarray  # int8 [N, K], dense 4-bit base
    scale_base: np.ndarray  # float64 [N] or [N, ceil(K/group_size)]
    block_index: np.ndarray  # int64 [B, 2] (row-block, col-block), row-major ascending
    q_res: np.ndarray  # int8 [B, bn, bk], zero past the matrix edge
    scale_res: np.ndarray  # float64 [B, bn], one scale per row of each kept block
    block: tuple  # (bn, bk)
    group_size: object = None  # the base's weight group size (None: per output channel)

    @property
    def shape(self):
        return self.q_base.shape


def check_mosaic_codes(codes, name="codes"):
    """The fields of a `MosaicCodes` (or any object with them), checked before use: integer codes
    within int8 (dequantization is defined for any; the kernels' packers check the 4-bit range),
    finite scales of the right shapes, block indices inside the matrix. Returns a dict of arrays."""
    for field in ("q_base", "scale_base", "block_index", "q_res", "scale_res", "block"):
        if not hasattr(codes, field):
            raise ValueError(f"{name} must be a MosaicCodes, it has no field {field!r}")
    q_base = as_int_codes(f"{name}.q_base", codes.q_base, -128, 127, rank=2)
    n, k = q_base.shape
    group_size = check_group_size(f"{name}.group_size", getattr(codes, "group_size", None))
    sb_shape = (n,) if group_size is None else (n, n_groups(k, group_size))
    scale_base = as_scales(f"{name}.scale_base", codes.scale_base, sb_shape)
    try:
        bn, bk = check_block(codes.block)
    except ValueError as exc:
        raise ValueError(f"{name}.{exc}") from None
    nbr, nbc = -(-n // bn), -(-k // bk)
    block_index = np.asarray(codes.block_index)
    if block_index.size == 0:
        block_index = block_index.reshape(0, 2)
    if block_index.ndim != 2 or block_index.shape[1] != 2:
        raise ValueError(f"{name}.block_index must have shape [B, 2], got {block_index.shape}")
    rows = as_int_codes(f"{name}.block_index[:, 0]", block_index[:, 0], 0, max(0, nbr - 1))
    cols = as_int_codes(f"{name}.block_index[:, 1]", block_index[:, 1], 0, max(0, nbc - 1))
    b = rows.size
    if b and (nbr == 0 or nbc == 0):
        raise ValueError(f"{name}.block_index lists blocks of an empty {n}x{k} matrix")
    q_res = as_int_codes(f"{name}.q_res", codes.q_res, -128, 127)
    if q_res.size == 0 and b == 0:
        q_res = q_res.reshape(0, bn, bk)
    if q_res.shape != (b, bn, bk):
        raise ValueError(f"{name}.q_res must have shape ({b}, {bn}, {bk}), got {q_res.shape}")
    scale_res = np.asarray(codes.scale_res)
    if scale_res.size == 0 and b == 0:
        scale_res = scale_res.reshape(0, bn)
    scale_res = as_scales(f"{name}.scale_res", scale_res, (b, bn))
    return dict(q_base=q_base, scale_base=scale_base, group_size=group_size, block=(bn, bk),
                block_index=np.stack([rows, cols], axis=1), q_res=q_res, scale_res=scale_res)


def _blocked(a, bn, bk):
    """[N, K] -> [row-blocks, col-blocks, bn, bk], zero-padded at the edges."""
    n, k = a.shape
    nbr, nbc = -(-n // bn), -(-k // bk)
    padded = np.zeros((nbr * bn, nbc * bk), dtype=a.dtype)
    padded[:n, :k] = a
    return padded.reshape(nbr, bn, nbc, bk).transpose(0, 2, 1, 3)


def mosaic_quantize(w, hdiag, density=0.05, block=(64, 64), group_size=None):
    """Base `qb, Δb = quantize_weights(W', 4, group_size)`; residual `R = W' - Δb * qb` cut into
    `block` tiles, each quantized to 4 bits with one scale per block row (`Δr = max|R_row| / 7`),
    scored `Σ h_k R**2 - Σ h_k (R - Δr * qr)**2`; the top `ceil(density * blocks)` are kept
    (ties keep the lower row-major block index)."""
    w = as_float_matrix("w", w)
    h = as_float_matrix("hdiag", hdiag, rank=1)
    if h.shape[0] != w.shape[1]:
        raise ValueError(f"hdiag has {h.shape[0]} entries but w has K={w.shape[1]}")
    if np.any(h < 0):
        raise ValueError("hdiag must be non-negative (a Hessian diagonal is a mean of squares)")
    density = check_unit_interval("density", density)
    bn, bk = check_block(block)
    group_size = check_group_size("group_size", group_size)
    n, k = w.shape

    q_base, scale_base = quantize_weights(w, bits=4, group_size=group_size)
    residual = w - dequantize(q_base, scale_base, group_size)
    blocks = _blocked(residual, bn, bk)  # [nbr, nbc, bn, bk]
    nbr, nbc = blocks.shape[:2]
    h_blocks = _blocked(np.broadcast_to(h, (1, k)), 1, bk)[0, :, 0, :]  # [nbc, bk]

    row_scale = np.abs(blocks).max(axis=3) / 7.0  # [nbr, nbc, bn]
    ratio = np.divide(blocks, row_scale[..., None], out=np.zeros_like(blocks), where=row_scale[..., None] > 0)
    q_res_all = np.clip(np.rint(ratio), -8, 7)
    err_after = blocks - row_scale[..., None] * q_res_all
    weight = h_blocks[None, :, None, :]
    with np.errstate(over="ignore", invalid="ignore"):
        score = (weight * blocks**2).sum(axis=(2, 3)) - (weight * err_after**2).sum(axis=(2, 3))
    if not np.all(np.isfinite(score)):
        raise ValueError("hdiag * w**2 overflows float64 in the block scores: hdiag or w too large")

    n_blocks = nbr * nbc
    # 1e-9 keeps a product such as 0.05 * 100 = 5.000000000000001 from rounding up to 6 blocks.
    n_keep = min(n_blocks, math.ceil(float(density) * n_blocks - 1e-9))
    flat_score = score.reshape(-1)
    order = np.lexsort((np.arange(n_blocks), -flat_score))  # best first, lower index on ties
    kept = np.sort(order[:n_keep])
    rb, cb = np.divmod(kept, nbc)
    return MosaicCodes(
        q_base=q_base,
        scale_base=scale_base,
        block_index=np.stack([rb, cb], axis=1).astype(np.int64).reshape(-1, 2),
        q_res=q_res_all[rb, cb].astype(np.int8).reshape(-1, bn, bk),
        scale_res=row_scale[rb, cb].reshape(-1, bn),
        block=(bn, bk),
        group_size=group_size,
    )


def mosaic_dequantize(codes):
    """The weight the codes stand for: `Δb * qb` plus every kept block's `Δr * qr`, float64 [N, K]."""
    c = check_mosaic_codes(codes)
    n, k = c["q_base"].shape
    bn, bk = c["block"]
    w = dequantize(c["q_base"], c["scale_base"], c["group_size"])
    nbr, nbc = -(-n // bn), -(-k // bk)
    padded = np.zeros((nbr * bn, nbc * bk))
    padded[:n, :k] = w
    with np.errstate(over="ignore", invalid="ignore"):
        for (rb, cb), q, s in zip(c["block_index"], c["q_res"], c["scale_res"]):
            padded[rb * bn : (rb + 1) * bn, cb * bk : (cb + 1) * bk] += q * s[:, None]
    return check_product(padded[:n, :k], "codes (base plus residual blocks)")


def mosaic_matmul(x, codes, act_bits=4, act_group_size=None):
    """`Y = scale_m * (Δb_n * (qx @ qb.T) + Σ_b Δr[b, n] * (qx_b @ qr_b.T))`, float64.

    `act_bits=None` is the W4A16 variant: the float activations instead of `scale_m * qx`.
    """
    x = as_float_matrix("x", x)
    w = mosaic_dequantize(codes)
    n, k = w.shape
    if x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]} but codes were built for K={k}")
    act_group_size = check_group_size("act_group_size", act_group_size)
    if act_bits is not None:
        act_bits = check_bits("act_bits", act_bits)
        qx, sx = quantize_activations(x, bits=act_bits, group_size=act_group_size)
        x = dequantize(qx, sx, act_group_size)
    with np.errstate(over="ignore", invalid="ignore"):
        y = x @ w.T
    return check_product(y, "x @ codes")
