"""MosaicQuant on the GPU: ZipperEngine, the fused dense-base + block-sparse-residual 4-bit GEMM.

Product (DESIGN.md §3.3), per token m and output channel n:

    Y[m, n] = sx[m] * (Δb[n] * (qx[m] @ qb[n]) + Σ_{kept blocks b in the row-block of n} Δr[b, n] * (qx_b[m] @ qr_b[n]))

The weights are a `layouts.MosaicBlocks` (the packed base, the packed kept residual blocks and a
block-CSR per N-tile). Operands are unpacked as 16 * code (`int4.unpack_lo_hi_x16`) and fed to int8
dots (`_x16_dot`): a K step of 64 or more as its even/odd nibble planes (two dots, no shuffle), a
step of 32 re-interleaved into natural K order (one 32-deep dot: planes of 16 are below the int8
dot's minimum). Each dot carries a factor 256 that the kernels remove exactly.

Scale groups: every K step (base and residual) lies inside one activation group and one base
weight group, so its int32 partial is rescaled by that group's scales into an fp32 accumulator;
the launch table's BLOCK_K is halved until it divides both groups (down to 32). A residual block
(bk = 64 by default) then spans several groups and takes its bk / step steps, each with its own
activation group scale; the residual's own scales are per block row, the same for every step.

Variants (one launch each; the launch table names one per M bucket, `configs.py`):
- `splitk` (decode, M <= 16): the dense base loop (`_fast_base_loop`, the same walk as
  `w4a4_gemm`: BLOCK_K independent of the residual block width) over one split's share of K, the
  int32 accumulator folded to fp32, then this split's share of the residual tail (every SPLIT_K-th
  step, each step's X / residual loads prefetched one step ahead), fp32 partials summed by the last
  arrival (`tiling.splitk_reduce`).
- `inloop` (16 < M <= 64, the DESIGN.md §3.4 form): dense stretches run a plain base loop; each
  kept column-block runs its steps with the base MMA and the residual MMA on the SAME activation
  registers, into a second accumulator. X is read once. K may be split, aligned to whole blocks.
- `reslate` (M > 64): the dense base loop over all of K (one accumulator, the dense GEMM's tile),
  folded to fp32, then the tile's kept blocks in a plain tail, each step re-reading its X tile from
  L2 (about 5 % of the tile's X at 5 % density). Reusing the tile in registers needs a second
  accumulator live through the main loop, which at the large-M tile spilled; see docs/DESIGN.md.
- `dequant` (large M, with groups on the H200): the product in bf16 on the 16-bit tensor cores.
  Each K step's activation codes times their scales, and the base codes times theirs plus the
  step's residual block (when the tile's list holds one) times its row scales, are formed in bf16
  in registers (`int4.unpack_lo_hi_float`: no conversion instruction) and ONE bf16 MMA a step
  accumulates in fp32: no int32 partial is converted and rescaled on the CUDA cores, and the
  residual costs a masked load and an FMA per weight, no MMA. Activations and base weights come
  through TMA descriptors (K a multiple of 32, 16-byte aligned), so a table bucket naming it also
  names a `"no_tma"` integer config for the rest. Not an exact-integer path:
  `mosaic_w4a4_gemm_int32` refuses it.
`mosaic_w4a4_gemm_unfused` is the baseline: the same variant with the residual compiled out, then
a second kernel that re-reads X for every kept block and adds the residual into the stored output.
`mosaic_w4a4_gemm_int32` stores the base and residual int32 sums separately (exact tests).
`mosaic_w4a16_gemm` is the W4A16 form (float activations, per-step residual test).

Limits (`limits.py`): activation and base-weight groups multiples of 32 (the shallowest step),
blocks (bn, bk) powers of two with bk >= 64, K <= `limits.MAX_K`.
"""
import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from zqkernels.gpu import limits
from zqkernels.gpu.configs import interpreting, launch_config, tma_or_fallback, use_asm
from zqkernels.gpu.int4 import unpack_interleaved, unpack_lo_hi_float, unpack_lo_hi_x16
from zqkernels.gpu.operands import (
    check_float_acts, check_out, check_out_dtype, check_packed, check_same_device, check_scale, refuse_non_finite,
)
from zqkernels.gpu.tiling import choose_split_k, splitk_reduce, splitk_workspace, tile_ids, tile_origin
from zqkernels.layouts import MosaicBlocks

INV256 = tl.constexpr(0.00390625)  # removes the 16 * 16 of the x16 nibble planes, exactly
# The shallowest int8 dot Triton compiles (Hopper's int8 wgmma is 32 deep): a K step of 64 or more
# can dot its two nibble planes separately; a step of 32 (groups of 32) dots them interleaved.
MIN_DOT_K = tl.constexpr(32)
NO_BLOCK = tl.constexpr(2147483647)  # past a residual list's end: no K step's column-block


# --------------------------------------------------------------------------------------------
# Shared pieces of the kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_list(indptr_ptr, pid_n, rn, BLOCK_N: tl.constexpr, BN_RES: tl.constexpr, LIST_W: tl.constexpr):
    """This tile's residual list (its row-block, or the union over its row-blocks when
    BLOCK_N > bn): (first entry, end, each column's row-block slot, each column's row in its block)."""
    n0 = pid_n * BLOCK_N
    tile = n0 // LIST_W
    slot = ((n0 - tile * LIST_W) + tl.arange(0, BLOCK_N)) // BN_RES
    p = tl.load(indptr_ptr + tile)
    p_end = tl.load(indptr_ptr + tile + 1)
    return p, p_end, slot, rn % BN_RES


@triton.jit
def _natural(lo, hi):
    """x16 nibble planes [R, H] (elements 2i, 2i+1) -> int8 tile [R, 2H] in natural K order."""
    return tl.reshape(tl.join(lo, hi), (lo.shape[0], 2 * lo.shape[1]))


@triton.jit
def _x16_dot(a_lo, a_hi, b_lo, b_hi, acc, B_T: tl.constexpr):
    """acc + the int32 dot of one K step, 256x the code product, from x16 nibble planes: a [M, H];
    b [N, H] when B_T (K-contiguous, transposed in the dot) else [H, N]. Planes of H >= 32 are two
    dots (a dot over K is a sum, so the order of K does not matter); a 32-deep step, whose planes
    would be 16 deep, is re-interleaved into natural order for one 32-deep dot. acc None: a new sum."""
    if a_lo.shape[1] >= MIN_DOT_K:
        if B_T:
            acc = tl.dot(a_lo, tl.trans(b_lo), acc, out_dtype=tl.int32)
            acc = tl.dot(a_hi, tl.trans(b_hi), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a_lo, b_lo, acc, out_dtype=tl.int32)
            acc = tl.dot(a_hi, b_hi, acc, out_dtype=tl.int32)
    else:
        # The same join + reshape as `w4a4_gemm`'s natural order, on K-contiguous [rows, H] planes.
        if not B_T:
            b_lo = tl.trans(b_lo)
            b_hi = tl.trans(b_hi)
        acc = tl.dot(_natural(a_lo, a_hi), tl.trans(_natural(b_lo, b_hi)), acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _base_step(acc_i, acc_f, x_lo, x_hi, w_lo, w_hi, sx_ptr, sw_ptr, rm, rn, m_ok, n_ok, k0, K,
               stride_sx, stride_sw, ACT_GROUP: tl.constexpr, W_GROUP: tl.constexpr):
    """One K step of the dense base: int32 accumulation, or (group scales) an fp32 rescale of the
    step's int32 partial. Returns (acc_i, acc_f, sxg): sxg, the step's activation group scale,
    is reused by the residual MMA of the same step."""
    sxg = tl.zeros((1,), dtype=tl.float32)
    if (ACT_GROUP != 0) or (W_GROUP != 0):
        part = _x16_dot(x_lo, x_hi, w_lo, w_hi, None, False)
        step = part.to(tl.float32) * INV256
        # A step past K (a block's tail) has a zero partial and an out-of-range scale index:
        # mask the scale load so no garbage (possibly NaN) multiplies the zero.
        if ACT_GROUP != 0:
            sxg = tl.load(sx_ptr + rm * stride_sx + k0 // ACT_GROUP, mask=m_ok & ((rm * 0 + k0) < K), other=0.0)
            step = step * sxg[:, None]
        if W_GROUP != 0:
            swg = tl.load(sw_ptr + rn * stride_sw + k0 // W_GROUP, mask=n_ok & ((rn * 0 + k0) < K), other=0.0)
            step = step * swg[None, :]
        acc_f += step
    else:
        acc_i = _x16_dot(x_lo, x_hi, w_lo, w_hi, acc_i, False)
    return acc_i, acc_f, sxg


@triton.jit
def _res_step(res_i, res_f, x_lo, x_hi, rq, srow, sxg, ACT_GROUP: tl.constexpr, INT_DEBUG: tl.constexpr,
              USE_ASM: tl.constexpr):
    """The residual MMA of one K step on activation planes already in registers."""
    r_lo, r_hi = unpack_lo_hi_x16(rq, USE_ASM)
    rpart = _x16_dot(x_lo, x_hi, r_lo, r_hi, None, False)
    if INT_DEBUG:
        res_i += rpart >> 8
    else:
        rstep = rpart.to(tl.float32) * srow[None, :]
        if ACT_GROUP != 0:
            rstep = rstep * sxg[:, None]
        res_f += rstep
    return res_i, res_f


@triton.jit
def _dense_segment(acc_i, acc_f, x_ptrs, w_ptrs, sx_ptr, sw_ptr, rm, rn, rh, m_ok, n_ok, k_begin, k_end, K,
                   stride_sx, stride_sw, ACT_GROUP: tl.constexpr, W_GROUP: tl.constexpr,
                   BLOCK_K: tl.constexpr, UNROLL: tl.constexpr, USE_ASM: tl.constexpr):
    """Base-only steps over [k_begin, k_end): a plain pipelined loop with no residual code in it."""
    for k_outer in range(k_begin, k_end, BLOCK_K * UNROLL):
        for j in tl.static_range(UNROLL):
            k0 = k_outer + j * BLOCK_K
            kh_ok = (k0 // 2 + rh) < (k_end // 2)
            xq = tl.load(x_ptrs + k0 // 2, mask=m_ok[:, None] & kh_ok[None, :], other=0)
            wq = tl.load(w_ptrs + k0 // 2, mask=kh_ok[:, None] & n_ok[None, :], other=0)
            x_lo, x_hi = unpack_lo_hi_x16(xq, USE_ASM)
            w_lo, w_hi = unpack_lo_hi_x16(wq, USE_ASM)
            acc_i, acc_f, sxg = _base_step(acc_i, acc_f, x_lo, x_hi, w_lo, w_hi, sx_ptr, sw_ptr, rm, rn, m_ok, n_ok,
                                           k0, k_end, stride_sx, stride_sw, ACT_GROUP, W_GROUP)
    return acc_i, acc_f


@triton.jit
def _fast_base_loop(acc_i, acc_f, xp_ptr, wp_ptr, sx_ptr, sw_ptr, rm_s, rn_s, K_HALF, stride_sx, stride_sw, t0, t1,
                    ACT_GROUP: tl.constexpr, W_GROUP: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                    USE_ASM: tl.constexpr):
    """The dense base over K tiles [t0, t1) exactly as `w4a4_gemm` walks K: BLOCK_K steps
    independent of the residual block width, rows clamped (rm_s = rm % M) instead of masked, both
    operands K-contiguous [rows, BLOCK_K/2] with the weight transposed in the dot, K masked only
    when BLOCK_K does not divide K. Nothing else lives in this loop."""
    BKH: tl.constexpr = BLOCK_K // 2
    offs_kh = tl.max_contiguous(tl.multiple_of(tl.arange(0, BKH), BKH), BKH)
    a_ptrs = xp_ptr + rm_s.to(tl.int64)[:, None] * K_HALF + (t0 * BKH + offs_kh)[None, :]
    w_ptrs = wp_ptr + rn_s.to(tl.int64)[:, None] * K_HALF + (t0 * BKH + offs_kh)[None, :]
    for t in range(t0, t1):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            kmask = (t * BKH + offs_kh) < K_HALF
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0)  # byte 0 = codes (0, 0)
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0)
        a_lo, a_hi = unpack_lo_hi_x16(a, USE_ASM)
        w_lo, w_hi = unpack_lo_hi_x16(w, USE_ASM)
        part = _x16_dot(a_lo, a_hi, w_lo, w_hi, None, True)
        if (ACT_GROUP != 0) or (W_GROUP != 0):
            # BLOCK_K divides the group sizes (checked): the step lies in one group.
            step = part.to(tl.float32) * INV256
            if ACT_GROUP != 0:
                step = step * tl.load(sx_ptr + rm_s * stride_sx + (t * BLOCK_K) // ACT_GROUP)[:, None]
            if W_GROUP != 0:
                step = step * tl.load(sw_ptr + rn_s * stride_sw + (t * BLOCK_K) // W_GROUP)[None, :]
            acc_f += step
        else:
            acc_i += part
        a_ptrs += BKH
        w_ptrs += BKH
    return acc_i, acc_f


@triton.jit
def _fold_base(acc_i, acc_f, sw_ptr, rn, n_ok, PER_STEP_SCALE: tl.constexpr, W_GROUP: tl.constexpr):
    """The base accumulator as fp32 with its per-channel weight scale (group scales are per step)."""
    if PER_STEP_SCALE:
        y = acc_f
    else:
        y = (acc_i >> 8).to(tl.float32)
    if W_GROUP == 0:
        y = y * tl.load(sw_ptr + rn, mask=n_ok, other=0.0)[None, :]
    return y


@triton.jit
def _res_tail_load(tt, t_end, xr_ptrs, rr_off, kblock_ptr, bids_ptr, rp_ptr, sr_ptr, slot, n_local, rhr, K_HALF,
                   R: tl.constexpr, RSTEPS: tl.constexpr, RES_BK: tl.constexpr, BN_RES: tl.constexpr,
                   BK_RES: tl.constexpr, GUARD: tl.constexpr):
    """Loads of tail step tt (kept block tt // RSTEPS, its RES_BK-deep part tt % RSTEPS): the X
    tile (re-read, clamped rows), the residual tile and its row scales. GUARD (the prefetch, which
    runs one step past the last): a step tt >= t_end loads zeros, an absent block."""
    e = tt // RSTEPS
    koff = (tt - e * RSTEPS) * RES_BK
    if GUARD:
        e = tl.where(tt < t_end, e, 0)  # entry 0 always exists (tile_lists keeps one dummy when none)
    k0 = tl.load(kblock_ptr + e) * BK_RES + koff
    kh_ok = (k0 // 2 + rhr) < K_HALF
    if GUARD:
        kh_ok = kh_ok & ((rhr * 0 + tt) < t_end)
    xq = tl.load(xr_ptrs + k0 // 2, mask=kh_ok[None, :], other=0)
    bid = tl.load(bids_ptr + e * R + slot)
    if GUARD:
        bid = tl.where((slot * 0 + tt) < t_end, bid, -1)
    have = bid >= 0
    # Blocks are zero past the matrix edge; only absent row-blocks are masked.
    rq = tl.load(rp_ptr + bid[None, :] * (BN_RES * (BK_RES // 2)) + koff // 2 + rr_off, mask=have[None, :], other=0)
    srow = tl.load(sr_ptr + bid * BN_RES + n_local, mask=have, other=0.0) * INV256
    return xq, rq, srow, k0


@triton.jit
def _res_tail_mma(res_i, res_f, xq, rq, srow, k0, sx_ptr, rm, rm_s, stride_sx, K, ACT_GROUP: tl.constexpr,
                  INT_DEBUG: tl.constexpr, USE_ASM: tl.constexpr):
    """The residual MMA of one tail step on tiles loaded by `_res_tail_load`."""
    x_lo, x_hi = unpack_lo_hi_x16(xq, USE_ASM)
    if ACT_GROUP != 0:
        sxg = tl.load(sx_ptr + rm_s * stride_sx + k0 // ACT_GROUP, mask=(rm * 0 + k0) < K, other=0.0)
    else:
        sxg = tl.zeros((1,), dtype=tl.float32)
    return _res_step(res_i, res_f, x_lo, x_hi, rq, srow, sxg, ACT_GROUP, INT_DEBUG, USE_ASM)


@triton.jit
def _res_tail(res_i, res_f, xp_ptr, sx_ptr, rp_ptr, sr_ptr, kblock_ptr, bids_ptr, rm, rm_s, slot, n_local,
              p, p_end, first, stride, K, K_HALF, stride_sx,
              ACT_GROUP: tl.constexpr, INT_DEBUG: tl.constexpr, USE_ASM: tl.constexpr, PREFETCH: tl.constexpr,
              R: tl.constexpr, RES_BK: tl.constexpr, BN_RES: tl.constexpr, BK_RES: tl.constexpr):
    """The tile's kept column-blocks after the base loop, RES_BK deep per step, steps
    first, first + stride, ... of the list; each step re-reads its X tile. PREFETCH loads step
    tt + stride before step tt's MMA, so the dependent loads of a short list overlap an MMA."""
    RHALF: tl.constexpr = RES_BK // 2
    RSTEPS: tl.constexpr = BK_RES // RES_BK
    rhr = tl.arange(0, RHALF)
    xr_ptrs = xp_ptr + rm_s.to(tl.int64)[:, None] * K_HALF + rhr[None, :]
    rr_off = n_local[None, :] * (BK_RES // 2) + rhr[:, None]
    t_begin = p * RSTEPS + first
    t_end = p_end * RSTEPS
    if PREFETCH:
        xq, rq, srow, k0 = _res_tail_load(t_begin, t_end, xr_ptrs, rr_off, kblock_ptr, bids_ptr, rp_ptr, sr_ptr,
                                          slot, n_local, rhr, K_HALF, R, RSTEPS, RES_BK, BN_RES, BK_RES, True)
        for tt in range(t_begin, t_end, stride):
            xq_n, rq_n, srow_n, k0_n = _res_tail_load(tt + stride, t_end, xr_ptrs, rr_off, kblock_ptr, bids_ptr,
                                                      rp_ptr, sr_ptr, slot, n_local, rhr, K_HALF, R, RSTEPS, RES_BK,
                                                      BN_RES, BK_RES, True)
            res_i, res_f = _res_tail_mma(res_i, res_f, xq, rq, srow, k0, sx_ptr, rm, rm_s, stride_sx, K, ACT_GROUP,
                                         INT_DEBUG, USE_ASM)
            xq, rq, srow, k0 = xq_n, rq_n, srow_n, k0_n
    else:
        for tt in range(t_begin, t_end, stride):
            xq, rq, srow, k0 = _res_tail_load(tt, t_end, xr_ptrs, rr_off, kblock_ptr, bids_ptr, rp_ptr, sr_ptr, slot,
                                              n_local, rhr, K_HALF, R, RSTEPS, RES_BK, BN_RES, BK_RES, False)
            res_i, res_f = _res_tail_mma(res_i, res_f, xq, rq, srow, k0, sx_ptr, rm, rm_s, stride_sx, K, ACT_GROUP,
                                         INT_DEBUG, USE_ASM)
    return res_i, res_f


@triton.jit
def _store_tile(y, res_i, acc_i, sx_ptr, out_ptr, out2_ptr, ws_ptr, cnt_ptr, pid, pid_k, rm, rn, m_ok, n_ok, M, N,
                SPLIT_K: tl.constexpr, ACT_GROUP: tl.constexpr, INT_DEBUG: tl.constexpr):
    """The epilogue: int32 base / residual sums (INT_DEBUG), or y times the per-token scale,
    stored directly or (SPLIT_K > 1) as a partial summed by the last arrival. Every partial is the
    full epilogue of its K range (all of it is linear), so the output is their sum."""
    o_off = rm[:, None] * N + rn[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    if INT_DEBUG:
        tl.store(out_ptr + o_off, acc_i >> 8, mask=o_mask)
        tl.store(out2_ptr + o_off, res_i, mask=o_mask)
    else:
        if ACT_GROUP == 0:
            y = y * tl.load(sx_ptr + rm, mask=m_ok, other=0.0)[:, None]
        if SPLIT_K > 1:
            is_last, total = splitk_reduce(y, ws_ptr, cnt_ptr, pid, pid_k, rm, rn, M, N, SPLIT_K)
            if is_last:
                tl.store(out_ptr + o_off, total.to(out_ptr.dtype.element_ty), mask=o_mask)
        else:
            tl.store(out_ptr + o_off, y.to(out_ptr.dtype.element_ty), mask=o_mask)


# --------------------------------------------------------------------------------------------
# The shipped variants
# --------------------------------------------------------------------------------------------


@triton.jit
def _mosaic_reslate_kernel(
    xp_ptr, sx_ptr, wp_ptr, sw_ptr, rp_ptr, sr_ptr, indptr_ptr, kblock_ptr, bids_ptr, out_ptr, out2_ptr,
    ws_ptr, cnt_ptr, M, N, K, K_HALF, stride_sx, stride_sw,
    ACT_GROUP: tl.constexpr, W_GROUP: tl.constexpr, HAS_RES: tl.constexpr, INT_DEBUG: tl.constexpr,
    EVEN_K: tl.constexpr, RES_BK: tl.constexpr, USE_ASM: tl.constexpr, BN_RES: tl.constexpr, BK_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid, pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm_s = rm % M
    rn_s = rn % N
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    res_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_i, acc_f = _fast_base_loop(acc_i, acc_f, xp_ptr, wp_ptr, sx_ptr, sw_ptr, rm_s, rn_s, K_HALF, stride_sx,
                                   stride_sw, 0, tl.cdiv(K_HALF, BLOCK_K // 2), ACT_GROUP, W_GROUP, BLOCK_K, EVEN_K,
                                   USE_ASM)
    # Fold the base to fp32 (its int32 accumulator dies here), then add the residual blocks into
    # the same registers: one [BLOCK_M, BLOCK_N] accumulator live at any time.
    y = _fold_base(acc_i, acc_f, sw_ptr, rn_s, n_ok, (ACT_GROUP != 0) or (W_GROUP != 0), W_GROUP)
    if HAS_RES:
        LIST_W: tl.constexpr = BLOCK_N if BLOCK_N > BN_RES else BN_RES
        p, p_end, slot, n_local = _tile_list(indptr_ptr, pid_n, rn, BLOCK_N, BN_RES, LIST_W)
        res_i, y = _res_tail(res_i, y, xp_ptr, sx_ptr, rp_ptr, sr_ptr, kblock_ptr, bids_ptr, rm, rm_s, slot, n_local,
                             p, p_end, 0, 1, K, K_HALF, stride_sx, ACT_GROUP, INT_DEBUG, USE_ASM, False,
                             LIST_W // BN_RES, RES_BK, BN_RES, BK_RES)
    _store_tile(y, res_i, acc_i, sx_ptr, out_ptr, out2_ptr, ws_ptr, cnt_ptr, pid, 0, rm, rn, m_ok, n_ok, M, N,
                1, ACT_GROUP, INT_DEBUG)


@triton.jit
def _mosaic_splitk_kernel(
    xp_ptr, sx_ptr, wp_ptr, sw_ptr, rp_ptr, sr_ptr, indptr_ptr, kblock_ptr, bids_ptr, out_ptr, out2_ptr,
    ws_ptr, cnt_ptr, M, N, K, K_HALF, stride_sx, stride_sw,
    ACT_GROUP: tl.constexpr, W_GROUP: tl.constexpr, HAS_RES: tl.constexpr, INT_DEBUG: tl.constexpr,
    EVEN_K: tl.constexpr, RES_BK: tl.constexpr, USE_ASM: tl.constexpr, BN_RES: tl.constexpr, BK_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid, pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm_s = rm % M
    rn_s = rn % N
    # This split's contiguous share of the BLOCK_K tiles, and every SPLIT_K-th tail step.
    k_tiles = tl.cdiv(K_HALF, BLOCK_K // 2)
    per_tiles = tl.cdiv(k_tiles, SPLIT_K)
    t0 = tl.minimum(pid_k * per_tiles, k_tiles)
    t1 = tl.minimum(t0 + per_tiles, k_tiles)
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    res_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_i, acc_f = _fast_base_loop(acc_i, acc_f, xp_ptr, wp_ptr, sx_ptr, sw_ptr, rm_s, rn_s, K_HALF, stride_sx,
                                   stride_sw, t0, t1, ACT_GROUP, W_GROUP, BLOCK_K, EVEN_K, USE_ASM)
    y = _fold_base(acc_i, acc_f, sw_ptr, rn_s, n_ok, (ACT_GROUP != 0) or (W_GROUP != 0), W_GROUP)
    if HAS_RES:
        LIST_W: tl.constexpr = BLOCK_N if BLOCK_N > BN_RES else BN_RES
        p, p_end, slot, n_local = _tile_list(indptr_ptr, pid_n, rn, BLOCK_N, BN_RES, LIST_W)
        res_i, y = _res_tail(res_i, y, xp_ptr, sx_ptr, rp_ptr, sr_ptr, kblock_ptr, bids_ptr, rm, rm_s, slot, n_local,
                             p, p_end, pid_k, SPLIT_K, K, K_HALF, stride_sx, ACT_GROUP, INT_DEBUG, USE_ASM, True,
                             LIST_W // BN_RES, RES_BK, BN_RES, BK_RES)
    _store_tile(y, res_i, acc_i, sx_ptr, out_ptr, out2_ptr, ws_ptr, cnt_ptr, pid, pid_k, rm, rn, m_ok, n_ok, M, N,
                SPLIT_K, ACT_GROUP, INT_DEBUG)


@triton.jit
def _mosaic_inloop_kernel(
    xp_ptr, sx_ptr, wp_ptr, sw_ptr, rp_ptr, sr_ptr, indptr_ptr, kblock_ptr, bids_ptr, out_ptr, out2_ptr,
    ws_ptr, cnt_ptr, M, N, K, K_HALF, stride_sx, stride_sw,
    ACT_GROUP: tl.constexpr, W_GROUP: tl.constexpr, HAS_RES: tl.constexpr, INT_DEBUG: tl.constexpr,
    USE_ASM: tl.constexpr, BN_RES: tl.constexpr, BK_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UNROLL: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid, pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    HALF: tl.constexpr = BLOCK_K // 2
    STEPS: tl.constexpr = BK_RES // BLOCK_K
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rh = tl.arange(0, HALF)
    m_ok = rm < M
    n_ok = rn < N
    x_ptrs = xp_ptr + rm[:, None] * K_HALF + rh[None, :]
    w_ptrs = wp_ptr + rn[None, :] * K_HALF + rh[:, None]  # [HALF, BLOCK_N]: the transposed B operand
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    res_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    res_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    # Program pid_k walks [k_begin, k_end), aligned to whole residual column-blocks so no block is
    # cut in two.
    per_split = tl.cdiv(tl.cdiv(K, BK_RES), SPLIT_K) * BK_RES
    k_begin = tl.minimum(pid_k * per_split, K)
    k_end = tl.minimum(k_begin + per_split, K)
    if HAS_RES:
        LIST_W: tl.constexpr = BLOCK_N if BLOCK_N > BN_RES else BN_RES
        R: tl.constexpr = LIST_W // BN_RES
        p, p_end, slot, n_local = _tile_list(indptr_ptr, pid_n, rn, BLOCK_N, BN_RES, LIST_W)
        r_off = n_local[None, :] * (BK_RES // 2) + rh[:, None]  # within one packed residual block
        k_lo = k_begin
        for e in range(p, p_end):
            kb0 = tl.load(kblock_ptr + e) * BK_RES
            if (kb0 >= k_begin) & (kb0 < k_end):  # this split's blocks only
                acc_i, acc_f = _dense_segment(acc_i, acc_f, x_ptrs, w_ptrs, sx_ptr, sw_ptr, rm, rn, rh, m_ok, n_ok,
                                              k_lo, kb0, K, stride_sx, stride_sw, ACT_GROUP, W_GROUP, BLOCK_K,
                                              UNROLL, USE_ASM)
                bid = tl.load(bids_ptr + e * R + slot)
                have = bid >= 0
                srow = tl.load(sr_ptr + bid * BN_RES + n_local, mask=have, other=0.0) * INV256
                for j in tl.static_range(STEPS):
                    k0 = kb0 + j * BLOCK_K
                    kh_ok = (k0 // 2 + rh) < K_HALF
                    xq = tl.load(x_ptrs + k0 // 2, mask=m_ok[:, None] & kh_ok[None, :], other=0)
                    wq = tl.load(w_ptrs + k0 // 2, mask=kh_ok[:, None] & n_ok[None, :], other=0)
                    # Blocks are zero past the matrix edge; only absent row-blocks are masked.
                    rq = tl.load(rp_ptr + bid[None, :] * (BN_RES * (BK_RES // 2)) + (j * HALF) + r_off,
                                 mask=have[None, :], other=0)
                    x_lo, x_hi = unpack_lo_hi_x16(xq, USE_ASM)
                    w_lo, w_hi = unpack_lo_hi_x16(wq, USE_ASM)
                    acc_i, acc_f, sxg = _base_step(acc_i, acc_f, x_lo, x_hi, w_lo, w_hi, sx_ptr, sw_ptr, rm, rn,
                                                   m_ok, n_ok, k0, K, stride_sx, stride_sw, ACT_GROUP, W_GROUP)
                    res_i, res_f = _res_step(res_i, res_f, x_lo, x_hi, rq, srow, sxg, ACT_GROUP, INT_DEBUG,
                                             USE_ASM)
                k_lo = kb0 + BK_RES
        acc_i, acc_f = _dense_segment(acc_i, acc_f, x_ptrs, w_ptrs, sx_ptr, sw_ptr, rm, rn, rh, m_ok, n_ok,
                                      k_lo, k_end, K, stride_sx, stride_sw, ACT_GROUP, W_GROUP, BLOCK_K, UNROLL,
                                      USE_ASM)
    else:
        acc_i, acc_f = _dense_segment(acc_i, acc_f, x_ptrs, w_ptrs, sx_ptr, sw_ptr, rm, rn, rh, m_ok, n_ok,
                                      k_begin, k_end, K, stride_sx, stride_sw, ACT_GROUP, W_GROUP, BLOCK_K, UNROLL,
                                      USE_ASM)
    y = _fold_base(acc_i, acc_f, sw_ptr, rn, n_ok, (ACT_GROUP != 0) or (W_GROUP != 0), W_GROUP) + res_f
    _store_tile(y, res_i, acc_i, sx_ptr, out_ptr, out2_ptr, ws_ptr, cnt_ptr, pid, pid_k, rm, rn, m_ok, n_ok, M, N,
                SPLIT_K, ACT_GROUP, INT_DEBUG)


@triton.jit
def _mosaic_residual_kernel(
    xp_ptr, sx_ptr, rp_ptr, sr_ptr, indptr_ptr, kblock_ptr, bids_ptr, out_ptr,
    M, N, K, stride_sx,
    ACT_GROUP: tl.constexpr, USE_ASM: tl.constexpr,
    BN_RES: tl.constexpr, BK_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Unfused baseline, second launch: out += sx * Σ_b Δr_b * (qx_b @ qr_b.T), re-reading X."""
    pid, pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    KH = K // 2
    HALF: tl.constexpr = BLOCK_K // 2
    STEPS: tl.constexpr = BK_RES // BLOCK_K
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rh = tl.arange(0, HALF)
    m_ok = rm < M
    n_ok = rn < N
    LIST_W: tl.constexpr = BLOCK_N if BLOCK_N > BN_RES else BN_RES
    R: tl.constexpr = LIST_W // BN_RES
    p0, p1, slot, n_local = _tile_list(indptr_ptr, pid_n, rn, BLOCK_N, BN_RES, LIST_W)
    if p1 > p0:
        res_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        r_off = n_local[None, :] * (BK_RES // 2) + rh[:, None]
        for t in range(p0 * STEPS, p1 * STEPS):
            p = t // STEPS
            koff = (t - p * STEPS) * BLOCK_K
            k0 = tl.load(kblock_ptr + p) * BK_RES + koff
            kh_ok = (k0 // 2 + rh) < KH
            xq = tl.load(xp_ptr + rm[:, None] * KH + k0 // 2 + rh[None, :],
                         mask=m_ok[:, None] & kh_ok[None, :], other=0)
            bid = tl.load(bids_ptr + p * R + slot)
            have = bid >= 0
            rq = tl.load(rp_ptr + bid[None, :] * (BN_RES * (BK_RES // 2)) + koff // 2 + r_off,
                         mask=have[None, :], other=0)
            x_lo, x_hi = unpack_lo_hi_x16(xq, USE_ASM)
            srow = tl.load(sr_ptr + bid * BN_RES + n_local, mask=have, other=0.0) * INV256
            if ACT_GROUP != 0:
                sxg = tl.load(sx_ptr + rm * stride_sx + k0 // ACT_GROUP, mask=m_ok & ((rm * 0 + k0) < K), other=0.0)
            else:
                sxg = tl.zeros((1,), dtype=tl.float32)
            res_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            res_i, res_f = _res_step(res_i, res_f, x_lo, x_hi, rq, srow, sxg, ACT_GROUP, False, USE_ASM)
        if ACT_GROUP == 0:
            res_f = res_f * tl.load(sx_ptr + rm, mask=m_ok, other=0.0)[:, None]
        o_ptrs = out_ptr + rm[:, None] * N + rn[None, :]
        o_mask = m_ok[:, None] & n_ok[None, :]
        y = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32) + res_f
        tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _list_start(indptr_ptr, kblock_ptr, pid_n, rn, rh, BLOCK_N: tl.constexpr, BN_RES: tl.constexpr,
                BK_RES: tl.constexpr):
    """The walk of a tile's residual list by kernels that test every K step against it: (first
    entry, end, each column's row-block slot, each column's row in its block, the first listed
    column-block (NO_BLOCK past the end), each column's offsets into a block's packed rows)."""
    LIST_W: tl.constexpr = BLOCK_N if BLOCK_N > BN_RES else BN_RES
    p, p_end, slot, n_local = _tile_list(indptr_ptr, pid_n, rn, BLOCK_N, BN_RES, LIST_W)
    next_cb = tl.load(kblock_ptr + p, mask=p < p_end, other=NO_BLOCK)
    return p, p_end, slot, n_local, next_cb, n_local[:, None] * (BK_RES // 2) + rh[None, :]


@triton.jit
def _list_block(k0, p, p_end, next_cb, slot, n_local, r_off, rp_ptr, sr_ptr, bids_ptr, kblock_ptr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BN_RES: tl.constexpr, BK_RES: tl.constexpr):
    """At a K step inside the list's next column-block: (the step's packed residual codes
    [BLOCK_N, BLOCK_K/2] (0 in row-blocks that keep none), their row scales, and the walk
    advanced past the block at its last step)."""
    R: tl.constexpr = (BLOCK_N if BLOCK_N > BN_RES else BN_RES) // BN_RES
    koff = k0 % BK_RES
    bid = tl.load(bids_ptr + p * R + slot)
    have = bid >= 0
    rq = tl.load(rp_ptr + bid[:, None] * (BN_RES * (BK_RES // 2)) + koff // 2 + r_off, mask=have[:, None], other=0)
    srow = tl.load(sr_ptr + bid * BN_RES + n_local, mask=have, other=0.0)
    if koff + BLOCK_K == BK_RES:
        p += 1
        next_cb = tl.load(kblock_ptr + p, mask=p < p_end, other=NO_BLOCK)
    return rq, srow, p, next_cb


@triton.jit
def _dot_operand(v, COMPILED: tl.constexpr):
    # Triton 3.9's interpreter gets int8 -> bfloat16 casts and bfloat16 dots wrong (garbage
    # values); there both operands go through float32, which is exact for these operands
    # (bf16/fp16 activations, int4 codes) and accumulates in fp32 like the compiled dot.
    if COMPILED:
        return v
    else:
        return v.to(tl.float32)


@triton.jit
def _mosaic_w4a16_kernel(
    x_ptr, wp_ptr, sw_ptr, rp_ptr, sr_ptr, indptr_ptr, kblock_ptr, bids_ptr, out_ptr,
    M, N, K, stride_xm, stride_sw,
    W_GROUP: tl.constexpr, COMPILED: tl.constexpr,
    BN_RES: tl.constexpr, BK_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UNROLL: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """W4A16 ZipperEngine: float activations; each K step tests whether its column-block is the
    next entry of the tile's list. X is loaded in natural order; the weight nibbles are rebuilt in
    natural order (`int4.unpack_interleaved`) and converted to X's dtype (codes are exact there)."""
    pid, pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    KH = K // 2
    HALF: tl.constexpr = BLOCK_K // 2
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rh = tl.arange(0, HALF)
    m_ok = rm < M
    n_ok = rn < N
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    w_ptrs = wp_ptr + rn[:, None] * KH + rh[None, :]  # [BLOCK_N, HALF]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    res = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    p, p_end, slot, n_local, next_cb, r_off = _list_start(indptr_ptr, kblock_ptr, pid_n, rn, rh, BLOCK_N, BN_RES,
                                                          BK_RES)
    for k_outer in range(0, K, BLOCK_K * UNROLL):
        for j in tl.static_range(UNROLL):
            k0 = k_outer + j * BLOCK_K
            x = _dot_operand(tl.load(x_ptrs + k0, mask=m_ok[:, None] & ((k0 + rk) < K)[None, :], other=0.0), COMPILED)
            kh_ok = (k0 // 2 + rh) < KH
            wq = tl.load(w_ptrs + k0 // 2, mask=n_ok[:, None] & kh_ok[None, :], other=0)
            w = tl.trans(unpack_interleaved(wq, BLOCK_N, BLOCK_K).to(x.dtype))
            if W_GROUP != 0:
                # Unrolled steps may lie past K: their group index has no scale (an unmasked load
                # reads past the tensor, and garbage * 0 can be NaN).
                swg = tl.load(sw_ptr + rn * stride_sw + k0 // W_GROUP, mask=n_ok & ((rn * 0 + k0) < K), other=0.0)
                acc += tl.dot(x, w) * swg[None, :]
            else:
                acc = tl.dot(x, w, acc)
            if k0 // BK_RES == next_cb:
                rq, srow, p, next_cb = _list_block(k0, p, p_end, next_cb, slot, n_local, r_off, rp_ptr, sr_ptr,
                                                   bids_ptr, kblock_ptr, BLOCK_N, BLOCK_K, BN_RES, BK_RES)
                r = tl.trans(unpack_interleaved(rq, BLOCK_N, BLOCK_K).to(x.dtype))
                res += tl.dot(x, r) * srow[None, :]
    if W_GROUP == 0:
        sw = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
        acc = acc * sw[None, :]
    y = acc + res
    o_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _times_row_scales(tile, s_ptr, rows, ok, stride_s, k0, fixed, GROUP: tl.constexpr, DT: tl.constexpr):
    """A [rows, BLOCK_K] code tile times its rows' scales in DT: `fixed` (one per row, GROUP 0) or
    the step's group's (BLOCK_K divides GROUP: the whole step lies in group k0 // GROUP)."""
    if GROUP != 0:
        return tile * tl.load(s_ptr + rows * stride_s + k0 // GROUP, mask=ok, other=0.0).to(DT)[:, None]
    else:
        return tile * fixed[:, None]


# M is a plain runtime int, as in the W4A4 GEMMs.
@triton.jit(do_not_specialize=["M"])
def _mosaic_dequant_kernel(
    x_desc, w_desc, sx_ptr, sw_ptr, rp_ptr, sr_ptr, indptr_ptr, kblock_ptr, bids_ptr, out_ptr,
    M, N, K, stride_sx, stride_sw,
    ACT_GROUP: tl.constexpr, W_GROUP: tl.constexpr, HAS_RES: tl.constexpr, DOT_F32: tl.constexpr,
    USE_ASM: tl.constexpr, BN_RES: tl.constexpr, BK_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The W4A4 product in bf16 on the 16-bit tensor cores: each K step's activation codes times
    their group scales, and the base codes times theirs plus the step's residual block (when the
    tile's list holds one) times its row scales, are formed in bf16 in registers (the codes by the
    magic-number unpack, no conversion instruction), and ONE bf16 MMA per step accumulates in fp32:
    the residual costs a masked load and an FMA per weight, no second MMA, and no int32 partial is
    rescaled on the CUDA cores. The weights are the MMA's register operand ([BLOCK_N, BLOCK_K]).
    Activations [M, K/2] and base weights [N, K/2] come through TMA descriptors (zero-filled past
    M, N and K); the residual blocks through the tile's block list, as in the W4A16 kernel."""
    off_m, off_n, rm, rn = tile_origin(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_n = off_n // BLOCK_N
    m_ok = rm < M
    n_ok = rn < N
    HALF: tl.constexpr = BLOCK_K // 2
    rh = tl.arange(0, HALF)
    DT: tl.constexpr = tl.float32 if DOT_F32 else tl.bfloat16
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # Per-row scales (per token, per channel) are loaded once. The per-token ones go into the
    # activation tile too: every step's operand is then a product in registers (Triton 3.6 failed to
    # lay out the bare unpacked tile as a TMA-fed operand).
    sx_m = tl.load(sx_ptr + rm, mask=m_ok & (ACT_GROUP == 0), other=0.0).to(DT)
    sw_n = tl.load(sw_ptr + rn, mask=n_ok & (W_GROUP == 0), other=0.0).to(DT)
    if HAS_RES:
        p, p_end, slot, n_local, next_cb, r_off = _list_start(indptr_ptr, kblock_ptr, pid_n, rn, rh, BLOCK_N,
                                                              BN_RES, BK_RES)
    for t in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = t * BLOCK_K
        x_lo, x_hi = unpack_lo_hi_float(x_desc.load([off_m, t * HALF]), DT, USE_ASM)
        x = _natural(x_lo, x_hi)  # [BLOCK_M, BLOCK_K] codes
        x = _times_row_scales(x, sx_ptr, rm, m_ok, stride_sx, k0, sx_m, ACT_GROUP, DT)
        w_lo, w_hi = unpack_lo_hi_float(w_desc.load([off_n, t * HALF]), DT, USE_ASM)
        w = _times_row_scales(_natural(w_lo, w_hi), sw_ptr, rn, n_ok, stride_sw, k0, sw_n, W_GROUP, DT)
        if HAS_RES:
            if k0 // BK_RES == next_cb:
                rq, srow, p, next_cb = _list_block(k0, p, p_end, next_cb, slot, n_local, r_off, rp_ptr, sr_ptr,
                                                   bids_ptr, kblock_ptr, BLOCK_N, BLOCK_K, BN_RES, BK_RES)
                r_lo, r_hi = unpack_lo_hi_float(rq, DT, USE_ASM)
                w = w + _natural(r_lo, r_hi) * srow.to(DT)[:, None]
        acc = tl.dot(w, tl.trans(x), acc)
    y = tl.trans(acc)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], y.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

# The shipped variants (module docstring); the first two step their base loop independently of bk
# (the fast base loop), inloop steps inside the residual blocks (BLOCK_K divides bk).
VARIANTS = {"reslate": _mosaic_reslate_kernel, "splitk": _mosaic_splitk_kernel, "inloop": _mosaic_inloop_kernel,
            "dequant": _mosaic_dequant_kernel}
_WIDE_K = ("reslate", "splitk")


def _table_config(m, weights, act_group_size, family):
    """The launch table's config for M, with its tiles fitted to these weights and groups. A W4A4
    product with activation or base-weight groups reads the table's `w4a4_group` section (tuned
    with groups, whose shallow K steps want other tiles and stages), a per-token one `w4a4`."""
    if family == "w4a4" and (act_group_size is not None or weights.group_size is not None):
        family = "w4a4_group"
    return _fit(launch_config("mosaic", family, m, weights.device), weights, act_group_size)


def _fit(cfg, weights, act_group_size):
    """A table config's tiles fitted to these weights' blocks and these groups."""
    bn, bk = weights.block
    if bn % cfg["BLOCK_N"] and cfg["BLOCK_N"] % bn:  # a tile neither inside one row-block nor whole ones
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], bn)
    if cfg.get("variant") not in _WIDE_K:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], bk)
    for g in (act_group_size, weights.group_size):  # one scale per K step: BLOCK_K divides the group
        while g is not None and g % cfg["BLOCK_K"] and cfg["BLOCK_K"] > limits.MOSAIC_GROUP_MULTIPLE:
            cfg["BLOCK_K"] //= 2
    return cfg


def _check_config(cfg, weights, act_group_size, wide_k, min_k):
    """min_k: the shallowest K step the variant's dot compiles (int8: 32; fp16: 16)."""
    bn, bk = weights.block
    bm, bnt, bkt = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    for name, v in (("BLOCK_M", bm), ("BLOCK_N", bnt), ("BLOCK_K", bkt)):
        if v & (v - 1) or v < 2:
            raise ValueError(f"{name}={v} must be a power of two")
    if bkt < min_k:
        raise ValueError(f"BLOCK_K={bkt} must be >= {min_k} (the shallowest dot the kernel compiles)")
    if bn % bnt and bnt % bn:
        raise ValueError(f"BLOCK_N={bnt} must divide the residual block's bn={bn} or be a multiple of it")
    if bkt > bk and wide_k:
        # The fast base loop ignores the blocks; its residual tail steps bk deep (a power of two).
        if bk & (bk - 1):
            raise ValueError(f"BLOCK_K={bkt} > bk={bk} needs a power-of-two bk (residual steps of bk)")
    elif bk % bkt:
        raise ValueError(f"BLOCK_K={bkt} must divide the residual block's bk={bk}")
    for name, g in (("act_group_size", act_group_size), ("weights.group_size", weights.group_size)):
        if g is not None and g % bkt:
            raise ValueError(f"{name}={g} must be a multiple of BLOCK_K={bkt} (one scale per K step)")


def _check_weights(weights):
    if not isinstance(weights, MosaicBlocks):
        raise ValueError(f"weights must be a layouts.MosaicBlocks, got {type(weights).__name__}")


def _check_offsets(m, weights, x_elems_per_row):
    """The kernels index with int32: every buffer they address must stay below 2**31 elements."""
    n, k = weights.shape
    for name, size in (("M * N (output)", m * n), ("M * K (activations)", m * x_elems_per_row),
                       ("residual blocks", weights.res_packed.numel())):
        if size >= 2**31:
            raise ValueError(f"{name} = {size} elements exceeds the kernels' int32 offsets; split M")


def _check_w4a4_call(qx_packed, act_scale, weights, act_group_size):
    """Zero tokens (M = 0) are valid here and give an empty output."""
    _check_weights(weights)
    n, k = weights.shape
    check_packed("qx_packed", qx_packed, allow_empty_rows=True)
    if qx_packed.shape[1] != k // 2:
        raise ValueError(f"qx_packed must be [M, {k // 2}] for K={k}, got {tuple(qx_packed.shape)}")
    check_same_device("qx_packed", qx_packed, weights.device, "weights")
    limits.check_k(k, "weights: K")
    limits.check_mosaic_groups(act_group_size, weights.group_size, weight_name="weights.group_size")
    m = qx_packed.shape[0]
    if act_scale is not None:
        want = (m,) if act_group_size is None else (m, -(-k // act_group_size))
        check_scale("act_scale", act_scale, want, weights.device)
    _check_offsets(m, weights, k // 2)
    return m, None if act_group_size is None else int(act_group_size)


def dequant_takes(qx_packed, weights):
    """True when the dequant variant's TMA descriptors take these operands: K a multiple of 32
    (K/2 bytes a row, 16-byte aligned) and 16-byte aligned bases."""
    return (weights.shape[1] % 32 == 0 and qx_packed.data_ptr() % 16 == 0
            and weights.qb_packed.data_ptr() % 16 == 0)


def _launch_dequant(cfg, qx_packed, sx, weights, act_group_size, out, has_res):
    n, k = weights.shape
    m = qx_packed.shape[0]
    bn, bk = weights.block
    if not dequant_takes(qx_packed, weights):
        raise ValueError(f"the dequant variant needs K a multiple of 32 and 16-byte aligned operands, got K={k} "
                         "(a launch-table bucket naming dequant sends such operands to its no_tma config)")
    bm, bnt, bkt = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    sw = weights.scale_base
    _mosaic_dequant_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bnt),)](
        TensorDescriptor.from_tensor(qx_packed, [bm, bkt // 2]), TensorDescriptor.from_tensor(weights.qb_packed,
                                                                                             [bnt, bkt // 2]),
        sx, sw, weights.res_packed, weights.scale_res, *weights.tile_lists(max(bnt, bn)), out,
        m, n, k, sx.stride(0), sw.stride(0),
        ACT_GROUP=act_group_size or 0, W_GROUP=weights.group_size or 0, HAS_RES=has_res,
        DOT_F32=interpreting(), USE_ASM=use_asm(weights.device), BN_RES=bn, BK_RES=bk,
        BLOCK_M=bm, BLOCK_N=bnt, BLOCK_K=bkt, GROUP_M=cfg.get("GROUP_M", 8),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))


def _launch(qx_packed, act_scale, weights, act_group_size, out, out2, has_res, int_debug, config):
    """The dispatcher: the launch table's config for this M names the variant (module docstring)."""
    n, k = weights.shape
    m = qx_packed.shape[0]
    bn, bk = weights.block
    cfg = dict(config) if config is not None else _table_config(m, weights, act_group_size, "w4a4")
    variant, cfg = tma_or_fallback(cfg, dequant_takes(qx_packed, weights), ("dequant",))
    if config is None:
        cfg = _fit(cfg, weights, act_group_size)  # a no_tma config, fitted as the bucket's was
    if variant not in VARIANTS:
        raise ValueError(f"config variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    if variant == "dequant":
        if int_debug:
            raise ValueError("the dequant variant computes in bf16: mosaic_w4a4_gemm_int32 needs a config of an "
                             "integer variant (reslate, splitk, inloop)")
        _check_config(cfg, weights, act_group_size, False, 32)
        sx = act_scale if act_scale is not None else torch.zeros(max(m, 1), dtype=torch.float32, device=weights.device)
        _launch_dequant(cfg, qx_packed, sx, weights, act_group_size, out, has_res)
        return dict(cfg, variant=variant)
    _check_config(cfg, weights, act_group_size, variant in _WIDE_K, 32)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    split = 1
    if variant == "splitk":
        split = choose_split_k(cfg, tiles, triton.cdiv(k, cfg["BLOCK_K"]), weights.device)
    elif variant == "inloop":
        split = choose_split_k(cfg, tiles, triton.cdiv(k, bk), weights.device)
    if int_debug:
        split = 1  # the debug entry point checks one unsplit walk of K
    if split * m * n >= 2**31:
        raise ValueError(f"SPLIT_K={split} partials of [{m}, {n}] exceed int32 offsets")
    ws, cnt = splitk_workspace(weights.device, torch.float32, split * m * n, tiles) if split > 1 else (out, out)
    sx = act_scale if act_scale is not None else torch.zeros(max(m, 1), dtype=torch.float32, device=weights.device)
    sw = weights.scale_base
    meta = dict(ACT_GROUP=act_group_size or 0, W_GROUP=weights.group_size or 0, HAS_RES=has_res, INT_DEBUG=int_debug,
                USE_ASM=use_asm(weights.device), BN_RES=bn, BK_RES=bk, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg.get("GROUP_M", 8),
                num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
    if variant in _WIDE_K:
        meta.update(EVEN_K=k % cfg["BLOCK_K"] == 0, RES_BK=min(cfg["BLOCK_K"], bk))
    else:
        meta.update(UNROLL=cfg.get("UNROLL", 1))
    if variant != "reslate":
        meta.update(SPLIT_K=split)
    VARIANTS[variant][(tiles, split)](
        qx_packed, sx, weights.qb_packed, sw, weights.res_packed, weights.scale_res,
        *weights.tile_lists(max(cfg["BLOCK_N"], bn)), out, out2, ws, cnt,
        m, n, k, k // 2, sx.stride(0), sw.stride(0), **meta)
    return dict(cfg, variant=variant)


def mosaic_w4a4_gemm(qx_packed, act_scale, weights, act_group_size=None, out_dtype=torch.float16, *, out=None,
                     config=None, check_finite=True):
    """ZipperEngine: `Y = sx * (Δb * (qx @ qb.T) + Σ_b Δr_b * (qx_b @ qr_b.T))` in ONE launch.

    qx_packed uint8 [M, K/2], act_scale float32 [M] (or [M, ceil(K/g)] with act_group_size g),
    weights a `layouts.MosaicBlocks`; returns out_dtype [M, N] (written into `out` when given).
    `config` (tests and tuning) replaces the launch table's entry: "variant" and its tiles.
    check_finite: refuse NaN / Inf activation scales (the weights' were checked when the layout was
    built); False on the layers' per-token path.
    """
    m, act_group_size = _check_w4a4_call(qx_packed, act_scale, weights, act_group_size)
    check_out_dtype(out_dtype)
    if check_finite:
        refuse_non_finite(act_scale=act_scale)
    out = check_out(out, (m, weights.shape[0]), out_dtype, weights.device)
    if m:
        _launch(qx_packed, act_scale, weights, act_group_size, out, out, True, False, config)
    return out


def mosaic_w4a4_gemm_int32(qx_packed, weights, *, out=None, config=None):
    """Debug entry point of the same fused kernels: `(qx @ qb.T, Σ_b qx_b @ qr_b.T)` as two int32
    [M, N] tensors, no scales, one unsplit walk of K, so a test checks the accumulators exactly."""
    m, _ = _check_w4a4_call(qx_packed, None, weights, None)
    if weights.group_size is not None:
        raise ValueError("mosaic_w4a4_gemm_int32 needs per-channel base scales (weights.group_size None)")
    n = weights.shape[0]
    if out is not None and (not isinstance(out, (tuple, list)) or len(out) != 2):
        raise ValueError("out must be a pair (base, res) of int32 [M, N] tensors")
    base = check_out(None if out is None else out[0], (m, n), torch.int32, weights.device, "out[0]")
    res = check_out(None if out is None else out[1], (m, n), torch.int32, weights.device, "out[1]")
    if m:
        _launch(qx_packed, None, weights, None, base, res, True, True, config)
    return base, res


def mosaic_w4a4_gemm_unfused(qx_packed, act_scale, weights, act_group_size=None, out_dtype=torch.float16, *,
                             out=None, config=None, check_finite=True):
    """The baseline ZipperEngine replaces: the same variant's dense base (residual compiled out),
    then a second launch that re-reads X for every kept block and adds the residual into Y."""
    m, act_group_size = _check_w4a4_call(qx_packed, act_scale, weights, act_group_size)
    check_out_dtype(out_dtype)
    if check_finite:
        refuse_non_finite(act_scale=act_scale)
    n, k = weights.shape
    out = check_out(out, (m, n), out_dtype, weights.device)
    if m == 0:
        return out
    cfg = _launch(qx_packed, act_scale, weights, act_group_size, out, out, False, False, config)
    if weights.n_blocks:
        bn, bk = weights.block
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _mosaic_residual_kernel[grid](
            qx_packed, act_scale, weights.res_packed, weights.scale_res, *weights.tile_lists(max(cfg["BLOCK_N"], bn)),
            out, m, n, k, act_scale.stride(0),
            ACT_GROUP=act_group_size or 0, USE_ASM=use_asm(weights.device), BN_RES=bn, BK_RES=bk,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=min(cfg["BLOCK_K"], bk),
            GROUP_M=cfg.get("GROUP_M", 8), num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
        )
    return out


def mosaic_w4a16_gemm(x, weights, out_dtype=None, *, out=None, config=None, check_finite=True):
    """W4A16 ZipperEngine: `Y = X @ (Δb * qb + Σ_b Δr_b * qr_b).T` with fp16/bf16 activations
    [M, K]; output dtype defaults to x's. `config`: tiles (BLOCK_M, BLOCK_N, BLOCK_K dividing bk,
    UNROLL, GROUP_M, num_warps, num_stages) replacing the launch table's."""
    _check_weights(weights)
    n, k = weights.shape
    check_float_acts("x", x, k, allow_empty_rows=True)
    check_same_device("x", x, weights.device, "weights")
    limits.check_mosaic_groups(None, weights.group_size, weight_name="weights.group_size")
    _check_offsets(x.shape[0], weights, x.stride(0))
    if check_finite:
        refuse_non_finite(x=x)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    check_out_dtype(out_dtype)
    m = x.shape[0]
    out = check_out(out, (m, n), out_dtype, weights.device)
    if m == 0:
        return out
    bn, bk = weights.block
    cfg = dict(config) if config is not None else _table_config(m, weights, None, "w4a16")
    cfg.pop("variant", None)
    _check_config(cfg, weights, None, False, 16)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    sw = weights.scale_base
    _mosaic_w4a16_kernel[grid](
        x, weights.qb_packed, sw, weights.res_packed, weights.scale_res, *weights.tile_lists(max(cfg["BLOCK_N"], bn)),
        out, m, n, k, x.stride(0), sw.stride(0),
        W_GROUP=weights.group_size or 0, COMPILED=not interpreting(), BN_RES=bn, BK_RES=bk,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], UNROLL=cfg.get("UNROLL", 1),
        GROUP_M=cfg.get("GROUP_M", 8), num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
    )
    return out
