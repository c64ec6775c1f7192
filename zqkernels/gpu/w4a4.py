"""W4A4 GEMM: packed int4 activations x packed int4 weights, int8 tensor cores, int32 accumulate.

    Y[M, N] = act_scale x w_scale x (qx @ qw.T)           (per-token activation scales)
    Y[M, N] = w_scale x sum_g act_scale[:, g] x (qx_g @ qw_g.T)   (act_group_size = g)

Hopper has no INT4 MMA: each program loads packed bytes, unpacks the nibbles to int8 in registers
and feeds an int8 `tl.dot` (wgmma on Hopper) with int32 accumulation. The unpack is
`int4.unpack_lo_hi_x16`: each nibble moved to the top of its byte (int8 value 16 * code), one
32-bit AND or shift+AND per four bytes; the dot is then 256x the code product, shifted back exactly
(on the H100 this was 1.5x faster than a sign-extending unpack, whose ~12 integer ops per byte
outweighed the MMAs at large M). Two K orders, both exact: PLANES (dot the even-element and
odd-element planes separately, no shuffle; needs BLOCK_K >= 64) or natural order (join + reshape).
Small M uses SWAP_AB: the tile is computed transposed so the weights sit on the MMA's M side
(>= 64 rows) and the few tokens on its N side. With per-group
activation scales the int32 partial sum of each K tile is rescaled into an fp32 accumulator;
BLOCK_K divides the group size (the launcher shrinks BLOCK_K to the group when needed), so every K
tile lies inside one group. The weight scale is per output channel (the epilogue).

Small M (decode) is bound by the weight bytes and has too few output tiles to fill 132 SMs, so the
K loop is split over SPLIT_K programs; the last program to finish a tile (an atomic counter per
tile) sums the partials in split order and runs the epilogue: one launch, deterministic, exact in
int32 for per-token scales. Large M uses big tiles, grouped tile order for L2 reuse, no split.
Launch configs are data: `configs/<gpu>.json`, keyed by M bucket (`launch_config`).

Requirements (ValueError otherwise): uint8 packed operands [M, K/2] and [N, K/2], contiguous, on
one device (a CUDA device, or the CPU under TRITON_INTERPRET=1); float32 scales of the documented
shapes; act_group_size in (None, 32, 64, 128, 256); K <= 131070 (int32 range of the 256x sums).
M, N, K need not be multiples of any tile.
The split-K workspace and tile counters are cached per device: launches that run concurrently on
different streams of one device must not share them (serialize on one stream, as inference does).
"""
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from zqkernels.gpu.int4 import unpack_lo_hi_x16

SUPPORTED_ACT_GROUPS = (32, 64, 128, 256)
# Operands are unpacked as 16 * code (int4.unpack_lo_hi_x16): |sum| <= 256 * 64 * K must fit int32.
MAX_KH = 65535
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CONFIG_DIR = Path(__file__).with_name("configs")

# Used where no tuned table matches the device (and under the interpreter, where small tiles keep
# the numpy emulation fast). PLANES: dot the even-element and odd-element nibble planes separately
# (needs BLOCK_K/2 >= 32 compiled); otherwise rebuild natural order and do one dot.
# SPLIT_K = 0 means "choose": enough splits for about SPLIT_TARGET_CTAS programs.
_DEFAULTS = {
    "w4a4": {
        "per_token": {
            "16": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, SPLIT_K=0, GROUP_M=1, PLANES=False, SWAP_AB=True, num_warps=4, num_stages=4),
            "64": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=256, SPLIT_K=0, GROUP_M=8, PLANES=False, num_warps=4, num_stages=4),
            "256": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, GROUP_M=8, PLANES=False, num_warps=8, num_stages=3),
            "4096": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, SPLIT_K=1, GROUP_M=8, PLANES=False, num_warps=8, num_stages=3),
        },
        "group": {
            "16": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=0, GROUP_M=1, PLANES=False, SWAP_AB=True, num_warps=4, num_stages=4),
            "64": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=0, GROUP_M=8, PLANES=False, num_warps=4, num_stages=4),
            "4096": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, SPLIT_K=1, GROUP_M=8, PLANES=False, num_warps=8, num_stages=3),
        },
    },
    "w4a16": {
        "per_channel": {
            "16": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, SPLIT_K=0, GROUP_M=1, SWAP_AB=True, num_warps=4, num_stages=4),
            "64": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=0, GROUP_M=8, num_warps=4, num_stages=4),
            "4096": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, GROUP_M=8, num_warps=8, num_stages=4),
        },
        "group": {
            "16": dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=0, GROUP_M=1, SWAP_AB=True, num_warps=4, num_stages=4),
            "64": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=0, GROUP_M=8, num_warps=4, num_stages=4),
            "4096": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, GROUP_M=8, num_warps=8, num_stages=4),
        },
    },
}
_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=0, GROUP_M=2, PLANES=True,
                           num_warps=4, num_stages=1, SPLIT_TARGET_CTAS=8)


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _table_for(device):
    """The tuned table of this GPU model (configs/<name>.json, matched on the device name)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for path in sorted(_CONFIG_DIR.glob("*.json")):
        if path.stem.lower() in name:
            return json.loads(path.read_text())
    return None


_TABLE_CACHE = {}


def launch_config(family, mode, M, device):
    """Launch config for `family` ('w4a4'|'w4a16'), `mode` ('per_token'|'group'|'per_channel'),
    from the device's JSON table, bucket = smallest key >= M (else the largest)."""
    if interpreting() or device.type != "cuda":
        return dict(_INTERPRETER_CONFIG, SWAP_AB=M <= 8)  # both orientations get exercised
    key = (device.index if device.index is not None else torch.cuda.current_device())
    if key not in _TABLE_CACHE:
        _TABLE_CACHE[key] = _table_for(device)
    table = _TABLE_CACHE[key]
    buckets = (table or {}).get(family, {}).get(mode) or _DEFAULTS[family][mode]
    keys = sorted(int(k) for k in buckets)
    pick = next((k for k in keys if k >= M), keys[-1])
    cfg = dict(buckets[str(pick)])
    if "SPLIT_TARGET_CTAS" not in cfg:
        if ("sms", key) not in _TABLE_CACHE:
            _TABLE_CACHE[("sms", key)] = torch.cuda.get_device_properties(device).multi_processor_count
        cfg["SPLIT_TARGET_CTAS"] = 2 * _TABLE_CACHE[("sms", key)]
    return cfg


def choose_split_k(cfg, tiles_mn, k_tiles):
    split = int(cfg.get("SPLIT_K", 1))
    if split == 0:
        split = 1
        while tiles_mn * split * 2 <= cfg["SPLIT_TARGET_CTAS"] and split * 2 <= k_tiles and split < 32:
            split *= 2
    return max(1, min(split, k_tiles))


_WORKSPACE = {}


def splitk_buffers(device, n_partial, n_tiles):
    """(int32 workspace of >= n_partial elements, int32 tile counters, zero, >= n_tiles)."""
    key = (device.type, device.index)
    ws, cnt = _WORKSPACE.get(key, (None, None))
    if ws is None or ws.numel() < n_partial:
        ws = torch.empty(max(n_partial, 1 << 16), dtype=torch.int32, device=device)
    if cnt is None or cnt.numel() < n_tiles:
        cnt = torch.zeros(max(n_tiles, 1 << 12), dtype=torch.int32, device=device)
    _WORKSPACE[key] = (ws, cnt)
    return ws, cnt


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row-tiles share each weight column-tile while it is in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % size_m)
    pid_n = (pid % in_group) // size_m
    return pid, pid_m, pid_n


@triton.jit
def _w4a4_epilogue(total, sx_ptr, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om,
                   ACT_GROUP: tl.constexpr, OUT_INT32: tl.constexpr):
    # `total` is [BLOCK_M, BLOCK_N] and 256x the code product (both operands unpacked as 16 * code).
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if OUT_INT32:
        val = total >> 8  # exact: every partial sum is a multiple of 256
    else:
        sw = tl.load(sw_ptr + offs_n, mask=offs_n < N, other=0.0)
        if ACT_GROUP == 0:
            sa = tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)
            val = (total >> 8).to(tl.float32) * sa[:, None] * sw[None, :]
        else:
            val = total * (sw * 0.00390625)[None, :]  # 1/256: a power of two, exact
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(ptrs, val.to(out_ptr.dtype.element_ty), mask=mask)


# M and SPLIT_K are plain runtime ints: M == 1 (decode) or each split count would otherwise
# compile another kernel per config.
@triton.jit(do_not_specialize=["M", "SPLIT_K"])
def _w4a4_gemm_kernel(
    qx_ptr, sx_ptr, qw_ptr, sw_ptr, out_ptr, ws_ptr, cnt_ptr,
    M, N, KH, stride_xm, stride_wn, stride_om, stride_sxm,
    ACT_GROUP: tl.constexpr, OUT_INT32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K, USE_SPLIT: tl.constexpr, GROUP_M: tl.constexpr, PLANES: tl.constexpr, EVEN_K: tl.constexpr,
    SWAP_AB: tl.constexpr, USE_ASM: tl.constexpr,
):
    BKH: tl.constexpr = BLOCK_K // 2
    pid, pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/cols read a valid row instead (modulo) and are never stored: no load masks.
    rm = offs_m % M
    rn = offs_n % N
    offs_kh = tl.max_contiguous(tl.multiple_of(tl.arange(0, BKH), BKH), BKH)

    k_tiles = tl.cdiv(KH, BKH)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)
    a_ptrs = qx_ptr + rm.to(tl.int64)[:, None] * stride_xm + (t0 * BKH + offs_kh)[None, :]
    w_ptrs = qw_ptr + rn.to(tl.int64)[:, None] * stride_wn + (t0 * BKH + offs_kh)[None, :]

    # SWAP_AB (small M): compute the transposed tile [BLOCK_N, BLOCK_M] so the weights are the MMA's
    # A operand (its M side must be >= 64; a few tokens are a poor one) and the tiny activation
    # tile is B.
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
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0)  # byte 0 = codes (0, 0)
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0)
        a_lo, a_hi = unpack_lo_hi_x16(a, USE_ASM)
        w_lo, w_hi = unpack_lo_hi_x16(w, USE_ASM)
        if PLANES:
            if SWAP_AB:
                part = tl.dot(w_lo, tl.trans(a_lo), out_dtype=tl.int32)
                part = tl.dot(w_hi, tl.trans(a_hi), part, out_dtype=tl.int32)
            else:
                part = tl.dot(a_lo, tl.trans(w_lo), out_dtype=tl.int32)
                part = tl.dot(a_hi, tl.trans(w_hi), part, out_dtype=tl.int32)
        else:
            a8 = tl.reshape(tl.join(a_lo, a_hi), (BLOCK_M, BLOCK_K))
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
        a_ptrs += BKH
        w_ptrs += BKH

    if ACT_GROUP == 0:
        acc = acc_i
    else:
        acc = acc_f
    if SWAP_AB:
        acc = tl.trans(acc)
    if not USE_SPLIT:
        _w4a4_epilogue(acc, sx_ptr, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, ACT_GROUP, OUT_INT32)
    else:
        ws_tile = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        valid = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(ws_tile + pid_k * M * N, acc, mask=valid)
        # Every thread's partial must be stored before the (single-thread, acq_rel) arrival.
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid, 1)
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc.dtype)
            for s in range(SPLIT_K):  # fixed order: the result does not depend on arrival order
                total += tl.load(ws_tile + s * M * N, mask=valid, other=0, cache_modifier=".cg")
            _w4a4_epilogue(total, sx_ptr, sw_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, ACT_GROUP, OUT_INT32)
            tl.atomic_xchg(cnt_ptr + pid, 0)  # ready for the next launch


def _check_packed(name, t):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8:
        raise ValueError(f"{name} must be uint8 (two int4 codes per byte), got {t.dtype}")
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D packed tensor, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"{name} is on {t.device}; the Triton kernel needs CUDA (or TRITON_INTERPRET=1)")


def _check_operands(qx_packed, qw_packed):
    """The two packed operands of a W4A4 product: same device, same K, K within int32 range."""
    _check_packed("qx_packed", qx_packed)
    _check_packed("qw_packed", qw_packed)
    if qw_packed.device != qx_packed.device:
        raise ValueError(f"qw_packed is on {qw_packed.device}, qx_packed on {qx_packed.device}")
    M, KH = qx_packed.shape
    N = qw_packed.shape[0]
    if qw_packed.shape[1] != KH:
        raise ValueError(f"qw_packed has K/2={qw_packed.shape[1]}, qx_packed K/2={KH}")
    if KH > MAX_KH:
        raise ValueError(f"qx_packed: K={2 * KH} too large; the int32 accumulator (256x the code product) holds K <= {2 * MAX_KH}")
    return M, N, KH


def _check_scale(name, t, shape, device):
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
        raise ValueError(f"{name} must be a float32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the packed operands on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_out(out, shape, dtype, device):
    """A caller's preallocated result (tests poison it), or a new one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(out, torch.Tensor) or out.dtype != dtype or tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must be a {dtype} tensor of shape {tuple(shape)}, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}")
    if out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be contiguous on {device}")
    return out


def _launch(qx, sx, qw, sw, out, act_group, out_int32, cfg=None):
    M, KH = qx.shape
    N = qw.shape[0]
    mode = "per_token" if act_group == 0 else "group"
    cfg = dict(cfg) if cfg is not None else launch_config("w4a4", mode, M, qx.device)
    cfg.setdefault("SPLIT_TARGET_CTAS", 264)
    block_k = cfg["BLOCK_K"]
    planes = bool(cfg.get("PLANES", True))
    if act_group:
        block_k = min(block_k, act_group)  # a K tile must not straddle a group
    if block_k < 64:
        planes = False  # each plane would be shorter than the int8 dot's minimum K of 32
    bkh = block_k // 2
    tiles_mn = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    k_tiles = triton.cdiv(KH, bkh)
    split = choose_split_k(cfg, tiles_mn, k_tiles)
    ws, cnt = splitk_buffers(qx.device, split * M * N if split > 1 else 0, tiles_mn if split > 1 else 0)
    # The workspace holds int32 partials (per-token, int32 out) or fp32 ones (group-rescaled).
    # Trailing splits left without K tiles by the ceil division still store zeros and arrive.
    ws = ws if act_group == 0 else ws.view(torch.float32)
    use_asm = qx.device.type == "cuda" and not interpreting() and bool(cfg.get("USE_ASM", True))
    _w4a4_gemm_kernel[(tiles_mn, split)](
        qx, sx, qw, sw, out, ws, cnt,
        M, N, KH, qx.stride(0), qw.stride(0), out.stride(0), sx.stride(0) if sx.dim() == 2 else 1,
        ACT_GROUP=act_group, OUT_INT32=out_int32,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, SPLIT_K=split, USE_SPLIT=split > 1,
        GROUP_M=cfg["GROUP_M"], PLANES=planes, EVEN_K=(KH % bkh == 0),
        SWAP_AB=bool(cfg.get("SWAP_AB", False)), USE_ASM=use_asm,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def w4a4_gemm(qx_packed, act_scale, qw_packed, w_scale, act_group_size=None, out_dtype=torch.float16, *,
              out=None, config=None):
    """qx_packed uint8 [M, K/2], act_scale fp32 [M] (or [M, ceil(K/g)] with act_group_size=g),
    qw_packed uint8 [N, K/2], w_scale fp32 [N] -> out_dtype [M, N] (fp16, bf16 or fp32).
    `out` (optional): preallocated result. `config` overrides the tuned launch config (tuning only)."""
    M, N, KH = _check_operands(qx_packed, qw_packed)
    if act_group_size is not None and act_group_size not in SUPPORTED_ACT_GROUPS:
        raise ValueError(f"act_group_size must be None or one of {SUPPORTED_ACT_GROUPS}, got {act_group_size}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    K = 2 * KH
    sx_shape = (M,) if act_group_size is None else (M, triton.cdiv(K, act_group_size))
    _check_scale("act_scale", act_scale, sx_shape, qx_packed.device)
    _check_scale("w_scale", w_scale, (N,), qx_packed.device)
    out = check_out(out, (M, N), out_dtype, qx_packed.device)
    return _launch(qx_packed, act_scale, qw_packed, w_scale, out, act_group_size or 0, False, config)


def w4a4_gemm_int32(qx_packed, qw_packed, *, out=None, config=None):
    """qx_packed uint8 [M, K/2] x qw_packed uint8 [N, K/2] -> int32 [M, N] = qx @ qw.T exactly."""
    M, N, KH = _check_operands(qx_packed, qw_packed)
    out = check_out(out, (M, N), torch.int32, qx_packed.device)
    dummy = torch.empty(1, dtype=torch.float32, device=qx_packed.device)
    return _launch(qx_packed, dummy, qw_packed, dummy, out, 0, True, config)
