"""ZipperQuant's high part on the GPU: `out += 16 * Δ_n * (X' @ q_high.T)` (DESIGN.md §2.4).

ZipperQuant sends this part to the CPU; with the activations already on the GPU the same few
multiply-adds may be cheaper there. The layout (`layouts.ZipperHighGPU`, built once) is one of:
- "columns": the C input channels holding any nonzero `q_high` (after SmoothQuant the outliers
  sit in a few input channels) gathered into a dense `[C, N]`; one pass over those C columns of X:
  `out[m, n] += 16 Δ_n Σ_c X'[m, cols_c] Hc[c, n]`. Work M·N·C; pays when C << K.
- "ell": each output row keeps its own nonzeros (column, value), padded to the longest row
  (`[E_max, N]`, coalesced per tile); `out[m, n] += 16 Δ_n Σ_e X'[m, col[e, n]] val[e, n]`.
  Work M·N·E_max gathers; pays when the nonzeros are scattered over many columns.
- "dense": every code of q_high packed as int4, the product on the 16-bit tensor cores through
  `w4a16.w4a16_gemm` accumulating into `out` (its launch table, `w4a16` per channel, row scale
  16 Δ_n). Work M·N·K at tensor-core rate; pays when the outliers reach most input channels, as
  the per-row grid puts them (`outlier_ratio` of every row). At the M the launch table names
  (`fused_at`; on the H200 one token with per-token scales) the whole product is one fused GEMV
  instead, `zipper_gemv`: x read once, quantized for the low part as the quantizer does, X' kept
  in float32 for the high part, both code planes streamed as words in one pass.
Columns and ell read X' in float32 and multiply in IEEE float32 (no TF32). Dense multiplies X' in
16 bits: fp16 / bf16 as given, float32 rounded to bf16 (float32's range, so no X' overflows; 2^-9
relative per element), the codes exact and the sums in fp32. `out` is float32 [M, N] and is
accumulated in place (the low GEMM's output), one program per tile, so no atomics are needed.
Tile shapes of columns and ell come from the launch table (`zipper_high` family, by M; wide-N
layers take BLOCK_N_WIDE_N past WIDE_N; BLOCK_E entries summed a step, 1 in every GPU table until
timed against more).
"""
import torch
import triton
import triton.language as tl

from zqkernels.gpu.configs import launch_config
from zqkernels.gpu.operands import check_float_acts, check_same_device, refuse_non_finite
from zqkernels.layouts import ZipperHighGPU


@triton.jit
def _high_columns_kernel(x_ptr, cols_ptr, h_ptr, rs_ptr, out_ptr, M, N, C, stride_xm,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # IEEE fp32 FMAs, C small by construction: one rank-1 update a column. BLOCK_E columns a step,
    # unrolled, so their loads are independent of each other and in flight together. Not written
    # as sum(x[:, :, None] * h[None, :, :], axis=1): the compiler turns that broadcast-multiply-
    # reduce into a tensor-core dot at TF32 (on the H200 errors up to 1.0 at BLOCK_M >= 16,
    # reports/results/h200/zipper_high_block_e_probe.log), and this part carries the outliers.
    for c0 in range(0, C, BLOCK_E):
        for j in tl.static_range(BLOCK_E):
            c = c0 + j
            col = tl.load(cols_ptr + tl.minimum(c, C - 1))  # past C: a valid column, its terms masked to 0
            xv = tl.load(x_ptr + rm * stride_xm + col, mask=m_ok & (rm * 0 + c < C), other=0.0).to(tl.float32)
            hv = tl.load(h_ptr + c * N + rn, mask=n_ok & (rn * 0 + c < C), other=0.0)
            acc += xv[:, None] * hv[None, :]
    rs = tl.load(rs_ptr + rn, mask=n_ok, other=0.0)
    o_ptrs = out_ptr + rm[:, None] * N + rn[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(o_ptrs, tl.load(o_ptrs, mask=o_mask, other=0.0) + acc * rs[None, :], mask=o_mask)


@triton.jit
def _high_ell_kernel(x_ptr, ecol_ptr, eval_ptr, rs_ptr, out_ptr, M, N, E, stride_xm,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Each slot's (column, value) load and then its gather of X' are two dependent memory round
    # trips. BLOCK_E == 1: one slot a step (2-D tiles only), latency-bound at few tokens; more:
    # BLOCK_E slots a step, independent of each other and in flight together, summed over the step
    if BLOCK_E == 1:
        for e in range(0, E):
            col = tl.load(ecol_ptr + e * N + rn, mask=n_ok, other=0)
            val = tl.load(eval_ptr + e * N + rn, mask=n_ok, other=0.0)
            xg = tl.load(x_ptr + rm[:, None] * stride_xm + col[None, :], mask=m_ok[:, None] & n_ok[None, :],
                         other=0.0)
            acc += xg.to(tl.float32) * val[None, :]
    else:
        for e0 in range(0, E, BLOCK_E):
            re = e0 + tl.arange(0, BLOCK_E)
            en_ok = (re[:, None] < E) & n_ok[None, :]
            col = tl.load(ecol_ptr + re[:, None] * N + rn[None, :], mask=en_ok, other=0)  # [BE, BN]
            val = tl.load(eval_ptr + re[:, None] * N + rn[None, :], mask=en_ok, other=0.0)
            xg = tl.load(x_ptr + rm[:, None, None] * stride_xm + col[None, :, :],
                         mask=m_ok[:, None, None] & en_ok[None, :, :], other=0.0)  # [BM, BE, BN]
            acc += tl.sum(xg.to(tl.float32) * val[None, :, :], axis=1)
    rs = tl.load(rs_ptr + rn, mask=n_ok, other=0.0)
    o_ptrs = out_ptr + rm[:, None] * N + rn[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(o_ptrs, tl.load(o_ptrs, mask=o_mask, other=0.0) + acc * rs[None, :], mask=o_mask)


@triton.jit
def _smooth_bf16_kernel(x_ptr, inv_ptr, y_ptr, M, K, stride_xm, BLOCK: tl.constexpr):
    # X' = float32(x) * inv_s (IEEE, the quantizer's definition), rounded once to bf16 (half to
    # even) in integer arithmetic on its bits, stored as int16: Triton's interpreter truncates a
    # float32 -> bf16 cast, the GPU rounds it; this form is the same bits on both, torch's.
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < K
    x = tl.load(x_ptr + row.to(tl.int64) * stride_xm + offs, mask=ok, other=0.0).to(tl.float32)
    v = x * tl.load(inv_ptr + offs, mask=ok, other=0.0)
    b = v.to(tl.int32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16  # NaN bit patterns could carry into Inf: kept NaN below
    r = tl.where(v != v, 0x7FC0, r)
    tl.store(y_ptr + row.to(tl.int64) * K + offs, r.to(tl.int16), mask=ok)


def _dense_acts(x, inv_smooth):
    """The dense layout's 16-bit X': x itself when it is fp16 / bf16 and unsmoothed, else
    float32(x) * inv_s rounded to bf16 (float32's range: an X' beyond fp16's never overflows)."""
    if inv_smooth is None:
        return x if x.dtype in (torch.float16, torch.bfloat16) else x.to(torch.bfloat16)
    m, k = x.shape
    y = torch.empty((m, k), dtype=torch.bfloat16, device=x.device)
    if m:
        block = min(1024, triton.next_power_of_2(max(k, 16)))
        _smooth_bf16_kernel[(m, triton.cdiv(k, block))](x, inv_smooth, y.view(torch.int16), m, k, x.stride(0),
                                                        BLOCK=block, num_warps=4)
    return y


def _launch_rows(kernel, x, high, out, block):
    m, (n, _) = x.shape[0], high.shape
    if block is None:
        cfg = launch_config("zipper_high", high.method, m, out.device)
        bn = cfg["BLOCK_N_WIDE_N"] if n > cfg["WIDE_N"] else cfg["BLOCK_N"]
        block = (cfg["BLOCK_M"], bn, cfg["BLOCK_E"])
    bm, bn, be = check_block(block)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    kernel[grid](x, high.index, high.values, high.row_scale, out, m, n, high.width, x.stride(0),
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_E=be, num_warps=4)


def _launch_columns(x, high, out, block):
    _launch_rows(_high_columns_kernel, x, high, out, block)


def _launch_ell(x, high, out, block):
    _launch_rows(_high_ell_kernel, x, high, out, block)


def _launch_dense(x, high, out, block):  # block: None (refused above)
    from zqkernels.gpu.w4a16 import w4a16_gemm

    w4a16_gemm(_dense_acts(x, None), high.values, high.row_scale, out=out, accumulate=True, check_finite=False)


# one launcher per layout: columns and ell their own kernels, dense the W4A16 GEMM
VARIANTS = {"columns": _launch_columns, "ell": _launch_ell, "dense": _launch_dense}


def check_block(block):
    """(BLOCK_M, BLOCK_N, BLOCK_E): three powers of two (Triton's block sizes), or ValueError."""
    try:
        bm, bn, be = (int(b) for b in block)
    except (TypeError, ValueError):
        raise ValueError(f"block must be (BLOCK_M, BLOCK_N, BLOCK_E), got {block!r}") from None
    for name, v in (("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_E", be)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"block: {name}={v} must be a power of two")
    return bm, bn, be


def zipper_high_gpu(x_smoothed, high, out, *, block=None, check_finite=True):
    """`out += 16 * Δ_n * (x_smoothed @ q_high.T)` in place and return `out`.

    x_smoothed: fp16/bf16/fp32 [M, K] (X', already smoothed), rows contiguous (the dense layout:
    contiguous, and an fp32 X' is rounded to bf16 for its tensor cores); high: a
    `layouts.ZipperHighGPU`; out: float32 [M, N] contiguous on the same device.
    `block=(BLOCK_M, BLOCK_N, BLOCK_E)` overrides the columns / ell launch table's tiles (tests and
    tuning; BLOCK_E: ELL slots or gathered columns summed a step); the dense layout refuses it.
    check_finite: refuse NaN / Inf in x_smoothed or out (False on the layers' per-token path).
    """
    if not isinstance(high, ZipperHighGPU):
        raise ValueError(f"high must be a layouts.ZipperHighGPU, got {type(high).__name__}")
    n, k = high.shape
    check_float_acts("x_smoothed", x_smoothed, k, dtypes=(torch.float16, torch.bfloat16, torch.float32),
                     allow_empty_rows=True)
    m = x_smoothed.shape[0]
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32:
        raise ValueError(f"out must be a float32 tensor, got {getattr(out, 'dtype', type(out))}")
    if tuple(out.shape) != (m, n):
        raise ValueError(f"out must have shape {(m, n)}, got {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    for name, t in (("x_smoothed", x_smoothed), ("out", out)):
        check_same_device(name, t, high.device, "high")
    if m * max(n, x_smoothed.stride(0)) >= 2**31:
        raise ValueError(f"M={m} rows exceed the kernels' int32 offsets for this shape; split M")
    if check_finite:
        refuse_non_finite(x_smoothed=x_smoothed, out=out)
    if block is not None:
        if high.method == "dense":
            raise ValueError("block: the dense layout runs on the w4a16 launch table's tiles; pass block=None")
        check_block(block)
    if m == 0 or high.nnz == 0:
        return out
    VARIANTS[high.method](x_smoothed, high, out, block)
    return out


def zipper_gemv(x, low, high, inv_smooth=None, act_group_size=None, *, out=None, config=None, check_finite=True):
    """ZipperQuant's whole product at a few tokens in one launch, float32 [M, N]:
    `Δ_n (s_x (q_x @ q_low.T) + 16 (X' @ q_high.T))` with X' = float32(x) * inv_s.

    The W4A4 fused GEMV (`w4a4.w4a4_gemv_quant`: the activations quantized in its prologue, codes
    bit for bit the quantizer's) reads the high part's dense code plane beside the low one and
    multiplies it with X' in float32 (exact products, float32 sums; no bf16 X' as the dense
    layout's tensor-core path takes). x fp16|bf16|fp32 [M, K] contiguous (K even); low:
    `layouts.DenseInt4` of q_low (per-channel Δ_n); high: a dense `layouts.ZipperHighGPU` with
    row_scale = 16 x low.scale (as the layers build it); `config`: a W4A4 gemv config (default:
    the W4A4 launch table's bucket for M, which must name gemv). check_finite: refuse NaN / Inf in
    X' and the scales and check the row scales (host syncs; False on the layers' path)."""
    from zqkernels.gpu import limits
    from zqkernels.gpu.actquant import check_inputs
    from zqkernels.gpu.operands import check_float_x_packed_w, check_out, check_scale
    from zqkernels.gpu.w4a4 import launch_gemv_quant

    if not isinstance(high, ZipperHighGPU) or high.method != "dense":
        raise ValueError(f"high must be a dense layouts.ZipperHighGPU, got "
                         f"{getattr(high, 'method', type(high).__name__)!r}")
    act_group = check_inputs(x, inv_smooth, act_group_size, "int4") or 0
    m, n, k = check_float_x_packed_w(x, low.packed)
    limits.check_k(k, "x: K")
    if tuple(high.shape) != (n, k):
        raise ValueError(f"high has shape {tuple(high.shape)}, the low part {(n, k)}")
    check_scale("low.scale", low.scale, (n,), x.device)
    check_same_device("high", high.values, x.device, "x")
    out = check_out(out, (m, n), torch.float32, x.device)
    if check_finite:
        refuse_non_finite(x_smoothed=x if inv_smooth is None else x.float() * inv_smooth, w_scale=low.scale)
        if not torch.equal(high.row_scale, 16.0 * low.scale):
            raise ValueError("high.row_scale must be 16 x low.scale (ZipperQuant's 16 Δ_n)")
    scales = "per_token" if act_group == 0 else "group"
    cfg = dict(config) if config is not None else launch_config("w4a4", scales, m, x.device, n, k)
    variant = cfg.pop("variant", None)
    cfg.pop("act_layout", None)
    if variant != "gemv":
        raise ValueError(f"zipper_gemv runs the W4A4 gemv variant's tiles; its config names {variant!r}")
    return launch_gemv_quant(cfg, x, inv_smooth, low.packed, low.scale, out, act_group, high.values)


def fused_at(m, act_group_size, device):
    """True when the dense layout's product at M tokens runs as one fused GEMV (`zipper_gemv`):
    where the launch table's `zipper_high` section `dense` (per-token activations) or
    `dense_group` names "fused" for M, else "two_pass" (the W4A4 layer, then the W4A16 GEMM
    accumulating). A measured choice: on the H200 the fused GEMV took o at M = 1 in 11.8 µs against
    17.6 for the two passes per token, and lost at M = 2 and with groups of 32
    (reports/results/h200/probe_zipper_fused*.json); a fused bucket lies where the W4A4 table's
    bucket names its gemv, whose tiles it runs (test_configs)."""
    section = "dense_group" if act_group_size else "dense"
    variant = launch_config("zipper_high", section, m, device)["variant"]
    if variant not in ("fused", "two_pass"):
        raise ValueError(f"launch table zipper_high/{section}: variant must be fused or two_pass, got {variant!r}")
    return variant == "fused"


def zipper_gpu_linear(x, low, high, inv_smooth=None, act_group_size=None):
    """The whole ZipperQuant product on the GPU, float32 [M, N]: the low part (`w4a4.w4a4_linear`:
    smooth + quantize + GEMM as the launch table says for this M, into float32) and the
    high part added in place, on X' = float32(x) * 1/s; for the dense layout at an M where the
    launch table says so (`fused_at`), both in one fused GEMV (`zipper_gemv`).

    x: fp16|bf16|fp32 [M, K] contiguous; low: `layouts.DenseInt4` of q_low (per-channel Δ_n);
    high: `layouts.ZipperHighGPU`; inv_smooth: float32 [K] or None. A non-finite activation makes
    its token's output NaN (the quantizer's NaN scale), never a finite wrong number.
    """
    from zqkernels.gpu.w4a4 import w4a4_linear

    check_float_acts("x", x, dtypes=(torch.float16, torch.bfloat16, torch.float32))  # before x.shape is read
    if high.method == "dense" and fused_at(x.shape[0], act_group_size, x.device):
        return zipper_gemv(x, low, high, inv_smooth, act_group_size, check_finite=False)
    y = w4a4_linear(x, inv_smooth, low.packed, low.scale, act_group_size, torch.float32)
    if high.method == "dense":
        return zipper_high_gpu(_dense_acts(x, inv_smooth), high, y, check_finite=False)
    xs = x.to(torch.float32)
    if inv_smooth is not None:
        xs = xs * inv_smooth
    return zipper_high_gpu(xs, high, y, check_finite=False)
