"""Fused activation quantization: optional smoothing (x * 1/s), per-token or per-token-per-group
absmax, IEEE float32 scale and codes (round half to even), int4 packing; one pass over X.

Contract (brief, "Shared contracts"; DESIGN.md §1), all in IEEE float32 so that the GPU is
bit-exact with `reference.quantize_activations`:
    xs     = float32(x) * inv_smooth          (IEEE mul; skipped when inv_smooth is None)
    absmax = max |xs| over the row (or the group of g channels; the last group may be short)
    scale  = div_rn(absmax, 7)
    codes  = clip(rint(div_rn(xs, scale)), -8, 7);   absmax == 0 -> scale 0, codes 0
One program quantizes BLOCK_K channels of one token (a per-token row longer than ONE_PASS_MAX_K in
two passes over chunks); the tile is viewed as [groups, g/2, 2] so the even/odd pair of each
packed byte sits in the last axis and packing is a reduction over it.
"""
import torch
import triton
import triton.language as tl

from zqkernels.gpu.int4 import div_rn, pack_lo_hi, rint_f32

SUPPORTED_GROUPS = (32, 64, 128, 256)
# Per-token rows up to this many channels are quantized from registers in one pass; longer rows
# take two passes over chunks of ROW_CHUNK (absmax, then codes; the second read hits L1/L2).
ONE_PASS_MAX_K = 8192
ROW_CHUNK = 4096


@triton.jit
def _load_tile(x_ptr, inv_ptr, row_off, k0, K, NG: tl.constexpr, HALF: tl.constexpr,
               HAS_INV: tl.constexpr, LOAD_1D: tl.constexpr):
    """float32 tile [NG, HALF, 2] of x (* inv_smooth) at channels k0 + g*2*HALF + 2*i + j."""
    if LOAD_1D:
        # contiguous 1-D load (wide vector loads), then viewed as [groups, pairs, 2]
        k1 = k0 + tl.arange(0, NG * HALF * 2)
        m1 = k1 < K
        x = tl.load(x_ptr + row_off + k1, mask=m1, other=0.0).to(tl.float32)
        if HAS_INV:
            x = x * tl.load(inv_ptr + k1, mask=m1, other=0.0)
        x = tl.reshape(x, (NG, HALF, 2))
    else:
        g = tl.arange(0, NG)[:, None, None]
        i = tl.arange(0, HALF)[None, :, None]
        j = tl.arange(0, 2)[None, None, :]
        k = k0 + g * (2 * HALF) + 2 * i + j
        mask = k < K
        x = tl.load(x_ptr + row_off + k, mask=mask, other=0.0).to(tl.float32)
        if HAS_INV:
            x = x * tl.load(inv_ptr + k, mask=mask, other=0.0)
    return x


@triton.jit
def _absmax(x):
    return tl.max(tl.max(tl.abs(x), axis=2), axis=1)  # [NG]


@triton.jit
def _store_codes(x, scale, q_ptr, qrow_off, k0, K, NG: tl.constexpr, HALF: tl.constexpr):
    safe = tl.where(scale == 0.0, 1.0, scale)
    v = div_rn(x, safe[:, None, None])
    # clip before rounding: the same as rounding then clipping (the bounds are integers), and
    # keeps |v| small enough for rint_f32; inf (tiny nonzero scale) clips like numpy's clip.
    v = tl.minimum(tl.maximum(v, -8.0), 7.0)
    codes = rint_f32(v).to(tl.int32)
    codes = tl.where((scale == 0.0)[:, None, None], 0, codes)
    j = tl.arange(0, 2)[None, None, :]
    lo = tl.sum(tl.where(j == 0, codes, 0), axis=2)  # [NG, HALF]: the pair of each packed byte
    hi = tl.sum(tl.where(j == 1, codes, 0), axis=2)
    kk = k0 + tl.arange(0, NG)[:, None] * (2 * HALF) + 2 * tl.arange(0, HALF)[None, :]
    tl.store(q_ptr + qrow_off + kk // 2, pack_lo_hi(lo, hi), mask=kk < K)


@triton.jit
def _quantize_activations_kernel(
    x_ptr, inv_ptr, q_ptr, scale_ptr,
    K, stride_xm, stride_qm, stride_sm,
    HAS_INV: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, N_CHUNKS: tl.constexpr,
    LOAD_1D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    NG: tl.constexpr = BLOCK_K // GROUP
    HALF: tl.constexpr = GROUP // 2
    x_row = pid_m.to(tl.int64) * stride_xm
    q_row = pid_m.to(tl.int64) * stride_qm
    seven = tl.full((NG,), 7.0, tl.float32)
    if N_CHUNKS == 1:
        k0 = pid_k * BLOCK_K
        x = _load_tile(x_ptr, inv_ptr, x_row, k0, K, NG, HALF, HAS_INV, LOAD_1D)
        scale = div_rn(_absmax(x), seven)
        _store_codes(x, scale, q_ptr, q_row, k0, K, NG, HALF)
        gi = pid_k * NG + tl.arange(0, NG)
        tl.store(scale_ptr + pid_m.to(tl.int64) * stride_sm + gi, scale, mask=gi * GROUP < K)
    else:  # per-token over a long row (NG == 1): absmax pass, then codes pass
        amax = tl.zeros((NG,), tl.float32)
        for c in range(N_CHUNKS):
            x = _load_tile(x_ptr, inv_ptr, x_row, c * BLOCK_K, K, NG, HALF, HAS_INV, LOAD_1D)
            amax = tl.maximum(amax, _absmax(x))
        scale = div_rn(amax, seven)
        for c in range(N_CHUNKS):
            x = _load_tile(x_ptr, inv_ptr, x_row, c * BLOCK_K, K, NG, HALF, HAS_INV, LOAD_1D)
            _store_codes(x, scale, q_ptr, q_row, c * BLOCK_K, K, NG, HALF)
        tl.store(scale_ptr + pid_m.to(tl.int64) * stride_sm + tl.arange(0, NG), scale)


def _check(x, inv_smooth, group_size):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    M, K = x.shape
    if K % 2 != 0:
        raise ValueError(f"x: K must be even to pack two int4 codes per byte, got K={K}")
    if M == 0 or K == 0:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous")
    if inv_smooth is not None:
        if not isinstance(inv_smooth, torch.Tensor) or inv_smooth.dtype != torch.float32:
            raise ValueError(f"inv_smooth must be a float32 tensor, got {getattr(inv_smooth, 'dtype', type(inv_smooth))}")
        if tuple(inv_smooth.shape) != (K,):
            raise ValueError(f"inv_smooth must have shape ({K},), got {tuple(inv_smooth.shape)}")
        if inv_smooth.device != x.device:
            raise ValueError(f"inv_smooth is on {inv_smooth.device}, x on {x.device}")
        if not inv_smooth.is_contiguous():
            raise ValueError("inv_smooth must be contiguous")
    if group_size is not None and group_size not in SUPPORTED_GROUPS:
        raise ValueError(f"group_size must be None or one of {SUPPORTED_GROUPS}, got {group_size}")
    if x.device.type == "cpu" and not _interpreting():
        raise ValueError("x is on the CPU; the Triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1)")


def _interpreting():
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _out(name, t, shape, dtype, device):
    if t is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be a {dtype} tensor of shape {tuple(shape)}, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if t.device != device or not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous on {device}")
    return t


def quantize_activations(x, inv_smooth=None, group_size=None, *, out=None, out_scales=None, config=None):
    """x [M, K] fp16|bf16|fp32, inv_smooth [K] fp32 or None, group_size None|32|64|128|256
    -> (packed uint8 [M, K/2], float32 scales [M] or [M, ceil(K/group_size)]).
    `out` / `out_scales` (optional) are preallocated results (tests poison them); `config`
    (tuning only) overrides dict(LOAD_1D=..., ONE_PASS_MAX_K=..., ROW_CHUNK=..., GROUP_BLOCK=...)."""
    cfg = dict(LOAD_1D=True, ONE_PASS_MAX_K=ONE_PASS_MAX_K, ROW_CHUNK=ROW_CHUNK, GROUP_BLOCK=1024)
    cfg.update(config or {})
    _check(x, inv_smooth, group_size)
    M, K = x.shape
    q = _out("out", out, (M, K // 2), torch.uint8, x.device)
    n_chunks = 1
    if group_size is None:
        group = block_k = max(triton.next_power_of_2(K), 2)
        if K > cfg["ONE_PASS_MAX_K"]:
            group = block_k = cfg["ROW_CHUNK"]
            n_chunks = triton.cdiv(K, block_k)
        scales = _out("out_scales", out_scales, (M,), torch.float32, x.device)
        stride_sm = 1
    else:
        group = group_size
        # GROUP_BLOCK channels a program: enough bytes in flight per program, few programs per token.
        block_k = max(group, min(cfg["GROUP_BLOCK"], triton.next_power_of_2(K)))
        n_groups = triton.cdiv(K, group)
        scales = _out("out_scales", out_scales, (M, n_groups), torch.float32, x.device)
        stride_sm = n_groups
    num_warps = cfg.get("num_warps") or (4 if block_k <= 2048 else (8 if block_k <= 8192 else 16))
    grid = (M, 1 if n_chunks > 1 else triton.cdiv(K, block_k))
    _quantize_activations_kernel[grid](
        x, inv_smooth if inv_smooth is not None else x, q, scales,
        K, x.stride(0), q.stride(0), stride_sm,
        HAS_INV=inv_smooth is not None, GROUP=group, BLOCK_K=block_k, N_CHUNKS=n_chunks,
        LOAD_1D=bool(cfg["LOAD_1D"]), num_warps=num_warps,
    )
    return q, scales
