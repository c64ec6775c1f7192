"""W4A16 GEMM (our weight-only baseline): fp16/bf16 activations x packed int4 weights.

    Y[M, N] = sum_g (x[:, g] @ qw[:, g].T) x w_scale[:, g]      (per-channel: one group = all of K)

The weights are unpacked as 16 * code (`int4.unpack_lo_hi_x16`, exact in fp16/bf16) and put back
in natural K order (join + reshape), so each K tile is one 16-bit tensor-core dot of a contiguous
x tile against them, accumulated in fp32; the scale (and the exact 1/16) multiplies the fp32
partial sum (per group, BLOCK_K divides the group) or the whole sum in the epilogue (per channel).
Small M swaps the operands (weights on the MMA's M side), as `w4a4` does.
Small M splits K the same way as `w4a4` (last arriving program reduces, deterministic).
Requirements (ValueError otherwise): x [M, K] fp16|bf16 contiguous, qw_packed uint8 [N, K/2]
contiguous, w_scale fp32 [N] or [N, ceil(K/g)], group_size in (None, 32, 64, 128, 256), one device.
"""
import torch
import triton
import triton.language as tl

from zqkernels.gpu.int4 import unpack_lo_hi_x16
from zqkernels.gpu.w4a4 import (
    _check_packed, _check_scale, check_out, choose_split_k, interpreting, launch_config, splitk_buffers, tile_ids,
)

SUPPORTED_GROUPS = (32, 64, 128, 256)


@triton.jit
def _w4a16_epilogue(total, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, GROUP: tl.constexpr):
    # `total` is 16x the product (weights unpacked as 16 * code); 1/16 is exact.
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if GROUP == 0:
        total = total * (tl.load(sw_ptr + offs_n, mask=offs_n < N, other=0.0) * 0.0625)[None, :]
    else:
        total = total * 0.0625
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)


# M and SPLIT_K are plain runtime ints (no recompile for M == 1 or per split count).
@triton.jit(do_not_specialize=["M", "SPLIT_K"])
def _w4a16_gemm_kernel(
    x_ptr, qw_ptr, sw_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, KH, stride_xm, stride_wn, stride_om, stride_swn,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K, USE_SPLIT: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_F32: tl.constexpr,
    SWAP_AB: tl.constexpr, USE_ASM: tl.constexpr, PLANES: tl.constexpr,
):
    BKH: tl.constexpr = BLOCK_K // 2
    pid, pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M
    rn = offs_n % N
    offs_kh = tl.max_contiguous(tl.multiple_of(tl.arange(0, BKH), BKH), BKH)
    offs_k = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)

    k_tiles = tl.cdiv(KH, BKH)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)
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
            w_lo, w_hi = unpack_lo_hi_x16(w, USE_ASM)
            if DOT_F32:  # interpreter only (see below)
                xe = xe.to(tl.float32)
                xo = xo.to(tl.float32)
                w_lo = w_lo.to(tl.float32)
                w_hi = w_hi.to(tl.float32)
            else:
                w_lo = w_lo.to(x_ptr.dtype.element_ty)
                w_hi = w_hi.to(x_ptr.dtype.element_ty)
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
            w_lo, w_hi = unpack_lo_hi_x16(w, USE_ASM)
            w8 = tl.reshape(tl.join(w_lo, w_hi), (BLOCK_N, BLOCK_K))  # 16 * code, natural K order
            if DOT_F32:
                # Triton 3.9's interpreter mishandles bf16 (int8 -> bf16 casts and bf16 dots act on
                # the raw bits): there, and only there, the bf16 tiles go through exact fp32 instead.
                x = x.to(tl.float32)
                wf = w8.to(tl.float32)
            else:
                wf = w8.to(x_ptr.dtype.element_ty)  # 16 * code in [-128, 112]: exact in fp16/bf16
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
    if not USE_SPLIT:
        _w4a16_epilogue(acc, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, GROUP)
    else:
        ws_tile = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        valid = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(ws_tile + pid_k * M * N, acc, mask=valid)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid, 1)
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(ws_tile + s * M * N, mask=valid, other=0.0, cache_modifier=".cg")
            _w4a16_epilogue(total, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, GROUP)
            tl.atomic_xchg(cnt_ptr + pid, 0)


def w4a16_gemm(x, qw_packed, w_scale, group_size=None, *, out=None, config=None):
    """x fp16|bf16 [M, K], qw_packed uint8 [N, K/2], w_scale fp32 [N] (or [N, ceil(K/g)] with
    group_size=g) -> x.dtype [M, N]. `out` (optional): preallocated result. `config` overrides the tuned launch config (tuning only)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x dtype must be float16 or bfloat16, got {x.dtype}")
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must be a non-empty 2-D [M, K] tensor, got shape {tuple(x.shape)}")
    if x.shape[1] % 2 != 0:
        raise ValueError(f"x: K must be even (int4 weights pack two codes per byte), got K={x.shape[1]}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"x is on {x.device}; the Triton kernel needs CUDA (or TRITON_INTERPRET=1)")
    _check_packed("qw_packed", qw_packed)
    if qw_packed.device != x.device:
        raise ValueError(f"qw_packed is on {qw_packed.device}, x on {x.device}")
    M, K = x.shape
    N, KH = qw_packed.shape
    if 2 * KH != K:
        raise ValueError(f"qw_packed has K/2={KH}, x has K={K}")
    if group_size is not None and group_size not in SUPPORTED_GROUPS:
        raise ValueError(f"group_size must be None or one of {SUPPORTED_GROUPS}, got {group_size}")
    sw_shape = (N,) if group_size is None else (N, triton.cdiv(K, group_size))
    _check_scale("w_scale", w_scale, sw_shape, x.device)
    out = check_out(out, (M, N), x.dtype, x.device)

    mode = "per_channel" if group_size is None else "group"
    cfg = dict(config) if config is not None else launch_config("w4a16", mode, M, x.device)
    cfg.setdefault("SPLIT_TARGET_CTAS", 264)
    block_k = cfg["BLOCK_K"] if group_size is None else min(cfg["BLOCK_K"], group_size)
    bkh = block_k // 2
    tiles_mn = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    split = choose_split_k(cfg, tiles_mn, triton.cdiv(KH, bkh))
    ws, cnt = splitk_buffers(x.device, split * M * N if split > 1 else 0, tiles_mn if split > 1 else 0)
    _w4a16_gemm_kernel[(tiles_mn, split)](
        x, qw_packed, w_scale, out, ws.view(torch.float32), cnt,
        M, N, KH, x.stride(0), qw_packed.stride(0), out.stride(0), w_scale.stride(0) if group_size else 1,
        GROUP=group_size or 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, SPLIT_K=split, USE_SPLIT=split > 1,
        GROUP_M=cfg["GROUP_M"], EVEN_K=(KH % bkh == 0),
        DOT_F32=interpreting() and x.dtype == torch.bfloat16,
        SWAP_AB=bool(cfg.get("SWAP_AB", False)), USE_ASM=x.device.type == "cuda" and not interpreting() and bool(cfg.get("USE_ASM", True)),
        PLANES=bool(cfg.get("PLANES", False)) and block_k >= 32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
