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

Requirements (ValueError otherwise): activations uint8 packed [M, K/2] or int8 codes [M, K],
weights uint8 packed [N, K/2], contiguous, on one device (CUDA, or the CPU under
TRITON_INTERPRET=1); float32 scales of the documented shapes; act_group_size in
`limits.ACT_GROUPS`; K <= `limits.MAX_K`. M, N, K need not be tile multiples. Int8 codes outside
-8..7 are not checked (one pass over the tensor per call); they are what the quantizer writes.
"""
import torch
import triton
import triton.language as tl

from zqkernels.gpu import limits
from zqkernels.gpu.configs import launch_config, table_for, use_asm
from zqkernels.gpu.int4 import unpack_lo_hi_x16
from zqkernels.gpu.operands import (
    check_int8_codes, check_out, check_out_dtype, check_packed, check_same_device, check_scale, refuse_non_finite,
)
from zqkernels.gpu.tiling import choose_split_k, splitk_reduce, splitk_workspace, tile_ids

ACT_LAYOUTS = ("int4", "int8")  # the `act_layout` of a launch-table bucket; the quantizer's `layout`


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
    # `total` is [BLOCK_M, BLOCK_N]: 256x the code product with packed activations, 16x with int8.
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if OUT_INT32:
        val = _code_product(total, A_INT8)
    else:
        sw = tl.load(sw_ptr + offs_n, mask=offs_n < N, other=0.0)
        if ACT_GROUP == 0:
            sa = tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)
            val = _code_product(total, A_INT8).to(tl.float32) * sa[:, None] * sw[None, :]
        elif A_INT8:
            val = total * (sw * 0.0625)[None, :]  # 1/16: a power of two, exact
        else:
            val = total * (sw * 0.00390625)[None, :]  # 1/256: a power of two, exact
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(ptrs, val.to(out_ptr.dtype.element_ty), mask=mask)


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
    if USE_SPLIT:
        is_last, total = splitk_reduce(acc, ws_ptr, cnt_ptr, pid, pid_k, offs_m, offs_n, M, N, SPLIT_K)
        if is_last:
            _w4a4_epilogue(total, sx_ptr, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, ACT_GROUP, OUT_INT32,
                           A_INT8)
    else:
        _w4a4_epilogue(acc, sx_ptr, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, ACT_GROUP, OUT_INT32, A_INT8)


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


VARIANTS = {"gemm": _launch_gemm, "splitk": _launch_splitk}


def _launch(qx, sx, qw, sw, out, act_group, out_int32, config):
    """The dispatcher: the launch table's config for this M names the variant (see the docstring)."""
    scales = "per_token" if act_group == 0 else "group"
    cfg = dict(config) if config is not None else launch_config("w4a4", scales, qx.shape[0], qx.device)
    # The operand's dtype decides the activation load; a config's act_layout is the quantizer's choice.
    layout = cfg.pop("act_layout", "int4")
    if layout not in ACT_LAYOUTS:
        raise ValueError(f"config act_layout must be one of {ACT_LAYOUTS}, got {layout!r}")
    variant = cfg.pop("variant")
    if variant not in VARIANTS:
        raise ValueError(f"config variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    VARIANTS[variant](cfg, qx, sx, qw, sw, out, act_group, out_int32)
    return out


def act_layouts(act_group_size, device):
    """((M bucket, act_layout), ...) in M order: the activation layout ("int4" | "int8") each w4a4
    bucket of the launch table names (`act_layout`, required in every bucket), for `pick_act_layout`.
    A layer reads it once when built, so its forward picks the layout from a tuple of constants
    (no table read per call, and `torch.compile` traces it)."""
    scales = "per_token" if not act_group_size else "group"
    steps = []
    for key in sorted(int(k) for k in table_for(device)["w4a4"][scales]):
        layout = launch_config("w4a4", scales, key, device).get("act_layout")
        if layout not in ACT_LAYOUTS:
            raise ValueError(f"launch table w4a4/{scales} bucket {key}: act_layout must be one of {ACT_LAYOUTS}, "
                             f"got {layout!r}")
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
