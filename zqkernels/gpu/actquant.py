"""Fused activation quantization: optional smoothing (x * 1/s), per-token or per-token-per-group
absmax, IEEE float32 scale and codes (round half to even), stored packed or one per byte; one pass
over X. `quantize_silu_mul` is the same kernel reading a gated MLP's [gate | up] and quantizing
silu(gate) * up, computed in its load as torch computes it, so that product never goes to memory.

Contract (DESIGN.md §1), all in IEEE float32 so that the GPU is bit-exact with
`reference.quantize_activations`:
    xs     = float32(x) * inv_smooth          (IEEE mul; skipped when inv_smooth is None)
    absmax = max |xs| over the row (or the group of g channels; the last group may be short)
    scale  = div_rn(absmax, 7)
    codes  = clip(rint(div_rn(xs, scale)), -8, 7);   absmax == 0 -> scale 0, codes 0
Two layouts of the same codes (`layout=`), chosen per M by the W4A4 launch table (`configs.py`):
"int4" packs two codes per uint8 [M, K/2] (DESIGN.md §1); "int8" stores each code as an int8
[M, K], so the GEMM feeds the activation tile to the MMA as loaded, with no unpack. The activation
tensor is made per call, so the extra M*K/2 bytes it costs are small next to the weights at
large M. One kernel serves both; a constexpr picks the store, so the codes are the same bits.
A group holding NaN or Inf gets scale NaN and codes 0: no code is emitted for a non-finite value,
and the NaN scale makes every product that uses the group NaN, never a finite wrong number.
`quantize_activations(check_finite=True)` (the default) raises ValueError on such input instead;
the layers pass `check_finite=False` to keep the per-token path free of a host sync.

One program quantizes BLOCK_K channels of one token; a per-token row longer than ONE_PASS_MAX_K
is quantized in two passes over chunks of ROW_CHUNK (absmax, then codes; the second read hits
L1/L2), because a whole long row does not fit one program's registers. Those two limits,
GROUP_BLOCK (channels a program takes with per-group scales) and ELEMS_PER_THREAD (channels a
thread, which sets the warps) are the launch table's `actquant` family, per scales and M bucket
(`configs.py`): at one token a single program walks the row, at thousands the programs fill the
GPU, so the best limits differ. The interpreter's table sets them small, so CPU-sized rows reach
the two-pass path too. The tile is [groups, channels]; the packed store splits it into the even
and odd channel of each byte (the int8 store writes it element by element).
"""
import torch
import triton
import triton.language as tl

from zqkernels.gpu import limits
from zqkernels.gpu.configs import launch_config
from zqkernels.gpu.fpmath import div_rn, round_rne, silu
from zqkernels.gpu.int4 import pack_lo_hi
from zqkernels.gpu.operands import check_float_acts, check_out, check_same_device


# 1.5 * 2**23: v + MAGIC rounds v to an integer (the FPU's round-to-nearest-even, numpy's `rint`)
# for |v| < 2**22 and leaves it in the low mantissa bits: bits(v + MAGIC) = MAGIC_BITS + rint(v).
MAGIC = tl.constexpr(12582912.0)
MAGIC_BITS = tl.constexpr(0x4B400000)
# Smallest scale the reciprocal path takes: it keeps 1/scale and the residual x - scale * q of
# every element near a rounding boundary (|x / scale| >= 1/4) in the normal float32 range.
FAST_MIN_SCALE = tl.constexpr(2.0**-100)


@triton.jit
def max_nan(a, b):
    """max, NaN when either is NaN (the combine of every absmax reduction here and in the GEMV)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def scale_of(amax):
    """scale = div_rn(absmax, 7); NaN for a group holding NaN or Inf."""
    seven = tl.full(amax.shape, 7.0, tl.float32)
    return tl.where(amax < float("inf"), div_rn(amax, seven), float("nan"))  # NaN < inf is false


@triton.jit
def recip_of(scale):
    """(d, y) per group: the divisor d (the scale; 1 for a zero or NaN scale) and y = div_rn(1, d),
    computed once a group so that each element's quotient costs one multiply and two FMAs."""
    d = tl.where((scale == 0.0) | (scale != scale), 1.0, scale)
    return d, div_rn(tl.full(d.shape, 1.0, tl.float32), d)


@triton.jit
def codes_of(x, scale, d, y):
    """int32 codes clip(rint(div_rn(x, scale)), -8, 7) of float32 x; `scale` and its `recip_of`
    (d, y) broadcast against x, which lies within its group's absmax (so |x / scale| <= 7 * (1 + 2**-23):
    the clip never binds and rint lands in [-7, 7]); 0 where the scale is 0 or NaN.

    Where every scale of the tile is finite and >= FAST_MIN_SCALE (or 0), the quotient is
    Markstein's: q0 = x * y, r = fma(-d, q0, x) (exact), q = fma(r, y, q0), which equals
    div_rn(x, d) when y = RN(1 / d) and nothing under- or overflows (docs/DESIGN.md §1) -- 3
    instructions an element where div_rn takes 10 with its range check and branch. Any other tile
    (a NaN scale, or a tiny one) takes div_rn itself; the test is one per program, uniform."""
    ok = (scale == 0.0) | (scale >= FAST_MIN_SCALE)  # false for NaN; a scale is never +inf
    if tl.min(ok.to(tl.int32)) == 1:
        q0 = x * y
        q = tl.fma(tl.fma(-d, q0, x), y, q0)
        codes = (q + MAGIC).to(tl.int32, bitcast=True) - MAGIC_BITS
    else:
        v = div_rn(x, d)
        v = tl.minimum(tl.maximum(v, -8.0), 7.0)  # clip before rounding (inf from a tiny scale clips)
        codes = (v + MAGIC).to(tl.int32, bitcast=True) - MAGIC_BITS
        codes = tl.where((scale == 0.0) | (scale != scale), 0, codes)
    return codes


@triton.jit
def _load_tile(x_ptr, inv_ptr, row_off, k0, K, NG: tl.constexpr, GROUP: tl.constexpr, HAS_INV: tl.constexpr,
               GATED: tl.constexpr):
    """float32 tile [NG, GROUP] of x (* inv_smooth) at channels k0 .. k0 + NG*GROUP: one
    contiguous load (wide vector loads), viewed as [groups, channels]. GATED: the row holds
    [gate | up] (2K values) and x is silu(gate) * up with torch's roundings (`quantize_silu_mul`)."""
    k1 = k0 + tl.arange(0, NG * GROUP)
    m1 = k1 < K
    if GATED:
        g = tl.load(x_ptr + row_off + k1, mask=m1, other=0.0)
        u = tl.load(x_ptr + row_off + K + k1, mask=m1, other=0.0)
        a = round_rne(silu(g.to(tl.float32)), g.dtype).to(tl.float32)
        x = round_rne(a * u.to(tl.float32), g.dtype).to(tl.float32)
    else:
        x = tl.load(x_ptr + row_off + k1, mask=m1, other=0.0).to(tl.float32)
    if HAS_INV:
        x = x * tl.load(inv_ptr + k1, mask=m1, other=0.0)
    return tl.reshape(x, (NG, GROUP))


@triton.jit
def _absmax(x):
    """Per group max |x| of a [NG, GROUP] tile, NaN when any element is NaN (max.NaN: no
    instruction more than a plain max, so flagging non-finite input costs the memory-bound kernel
    nothing) and Inf for an Inf."""
    return tl.reduce(tl.abs(x), 1, max_nan)


@triton.jit
def _store_codes(x, scale, q_ptr, qrow_off, k0, K, NG: tl.constexpr, GROUP: tl.constexpr, INT8: tl.constexpr):
    d, y = recip_of(scale)
    codes = codes_of(x, scale[:, None], d[:, None], y[:, None])  # [NG, GROUP]
    if INT8:  # one code per byte, natural order: channel k at byte k of the row
        kk = k0 + tl.arange(0, NG * GROUP)
        tl.store(q_ptr + qrow_off + kk, tl.reshape(codes, (NG * GROUP,)).to(tl.int8), mask=kk < K)
    else:  # the pair of each packed byte: even channel in the low nibble, odd in the high
        lo, hi = tl.split(tl.reshape(codes, (NG * GROUP // 2, 2)))
        kh = k0 // 2 + tl.arange(0, NG * GROUP // 2)
        tl.store(q_ptr + qrow_off + kh, pack_lo_hi(lo, hi), mask=kh < K // 2)


@triton.jit
def _quantize_activations_kernel(
    x_ptr, inv_ptr, q_ptr, scale_ptr,
    K, stride_xm, stride_qm, stride_sm,
    HAS_INV: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, N_CHUNKS: tl.constexpr,
    INT8: tl.constexpr, GATED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    NG: tl.constexpr = BLOCK_K // GROUP
    x_row = pid_m.to(tl.int64) * stride_xm
    q_row = pid_m.to(tl.int64) * stride_qm
    if N_CHUNKS == 1:
        k0 = pid_k * BLOCK_K
        x = _load_tile(x_ptr, inv_ptr, x_row, k0, K, NG, GROUP, HAS_INV, GATED)
        scale = scale_of(_absmax(x))
        _store_codes(x, scale, q_ptr, q_row, k0, K, NG, GROUP, INT8)
        gi = pid_k * NG + tl.arange(0, NG)
        tl.store(scale_ptr + pid_m.to(tl.int64) * stride_sm + gi, scale, mask=gi * GROUP < K)
    else:  # per-token over a long row (NG == 1): absmax pass, then codes pass
        amax = tl.zeros((NG,), tl.float32)
        for c in range(N_CHUNKS):
            x = _load_tile(x_ptr, inv_ptr, x_row, c * BLOCK_K, K, NG, GROUP, HAS_INV, GATED)
            amax = max_nan(amax, _absmax(x))
        scale = scale_of(amax)
        for c in range(N_CHUNKS):
            x = _load_tile(x_ptr, inv_ptr, x_row, c * BLOCK_K, K, NG, GROUP, HAS_INV, GATED)
            _store_codes(x, scale, q_ptr, q_row, c * BLOCK_K, K, NG, GROUP, INT8)
        tl.store(scale_ptr + pid_m.to(tl.int64) * stride_sm + tl.arange(0, NG), scale)


LAYOUTS = ("int4", "int8")


def check_inputs(x, inv_smooth, group_size, layout, gated=False):
    """The quantizer's inputs checked (also by the GEMV that quantizes in its prologue); the group as
    an int or None. gated: x is [M, 2K] (gate | up) and the codes are of its K channels."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    check_float_acts("x", x, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    if gated and x.shape[1] % 2:
        raise ValueError(f"x must hold [gate | up] halves of equal width, got {x.shape[1]} columns")
    k = x.shape[1] // 2 if gated else x.shape[1]
    if layout == "int4" and k % 2:
        raise ValueError(f"x: K must be even to pack two int4 codes per byte (layout='int4'), got K={k}")
    if inv_smooth is not None:
        if not isinstance(inv_smooth, torch.Tensor) or inv_smooth.dtype != torch.float32:
            raise ValueError(f"inv_smooth must be a float32 tensor, got {getattr(inv_smooth, 'dtype', type(inv_smooth))}")
        if tuple(inv_smooth.shape) != (k,):
            raise ValueError(f"inv_smooth must have shape ({k},), got {tuple(inv_smooth.shape)}")
        check_same_device("inv_smooth", inv_smooth, x.device, "x")
        if not inv_smooth.is_contiguous():
            raise ValueError("inv_smooth must be contiguous")
    return limits.check_act_group(group_size, "group_size")


def quantize_activations(x, inv_smooth=None, group_size=None, *, layout="int4", out=None, out_scales=None,
                         check_finite=True, config=None):
    """x [M, K] fp16|bf16|fp32, inv_smooth [K] fp32 or None, group_size None|32|64|128|256
    -> (codes, float32 scales [M] or [M, ceil(K/group_size)]), the codes as `layout` says:
    "int4" packed uint8 [M, K/2] (K even), "int8" int8 [M, K] (one code -8..7 per byte).

    `out` / `out_scales` (optional) are preallocated results (tests poison them); `out` must have
    the layout's dtype and shape. check_finite:
    raise ValueError when x (times inv_smooth) holds NaN or Inf (one host sync; skipped while a CUDA
    graph is being captured); with False such a group gets scale NaN and codes 0 (module docstring). `config` overrides the table's
    bucket's dict(ONE_PASS_MAX_K=..., ROW_CHUNK=..., ELEMS_PER_THREAD=...) (per token) or
    dict(GROUP_BLOCK=..., ELEMS_PER_THREAD=...) (groups), key by key (tests and tuning)."""
    group_size = check_inputs(x, inv_smooth, group_size, layout)
    return _quantize(x, x.shape[1], False, inv_smooth, group_size, layout, out, out_scales, check_finite, config)


def quantize_silu_mul(h, inv_smooth=None, group_size=None, *, layout="int4", out=None, out_scales=None,
                      check_finite=True, config=None):
    """The codes and scales `quantize_activations` gives for x = silu(gate) * up, from
    h = [gate | up] [M, 2K] fp16|bf16|fp32 (a gated MLP's fused gate/up output), without x in memory.

    x is what torch computes from the two halves in h's dtype: silu in float32 as torch's CUDA
    kernel does (`fpmath.silu`: CUDA's expf, IEEE division) rounded to h's dtype, times up in
    float32, rounded to h's dtype; then smoothing and codes as `quantize_activations`. So on the
    GPU the result equals `quantize_activations(F.silu(gate) * up)` bit for bit (under the
    interpreter, exp is numpy's float32 exp). The other arguments as `quantize_activations`'s,
    inv_smooth [K]."""
    group_size = check_inputs(h, inv_smooth, group_size, layout, gated=True)
    return _quantize(h, h.shape[1] // 2, True, inv_smooth, group_size, layout, out, out_scales, check_finite,
                     config)


def _quantize(x, K, gated, inv_smooth, group_size, layout, out, out_scales, check_finite, config):
    M = x.shape[0]
    cfg = launch_config("actquant", "per_token" if group_size is None else "group", M, x.device)
    cfg.update(config or {})
    int8 = layout == "int8"
    q = check_out(out, (M, K) if int8 else (M, K // 2), torch.int8 if int8 else torch.uint8, x.device)
    n_chunks = 1
    if group_size is None:
        group = block_k = max(triton.next_power_of_2(K), 2)
        if K > cfg["ONE_PASS_MAX_K"]:
            group = block_k = cfg["ROW_CHUNK"]
            n_chunks = triton.cdiv(K, block_k)
        scales = check_out(out_scales, (M,), torch.float32, x.device, "out_scales")
        stride_sm = 1
    else:
        group = group_size
        block_k = max(group, min(cfg["GROUP_BLOCK"], triton.next_power_of_2(K)))
        n_groups = triton.cdiv(K, group)
        scales = check_out(out_scales, (M, n_groups), torch.float32, x.device, "out_scales")
        stride_sm = n_groups
    # ELEMS_PER_THREAD channels a thread: each program's reductions and two scalar divisions are
    # a fixed cost that more channels a thread amortize, at fewer warps to hide the loads with.
    num_warps = max(1, min(16, block_k // (32 * cfg["ELEMS_PER_THREAD"])))
    grid = (M, 1 if n_chunks > 1 else triton.cdiv(K, block_k))
    _quantize_activations_kernel[grid](
        x, inv_smooth if inv_smooth is not None else x, q, scales,
        K, x.stride(0), q.stride(0), stride_sm,
        HAS_INV=inv_smooth is not None, GROUP=group, BLOCK_K=block_k, N_CHUNKS=n_chunks, INT8=int8, GATED=gated,
        num_warps=num_warps,
    )
    # The check reads the scales on the host; inside a CUDA-graph capture (no sync allowed) it is
    # skipped and the NaN scale alone marks a non-finite group.
    capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if check_finite and not capturing and not bool(torch.isfinite(scales).all()):
        bad = torch.nonzero(~torch.isfinite(scales.reshape(M, -1)))[0].tolist()
        raise ValueError(f"x holds NaN or Inf (after {'silu * up and ' if gated else ''}smoothing) in token {bad[0]}"
                         + ("" if group_size is None else f", channel group {bad[1]}"))
    return q, scales
