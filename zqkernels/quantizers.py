"""The oracle's weight quantizers in torch, run on the device where the weights are.

`reference/` (numpy, float64) defines smoothing, RTN, the ZipperQuant grid and bit split and the
MosaicQuant block scoring; this module computes the same codes with torch ops on any device (a
CUDA GPU, or the CPU), so a model need not travel to the host to be quantized. Inputs may be
torch tensors or numpy arrays; everything runs in float64 on the device of the weight `w` (numpy
inputs: the CPU). Results are torch tensors on that device; `to_reference()` turns the code
objects into `reference.ZipperCodes` / `reference.MosaicCodes` (numpy), the input of
`zqkernels.layouts`. The layers of `zqkernels.nn` quantize through this module on their device
(its docstring lists the steps that stay on the host); `host_oracle()` is the same interface
computed by `reference` on the host, the layers' previous path, kept to compare and time against.

Equality with the oracle (verify/test_quantizers.py):

- `quantize_weights`, `zipper_quantize`, `mosaic_quantize`: every integer code, every scale and
  the kept block list are bit-for-bit the oracle's, on the same float64 input; `dequantize` and
  `mosaic_dequantize` give the oracle's float64 weights bit for bit (one multiply, at most one
  add per element), and `pattern_lut_stats` the oracle's table statistics exactly (integer
  counts; E/U and the mean are the same single division). Ties at rounding
  boundaries included: both round half to even (`np.rint`, `torch.round`), so there is no tie
  rule to state, and the test asserts plain equality. What makes this hold on a GPU as well
  (the same tests run on CUDA where it is present):
  - only IEEE-exact operations (+, -, *, /, max, order statistics), each its own torch op, so
    no two roundings fuse into one FMA (do not `torch.compile` these functions: the compiler
    may fuse them);
  - division always by a tensor: CUDA torch turns `t / python_number` into `t * (1 / number)`,
    which rounds twice;
  - the quantile is numpy's default "linear" method written out (numpy 2.x `_quantile` /
    `_lerp`): virtual index `(K - 1) * q` in float64, the two order statistics around it, then
    `a + (b - a) * g` for `g < 0.5` and `b - (b - a) * (1 - g)` otherwise, each step rounded
    as numpy rounds it, each a separate op. `torch.quantile` is not used: its `lerp` is one
    kernel, whose `a + w * (b - a)` the CUDA compiler may contract into an FMA, and it sorts
    whole rows where two order statistics (`torch.topk`) suffice;
  - Mosaic block scores are sums, and a sum's rounding depends on its order: `_numpy_block_sum`
    adds in the order numpy's reduction of the oracle's `.sum(axis=(2, 3))` uses (numpy's
    pairwise sum with eight accumulators along each block row, then the rows in order; one
    pairwise sum over the whole block when the matrix has a single block column; checked
    against numpy 2.4, and a numpy that reorders its reductions fails
    `test_block_sum_adds_in_numpys_order`). The ranking
    of the B block scores (a few thousand numbers) runs on the host through the oracle's own
    `np.lexsort`, so equal scores keep the lower row-major block index exactly as there.
- `smooth_scales` is the one function that is not bit-exact: `x ** alpha` is a transcendental
  and torch's pow (SLEEF on the CPU, 1 ulp; CUDA's, 2 ulp) differs from numpy's (glibc) in the
  last bit for up to ~8 % of the entries on random inputs (measured on the CPU; alpha 0 and 1 are
  exact). The test bounds the difference at 8 ulp relative (`SMOOTH_RTOL`). For codes equal to
  the oracle's end to end, take the K smoothing factors from `reference.smooth_scales` on the
  host (column absmaxes are exact in any order, so `w.abs().amax(0)` may come from the device)
  and smooth the weight on the device: `W * s` is one correctly rounded multiply on both sides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

import reference
from reference.validation import check_bits, check_block, check_group_size, check_unit_interval, n_groups

F64 = torch.float64
# Relative bound on |smooth_scales - reference.smooth_scales| / reference (see the docstring).
SMOOTH_RTOL = 8 * float(np.finfo(np.float64).eps)


# ---------------------------------------------------------------- argument checks

def _as_tensor(name, a, rank, device=None):
    """`a` as a finite float64 tensor of `rank` on `device` (default: where it is), or ValueError."""
    if isinstance(a, torch.Tensor):
        t = a.detach()
    else:
        arr = np.asarray(a)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.ndim != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be a real numeric array, got dtype {t.dtype}")
    t = t.to(device=device if device is not None else t.device, dtype=F64)
    if t.numel():
        lo, hi = torch.aminmax(t)  # one pass; NaN propagates into both
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            raise ValueError(f"{name} holds NaN or Inf")
    return t



def _div(a, b):
    """IEEE `a / b` on every device: a Python-number divisor becomes a tensor on a's device,
    since CUDA torch multiplies by the reciprocal of a CPU scalar (two roundings)."""
    if not isinstance(b, torch.Tensor):
        b = torch.tensor(float(b), dtype=F64, device=a.device)
    return torch.div(a, b)


def _safe_div(a, b):
    """`a / b` where `b > 0`, else a code of 0 (an all-zero row or group: scale 0, never NaN).

    The oracle writes 0 where b == 0; dividing by 1 there instead costs no pass over `a` and gives
    the same code: b == 0 only where every |a| in its row (group) is 0 or a subnormal so small that
    `absmax / qmax` underflows to 0, and a / 1 then rounds to code 0 as well."""
    return _div(a, torch.where(b > 0, b, torch.ones((), dtype=F64, device=b.device)))


# ---------------------------------------------------------------- smoothing and RTN

def smooth_scales(act_absmax, weight_absmax, alpha=0.5, eps=1e-5):
    """`s_k = max(a_k, eps)**alpha / max(w_k, eps)**(1 - alpha)`, float64 [K] on weight_absmax's
    device; within `SMOOTH_RTOL` of `reference.smooth_scales` (pow is not correctly rounded)."""
    w = _as_tensor("weight_absmax", weight_absmax, rank=1)
    a = _as_tensor("act_absmax", act_absmax, rank=1, device=w.device)
    if a.shape != w.shape:
        raise ValueError(f"act_absmax shape {tuple(a.shape)} does not match weight_absmax shape {tuple(w.shape)}")
    if bool((a < 0).any()) or bool((w < 0).any()):
        raise ValueError("act_absmax and weight_absmax must be non-negative")
    alpha = check_unit_interval("alpha", alpha)
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)) or not (
            float(eps) > 0.0 and math.isfinite(float(eps))):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    eps = float(eps)
    return torch.div(torch.pow(torch.clamp_min(a, eps), alpha), torch.pow(torch.clamp_min(w, eps), 1.0 - alpha))




def _per_element(scale, n, k, g):
    """Scale per row [N] or per row and group [N, G] -> [N, K]."""
    if scale.ndim == 1:
        return scale[:, None]
    return scale[:, :, None].expand(n, scale.shape[1], g).reshape(n, -1)[:, :k]


def _group_width(k, group_size):
    """Channels per scale group, as `reference.quantize_weights` takes them."""
    return max(k, 1) if group_size is None else min(group_size, max(k, 1))


def _rtn(w, bits, group_size):
    """`reference.quantize_weights` on an already checked float64 tensor."""
    n, k = w.shape
    qmax = 2 ** (bits - 1) - 1
    # as the oracle: K = 0 is one empty group, a group wider than the row is one group of K
    g = _group_width(k, group_size)
    ng = n_groups(k, group_size)
    if k and ng * g == k:  # whole groups: work on the [N, G, g] view, no padded copy
        absmax = w.abs().reshape(n, ng, g).amax(dim=2)
    elif g:
        padded = torch.zeros((n, ng * g), dtype=F64, device=w.device)
        padded[:, :k] = w.abs()
        absmax = padded.reshape(n, ng, g).amax(dim=2)
        del padded
    else:
        absmax = torch.zeros((n, ng), dtype=F64, device=w.device)
    scale = _div(absmax, qmax)
    if k and ng * g == k:
        safe = torch.where(scale > 0, scale, torch.ones((), dtype=F64, device=w.device))
        ratio = torch.div(w.reshape(n, ng, g), safe[:, :, None]).reshape(n, k)  # the same IEEE quotients
    else:
        ratio = _safe_div(w, _per_element(scale if group_size is not None else scale[:, 0], n, k, g))
    if group_size is None:
        scale = scale[:, 0]
    # in place: the rounding is the same, the allocations (page faults on a CPU) are not
    q = torch.round(ratio, out=ratio).clamp_(-qmax - 1, qmax).to(torch.int8)
    return q, scale


def quantize_weights(w, bits=4, group_size=None):
    """Symmetric round-to-nearest per output channel (or per group of input channels), float64:
    `scale = absmax / (2**(bits-1) - 1)`, `q = rint(w / scale)`; an all-zero row (group) gets
    scale 0 and codes 0. Returns (q int8 [N, K], scale float64 [N] or [N, ceil(K/g)]) on w's
    device, bit-equal to `reference.quantize_weights`."""
    w = _as_tensor("w", w, rank=2)
    return _rtn(w, check_bits("bits", bits, range(2, 9)), check_group_size("group_size", group_size))


# ---------------------------------------------------------------- ZipperQuant

@dataclass(frozen=True)
class ZipperCodesTorch:
    """`W' ≈ scale[:, None] * (q_low + 16 * q_high)` as tensors on the weight's device."""

    q_low: torch.Tensor  # int8 [N, K] in [-8, 7]
    q_high: torch.Tensor  # int8 [N, K], sparse
    scale: torch.Tensor  # float64 [N], Δ_n

    @property
    def shape(self):
        return tuple(self.q_low.shape)

    def to_reference(self):
        return reference.ZipperCodes(q_low=self.q_low.cpu().numpy(), q_high=self.q_high.cpu().numpy(),
                                     scale=self.scale.cpu().numpy())


def row_quantile(a, q):
    """`np.quantile(a, q, axis=1)` (method "linear") of a float64 [N, K] tensor, bit for bit.

    numpy: virtual index `v = (K - 1) * q`; `v >= K - 1` takes the row's maximum; otherwise the
    order statistics `lo = a_(floor v)` and `hi = a_(floor v + 1)` and `g = v - floor v` give
    `lo + (hi - lo) * g` if `g < 0.5`, else `hi - (hi - lo) * (1 - g)`.
    """
    n, k = a.shape
    if k == 0:
        return torch.zeros(n, dtype=F64, device=a.device)
    v = (k - 1) * float(q)  # float64, as numpy's `(n - 1) * quantiles`
    if v >= k - 1:
        return a.amax(dim=1)
    below = math.floor(v)
    gamma = v - below
    # The largest K - below values, descending: the last is order statistic `below`, the one
    # before it `below + 1` (K - below >= 2 since below < K - 1).
    top = torch.topk(a, k - below, dim=1, largest=True, sorted=True).values
    lo, hi = top[:, -1], top[:, -2]
    diff = hi - lo
    if gamma >= 0.5:
        return hi - diff * (1.0 - gamma)
    return lo + diff * gamma


def _bit_split4(q):
    """`q_low = ((q + 8) mod 16) - 8`, `q_high = (q - q_low) / 16` on integer-valued float64
    codes (|q| <= 2039): `q_high = floor((q + 8) / 16)`, `q_low = q - 16 q_high`, every step exact
    (small integers, a power-of-two scale) and faster than int64 arithmetic. -> int8, int8."""
    q_high = torch.floor((q + 8.0) * 0.0625)
    q_low = q - 16.0 * q_high
    return q_low.to(torch.int8), q_high.to(torch.int8)


def zipper_quantize(w_smoothed, outlier_ratio=0.01, high_bits=4):
    """`Δ_n = max(quantile(|W'_n|, 1 - outlier_ratio) / 7, max|W'_n| / Q)` with
    `Q = 7 + 16 * (2**(high_bits-1) - 1)`, `q = rint(W' / Δ_n)` (|q| <= Q, nothing clips), the
    exact split `q = q_low + 16 * q_high`; an all-zero row gets Δ = 0 and codes 0.
    Bit-equal to `reference.zipper_quantize`; returns `ZipperCodesTorch` on w's device."""
    w = _as_tensor("w_smoothed", w_smoothed, rank=2)
    outlier_ratio = check_unit_interval("outlier_ratio", outlier_ratio)
    high_bits = check_bits("high_bits", high_bits, range(1, 9))
    q_max = 7 + 16 * (2 ** (high_bits - 1) - 1)
    n, k = w.shape
    a = w.abs()
    edge = row_quantile(a, 1.0 - outlier_ratio)
    row_max = a.amax(dim=1) if k else torch.zeros(n, dtype=F64, device=w.device)
    del a
    scale = torch.maximum(_div(edge, 7.0), _div(row_max, float(q_max)))
    # rint(max / (max / Q)) is Q up to one ulp of the quotient; the clamp never moves a code.
    q = torch.clamp(torch.round(_safe_div(w, scale[:, None])), -q_max, q_max)
    q_low, q_high = _bit_split4(q)
    return ZipperCodesTorch(q_low=q_low, q_high=q_high, scale=scale)


# ---------------------------------------------------------------- MosaicQuant

@dataclass(frozen=True)
class MosaicCodesTorch:
    """`reference.MosaicCodes` as tensors on the weight's device (block_index stays int64)."""

    q_base: torch.Tensor  # int8 [N, K]
    scale_base: torch.Tensor  # float64 [N] or [N, ceil(K/group_size)]
    block_index: torch.Tensor  # int64 [B, 2] (row-block, col-block), row-major ascending
    q_res: torch.Tensor  # int8 [B, bn, bk], zero past the matrix edge
    scale_res: torch.Tensor  # float64 [B, bn]
    block: tuple  # (bn, bk)
    group_size: object = None

    @property
    def shape(self):
        return tuple(self.q_base.shape)

    def to_reference(self):
        return reference.MosaicCodes(
            q_base=self.q_base.cpu().numpy(), scale_base=self.scale_base.cpu().numpy(),
            block_index=self.block_index.cpu().numpy(), q_res=self.q_res.cpu().numpy(),
            scale_res=self.scale_res.cpu().numpy(), block=self.block, group_size=self.group_size)


def _pairwise_sum(t):
    """numpy's `pairwise_sum` of float64 over the last axis, the same additions in the same order:
    below 8 terms one running sum from 0; up to 128 eight running sums (terms i, i+8, ...), joined
    as ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)), then the remainder; above 128 the two halves split
    at a multiple of 8 below n/2."""
    n = t.shape[-1]
    if n < 8:
        res = torch.zeros(t.shape[:-1], dtype=t.dtype, device=t.device)
        for i in range(n):
            res = res + t[..., i]
        return res
    if n <= 128:
        m = n - n % 8
        r = t[..., 0:8]
        for i in range(8, m, 8):
            r = r + t[..., i:i + 8]
        res = ((r[..., 0] + r[..., 1]) + (r[..., 2] + r[..., 3])) + ((r[..., 4] + r[..., 5]) + (r[..., 6] + r[..., 7]))
        for i in range(m, n):
            res = res + t[..., i]
        return res
    half = n // 2
    half -= half % 8
    return _pairwise_sum(t[..., :half]) + _pairwise_sum(t[..., half:])


def _numpy_block_sum(t):
    """[nbr, bn, nbc, bk] (the padded matrix viewed as blocks) -> [nbr, nbc] per-block sums in the
    order of the oracle's `x.sum(axis=(2, 3))` on its `[nbr, nbc, bn, bk]` block view: numpy's
    iterator walks each block row by row with the bk elements of a row as its inner loop
    (pairwise), adding the row sums in order; with one block column a block's rows are contiguous
    in memory and numpy coalesces the whole block into one pairwise sum."""
    nbr, bn, nbc, bk = t.shape
    if nbc == 1:
        return _pairwise_sum(t.reshape(nbr, 1, bn * bk))
    rows = _pairwise_sum(t)  # [nbr, bn, nbc]
    out = torch.zeros((nbr, nbc), dtype=t.dtype, device=t.device)
    for r in range(bn):
        out = out + rows[:, r, :]
    return out



def mosaic_quantize(w, hdiag, density=0.05, block=(64, 64), group_size=None):
    """Base `qb, Δb = quantize_weights(W', 4, group_size)`; residual `R = W' - Δb * qb` cut into
    `block` tiles, each 4-bit with one scale per block row (`Δr = max|R_row| / 7`), scored
    `Σ h_k R**2 - Σ h_k (R - Δr * qr)**2`; the top `ceil(density * blocks)` kept (ties keep the
    lower row-major block index), `block_index` sorted row-major, `q_res` zero past the edge.
    Bit-equal to `reference.mosaic_quantize`; returns `MosaicCodesTorch` on w's device."""
    w = _as_tensor("w", w, rank=2)
    h = _as_tensor("hdiag", hdiag, rank=1, device=w.device)
    if h.shape[0] != w.shape[1]:
        raise ValueError(f"hdiag has {h.shape[0]} entries but w has K={w.shape[1]}")
    if bool((h < 0).any()):
        raise ValueError("hdiag must be non-negative (a Hessian diagonal is a mean of squares)")
    density = check_unit_interval("density", density)
    bn, bk = check_block(block)
    group_size = check_group_size("group_size", group_size)
    n, k = w.shape
    dev = w.device

    q_base, scale_base = _rtn(w, 4, group_size)
    g = _group_width(k, group_size)
    nbr, nbc = -(-n // bn), -(-k // bk)
    # R = W' - Δb * qb. The element-wise steps below run in place where they can: each is the
    # same IEEE operation as the oracle's, only the buffers differ (fewer allocations).
    residual = q_base.to(F64).mul_(_per_element(scale_base, n, k, g))
    torch.sub(w, residual, out=residual)
    if nbr * bn == n and nbc * bk == k:
        padded = residual
    else:
        padded = torch.zeros((nbr * bn, nbc * bk), dtype=F64, device=dev)
        padded[:n, :k] = residual
        del residual
    blocks = padded.view(nbr, bn, nbc, bk)  # axes (row-block, row, col-block, col)
    del padded
    hp = torch.zeros(nbc * bk, dtype=F64, device=dev)
    hp[:k] = h
    weight = hp.view(1, 1, nbc, bk)

    row_scale = _div(blocks.abs().amax(dim=3), 7.0)  # [nbr, bn, nbc]
    q_res_all = torch.round(_safe_div(blocks, row_scale[..., None])).clamp_(-8, 7)
    before = _numpy_block_sum(torch.mul(blocks, blocks).mul_(weight))
    err_after = torch.mul(q_res_all, row_scale[..., None])
    torch.sub(blocks, err_after, out=err_after)
    after = _numpy_block_sum(err_after.mul_(err_after).mul_(weight))
    del err_after
    score = (before - after).cpu().numpy()
    if not np.all(np.isfinite(score)):  # as the oracle
        raise ValueError("hdiag * w**2 overflows float64 in the block scores: hdiag or w too large")

    n_blocks = nbr * nbc
    # As the oracle: 1e-9 keeps 0.05 * 100 = 5.000000000000001 from rounding up to 6 blocks.
    n_keep = min(n_blocks, math.ceil(density * n_blocks - 1e-9))
    flat_score = score.reshape(-1)
    order = np.lexsort((np.arange(n_blocks), -flat_score))  # the oracle's ranking, on B numbers
    kept = np.sort(order[:n_keep])
    rb_np, cb_np = np.divmod(kept, nbc)
    rb = torch.from_numpy(rb_np.astype(np.int64)).to(dev)
    cb = torch.from_numpy(cb_np.astype(np.int64)).to(dev)
    return MosaicCodesTorch(
        q_base=q_base,
        scale_base=scale_base,
        block_index=torch.stack([rb, cb], dim=1).reshape(-1, 2),
        q_res=q_res_all[rb, :, cb, :].to(torch.int8).reshape(-1, bn, bk),
        scale_res=row_scale[rb, :, cb].reshape(-1, bn),
        block=(bn, bk),
        group_size=group_size,
    )


# ---------------------------------------------------------------- dequantization

def dequantize(q, scale, group_size=None):
    """`reference.dequantize` on the codes' device: `q * scale` (a scale per row [N] or per row
    and group [N, ceil(K/g)]) in float64, one correctly rounded multiply per element, so equal to
    the oracle bit for bit. q: an integer tensor; scale: a float tensor on q's device."""
    if not isinstance(q, torch.Tensor) or q.ndim != 2 or q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise ValueError(f"q must be an integer tensor of rank 2, got {getattr(q, 'dtype', type(q).__name__)}")
    group_size = check_group_size("group_size", group_size)
    n, k = q.shape
    s = scale.to(device=q.device, dtype=F64)
    want = (n,) if group_size is None else (n, n_groups(k, group_size))
    if tuple(s.shape) != want:
        raise ValueError(f"scale must have shape {want}, got {tuple(s.shape)}")
    return q.to(F64).mul_(_per_element(s, n, k, _group_width(k, group_size)))  # in place: one buffer


def mosaic_dequantize(codes):
    """`reference.mosaic_dequantize` of `MosaicCodesTorch`: `Δb * qb` plus each kept block's
    `Δr * qr`, float64 [N, K] on the codes' device. Every element gets the same two roundings as
    in the oracle (the product `q * s`, then at most one add, since kept blocks never overlap), so
    the result is bit-equal. ValueError if the sum overflows float64 (the oracle refuses it too)."""
    n, k = codes.shape
    bn, bk = codes.block
    base = dequantize(codes.q_base, codes.scale_base, codes.group_size)
    if codes.block_index.shape[0] == 0:
        return base
    nbr, nbc = -(-n // bn), -(-k // bk)
    padded = torch.zeros((nbr * bn, nbc * bk), dtype=F64, device=base.device)
    padded[:n, :k] = base
    view = padded.view(nbr, bn, nbc, bk)
    rb, cb = codes.block_index[:, 0], codes.block_index[:, 1]
    view[rb, :, cb, :] = view[rb, :, cb, :] + codes.q_res.to(F64) * codes.scale_res[:, :, None]
    out = padded[:n, :k]
    if out.numel() and not bool(torch.isfinite(out).all()):
        raise ValueError("codes (base plus residual blocks) overflow float64")
    return out


# ---------------------------------------------------------------- pattern-table statistics

def pattern_lut_stats(q_high, group_size=4):
    """`reference.lut_stats(reference.build_pattern_lut(q_high, group_size))` on q_high's device,
    without building the table: every field is an integer count (or E/U, or a mean of counts,
    each one correctly rounded division as in numpy), so the dict is equal to the oracle's, not
    merely close. The table itself (dictionary and CSR of ids) is built only where it is used,
    on the host, by the hybrid backend.

    A (group, pattern) key is the group index and the g codes; where they fit one int64 (8 bits
    per code: g <= 6 for any real K) they are packed into it and counted with `torch.unique`, else `torch.unique(dim=0)` over the
    [E, g + 1] key rows. `pattern_bits` is 4 when every code of q_high lies in [-8, 7]: the
    dictionary holds every nonzero group's codes, and the zero groups' codes (0) are in range."""
    from reference.lut import MAX_GROUP_SIZE, uint_bytes

    if not isinstance(q_high, torch.Tensor) or q_high.ndim != 2 or q_high.is_floating_point() or \
            q_high.is_complex() or q_high.dtype == torch.bool:
        raise ValueError(f"q_high must be an integer tensor of rank 2, got {getattr(q_high, 'dtype', type(q_high).__name__)}")
    g = check_group_size("group_size", group_size)
    if g is None or g > MAX_GROUP_SIZE:
        raise ValueError(f"group_size must be an integer in [1, {MAX_GROUP_SIZE}], got {group_size!r}")
    n, k = q_high.shape
    dev = q_high.device
    if q_high.numel():
        lo, hi = (int(v) for v in torch.aminmax(q_high))
        if lo < -128 or hi > 127:
            raise ValueError(f"q_high holds codes outside [-128, 127] (min {lo}, max {hi})")
    else:
        lo = hi = 0
    n_grp = -(-k // g)
    if n_grp * g != k:
        padded = torch.zeros((n, n_grp * g), dtype=q_high.dtype, device=dev)
        padded[:, :k] = q_high
    else:
        padded = q_high
    blocks = padded.reshape(n, n_grp, g)
    nonzero = (blocks != 0).any(dim=2)  # [N, n_grp]
    row_len = nonzero.sum(dim=1)
    rows, groups = torch.nonzero(nonzero, as_tuple=True)
    e = int(rows.numel())
    if e:
        pat = blocks[rows, groups].to(torch.int64) + 128  # [E, g] in [0, 255]
        if n_grp * 256 ** g < 2 ** 63:  # (group, codes) fits one int64 key
            key = groups.to(torch.int64)
            for i in range(g):
                key = key * 256 + pat[:, i]
            uniq = torch.unique(key)
            uniq_groups = torch.div(uniq, 256 ** g, rounding_mode="floor")
        else:
            uniq_groups = torch.unique(torch.cat([groups.to(torch.int64)[:, None], pat], dim=1), dim=0)[:, 0]
        u = int(uniq_groups.numel())
        per_group = torch.bincount(uniq_groups, minlength=n_grp)
    else:
        u = 0
        per_group = torch.zeros(n_grp, dtype=torch.int64, device=dev)
    row_max = int(row_len.max()) if n else 0
    pattern_bits = 4 if u == 0 or (lo >= -8 and hi <= 7) else 8
    index_bytes = n * uint_bytes(row_max) + e * uint_bytes(max(u - 1, 0))
    pattern_bytes = -(-u * g * pattern_bits // 8) + u * uint_bytes(max(n_grp - 1, 0))
    return {
        "E": e,
        "U": u,
        "reuse": e / u if u else 0.0,
        "group_size": g,
        "index_bytes": int(index_bytes),
        "pattern_bytes": int(pattern_bytes),
        "pattern_bits": pattern_bits,
        "id_bytes": uint_bytes(max(u - 1, 0)),
        "oracle_index_bytes": int(8 * (n + 1) + 4 * e + 4 * e),  # int64 indptr, int32 ids and groups
        "table_bytes_per_token": 4 * u,
        "patterns_per_group_max": int(per_group.max()) if n_grp else 0,
        "patterns_per_group_mean": float(int(per_group.sum())) / n_grp if n_grp else 0.0,
    }


# ---------------------------------------------------------------- the host oracle, same interface

def host_oracle():
    """This module's interface (the functions `zqkernels.nn` calls) computed by the numpy oracle
    on a host float64 copy of the weight, results moved back to the weight's device: how the
    layers quantized before they ran on the weight's device. For comparing against and timing
    (tests/test_device_quantize.py, perf/time_quantizers.py --what layers), never a fallback."""
    from types import SimpleNamespace

    def to_dev(a, like):
        return torch.from_numpy(np.ascontiguousarray(a)).to(like.device)

    def host(t):
        return t.detach().cpu().numpy()

    def quantize_weights(w, bits=4, group_size=None):
        q, s = reference.quantize_weights(host(w), bits=bits, group_size=group_size)
        return to_dev(q, w), to_dev(s, w)

    def zipper_quantize(w_smoothed, outlier_ratio=0.01, high_bits=4):
        c = reference.zipper_quantize(host(w_smoothed), outlier_ratio=outlier_ratio, high_bits=high_bits)
        return ZipperCodesTorch(to_dev(c.q_low, w_smoothed), to_dev(c.q_high, w_smoothed), to_dev(c.scale, w_smoothed))

    def mosaic_quantize(w, hdiag, density=0.05, block=(64, 64), group_size=None):
        c = reference.mosaic_quantize(host(w), hdiag, density=density, block=block, group_size=group_size)
        return MosaicCodesTorch(to_dev(c.q_base, w), to_dev(c.scale_base, w), to_dev(c.block_index, w),
                                to_dev(c.q_res, w), to_dev(c.scale_res, w), c.block, c.group_size)

    def dequantize_(q, scale, group_size=None):
        return to_dev(reference.dequantize(host(q), host(scale), group_size), q)

    def mosaic_dequantize_(codes):
        return to_dev(reference.mosaic_dequantize(codes.to_reference()), codes.q_base)

    def pattern_lut_stats_(q_high, group_size=4):
        return reference.lut_stats(reference.build_pattern_lut(host(q_high), group_size=group_size))

    return SimpleNamespace(quantize_weights=quantize_weights, zipper_quantize=zipper_quantize,
                           mosaic_quantize=mosaic_quantize, dequantize=dequantize_,
                           mosaic_dequantize=mosaic_dequantize_, pattern_lut_stats=pattern_lut_stats_,
                           ZipperCodesTorch=ZipperCodesTorch, MosaicCodesTorch=MosaicCodesTorch)
