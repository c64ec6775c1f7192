"""W4A16 GEMM (our weight-only baseline): fp16/bf16 activations x packed int4 weights.

    Y[M, N] = sum_g (x[:, g] @ qw[:, g].T) x w_scale[:, g]      (per-channel: one group = all of K)

Every variant unpacks the weights straight to 16-bit codes in registers by the magic-number form
(`int4.unpack_lo_hi_float`: eight codes in ten instructions, no int -> float conversion, exact in
fp16 / bf16). Variants, named per M bucket by the launch table as in `w4a4`:
- `splitk` (small M: K split over programs, last arrival reduces, optional SWAP_AB) and `gemm`
  (one program per tile, grouped order): the codes either put back in natural K order (join +
  reshape: one 16-bit tensor-core dot of a contiguous x tile) or kept as even/odd planes (PLANES:
  two dots against the even and odd columns of x), accumulated in fp32; the scale multiplies the
  fp32 partial sum (per group, BLOCK_K divides the group) or the whole sum in the epilogue (per
  channel).
- `gemv` (M of 1 to a few): no MMA. Weights streamed as int32 words in [BLOCK_N, BLOCK_K / 8]
  tiles, the eight codes of a word made exact float32 by the same magic-number form in float32
  (`int4.codes_f32`) and multiplied with their float32 activations on the CUDA cores into one
  accumulator per word; K split over programs as in `splitk`; a K tile may span groups, each
  group's sum multiplied by its scale as it is added. Exact products, fp32 sums. On the H200 at
  M = 1 the word form ran 1.20x the form on bytes (one accumulator per byte) per channel
  (reports/results/h200/tune_w4a16_words.json).
- `tma` (large M): both operands through TMA tensor descriptors, the weights the MMA's register
  operand (no shared-memory round trip for them; through shared memory they lost on every tile
  tuned, docs/DESIGN.md "variants tried"). Per channel the scale is
  applied in the epilogue; with groups each K tile's weights are multiplied by their group's
  scale in the activation dtype before the MMA (what a dequantize-then-GEMM does), so the fp32
  accumulator runs through the whole K loop: the scale is rounded to fp16 / bf16 and each scaled
  weight once more (relative error up to 2^-10 for fp16, 2^-7 for bf16, per weight; exact codes
  times fp32 scales in the other variants). On the H200 at M = 4096 that ran 1.27-1.46x faster
  than rescaling each tile's partial sum in fp32 at the rescale's best tile, and 2.6-3.0x on the
  same tile (reports/results/h200/tune_w4a16_tma_group.json). With fp16 activations the folded
  scales must stay within fp16's range over 8 (|scale| <= 8188; checked with check_finite). It
  needs K a multiple of 32 and 16-byte aligned operands; a bucket naming it also names under
  `"no_tma"` the config for the rest (`configs.tma_or_fallback`), so every operand is taken at
  every M.
Requirements (ValueError otherwise): x [M, K] fp16|bf16 contiguous, qw_packed uint8 [N, K/2]
contiguous, w_scale fp32 [N] or [N, ceil(K/g)], group_size in `limits.W4A16_GROUPS`, one device.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

from zqkernels.gpu import limits
from zqkernels.gpu.configs import interpreting, launch_config, tma_or_fallback, use_asm, use_pdl
from zqkernels.gpu.int4 import load_words, split8, unpack_lo_hi_float, word_products, words_aligned
from zqkernels.gpu.operands import (
    check_float_acts, check_float_x_packed_w, check_out, check_scale, refuse_non_finite,
)
from zqkernels.gpu.tiling import choose_split_k, gemv_tile, splitk_reduce, splitk_workspace, tile_ids, tile_origin


@triton.jit
def _w4a16_k_loop(x_ptr, qw_ptr, sw_ptr, rm, rn, KH, stride_xm, stride_wn, stride_swn, t0, t1,
                  GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  PLANES: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, SWAP_AB: tl.constexpr,
                  USE_ASM: tl.constexpr):
    """K tiles [t0, t1) of one output tile, fp32 accumulator [BLOCK_M, BLOCK_N] ([BLOCK_N, BLOCK_M]
    with SWAP_AB) of the code product, group-rescaled."""
    BKH: tl.constexpr = BLOCK_K // 2
    # Triton 3.9's interpreter mishandles bf16 (int8 -> bf16 casts and bf16 dots act on the raw
    # bits): there, and only there, the bf16 tiles go through exact fp32 instead.
    DT: tl.constexpr = tl.float32 if DOT_F32 else x_ptr.dtype.element_ty
    offs_kh = tl.max_contiguous(tl.multiple_of(tl.arange(0, BKH), BKH), BKH)
    offs_k = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
    if PLANES:  # even / odd columns of x pair with the low / high nibble planes (strided loads)
        x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + (t0 * BLOCK_K + 2 * offs_kh)[None, :]
    else:
        x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + (t0 * BLOCK_K + offs_k)[None, :]
    w_ptrs = qw_ptr + rn.to(tl.int64)[:, None] * stride_wn + (t0 * BKH + offs_kh)[None, :]
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t0, t1):
        if PLANES:
            if EVEN_K:
                xe = tl.load(x_ptrs)
                xo = tl.load(x_ptrs + 1)
                w = tl.load(w_ptrs)
            else:
                kmask = ((t * BKH + offs_kh) < KH)[None, :]
                xe = tl.load(x_ptrs, mask=kmask, other=0.0)
                xo = tl.load(x_ptrs + 1, mask=kmask, other=0.0)
                w = tl.load(w_ptrs, mask=kmask, other=0)
            w_lo, w_hi = unpack_lo_hi_float(w, DT, USE_ASM)  # the codes, exact in fp16 / bf16
            xe = xe.to(DT)
            xo = xo.to(DT)
            if SWAP_AB:
                part = tl.dot(w_lo, tl.trans(xe))
                part = tl.dot(w_hi, tl.trans(xo), part)
            else:
                part = tl.dot(xe, tl.trans(w_lo))
                part = tl.dot(xo, tl.trans(w_hi), part)
        else:
            if EVEN_K:
                x = tl.load(x_ptrs)
                w = tl.load(w_ptrs)
            else:
                x = tl.load(x_ptrs, mask=((t * BLOCK_K + offs_k) < 2 * KH)[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=((t * BKH + offs_kh) < KH)[None, :], other=0)
            w_lo, w_hi = unpack_lo_hi_float(w, DT, USE_ASM)
            wf = tl.reshape(tl.join(w_lo, w_hi), (BLOCK_N, BLOCK_K))  # the codes, natural K order
            x = x.to(DT)
            if SWAP_AB:
                part = tl.dot(wf, tl.trans(x))
            else:
                part = tl.dot(x, tl.trans(wf))
        if GROUP == 0:
            acc += part
        else:
            # BLOCK_K divides GROUP: this whole tile lies in group (t * BLOCK_K) // GROUP.
            sw = tl.load(sw_ptr + rn * stride_swn + (t * BLOCK_K) // GROUP)
            if SWAP_AB:
                acc += part * sw[:, None]
            else:
                acc += part * sw[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BKH
    if SWAP_AB:
        acc = tl.trans(acc)
    return acc


@triton.jit
def _w4a16_epilogue(total, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, GROUP: tl.constexpr,
                    ACCUMULATE: tl.constexpr):
    # `total` is the product of the codes (per channel: the scale comes here) or already scaled.
    # ACCUMULATE: out (float32) += the product; one program owns each output, so no atomics.
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if GROUP == 0:
        total = total * tl.load(sw_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    if ACCUMULATE:
        total = tl.load(ptrs, mask=mask, other=0.0) + total
    tl.store(ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _w4a16_gemm_kernel(
    x_ptr, qw_ptr, sw_ptr, out_ptr,
    M, N, KH, stride_xm, stride_wn, stride_om, stride_swn,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PLANES: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
    USE_ASM: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    pid, pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _w4a16_k_loop(x_ptr, qw_ptr, sw_ptr, offs_m % M, offs_n % N, KH, stride_xm, stride_wn, stride_swn,
                        0, tl.cdiv(KH, BLOCK_K // 2), GROUP, BLOCK_M, BLOCK_N, BLOCK_K, PLANES, EVEN_K, DOT_F32,
                        False, USE_ASM)
    _w4a16_epilogue(acc, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, GROUP, ACCUMULATE)


@triton.jit(do_not_specialize=["M", "SPLIT_K"])
def _w4a16_splitk_kernel(
    x_ptr, qw_ptr, sw_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, KH, stride_xm, stride_wn, stride_om, stride_swn, SPLIT_K,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PLANES: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
    SWAP_AB: tl.constexpr, USE_SPLIT: tl.constexpr, USE_ASM: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    pid, pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_tiles = tl.cdiv(KH, BLOCK_K // 2)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)
    acc = _w4a16_k_loop(x_ptr, qw_ptr, sw_ptr, offs_m % M, offs_n % N, KH, stride_xm, stride_wn, stride_swn,
                        t0, t1, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, PLANES, EVEN_K, DOT_F32, SWAP_AB, USE_ASM)
    if USE_SPLIT:
        is_last, total = splitk_reduce(acc, ws_ptr, cnt_ptr, pid, pid_k, offs_m, offs_n, M, N, SPLIT_K)
        if is_last:
            _w4a16_epilogue(total, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, GROUP, ACCUMULATE)
    else:
        _w4a16_epilogue(acc, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, GROUP, ACCUMULATE)


@triton.jit
def _x_channels(x_ptr, x_row, word, K, EVEN_K: tl.constexpr):
    """The activations that meet the eight codes of weight words `word` [BW]: eight float32 tiles
    [BLOCK_M, 1, BW], tile n holding channel 8 * word + n (0 past K). One contiguous
    [BLOCK_M, BW, 8] load split in registers: eight strided loads, one per channel of a word, in
    the words' own layout, were 9-20 % slower on the H200 (docs/DESIGN.md, "variants tried")."""
    kk = word[:, None] * 8 + tl.arange(0, 8)[None, :]
    if EVEN_K:
        x = tl.load(x_ptr + x_row + kk[None, :, :])
    else:
        x = tl.load(x_ptr + x_row + kk[None, :, :], mask=kk[None, :, :] < K, other=0.0)
    x0, x1, x2, x3, x4, x5, x6, x7 = split8(x.to(tl.float32))
    return (x0[:, None, :], x1[:, None, :], x2[:, None, :], x3[:, None, :], x4[:, None, :], x5[:, None, :],
            x6[:, None, :], x7[:, None, :])


# M and SPLIT_K are plain runtime ints (no recompile for M == 1 or per split count).
@triton.jit(do_not_specialize=["M", "SPLIT_K"])
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, sw_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_wn, stride_om, stride_swn, SPLIT_K,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    WORDS: tl.constexpr, EVEN_K: tl.constexpr, USE_SPLIT: tl.constexpr, ACCUMULATE: tl.constexpr,
    PDL: tl.constexpr,
):
    """A few tokens on the CUDA cores: an MMA tile is at least 16 tokens deep, so at M = 1 the
    tensor-core variants waste 15/16 of their work. The weights are streamed as int32 words (eight
    codes each, as the W4A4 gemv reads them), each word's codes made exact float32 (`int4.codes_f32`)
    and multiplied with their eight activations into one float32 accumulator per word,
    [BLOCK_M, BLOCK_N, BLOCK_K / 8], reduced once at the end. Strides in words when WORDS (rows
    4-byte aligned), else in bytes, each word assembled from its four. With groups a K tile may
    span several: each group's part of the tile is summed and multiplied by its scale as it is
    added ([BLOCK_M, BLOCK_N] accumulator), or, in a tile inside one group, the tile by its scale.
    K split over SPLIT_K programs as in `splitk`. PDL: launched as a programmatic dependent launch,
    waiting for the kernel before it before touching memory (as `w4a4`'s gemv)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    BW: tl.constexpr = BLOCK_K // 8  # weight words per K tile and row
    GW: tl.constexpr = GROUP // 8  # words per group (a group is a multiple of 8 channels: whole words)
    SPANS: tl.constexpr = GROUP != 0 and GROUP < BLOCK_K  # a K tile holds NG whole groups
    NG: tl.constexpr = BLOCK_K // GROUP if SPANS else 1
    KH = K // 2
    pid, pid_k, offs_m, offs_n, rm, rn, nw_w, t0, t1, offs_w = gemv_tile(M, N, KH, SPLIT_K, BLOCK_M, BLOCK_N, BW)
    w_row = (rn * stride_wn)[None, :, None]  # [1, BLOCK_N, 1]
    x_row = (rm * stride_xm)[:, None, None]  # [BLOCK_M, 1, 1]
    if SPANS:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BW), dtype=tl.float32)
    for t in range(t0, t1):
        word = t * BW + offs_w
        if EVEN_K:
            w = tl.load(qw_ptr + w_row + word[None, None, :])
        else:
            w = load_words(qw_ptr, w_row, word[None, None, :], nw_w, KH, WORDS)
        x0, x1, x2, x3, x4, x5, x6, x7 = _x_channels(x_ptr, x_row, word, K, EVEN_K)
        part = word_products(w, x0, x1, x2, x3, x4, x5, x6, x7)
        if GROUP == 0:
            acc3 += part
        elif SPANS:
            g = t * NG + tl.arange(0, NG)
            sw = tl.load(sw_ptr + rn[:, None] * stride_swn + g[None, :], mask=g[None, :] * GROUP < K, other=0.0)
            g_sum = tl.sum(tl.reshape(part, (BLOCK_M, BLOCK_N, NG, GW)), axis=3)
            acc += tl.sum(g_sum * sw[None, :, :], axis=2)
        else:  # the whole tile lies in group (t * BLOCK_K) // GROUP
            sw = tl.load(sw_ptr + rn * stride_swn + (t * BLOCK_K) // GROUP)
            acc3 += part * sw[None, :, None]
    if not SPANS:
        acc = tl.sum(acc3, axis=2)
    if USE_SPLIT:
        is_last, total = splitk_reduce(acc, ws_ptr, cnt_ptr, pid, pid_k, offs_m, offs_n, M, N, SPLIT_K)
        if is_last:
            _w4a16_epilogue(total, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, GROUP, ACCUMULATE)
    else:
        _w4a16_epilogue(acc, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, GROUP, ACCUMULATE)


# M is a plain runtime int, as in the gemm variant.
@triton.jit(do_not_specialize=["M"])
def _w4a16_tma_kernel(
    x_desc, w_desc, sw_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, KH, stride_om, stride_swn, SPLIT_K,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_F32: tl.constexpr, USE_ASM: tl.constexpr, ACCUMULATE: tl.constexpr,
    X_BF16: tl.constexpr, USE_SPLIT: tl.constexpr,
):
    """One output tile a program, both operands through TMA tensor descriptors: activations [M, K]
    in [BLOCK_M, BLOCK_K] boxes, packed weights [N, K/2] in [BLOCK_N, BLOCK_K/2] boxes, unpacked in
    registers straight to 16-bit codes (`int4.unpack_lo_hi_float`: no int -> float conversion
    instruction) and interleaved back to natural K order. The weights are the MMA's register
    operand (dot(w, x.T), the [BLOCK_N, BLOCK_M] tile transposed at the store), so they never go
    through shared memory. The copy engine fills a box past M, N or K with zeros (code 0,
    activation 0), so no load is masked. At small M (a box of 16 activation rows, the rows past M
    zero-filled and never read from memory) K is split over SPLIT_K programs as in `splitk`, so
    the grid covers the SMs."""
    off_m, off_n, offs_m, offs_n = tile_origin(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    BKH: tl.constexpr = BLOCK_K // 2
    # the MMA's 16-bit type is the activations' (out may be float32: ACCUMULATE)
    DT: tl.constexpr = tl.float32 if DOT_F32 else (tl.bfloat16 if X_BF16 else tl.float16)
    k_tiles = tl.cdiv(KH, BKH)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    pid_k = tl.program_id(1)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for t in range(t0, t1):
        x = x_desc.load([off_m, t * BLOCK_K])
        w_lo, w_hi = unpack_lo_hi_float(w_desc.load([off_n, t * BKH]), DT, USE_ASM)
        w = tl.reshape(tl.join(w_lo, w_hi), (BLOCK_N, BLOCK_K))  # the codes, exact in fp16 / bf16
        if DOT_F32:  # the interpreter's bf16 (see `_w4a16_k_loop`)
            x = x.to(tl.float32)
        if GROUP != 0:
            # BLOCK_K divides GROUP: this whole tile lies in group (t * BLOCK_K) // GROUP. Its scales
            # go into the 16-bit weights before the MMA, so the accumulator never waits on a rescale.
            sw = tl.load(sw_ptr + (offs_n % N) * stride_swn + (t * BLOCK_K) // GROUP)
            w = w * sw.to(DT)[:, None]
        acc = tl.dot(w, tl.trans(x), acc)
    if USE_SPLIT:
        is_last, total = splitk_reduce(tl.trans(acc), ws_ptr, cnt_ptr, tl.program_id(0), pid_k, offs_m, offs_n, M, N,
                                       SPLIT_K)
        if is_last:
            _w4a16_epilogue(total, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, GROUP, ACCUMULATE)
    else:
        _w4a16_epilogue(tl.trans(acc), sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, GROUP, ACCUMULATE)


def _common(cfg, x, group, out):
    block_k = cfg["BLOCK_K"] if not group else min(cfg["BLOCK_K"], group)
    KH = x.shape[1] // 2
    return dict(GROUP=group, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, GROUP_M=cfg["GROUP_M"],
                PLANES=bool(cfg.get("PLANES", False)) and block_k >= 32, EVEN_K=KH % (block_k // 2) == 0,
                DOT_F32=interpreting() and x.dtype == torch.bfloat16, USE_ASM=use_asm(x.device),
                ACCUMULATE=out.dtype == torch.float32,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _launch_gemm(cfg, x, qw, sw, out, group):
    M, K = x.shape
    N = qw.shape[0]
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _w4a16_gemm_kernel[grid](x, qw, sw, out, M, N, K // 2, x.stride(0), qw.stride(0), out.stride(0),
                             sw.stride(0) if group else 1, **_common(cfg, x, group, out))


def _launch_splitk(cfg, x, qw, sw, out, group):
    M, K = x.shape
    N = qw.shape[0]
    meta = _common(cfg, x, group, out)
    tiles_mn = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    split = choose_split_k(cfg, tiles_mn, triton.cdiv(K, meta["BLOCK_K"]), x.device)
    if split * M * N >= 2**31:
        raise ValueError(f"split-K partials of [{M}, {N}] x {split} exceed int32 offsets; use the gemm variant")
    ws, cnt = splitk_workspace(x.device, torch.float32, split * M * N if split > 1 else 0, tiles_mn if split > 1 else 0)
    _w4a16_splitk_kernel[(tiles_mn, split)](
        x, qw, sw, out, ws, cnt, M, N, K // 2, x.stride(0), qw.stride(0), out.stride(0), sw.stride(0) if group else 1,
        split, SWAP_AB=bool(cfg.get("SWAP_AB", False)), USE_SPLIT=split > 1, **meta)


def _launch_gemv(cfg, x, qw, sw, out, group):
    M, K = x.shape
    N = qw.shape[0]
    block_k = cfg["BLOCK_K"]  # a K tile may span groups (the kernel's docstring)
    if block_k < 8 or block_k & (block_k - 1):
        raise ValueError(f"gemv config BLOCK_K must be a power of two >= 8 (one word), got {block_k}")
    tiles_mn = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    nwords = triton.cdiv(K // 2, 4)
    split = choose_split_k(cfg, tiles_mn, triton.cdiv(nwords, block_k // 8), x.device)
    if split * M * N >= 2**31:
        raise ValueError(f"split-K partials of [{M}, {N}] x {split} exceed int32 offsets; use the gemm variant")
    ws, cnt = splitk_workspace(x.device, torch.float32, split * M * N if split > 1 else 0, tiles_mn if split > 1 else 0)
    # Words straight from memory where every row starts 4-byte aligned; else bytes assembled.
    words = words_aligned(x, qw)
    w, unit = (qw.view(torch.int32), 4) if words else (qw, 1)
    pdl = use_pdl(x.device)
    _w4a16_gemv_kernel[(tiles_mn, split)](
        x, w, sw, out, ws, cnt, M, N, K, x.stride(0), qw.stride(0) // unit, out.stride(0),
        sw.stride(0) if group else 1, split, GROUP=group, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=block_k, WORDS=words, EVEN_K=words and nwords % (block_k // 8) == 0,
        USE_SPLIT=split > 1, ACCUMULATE=out.dtype == torch.float32,
        PDL=pdl, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **({"launch_pdl": True} if pdl else {}))


FP16_FOLDED_SCALE_MAX = 8188.0  # 8 x 8188 = 65504, fp16's largest finite value


def tma_takes(x, qw):
    """True when the tma variant can take these operands: TMA descriptors' 16-byte aligned base and
    row stride (K a multiple of 32: K/2 weight bytes a row)."""
    return qw.shape[1] % 16 == 0 and x.data_ptr() % 16 == 0 and qw.data_ptr() % 16 == 0


def _launch_tma(cfg, x, qw, sw, out, group):
    M, K = x.shape
    N = qw.shape[0]
    if not tma_takes(x, qw):
        raise ValueError(f"the tma variant needs K a multiple of 32 and 16-byte aligned operands, got K={K} "
                         "(a launch-table bucket naming tma sends such operands to its no_tma config)")
    meta = _common(cfg, x, group, out)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], meta["BLOCK_K"]
    tiles_mn = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    split = choose_split_k(dict(cfg, SPLIT_K=cfg.get("SPLIT_K", 1)), tiles_mn, triton.cdiv(K, bk), x.device)
    if split * M * N >= 2**31:
        raise ValueError(f"split-K partials of [{M}, {N}] x {split} exceed int32 offsets; use SPLIT_K 1")
    ws, cnt = splitk_workspace(x.device, torch.float32, split * M * N if split > 1 else 0, tiles_mn if split > 1 else 0)
    _w4a16_tma_kernel[(tiles_mn, split)](
        TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(qw, [bn, bk // 2]), sw, out, ws, cnt,
        M, N, K // 2, out.stride(0), sw.stride(0) if group else 1, split,
        GROUP=group, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
        DOT_F32=meta["DOT_F32"], USE_ASM=meta["USE_ASM"], ACCUMULATE=meta["ACCUMULATE"],
        X_BF16=x.dtype == torch.bfloat16, USE_SPLIT=split > 1, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])


VARIANTS = {"gemm": _launch_gemm, "splitk": _launch_splitk, "gemv": _launch_gemv, "tma": _launch_tma}


def w4a16_gemm(x, qw_packed, w_scale, group_size=None, *, out=None, accumulate=False, config=None,
               check_finite=True):
    """x fp16|bf16 [M, K], qw_packed uint8 [N, K/2], w_scale fp32 [N] (or [N, ceil(K/g)] with
    group_size=g) -> x.dtype [M, N]. `out` (optional): preallocated result. accumulate=True: `out`
    (required, float32 [M, N]) gets the product added in the epilogue, in fp32, and is returned.
    `config` (tests and tuning) replaces the launch table's entry: a dict with "variant" and its
    tile parameters. check_finite: refuse NaN / Inf in x or w_scale (and in an accumulated `out`;
    False on the layers' per-token path)."""
    check_float_acts("x", x)
    M, N, K = check_float_x_packed_w(x, qw_packed)
    group_size = limits.check_w4a16_group(group_size)
    sw_shape = (N,) if group_size is None else (N, triton.cdiv(K, group_size))
    check_scale("w_scale", w_scale, sw_shape, x.device)
    if accumulate is not True and accumulate is not False:
        raise ValueError(f"accumulate must be True or False, got {accumulate!r}")
    if accumulate and out is None:
        raise ValueError("accumulate=True adds into out: pass out, a float32 [M, N] tensor")
    out = check_out(out, (M, N), torch.float32 if accumulate else x.dtype, x.device)
    if check_finite:
        refuse_non_finite(x=x, w_scale=w_scale, **({"out": out} if accumulate else {}))
    scales = "per_channel" if group_size is None else "group"
    cfg = dict(config) if config is not None else launch_config("w4a16", scales, M, x.device, N, K)
    variant, cfg = tma_or_fallback(cfg, tma_takes(x, qw_packed))
    if variant not in VARIANTS:
        raise ValueError(f"config variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    if check_finite and variant == "tma" and group_size and x.dtype == torch.float16:
        big = float(w_scale.abs().max()) if w_scale.numel() else 0.0
        if big > FP16_FOLDED_SCALE_MAX:
            raise ValueError(f"w_scale: the tma variant folds group scales into fp16 weights (codes up to -8); "
                             f"|scale| <= {FP16_FOLDED_SCALE_MAX} needed, got {big:g}")
    VARIANTS[variant](cfg, x, qw_packed, w_scale, out, group_size or 0)
    return out
