"""W4A4 GEMM: int4 activation codes x packed int4 weights, int8 tensor cores, int32 accumulate.

    Y[M, N] = act_scale x w_scale x (qx @ qw.T)                    (per-token activation scales)
    Y[M, N] = w_scale x sum_g act_scale[:, g] x (qx_g @ qw_g.T)    (act_group_size = g)

The activation codes come in one of two layouts, told apart by their dtype (the quantizer's
`layout=`, chosen per M by the launch table's `act_layout`):
- uint8 [M, K/2]: packed, two codes per byte, like the weights;
- int8 [M, K]: one code -8..7 per byte; the tile goes to the MMA as loaded, no unpack (the
  activations are made per call, so their extra bytes are cheap; on Hopper the activation unpack
  cost about 18 % of the packed path's time at M = 4096, DESIGN.md "Leads").
Hopper has no INT4 MMA: each program loads packed bytes, unpacks the nibbles to int8 in registers
(`int4.unpack_lo_hi_x16`: each nibble moved to the top of its byte, int8 value 16 * code, one
32-bit AND or shift+AND per four bytes) and feeds an int8 `tl.dot` (wgmma) with int32
accumulation. Each unpacked operand carries a factor 16: the dot is 256x the code product with
packed activations, 16x with int8 ones, and the epilogue takes it back exactly (a shift of an
int32 that is a multiple of it, or a power-of-two fp32 factor). Two K orders, both exact: PLANES
(dot the even-element and odd-element planes separately; no shuffle of the weights, the int8
activation tile split into its even and odd elements in registers; needs BLOCK_K >= 64) or natural
order (the unpacked planes joined + reshaped). With per-group activation scales the int32
partial of each K tile is rescaled into an fp32 accumulator; BLOCK_K divides the group (the
launcher clamps it), so every K tile lies inside one group. The weight scale is per output channel.

Variants (the launch table, `configs.py`, names one per M bucket):
- `splitk` (small M, decode): too few output tiles to fill the SMs, so K is split over SPLIT_K
  programs and the last to arrive reduces (`tiling.splitk_reduce`: one launch, deterministic,
  exact in int32 for per-token scales). SWAP_AB computes the tile transposed, weights on the MMA's
  M side (>= 64 rows) and the few tokens on its N side.
- `gemm` (large M): one program per [BLOCK_M, BLOCK_N] tile in grouped order for L2 reuse.
- `tma` (large M): the `gemm` tiling with both operands loaded by the copy engine through TMA
  tensor descriptors (`[BLOCK_M, BLOCK_K]` boxes of int8 activation codes, `[BLOCK_N, BLOCK_K/2]`
  boxes of packed weights), no address arithmetic or load masks in the K loop (boxes past the
  tensor are zero-filled). Takes int8 activations only, K a multiple of 32 and 16-byte aligned
  operands (a descriptor's base and row stride); on the H200 at M = 4096 it ran 1.35-1.45x the
  `gemm` variant (reports/results/h200/probe_tma_m4096.json). A launch-table bucket that names
  tma also names, under `"no_tma"`, the config for the operands a descriptor cannot take at its
  M: packed activation codes, K not a multiple of 32, rows not 16-byte aligned (the best
  packed-code candidate of the same tune, a pointer-load variant that takes either code layout),
  so `w4a4_gemm` takes every operand it accepts at every M. An explicit tma `config=` without
  one refuses them.
- `gemv` (M of 1 to a few): no MMA. An MMA tile is at least 16 tokens deep, so at M = 1 it
  computes 15 rows of padding and moves the weights through shared memory; here each program
  streams its weight rows as int32 words (eight codes), unpacks them x16 with two 32-bit ops and
  multiplies on the CUDA cores with dp4a (four int8 products per instruction) against the
  activation words, unpacked the same way (int8 codes: their even and odd bytes permuted into
  words, `int4.even_odd_bytes`). K is split as in `splitk`, with the same reduction. Rows that
  are not 4-byte aligned (K not a multiple of 8, or an offset pointer) are loaded as bytes and
  assembled into the same words.

The layers' entry point is `w4a4_linear` (float activations in): the launch table's bucket for M
says how, by its `act_layout`: quantize into "int4" or "int8" codes then `w4a4_gemm`, or, in a
gemv bucket, "fused": `w4a4_gemv_quant`, the gemv kernel with the activation quantizer in its
prologue (one launch instead of two; at M = 1 the quantizer's own launch is a single program per
token, latency-bound). Each of its programs takes the row's absmax itself (the whole row, from
L2 after the first program) and quantizes the channels of its own K tiles with the quantizer's
float32 arithmetic (`actquant.codes_of`), so codes and scales are the quantizer's bit for bit.

Requirements (ValueError otherwise): activations uint8 packed [M, K/2] or int8 codes [M, K],
weights uint8 packed [N, K/2], contiguous, on one device (CUDA, or the CPU under
TRITON_INTERPRET=1); float32 scales of the documented shapes; act_group_size in
`limits.ACT_GROUPS`; K <= `limits.MAX_K`. M, N, K need not be tile multiples. Int8 codes outside
-8..7 are not checked (one pass over the tensor per call); they are what the quantizer writes.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

from zqkernels.gpu import limits
from zqkernels.gpu.actquant import codes_of, max_nan, recip_of, scale_of
from zqkernels.gpu.configs import launch_config, table_for, tma_or_fallback, use_asm, use_pdl
from zqkernels.gpu.int4 import (
    dp4a, even_odd_bytes, load_words, split8, unpack_lo_hi_x16, unpack_words_x16, word_products,
    words_aligned,
)
from zqkernels.gpu.operands import (
    check_float_x_packed_w, check_int8_codes, check_out, check_out_dtype, check_packed, check_same_device, check_scale,
    refuse_non_finite,
)
from zqkernels.gpu.tiling import choose_split_k, gemv_tile, splitk_reduce, splitk_workspace, tile_ids, tile_origin

ACT_LAYOUTS = ("int4", "int8")  # the quantizer's `layout`: the activation codes a launch takes
# The `act_layout` a launch-table bucket may name: one of those, or "fused" (a gemv bucket only):
# the layer calls `w4a4_gemv_quant`, which quantizes inside the GEMV, instead of quantizer + GEMM.
TABLE_ACT_LAYOUTS = ACT_LAYOUTS + ("fused",)


@triton.jit
def _w4a4_k_loop(qx_ptr, qw_ptr, sx_ptr, rm, rn, KH, stride_xm, stride_wn, stride_sxm, t0, t1,
                 ACT_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PLANES: tl.constexpr, EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr, A_INT8: tl.constexpr,
                 USE_ASM: tl.constexpr):
    """K tiles [t0, t1) of one output tile: int32 (per-token) or fp32 (group-rescaled) accumulator,
    [BLOCK_M, BLOCK_N] ([BLOCK_N, BLOCK_M] with SWAP_AB). Rows rm / rn are clamped by the caller.
    A_INT8: activation bytes are int8 codes (BLOCK_K bytes per tile row), else packed (BLOCK_K / 2)."""
    BKH: tl.constexpr = BLOCK_K // 2
    BKA: tl.constexpr = BLOCK_K if A_INT8 else BKH  # activation bytes per K tile and row
    offs_kh = tl.max_contiguous(tl.multiple_of(tl.arange(0, BKH), BKH), BKH)
    offs_ka = tl.max_contiguous(tl.multiple_of(tl.arange(0, BKA), BKA), BKA)
    a_ptrs = qx_ptr + rm.to(tl.int64)[:, None] * stride_xm + (t0 * BKA + offs_ka)[None, :]
    w_ptrs = qw_ptr + rn.to(tl.int64)[:, None] * stride_wn + (t0 * BKH + offs_kh)[None, :]
    if SWAP_AB:
        acc_i = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
        acc_f = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t0, t1):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            kmask = (t * BKH + offs_kh) < KH
            amask = (t * BKA + offs_ka) < KH * (BKA // BKH)  # the row's bytes: K int8 codes or K/2 packed
            a = tl.load(a_ptrs, mask=amask[None, :], other=0)  # 0 = code 0 (packed: codes (0, 0))
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0)
        w_lo, w_hi = unpack_lo_hi_x16(w, USE_ASM)
        if A_INT8:
            if PLANES:  # even / odd elements, to meet the weights' planes
                a_lo, a_hi = tl.split(tl.reshape(a, (BLOCK_M, BKH, 2)))
            else:
                a8 = a
        else:
            a_lo, a_hi = unpack_lo_hi_x16(a, USE_ASM)
            if not PLANES:
                a8 = tl.reshape(tl.join(a_lo, a_hi), (BLOCK_M, BLOCK_K))
        if PLANES:
            if SWAP_AB:
                part = tl.dot(w_lo, tl.trans(a_lo), out_dtype=tl.int32)
                part = tl.dot(w_hi, tl.trans(a_hi), part, out_dtype=tl.int32)
            else:
                part = tl.dot(a_lo, tl.trans(w_lo), out_dtype=tl.int32)
                part = tl.dot(a_hi, tl.trans(w_hi), part, out_dtype=tl.int32)
        else:
            w8 = tl.reshape(tl.join(w_lo, w_hi), (BLOCK_N, BLOCK_K))
            if SWAP_AB:
                part = tl.dot(w8, tl.trans(a8), out_dtype=tl.int32)
            else:
                part = tl.dot(a8, tl.trans(w8), out_dtype=tl.int32)
        if ACT_GROUP == 0:
            acc_i += part
        else:
            # BLOCK_K divides ACT_GROUP: this whole tile lies in group (t * BLOCK_K) // ACT_GROUP.
            sa = tl.load(sx_ptr + rm * stride_sxm + (t * BLOCK_K) // ACT_GROUP)
            if SWAP_AB:
                acc_f += part.to(tl.float32) * sa[None, :]
            else:
                acc_f += part.to(tl.float32) * sa[:, None]
        a_ptrs += BKA
        w_ptrs += BKH
    if ACT_GROUP == 0:
        acc = acc_i
    else:
        acc = acc_f
    if SWAP_AB:
        acc = tl.trans(acc)
    return acc


@triton.jit
def _code_product(total, A_INT8: tl.constexpr):
    """The int32 dot of x16-unpacked operands back to the code product, exactly: every partial sum
    is a multiple of 256 (both operands unpacked) or of 16 (int8 activations, weights unpacked)."""
    if A_INT8:
        return total >> 4
    else:
        return total >> 8


@triton.jit
def _w4a4_epilogue(total, sx_ptr, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om,
                   ACT_GROUP: tl.constexpr, OUT_INT32: tl.constexpr, A_INT8: tl.constexpr):
    if ACT_GROUP == 0 and not OUT_INT32:
        sa = tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)
    else:
        sa = None
    _w4a4_store(total, sa, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, ACT_GROUP, OUT_INT32, A_INT8)


@triton.jit
def _w4a4_store(total, sa, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om,
                ACT_GROUP: tl.constexpr, OUT_INT32: tl.constexpr, A_INT8: tl.constexpr):
    # `total` is [BLOCK_M, BLOCK_N]: 256x the code product with packed activations, 16x with int8;
    # `sa` the per-token activation scales [BLOCK_M] (per-token float output only).
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if OUT_INT32:
        val = _code_product(total, A_INT8)
    else:
        sw = tl.load(sw_ptr + offs_n, mask=offs_n < N, other=0.0)
        if ACT_GROUP == 0:
            val = _code_product(total, A_INT8).to(tl.float32) * sa[:, None] * sw[None, :]
        elif A_INT8:
            val = total * (sw * 0.0625)[None, :]  # 1/16: a power of two, exact
        else:
            val = total * (sw * 0.00390625)[None, :]  # 1/256: a power of two, exact
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(ptrs, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _splitk_epilogue(acc, ws_ptr, cnt_ptr, pid, pid_k, sx_ptr, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om,
                     SPLIT_K, ACT_GROUP: tl.constexpr, OUT_INT32: tl.constexpr, A_INT8: tl.constexpr,
                     USE_SPLIT: tl.constexpr):
    """The end of a K-split program: with USE_SPLIT its partial is reduced (`tiling.splitk_reduce`)
    and the last program to arrive stores the tile; else this program stores it."""
    if USE_SPLIT:
        is_last, total = splitk_reduce(acc, ws_ptr, cnt_ptr, pid, pid_k, offs_m, offs_n, M, N, SPLIT_K)
        if is_last:
            _w4a4_epilogue(total, sx_ptr, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, ACT_GROUP, OUT_INT32,
                           A_INT8)
    else:
        _w4a4_epilogue(acc, sx_ptr, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, ACT_GROUP, OUT_INT32, A_INT8)


# M is a plain runtime int: M == 1 (decode) would otherwise compile another kernel.
@triton.jit(do_not_specialize=["M"])
def _w4a4_gemm_kernel(
    qx_ptr, sx_ptr, qw_ptr, sw_ptr, out_ptr,
    M, N, KH, stride_xm, stride_wn, stride_om, stride_sxm,
    ACT_GROUP: tl.constexpr, OUT_INT32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PLANES: tl.constexpr, EVEN_K: tl.constexpr, A_INT8: tl.constexpr, USE_ASM: tl.constexpr,
):
    pid, pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/cols read a valid row instead (modulo) and are never stored: no load masks.
    acc = _w4a4_k_loop(qx_ptr, qw_ptr, sx_ptr, offs_m % M, offs_n % N, KH, stride_xm, stride_wn, stride_sxm,
                       0, tl.cdiv(KH, BLOCK_K // 2), ACT_GROUP, BLOCK_M, BLOCK_N, BLOCK_K, PLANES, EVEN_K, False,
                       A_INT8, USE_ASM)
    _w4a4_epilogue(acc, sx_ptr, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, ACT_GROUP, OUT_INT32, A_INT8)


# M and SPLIT_K are plain runtime ints (no recompile for M == 1 or per split count).
@triton.jit(do_not_specialize=["M", "SPLIT_K"])
def _w4a4_splitk_kernel(
    qx_ptr, sx_ptr, qw_ptr, sw_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, KH, stride_xm, stride_wn, stride_om, stride_sxm, SPLIT_K,
    ACT_GROUP: tl.constexpr, OUT_INT32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PLANES: tl.constexpr, EVEN_K: tl.constexpr, SWAP_AB: tl.constexpr, USE_SPLIT: tl.constexpr,
    A_INT8: tl.constexpr, USE_ASM: tl.constexpr,
):
    pid, pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_tiles = tl.cdiv(KH, BLOCK_K // 2)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)
    # Trailing splits left without K tiles by the ceil division still store zeros and arrive.
    acc = _w4a4_k_loop(qx_ptr, qw_ptr, sx_ptr, offs_m % M, offs_n % N, KH, stride_xm, stride_wn, stride_sxm,
                       t0, t1, ACT_GROUP, BLOCK_M, BLOCK_N, BLOCK_K, PLANES, EVEN_K, SWAP_AB, A_INT8, USE_ASM)
    _splitk_epilogue(acc, ws_ptr, cnt_ptr, pid, pid_k, sx_ptr, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om,
                     SPLIT_K, ACT_GROUP, OUT_INT32, A_INT8, USE_SPLIT)


# M is a plain runtime int, as in the gemm variant.
@triton.jit(do_not_specialize=["M"])
def _w4a4_tma_kernel(
    a_desc, w_desc, sx_ptr, sw_ptr, out_ptr,
    M, N, KH, stride_om, stride_sxm,
    ACT_GROUP: tl.constexpr, OUT_INT32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    USE_ASM: tl.constexpr,
):
    """One output tile a program, both operands through TMA tensor descriptors: int8 activation
    codes [M, K] in [BLOCK_M, BLOCK_K] boxes (fed to the MMA as loaded) and packed weights [N, K/2]
    in [BLOCK_N, BLOCK_K/2] boxes, unpacked x16 in registers and interleaved back to natural K order.
    The copy engine fills a box past M, N or K with zeros (code 0), so no load is masked."""
    off_m, off_n, offs_m, offs_n = tile_origin(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    BKH: tl.constexpr = BLOCK_K // 2
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, tl.cdiv(KH, BKH)):
        a = a_desc.load([off_m, t * BLOCK_K])
        w_lo, w_hi = unpack_lo_hi_x16(w_desc.load([off_n, t * BKH]), USE_ASM)
        w8 = tl.reshape(tl.join(w_lo, w_hi), (BLOCK_N, BLOCK_K))
        if ACT_GROUP == 0:
            acc_i = tl.dot(a, tl.trans(w8), acc_i, out_dtype=tl.int32)
        else:
            # BLOCK_K divides ACT_GROUP: this whole tile lies in group (t * BLOCK_K) // ACT_GROUP.
            part = tl.dot(a, tl.trans(w8), out_dtype=tl.int32)
            sa = tl.load(sx_ptr + (offs_m % M) * stride_sxm + (t * BLOCK_K) // ACT_GROUP)
            acc_f += part.to(tl.float32) * sa[:, None]
    if ACT_GROUP == 0:
        acc = acc_i
    else:
        acc = acc_f
    _w4a4_epilogue(acc, sx_ptr, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, ACT_GROUP, OUT_INT32, True)


@triton.jit
def _gemv_products(w, a_lo, a_hi, acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BW: tl.constexpr,
                   USE_ASM: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N, BW] + the dp4a products of weight words w [1, BLOCK_N, BW] (packed,
    unpacked x16 here) with activation words a_lo / a_hi [BLOCK_M, 1, BW] (already x16 or int8)."""
    w_lo, w_hi = unpack_words_x16(w)
    shape: tl.constexpr = (BLOCK_M, BLOCK_N, BW)
    acc = dp4a(tl.broadcast_to(w_lo, shape), tl.broadcast_to(a_lo, shape), acc, USE_ASM)
    return dp4a(tl.broadcast_to(w_hi, shape), tl.broadcast_to(a_hi, shape), acc, USE_ASM)


@triton.jit
def _gemv_group_sums(part, sa, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr, GW: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N]: the int32 products `part` [BLOCK_M, BLOCK_N, NG * GW] summed per
    activation group of GW words, each sum times its group's scale sa [BLOCK_M, NG], added up."""
    g_sum = tl.sum(tl.reshape(part, (BLOCK_M, BLOCK_N, NG, GW)), axis=3)
    return tl.sum(g_sum.to(tl.float32) * sa[:, None, :], axis=2)


@triton.jit
def _load_x(x_ptr, inv_ptr, row_off, kk, K, HAS_INV: tl.constexpr):
    """float32 x (* inv_smooth) at channels kk (row starts row_off broadcast against them), 0 past K:
    the quantizer's own arithmetic (`actquant`), so the codes are the same bits."""
    x = tl.load(x_ptr + row_off + kk, mask=kk < K, other=0.0).to(tl.float32)
    if HAS_INV:
        x = x * tl.load(inv_ptr + kk, mask=kk < K, other=0.0)
    return x


@triton.jit
def _words_x16(codes, BLOCK_M: tl.constexpr, BW: tl.constexpr):
    """int32 codes [BLOCK_M, BW, 8] (eight consecutive elements per word) -> (lo, hi) [BLOCK_M, BW]
    words laid out as `int4.unpack_words_x16` gives them for a packed word: byte j of lo is 16 x the
    code of element 2j, of hi of element 2j + 1."""
    even, odd = tl.split(tl.reshape(codes, (BLOCK_M, BW, 4, 2)))
    j = tl.arange(0, 4)[None, None, :] * 8
    # the four bytes do not overlap: their sum is their OR (int32 wrap-around in the top byte)
    return tl.sum(((even << 4) & 0xFF) << j, axis=2), tl.sum(((odd << 4) & 0xFF) << j, axis=2)


@triton.jit
def _gemv_one_token(qx_ptr, qw_ptr, a_off, w_row, t0, t1, offs_w, nw_w, KH, BLOCK_N: tl.constexpr, BW: tl.constexpr,
                    WORDS: tl.constexpr, USE_ASM: tl.constexpr):
    """int32 [1, BLOCK_N]: one token's per-token product over K tiles [t0, t1), [BLOCK_N, BW] weight
    tiles (row starts w_row [BLOCK_N, 1]) against one row of packed activation words (a_off), in
    2-D. The same products as `_gemv_tokens`. On the H200 at M = 1 (reports/results/h200/
    probe_gemv_m1*.json) the 3-D form ran 5-9 % behind a 2-D probe kernel on the same tiles, which
    is within 3 % of a read-only kernel; in this form the gemv gained 0.4-4 % (another sitting)
    and stays 4-7 % behind that probe (what costs the rest is not isolated)."""
    acc = tl.zeros((BLOCK_N, BW), dtype=tl.int32)
    for t in range(t0, t1):
        word = t * BW + offs_w
        w_lo, w_hi = unpack_words_x16(load_words(qw_ptr, w_row, word[None, :], nw_w, KH, WORDS))
        a_lo, a_hi = unpack_words_x16(load_words(qx_ptr, a_off, word, nw_w, KH, WORDS)[None, :])
        acc = dp4a(w_lo, tl.broadcast_to(a_lo, (BLOCK_N, BW)), acc, USE_ASM)
        acc = dp4a(w_hi, tl.broadcast_to(a_hi, (BLOCK_N, BW)), acc, USE_ASM)
    return tl.sum(acc, axis=1)[None, :]


@triton.jit
def _gemv_tokens(qx_ptr, sx_ptr, qw_ptr, rm, a_row, w_row, t0, t1, offs_w, nw_w, KH, stride_sxm,
                 ACT_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BW: tl.constexpr,
                 WORDS: tl.constexpr, A_INT8: tl.constexpr, USE_ASM: tl.constexpr):
    """[BLOCK_M, BLOCK_N] over K tiles [t0, t1): int32 per-token products, or fp32 sums of each
    activation group's product times its scale; activations packed or int8 codes."""
    if ACT_GROUP == 0:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BW), dtype=tl.int32)
    else:
        GW: tl.constexpr = ACT_GROUP // 8  # words per activation group
        NG: tl.constexpr = BW // GW if BW >= GW else 1  # groups per K tile
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t0, t1):
        word = t * BW + offs_w
        w = load_words(qw_ptr, w_row, word[None, None, :], nw_w, KH, WORDS)
        if A_INT8:  # two words of int8 codes per weight word: elements 8i..8i+3, 8i+4..8i+7
            word2 = 2 * word[None, None, :, None] + tl.arange(0, 2)[None, None, None, :]
            a0, a1 = tl.split(load_words(qx_ptr, a_row[:, :, :, None], word2, 2 * KH // 4, 2 * KH, WORDS))
            a_lo, a_hi = even_odd_bytes(a0, a1, USE_ASM)
        else:
            a_lo, a_hi = unpack_words_x16(load_words(qx_ptr, a_row, word[None, None, :], nw_w, KH, WORDS))
        if ACT_GROUP == 0:
            acc3 = _gemv_products(w, a_lo, a_hi, acc3, BLOCK_M, BLOCK_N, BW, USE_ASM)
        else:
            part = _gemv_products(w, a_lo, a_hi, tl.zeros((BLOCK_M, BLOCK_N, BW), dtype=tl.int32), BLOCK_M, BLOCK_N,
                                  BW, USE_ASM)
            if BW >= GW:  # NG whole groups in this tile
                g = t * NG + tl.arange(0, NG)
                sa = tl.load(sx_ptr + rm[:, None] * stride_sxm + g[None, :], mask=g[None, :] * ACT_GROUP < 2 * KH,
                             other=0.0)
                acc += _gemv_group_sums(part, sa, BLOCK_M, BLOCK_N, NG, GW)
            else:  # the tile lies inside one group
                sa = tl.load(sx_ptr + rm * stride_sxm + (t * BW) // GW)
                acc += _gemv_group_sums(part, sa[:, None], BLOCK_M, BLOCK_N, 1, BW)
    if ACT_GROUP == 0:
        acc = tl.sum(acc3, axis=2)
    return acc


# M and SPLIT_K are plain runtime ints (no recompile for M == 1 or per split count).
@triton.jit(do_not_specialize=["M", "SPLIT_K"])
def _w4a4_gemv_kernel(
    qx_ptr, sx_ptr, qw_ptr, sw_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, KH, stride_xm, stride_wn, stride_om, stride_sxm, SPLIT_K,
    ACT_GROUP: tl.constexpr, OUT_INT32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    WORDS: tl.constexpr, USE_SPLIT: tl.constexpr, A_INT8: tl.constexpr, USE_ASM: tl.constexpr,
    PDL: tl.constexpr,
):
    """A few tokens on the CUDA cores: each program streams [BLOCK_N, BLOCK_K] weight codes as int32
    words (eight codes each), unpacks them x16 in place and multiplies with dp4a, a [BLOCK_M,
    BLOCK_N, BLOCK_K / 8] int32 accumulator (per-token) or its per-group sums rescaled into fp32.
    K is split over SPLIT_K programs as in `splitk`. Strides are in words when WORDS, else in bytes.
    PDL: launched as a programmatic dependent launch (`configs.use_pdl`). Every program waits for
    the kernel before to finish, its writes visible, before it touches memory, and lets the next
    kernel launch at once: the grid's launch and ramp then overlap the tail of the kernel before
    instead of following it (0.4-0.6 µs a call at M = 1 back to back on the H200,
    reports/results/h200/probe_gemv_m1_pdl.json against probe_gemv_m1_b.json)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    BW: tl.constexpr = BLOCK_K // 8  # weight words per K tile and row
    pid, pid_k, offs_m, offs_n, rm, rn, nw_w, t0, t1, offs_w = gemv_tile(M, N, KH, SPLIT_K, BLOCK_M, BLOCK_N, BW)
    w_row = (rn * stride_wn)[None, :, None]  # [1, BLOCK_N, 1]
    a_row = (rm * stride_xm)[:, None, None]  # [BLOCK_M, 1, 1]
    if BLOCK_M == 1 and ACT_GROUP == 0 and not A_INT8:
        acc = _gemv_one_token(qx_ptr, qw_ptr, rm * stride_xm, (rn * stride_wn)[:, None], t0, t1, offs_w, nw_w, KH,
                              BLOCK_N, BW, WORDS, USE_ASM)
    else:
        acc = _gemv_tokens(qx_ptr, sx_ptr, qw_ptr, rm, a_row, w_row, t0, t1, offs_w, nw_w, KH, stride_sxm,
                           ACT_GROUP, BLOCK_M, BLOCK_N, BW, WORDS, A_INT8, USE_ASM)
    _splitk_epilogue(acc, ws_ptr, cnt_ptr, pid, pid_k, sx_ptr, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om,
                     SPLIT_K, ACT_GROUP, OUT_INT32, A_INT8, USE_SPLIT)


# M and SPLIT_K are plain runtime ints (no recompile for M == 1 or per split count).
@triton.jit(do_not_specialize=["M", "SPLIT_K"])
def _w4a4_gemv_quant_kernel(
    x_ptr, inv_ptr, qw_ptr, sw_ptr, hw_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_wn, stride_om, SPLIT_K,
    ACT_GROUP: tl.constexpr, HAS_INV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    AMAX_BLOCK: tl.constexpr, AMAX_CHUNKS: tl.constexpr,
    WORDS: tl.constexpr, USE_SPLIT: tl.constexpr, USE_ASM: tl.constexpr, HIGH: tl.constexpr,
):
    """`_w4a4_gemv_kernel` with the activation quantizer in its prologue: float activations x [M, K]
    in, each program quantizing the channels of its own K tiles as `actquant` does. A per-token
    scale needs the whole row's absmax first: every program reads the row (AMAX_CHUNKS unrolled
    loads of AMAX_BLOCK channels, from L2 after the first) before its K loop; a group's absmax is
    taken on the tile itself (BLOCK_K is a multiple of the group). Weight strides in words when
    WORDS, else in bytes. HIGH (ZipperQuant's dense high part, `zipper_high.zipper_gemv`): a
    second plane of packed codes hw [N, K/2], laid out as qw, is multiplied with the float32
    X' = x * inv_smooth the quantizer forms anyway (exact products, float32 sums,
    `int4.word_products`), and the output is (low + 16 * high) * w_scale: ZipperQuant's product
    with Δ = w_scale, in one pass over x and both planes."""
    BW: tl.constexpr = BLOCK_K // 8
    KH = K // 2
    pid, pid_k, offs_m, offs_n, rm, rn, nw_w, t0, t1, offs_w = gemv_tile(M, N, KH, SPLIT_K, BLOCK_M, BLOCK_N, BW)
    w_row = (rn * stride_wn)[None, :, None]
    x_row = rm * stride_xm
    if ACT_GROUP == 0:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c in tl.static_range(AMAX_CHUNKS):
            ka = c * AMAX_BLOCK + tl.arange(0, AMAX_BLOCK)
            amax = max_nan(amax, tl.reduce(tl.abs(_load_x(x_ptr, inv_ptr, x_row[:, None], ka[None, :], K, HAS_INV)),
                                           1, max_nan))
        scale = scale_of(amax)  # [BLOCK_M], the quantizer's scale bit for bit
        d, y = recip_of(scale)
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BW), dtype=tl.int32)
        if HIGH:
            acc_h = tl.zeros((BLOCK_M, BLOCK_N, BW), dtype=tl.float32)
    else:
        GW: tl.constexpr = ACT_GROUP // 8
        NG: tl.constexpr = BW // GW  # the launcher makes BLOCK_K a multiple of the group
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HIGH:
            acc_h = tl.zeros((BLOCK_M, BLOCK_N, BW), dtype=tl.float32)
    for t in range(t0, t1):
        if ACT_GROUP == 0:
            w = load_words(qw_ptr, w_row, (t * BW + offs_w)[None, None, :], nw_w, KH, WORDS)
            kk = (t * BW + offs_w)[:, None] * 8 + tl.arange(0, 8)[None, :]  # [BW, 8] channels
            xs = _load_x(x_ptr, inv_ptr, x_row[:, None, None], kk[None, :, :], K, HAS_INV)  # [BLOCK_M, BW, 8]
            a_lo, a_hi = _words_x16(codes_of(xs, scale[:, None, None], d[:, None, None], y[:, None, None]), BLOCK_M, BW)
            acc3 = _gemv_products(w, a_lo[:, None, :], a_hi[:, None, :], acc3, BLOCK_M, BLOCK_N, BW, USE_ASM)
            if HIGH:
                x0, x1, x2, x3, x4, x5, x6, x7 = split8(xs)
                hw = load_words(hw_ptr, w_row, (t * BW + offs_w)[None, None, :], nw_w, KH, WORDS)
                acc_h += word_products(hw, x0[:, None, :], x1[:, None, :], x2[:, None, :], x3[:, None, :],
                                       x4[:, None, :], x5[:, None, :], x6[:, None, :], x7[:, None, :])
        else:
            # Everything indexed [.., group, word in group, ..] from the loads on. A form that
            # reshaped the [BLOCK_M, BW, 8] tile to [BLOCK_M, NG, group] and back was exact under
            # the interpreter but 3 % off compiled on the H200 (cause not isolated); this one
            # passes the compiled laws (reports/results/h200/verify_all_xdist14_gemv.log).
            wg = t * BW + tl.arange(0, NG)[:, None] * GW + tl.arange(0, GW)[None, :]  # [NG, GW] word ids
            w = load_words(qw_ptr, w_row[:, :, :, None], wg[None, None, :, :], nw_w, KH, WORDS)  # [1, BN, NG, GW]
            kk = wg[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]  # [NG, GW, 8] channels
            xs = _load_x(x_ptr, inv_ptr, x_row[:, None, None, None], kk[None, :, :, :], K, HAS_INV)
            sg = scale_of(tl.reduce(tl.reduce(tl.abs(xs), 3, max_nan), 2, max_nan))  # [BLOCK_M, NG]
            dg, yg = recip_of(sg)
            codes = codes_of(xs, sg[:, :, None, None], dg[:, :, None, None], yg[:, :, None, None])  # [BLOCK_M, NG, GW, 8]
            even, odd = tl.split(tl.reshape(codes, (BLOCK_M, NG, GW, 4, 2)))
            j = tl.arange(0, 4)[None, None, None, :] * 8
            a_lo = tl.sum(((even << 4) & 0xFF) << j, axis=3)[:, None, :, :]  # [BLOCK_M, 1, NG, GW]
            a_hi = tl.sum(((odd << 4) & 0xFF) << j, axis=3)[:, None, :, :]
            w_lo, w_hi = unpack_words_x16(w)
            shape: tl.constexpr = (BLOCK_M, BLOCK_N, NG, GW)
            part = dp4a(tl.broadcast_to(w_lo, shape), tl.broadcast_to(a_lo, shape),
                        tl.zeros(shape, dtype=tl.int32), USE_ASM)
            part = dp4a(tl.broadcast_to(w_hi, shape), tl.broadcast_to(a_hi, shape), part, USE_ASM)
            acc += tl.sum(tl.sum(part, axis=3).to(tl.float32) * sg[:, None, :], axis=2)
            if HIGH:
                # the high part needs no group structure: X' read again in the per-token form's
                # [tokens, words, 8] tiles (from L1), so no rank-4 / rank-5 tiles (in the
                # [.., groups, words] indexing the fused GEMV lost to the two passes on the H200,
                # reports/results/h200/probe_zipper_fused_g32.json)
                word = t * BW + offs_w
                kw = word[:, None] * 8 + tl.arange(0, 8)[None, :]
                x0, x1, x2, x3, x4, x5, x6, x7 = split8(_load_x(x_ptr, inv_ptr, x_row[:, None, None], kw[None, :, :],
                                                                K, HAS_INV))
                hw = load_words(hw_ptr, w_row, word[None, None, :], nw_w, KH, WORDS)
                acc_h += word_products(hw, x0[:, None, :], x1[:, None, :], x2[:, None, :], x3[:, None, :],
                                       x4[:, None, :], x5[:, None, :], x6[:, None, :], x7[:, None, :])
    if ACT_GROUP == 0:
        acc = tl.sum(acc3, axis=2)
    else:
        scale = None
    if HIGH:
        # one float32 partial per output, low and high parts in units of Δ: the low part's code
        # product times its activation scales (exact int32 -> float32 below 2^24), + 16 x the high
        if ACT_GROUP == 0:
            acc = (acc >> 8).to(tl.float32) * scale[:, None] + 16.0 * tl.sum(acc_h, axis=2)
        else:
            acc = acc * 0.00390625 + 16.0 * tl.sum(acc_h, axis=2)
    if USE_SPLIT:
        is_last, total = splitk_reduce(acc, ws_ptr, cnt_ptr, pid, pid_k, offs_m, offs_n, M, N, SPLIT_K)
        if is_last:
            _gemv_quant_store(total, scale, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, ACT_GROUP, HIGH)
    else:
        _gemv_quant_store(acc, scale, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, ACT_GROUP, HIGH)


@triton.jit
def _gemv_quant_store(total, scale, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, ACT_GROUP: tl.constexpr,
                      HIGH: tl.constexpr):
    """The fused GEMV's store: the W4A4 product's (`_w4a4_store`), or with HIGH the partial in units
    of Δ times w_scale."""
    if HIGH:
        sw = tl.load(sw_ptr + offs_n, mask=offs_n < N, other=0.0)
        ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(ptrs, (total * sw[None, :]).to(out_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
    else:
        _w4a4_store(total, scale, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, ACT_GROUP, False, False)


def _tile_params(cfg, act_group, KH):
    """BLOCK_K clamped to the activation group; PLANES only where each plane is >= 32 deep."""
    block_k = cfg["BLOCK_K"]
    if act_group:
        block_k = min(block_k, act_group)  # a K tile must not straddle a group
    planes = bool(cfg.get("PLANES", True)) and block_k >= 64
    return block_k, planes, KH % (block_k // 2) == 0


def _launch_gemm(cfg, qx, sx, qw, sw, out, act_group, out_int32):
    M = qx.shape[0]
    N, KH = qw.shape
    block_k, planes, even_k = _tile_params(cfg, act_group, KH)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _w4a4_gemm_kernel[grid](
        qx, sx, qw, sw, out, M, N, KH, qx.stride(0), qw.stride(0), out.stride(0), sx.stride(0) if sx.dim() == 2 else 1,
        ACT_GROUP=act_group, OUT_INT32=out_int32, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
        GROUP_M=cfg["GROUP_M"], PLANES=planes, EVEN_K=even_k, A_INT8=qx.dtype == torch.int8,
        USE_ASM=use_asm(qx.device), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _launch_splitk(cfg, qx, sx, qw, sw, out, act_group, out_int32):
    M = qx.shape[0]
    N, KH = qw.shape
    block_k, planes, even_k = _tile_params(cfg, act_group, KH)
    tiles_mn = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    split = choose_split_k(cfg, tiles_mn, triton.cdiv(KH, block_k // 2), qx.device)
    if split * M * N >= 2**31:
        raise ValueError(f"split-K partials of [{M}, {N}] x {split} exceed int32 offsets; use the gemm variant")
    # The workspace holds int32 partials (per-token, int32 out) or fp32 ones (group-rescaled).
    ws, cnt = splitk_workspace(qx.device, torch.int32 if act_group == 0 else torch.float32,
                               split * M * N if split > 1 else 0, tiles_mn if split > 1 else 0)
    _w4a4_splitk_kernel[(tiles_mn, split)](
        qx, sx, qw, sw, out, ws, cnt,
        M, N, KH, qx.stride(0), qw.stride(0), out.stride(0), sx.stride(0) if sx.dim() == 2 else 1, split,
        ACT_GROUP=act_group, OUT_INT32=out_int32, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
        GROUP_M=cfg["GROUP_M"], PLANES=planes, EVEN_K=even_k, SWAP_AB=bool(cfg.get("SWAP_AB", False)),
        USE_SPLIT=split > 1, A_INT8=qx.dtype == torch.int8, USE_ASM=use_asm(qx.device),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _tma_takes(qx, qw):
    """True when the tma variant can take these operands: int8 codes, and TMA descriptors' 16-byte
    aligned base and row stride (K a multiple of 32: K/2 weight bytes a row)."""
    return qx.dtype == torch.int8 and qw.shape[1] % 16 == 0 and qx.data_ptr() % 16 == 0 and qw.data_ptr() % 16 == 0


def _launch_tma(cfg, qx, sx, qw, sw, out, act_group, out_int32):
    M = qx.shape[0]
    N, KH = qw.shape
    if qx.dtype != torch.int8:
        raise ValueError("the tma variant takes int8 activation codes [M, K] (its bucket's act_layout 'int8'), "
                         f"got {qx.dtype}")
    if not _tma_takes(qx, qw):  # int8 codes by now: K or an operand's base is what a descriptor refuses
        raise ValueError(f"the tma variant needs K a multiple of 32 and 16-byte aligned operands, got K={2 * KH} "
                         "(a launch-table bucket naming tma sends such operands to its no_tma config)")
    block_k, _, _ = _tile_params(cfg, act_group, KH)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _w4a4_tma_kernel[grid](
        TensorDescriptor.from_tensor(qx, [bm, block_k]), TensorDescriptor.from_tensor(qw, [bn, block_k // 2]),
        sx, sw, out, M, N, KH, out.stride(0), sx.stride(0) if sx.dim() == 2 else 1,
        ACT_GROUP=act_group, OUT_INT32=out_int32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k, GROUP_M=cfg["GROUP_M"],
        USE_ASM=use_asm(qx.device), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _gemv_block_k(cfg, act_group):
    block_k = cfg["BLOCK_K"]
    if block_k < 32 or block_k & (block_k - 1):
        raise ValueError(f"gemv config BLOCK_K must be a power of two >= 32 (four words), got {block_k}")
    return max(block_k, act_group)  # the fused prologue takes a group's absmax inside one tile


def _gemv_split(cfg, M, N, KH, block_k, float_partials, device):
    """(tiles_mn, split, workspace, counters) of a gemv launch: K split as in `splitk`, the
    partials int32 (per-token code products) or float32."""
    tiles_mn = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    split = choose_split_k(cfg, tiles_mn, triton.cdiv(triton.cdiv(KH, 4), block_k // 8), device)
    if split * M * N >= 2**31:
        raise ValueError(f"split-K partials of [{M}, {N}] x {split} exceed int32 offsets; use the gemm variant")
    ws, cnt = splitk_workspace(device, torch.float32 if float_partials else torch.int32,
                               split * M * N if split > 1 else 0, tiles_mn if split > 1 else 0)
    return tiles_mn, split, ws, cnt


def w4a4_gemv_quant(x, inv_smooth, qw_packed, w_scale, act_group_size=None, out_dtype=torch.float16, *, out=None,
                    config=None, check_finite=True):
    """The W4A4 layer's product at a few tokens in one launch: x [M, K] fp16|bf16|fp32 (K even),
    inv_smooth fp32 [K] or None, qw_packed uint8 [N, K/2], w_scale fp32 [N] -> out_dtype [M, N].

    Equals `quantize_activations(x, inv_smooth, act_group_size)` then `w4a4_gemm` with the gemv
    variant: the codes and scales are the quantizer's bit for bit (the same float32 arithmetic),
    so per-token outputs are identical and per-group ones differ only by the fp32 order of the
    group sums. `config`: a gemv config (default: the launch table's bucket for M, which must name
    the gemv variant). check_finite: refuse NaN / Inf in x (after smoothing) and w_scale (one host
    sync; False on the layers' per-token path: a non-finite row then gives NaN outputs)."""
    from zqkernels.gpu.actquant import check_inputs

    act_group = check_inputs(x, inv_smooth, act_group_size, "int4") or 0
    M, N, K = check_float_x_packed_w(x, qw_packed)
    limits.check_k(K, "x: K")
    check_out_dtype(out_dtype)
    check_scale("w_scale", w_scale, (N,), x.device)
    if check_finite:
        refuse_non_finite(x=x if inv_smooth is None else x.float() * inv_smooth, w_scale=w_scale)
    out = check_out(out, (M, N), out_dtype, x.device)
    scales = "per_token" if act_group == 0 else "group"
    cfg = dict(config) if config is not None else launch_config("w4a4", scales, M, x.device, N, K)
    if cfg.get("variant") != "gemv":
        raise ValueError(f"w4a4_gemv_quant runs the gemv variant's tiles; its config names {cfg.get('variant')!r}")
    return launch_gemv_quant(cfg, x, inv_smooth, qw_packed, w_scale, out, act_group)


def launch_gemv_quant(cfg, x, inv_smooth, qw, sw, out, act_group, high_packed=None):
    """The fused GEMV's launch on checked operands (`w4a4_gemv_quant`; with high_packed, a second
    code plane as qw, ZipperQuant's `zipper_high.zipper_gemv`)."""
    M, K = x.shape
    N, KH = qw.shape
    block_k = _gemv_block_k(cfg, act_group)
    high = high_packed is not None
    words = words_aligned(x, qw) and (not high or words_aligned(x, high_packed))
    tiles_mn, split, ws, cnt = _gemv_split(cfg, M, N, KH, block_k, act_group != 0 or high, x.device)
    amax_block = min(2048, triton.next_power_of_2(K))

    def w(t):
        return t.view(torch.int32) if words else t

    _w4a4_gemv_quant_kernel[(tiles_mn, split)](
        x, inv_smooth if inv_smooth is not None else x, w(qw), sw, w(high_packed) if high else w(qw), out, ws, cnt,
        M, N, K, x.stride(0), qw.stride(0) // (4 if words else 1), out.stride(0), split,
        ACT_GROUP=act_group, HAS_INV=inv_smooth is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=block_k, AMAX_BLOCK=amax_block, AMAX_CHUNKS=triton.cdiv(K, amax_block), WORDS=words,
        USE_SPLIT=split > 1, USE_ASM=use_asm(x.device), HIGH=high, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def _launch_gemv(cfg, qx, sx, qw, sw, out, act_group, out_int32):
    M = qx.shape[0]
    N, KH = qw.shape
    block_k = _gemv_block_k(cfg, 0)  # group scales: a tile may span groups, or lie inside one
    # Words straight from memory where every row starts 4-byte aligned; else bytes assembled.
    words = words_aligned(qx, qw)
    tiles_mn, split, ws, cnt = _gemv_split(cfg, M, N, KH, block_k, act_group != 0, qx.device)
    a, w, unit = (qx.view(torch.int32), qw.view(torch.int32), 4) if words else (qx, qw, 1)
    pdl = use_pdl(qx.device)
    _w4a4_gemv_kernel[(tiles_mn, split)](
        a, sx, w, sw, out, ws, cnt,
        M, N, KH, qx.stride(0) // unit, qw.stride(0) // unit, out.stride(0), sx.stride(0) if sx.dim() == 2 else 1,
        split, ACT_GROUP=act_group, OUT_INT32=out_int32, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=block_k, WORDS=words, USE_SPLIT=split > 1, A_INT8=qx.dtype == torch.int8,
        USE_ASM=use_asm(qx.device), PDL=pdl, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **({"launch_pdl": True} if pdl else {}),
    )

VARIANTS = {"gemm": _launch_gemm, "splitk": _launch_splitk, "gemv": _launch_gemv, "tma": _launch_tma}


def _launch(qx, sx, qw, sw, out, act_group, out_int32, config):
    """The dispatcher: the launch table's config for this M names the variant (see the docstring)."""
    scales = "per_token" if act_group == 0 else "group"
    cfg = (dict(config) if config is not None
           else launch_config("w4a4", scales, qx.shape[0], qx.device, qw.shape[0], 2 * qw.shape[1]))
    # The operand's dtype decides the activation load; a config's act_layout is the quantizer's choice.
    layout = cfg.pop("act_layout", "int4")
    if layout not in TABLE_ACT_LAYOUTS:
        raise ValueError(f"config act_layout must be one of {TABLE_ACT_LAYOUTS}, got {layout!r}")
    # a tma bucket's config for what a descriptor cannot take (module docstring)
    variant, cfg = tma_or_fallback(cfg, _tma_takes(qx, qw))
    if variant not in VARIANTS:
        raise ValueError(f"config variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    VARIANTS[variant](cfg, qx, sx, qw, sw, out, act_group, out_int32)
    return out


def act_layouts(act_group_size, device):
    """((M bucket, act_layout), ...) in M order: the activation layout ("int4" | "int8" | "fused") each w4a4
    bucket of the launch table names (`act_layout`, required in every bucket), for `pick_act_layout`.
    A layer reads it once when built, so its forward picks the layout from a tuple of constants
    (no table read per call, and `torch.compile` traces it)."""
    scales = "per_token" if not act_group_size else "group"
    steps = []
    for key in sorted(int(k) for k in table_for(device)["w4a4"][scales]):
        cfg = launch_config("w4a4", scales, key, device)
        layout = cfg.get("act_layout")
        if layout not in TABLE_ACT_LAYOUTS:
            raise ValueError(f"launch table w4a4/{scales} bucket {key}: act_layout must be one of "
                             f"{TABLE_ACT_LAYOUTS}, got {layout!r}")
        if layout == "fused" and cfg.get("variant") != "gemv":
            raise ValueError(f"launch table w4a4/{scales} bucket {key}: act_layout 'fused' needs the gemv variant, "
                             f"got {cfg.get('variant')!r}")
        no_tma = cfg.get("no_tma")
        if cfg.get("variant") == "tma" and (not isinstance(no_tma, dict) or no_tma.get("variant") in (None, "tma")):
            raise ValueError(f"launch table w4a4/{scales} bucket {key}: a tma bucket needs a 'no_tma' config of "
                             f"another variant for the operands a descriptor cannot take, got {no_tma!r}")
        steps.append((key, layout))
    return tuple(steps)


def pick_act_layout(m, steps):
    """The layout of the bucket `launch_config` would pick for M tokens: the smallest >= M, else the largest."""
    for key, layout in steps:
        if m <= key:
            return layout
    return steps[-1][1]


def act_layout(m, act_group_size, device):
    """The activation layout the launch table names for M tokens: what a W4A4 layer asks
    `quantize_activations` for before it calls `w4a4_gemm`."""
    return pick_act_layout(m, act_layouts(act_group_size, device))


def check_operands(qx_packed, qw_packed):
    """The two operands of a W4A4 product: activations packed (uint8 [M, K/2]) or int8 codes
    ([M, K]), packed weights [N, K/2]; same device, same K, K within int32 range."""
    if isinstance(qx_packed, torch.Tensor) and qx_packed.dtype == torch.int8:
        check_int8_codes("qx_packed", qx_packed)
        if qx_packed.shape[1] % 2:
            raise ValueError(f"qx_packed: int8 codes [M, K] need an even K (the weights pack two codes per byte), "
                             f"got K={qx_packed.shape[1]}")
        kh_x = qx_packed.shape[1] // 2
    else:
        if isinstance(qx_packed, torch.Tensor) and qx_packed.dtype != torch.uint8:
            raise ValueError(f"qx_packed must be uint8 (two int4 codes per byte) or int8 (one code per byte), "
                             f"got {qx_packed.dtype}")
        check_packed("qx_packed", qx_packed)
        kh_x = qx_packed.shape[1]
    check_packed("qw_packed", qw_packed)
    check_same_device("qw_packed", qw_packed, qx_packed.device, "qx_packed")
    M = qx_packed.shape[0]
    N, KH = qw_packed.shape
    if KH != kh_x:
        what = f"int8 codes with K={2 * kh_x}" if qx_packed.dtype == torch.int8 else f"K/2={kh_x}"
        raise ValueError(f"qw_packed has K/2={KH} (K={2 * KH}), qx_packed {what}")
    limits.check_k(2 * KH, "qx_packed: K")
    return M, N, KH


def w4a4_gemm(qx_packed, act_scale, qw_packed, w_scale, act_group_size=None, out_dtype=torch.float16, *,
              out=None, config=None, check_finite=True):
    """qx_packed uint8 [M, K/2] (packed codes) or int8 [M, K] (one code per byte; the dtype says
    which), act_scale fp32 [M] (or [M, ceil(K/g)] with act_group_size=g), qw_packed uint8
    [N, K/2], w_scale fp32 [N] -> out_dtype [M, N] (fp16, bf16 or fp32).
    `out` (optional): preallocated result. `config` (tests and tuning) replaces the launch table's
    entry: a dict with "variant" ("gemm" | "splitk") and its tile parameters (an "act_layout" in it
    is the quantizer's: the dtype of qx_packed decides the load). check_finite: refuse
    NaN / Inf scales (`operands.refuse_non_finite`; False on the layers' per-token path)."""
    M, N, KH = check_operands(qx_packed, qw_packed)
    act_group_size = limits.check_act_group(act_group_size)
    check_out_dtype(out_dtype)
    sx_shape = (M,) if act_group_size is None else (M, triton.cdiv(2 * KH, act_group_size))
    check_scale("act_scale", act_scale, sx_shape, qx_packed.device)
    check_scale("w_scale", w_scale, (N,), qx_packed.device)
    if check_finite:
        refuse_non_finite(act_scale=act_scale, w_scale=w_scale)
    out = check_out(out, (M, N), out_dtype, qx_packed.device)
    return _launch(qx_packed, act_scale, qw_packed, w_scale, out, act_group_size or 0, False, config)


def w4a4_gemm_int32(qx_packed, qw_packed, *, out=None, config=None):
    """qx_packed uint8 [M, K/2] or int8 [M, K] x qw_packed uint8 [N, K/2] -> int32 [M, N] = qx @ qw.T
    exactly (the debug entry point: the same kernels, the accumulator shifted back, not scaled)."""
    M, N, KH = check_operands(qx_packed, qw_packed)
    out = check_out(out, (M, N), torch.int32, qx_packed.device)
    dummy = torch.empty(1, dtype=torch.float32, device=qx_packed.device)
    return _launch(qx_packed, dummy, qw_packed, dummy, out, 0, True, config)


def w4a4_linear(x, inv_smooth, qw_packed, w_scale, act_group_size=None, out_dtype=torch.float16, *, steps=None):
    """A W4A4 layer's product on float activations x [M, K], as the launch table says for this M:
    quantize in the bucket's `act_layout` then `w4a4_gemm`, or, for a "fused" bucket, one
    `w4a4_gemv_quant` launch. `steps` (from `act_layouts`, read once by a layer) saves the
    table lookup. Unchecked values (`check_finite=False`): the per-token path of the layers."""
    from zqkernels.gpu.actquant import quantize_activations

    if steps is None:
        steps = act_layouts(act_group_size, x.device)
    layout = pick_act_layout(x.shape[0], steps)
    if layout == "fused":
        return w4a4_gemv_quant(x, inv_smooth, qw_packed, w_scale, act_group_size, out_dtype, check_finite=False)
    qx, sx = quantize_activations(x, inv_smooth, act_group_size, layout=layout, check_finite=False)
    return w4a4_gemm(qx, sx, qw_packed, w_scale, act_group_size, out_dtype, check_finite=False)

