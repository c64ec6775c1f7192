"""Peer kernels our 4-bit GEMMs are measured against, on the same shapes and M, in the same run.

Every peer has role "baseline": each result of the same shape and M gets a speedup over it.

- cublas_fp16:   `torch.matmul(x, w.t())`, fp16 x fp16 -> fp16 (cuBLAS; the W16A16 baseline).
- fp8_rowwise:   `torch._scaled_mm` W8A8 in e4m3: activations with one float32 scale per token
                 [M, 1], weights with one per output channel [1, N], bf16 out, fast accumulation
                 (torch's rowwise kernel: CUTLASS or cuBLASLt, by build). The GEMM alone,
                 activations already cast. Hopper's FP8 and INT8 MMAs share one peak, twice
                 FP16's, and FP8 W8A8 is what inference engines serve on Hopper: the bar a 4-bit
                 GEMM must clear at prefill, where the GEMM is compute-bound.
- fp8_rowwise_dynamic: the same with the activation cast in front (per-row absmax, scale =
                 absmax / 448, cast to e4m3) in one fused launch (`fp8_rowwise_cast`, a small
                 Triton kernel; as eager torch ops the cast is nine launches, six of them full
                 passes over the activations): what a W8A8 FP8 layer runs, the peer of
                 `zq_w4a4_aq` (bf16 X in).
- cublas_int8:   `torch._int_mm(x_int8, w_int8.t())` -> int32 (cuBLASLt). GEMM alone, inputs
                 already int8. It requires M > 16 and K, N multiples of 8: for M <= 16 the
                 activations are zero-padded to 32 rows and that padded call is timed (the
                 benchmark's `notes` and `padded_M` say so); TOPS count only the real M rows.
- torch_int4_wo: `torch.ops.aten._weight_int4pack_mm`, bf16 activations, int4 weights with
                 bf16 scale and zero per group of 128 (tinygemm), inner_k_tiles 8.
- zq_w4a16:      our `zqkernels.gpu.w4a16.w4a16_gemm`, fp16 activations, int4 weights, fp32
                 scales per group of 128: the W4A16 baseline ZipperQuant claims its speedup over.
- gemlite_a16w4, gemlite_a8w8_int8, gemlite_a8w8_fp8: gemlite's W4A16 (group 128) and its
                 dynamic A8W8 layers (int8 and e4m3; the activation cast is inside the timed
                 call), when gemlite is importable (skipped with a reason otherwise).

The FP8 operands are made by `fp8_rowwise_quantize` (torch ops, the definition) and, for
activations in the dynamic peer, `fp8_rowwise_cast` (tests/test_perf_fp8.py checks both against a
numpy model of the cast, the kernel under Triton's interpreter, and runs the product on the CPU).
On the GPU each layer's product is checked once against the dequantized operands
(`check_rel_err`) and the fused cast against `fp8_rowwise_quantize` (`cast_mismatches`), so a
misread scale or operand layout shows in the JSON instead of timing garbage silently.

Every peer is timed as ours are, back to back over copies of its operands (perf/conftest.py): each
test hands the harness `make_fn(i)`, the call over copy i; weight copies are clones of copy 0 kept
for the run (gemlite's layers, which hold their tensors inside a module, are built once per copy).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import triton
import triton.language as tl
from timing import clone_operands

pytestmark = pytest.mark.gpu

GROUP = 128
INT_MM_MIN_ROWS = 32  # _int_mm needs M > 16; 32 keeps M a multiple of 8 too
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max; e4m3fn has no infinity, past it is NaN
FP8_CHECK_TOL = 1e-2  # bf16 output rounding (2^-9) and fast accumulation over K, with margin


def _fp16_weight(cache, shape, i=0):
    def make():
        gen = torch.Generator(device="cuda").manual_seed(0)
        return torch.randn(shape.n, shape.k, device="cuda", dtype=torch.float16, generator=gen) * 0.02

    return cache.copy(("fp16", shape.name), i, make)


def _acts(m, k, dtype=torch.float16):
    return torch.randn(m, k, device="cuda", dtype=dtype)


def _copy(acts, i):
    """The activations of copy i: copy 0 as made, later copies clones in memory of their own."""
    return clone_operands(acts) if i else acts


def test_cublas_fp16(zq_bench, weight_cache, shape, m):
    x0 = _acts(m, shape.k)

    def make_fn(i):
        x, w = _copy(x0, i), _fp16_weight(weight_cache, shape, i)
        return lambda: torch.matmul(x, w.t())

    zq_bench.gpu(make_fn=make_fn, family="baseline", method="cublas_fp16", role="baseline",
                 shape=shape, m=m, flops=2 * m * shape.n * shape.k,
                 bytes_moved=2 * (m * shape.k + shape.n * shape.k + m * shape.n))


def test_cublas_int8(zq_bench, weight_cache, shape, m):
    def weights(i):
        return weight_cache.copy(("int8", shape.name), i, lambda: torch.randint(
            -127, 128, (shape.n, shape.k), device="cuda", dtype=torch.int8))

    rows = max(m, INT_MM_MIN_ROWS) if m <= 16 else m
    notes = []
    if rows != m:
        notes.append(f"torch._int_mm needs M > 16: activations zero-padded from {m} to {rows} rows; "
                     f"the padded call is timed, TOPS count the {m} real rows")
    x0 = torch.zeros(rows, shape.k, device="cuda", dtype=torch.int8)
    x0[:m] = torch.randint(-127, 128, (m, shape.k), device="cuda", dtype=torch.int8)

    def make_fn(i):
        x, w = _copy(x0, i), weights(i)
        return lambda: torch._int_mm(x, w.t())

    zq_bench.gpu(make_fn=make_fn, family="baseline", method="cublas_int8", role="baseline",
                 shape=shape, m=m, flops=2 * m * shape.n * shape.k, ops_unit="TOPS",
                 bytes_moved=rows * shape.k + shape.n * shape.k + 4 * rows * shape.n, notes=notes,
                 padded_M=rows)


def fp8_rowwise_quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `t` [R, K] as e4m3 codes and a float32 scale [R, 1], t ~ codes * scale.

    scale = absmax(row) * float32(1 / 448) in float32 (a product, not a quotient: CUDA turns a
    division by a scalar into this product anyway, so every device rounds it alike), codes =
    e4m3(clamp(t / scale, -448, 448)) with round to nearest even; the clamp keeps the absmax
    element, whose quotient can round past 448, from overflowing to NaN. An all-zero row gets
    scale 1 and zero codes.
    """
    if t.dim() != 2:
        raise ValueError(f"t: expected a 2-D tensor [rows, K], got shape {tuple(t.shape)}")
    t32 = t.float()
    amax = t32.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax * (1.0 / E4M3_MAX), torch.ones_like(amax))
    return (t32 / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def fp8_rowwise_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights `w` [N, K] as `_scaled_mm`'s second operand: e4m3 codes [K, N] column-major (the
    transpose of the row-major codes, no copy) and float32 per-channel scales [1, N]."""
    codes, scale = fp8_rowwise_quantize(w)
    return codes.t(), scale.reshape(1, -1).contiguous()


def fp8_rowwise_mm(x_codes, x_scale, w_codes_t, w_scale) -> torch.Tensor:
    """(x_codes * x_scale) @ (w_codes_t * w_scale) in bf16: rowwise-scaled `torch._scaled_mm`,
    x_scale [M, 1] and w_scale [1, N] float32, fast accumulation."""
    return torch._scaled_mm(x_codes, w_codes_t, scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16,
                            use_fast_accum=True)


@triton.jit
def _e4m3_grid(v, scale):
    """clamp(v / scale, -448, 448) rounded to e4m3's grid (nearest, ties to even) in float32.

    The rounding is done here, in float32, so the cast to e4m3 after it is exact: the GPU's own
    cast rounds the same way, but Triton's CPU interpreter rounds halves up and drops the carry
    into the exponent, and this keeps the kernel checkable there.
    """
    q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -448.0), 448.0)
    e = tl.maximum(((q.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # floor(log2|q|), >= -6
    step = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2^(e-3): 3 mantissa bits
    inv_step = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3-e), exact
    y = q * inv_step  # |y| < 16: adding 1.5 * 2^23 rounds it to an integer, ties to even
    return ((y + 12582912.0) - 12582912.0) * step


@triton.jit
def _fp8_rowwise_cast_kernel(x_ptr, codes_ptr, scale_ptr, K, stride_x, stride_c, BLOCK_K: tl.constexpr,
                             ONE_BLOCK: tl.constexpr):
    # one program per row: absmax, scale = absmax * float32(1 / 448) (as fp8_rowwise_quantize),
    # then the scaled, clamped cast
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_x
    c_row = codes_ptr + row * stride_c
    if ONE_BLOCK:  # the whole row in registers: X is read once
        mask = offs < K
        v = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.max(tl.abs(v), axis=0)
        scale = tl.where(a > 0, a * 0.002232142857142857, 1.0)
        tl.store(scale_ptr + row, scale)
        tl.store(c_row + offs, _e4m3_grid(v, scale).to(tl.float8e4nv), mask=mask)
    else:  # a longer row is read twice (the second time mostly from L2)
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        a = tl.max(amax, axis=0)
        scale = tl.where(a > 0, a * 0.002232142857142857, 1.0)
        tl.store(scale_ptr + row, scale)
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + offs < K
            v = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(c_row + k0 + offs, _e4m3_grid(v, scale).to(tl.float8e4nv), mask=mask)


# Rows up to 4096 stay in registers (16 floats a thread at 8 warps); longer ones loop, so a
# 14336-wide row does not take a program's whole register file.
FP8_CAST_MAX_BLOCK = 4096


def fp8_rowwise_cast(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8_rowwise_quantize` of activations in one fused launch (a Triton kernel): what a W8A8
    FP8 layer runs in front of its GEMM. Same codes and scales, bit for bit."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x: expected a 2-D tensor with unit stride along K, got shape {tuple(x.shape)} "
                         f"and strides {x.stride()}")
    m, k = x.shape
    codes = torch.empty((m, k), device=x.device, dtype=E4M3)
    scale = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    block = min(FP8_CAST_MAX_BLOCK, triton.next_power_of_2(max(k, 16)))
    _fp8_rowwise_cast_kernel[(m,)](x, codes, scale, k, x.stride(0), codes.stride(0), BLOCK_K=block,
                                   ONE_BLOCK=k <= block, num_warps=8 if block >= 4096 else 4)
    return codes, scale


def fp8_rowwise_linear(x, w_codes_t, w_scale) -> torch.Tensor:
    """A W8A8 FP8 layer: x [M, K] cast per token to e4m3 (`fp8_rowwise_cast`), then the GEMM."""
    x_codes, x_scale = fp8_rowwise_cast(x)
    return fp8_rowwise_mm(x_codes, x_scale, w_codes_t, w_scale)


def _fp8_weight(cache, shape, i=0):
    """Copy i of `_make_fp8_weight`'s codes, scales and check (later copies clones of copy 0)."""
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        pytest.skip(f"FP8 tensor cores need compute capability 8.9 or newer; this GPU is {major}.{minor}")
    return cache.copy(("fp8_rowwise", shape.name), i, lambda: _make_fp8_weight(cache, shape))


def _make_fp8_weight(cache, shape):
    """FP8 weights of the layer (from the same fp16 weights as cuBLAS FP16) and the layout check:
    the product of a probe against the float product of the dequantized operands."""
    w = _fp16_weight(cache, shape)
    w_codes_t, w_scale = fp8_rowwise_weight(w)
    gen = torch.Generator(device="cuda").manual_seed(5)
    probe = torch.randn(8, shape.k, device="cuda", dtype=torch.bfloat16, generator=gen)
    x_codes, x_scale = fp8_rowwise_quantize(probe)
    got = fp8_rowwise_mm(x_codes, x_scale, w_codes_t, w_scale).float()
    ref = (x_codes.float() * x_scale) @ (w_codes_t.float() * w_scale)
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    fused_codes, fused_scale = fp8_rowwise_cast(probe)  # the fused cast against its definition
    mismatches = int((fused_codes.float() != x_codes.float()).sum()) + int((fused_scale != x_scale).sum())
    del got, ref
    return w_codes_t, w_scale, {"check_rel_err": err, "cast_mismatches": mismatches}


def _fp8_notes(shape, check):
    notes = []
    if check["check_rel_err"] > FP8_CHECK_TOL:
        notes.append(f"check FAILED: relative error {check['check_rel_err']:.3g} against the dequantized operands")
    if check["cast_mismatches"]:
        notes.append(f"check FAILED: the fused cast differs from fp8_rowwise_quantize in "
                     f"{check['cast_mismatches']} values")
    for note in notes:
        warnings.warn(f"FP8 rowwise on {shape.name}: {note}")
    return notes


def test_fp8_rowwise(zq_bench, weight_cache, shape, m):
    *_, check = _fp8_weight(weight_cache, shape)
    acts = fp8_rowwise_quantize(_acts(m, shape.k, torch.bfloat16))

    def make_fn(i):
        (x_codes, x_scale), (w_codes_t, w_scale, _) = _copy(acts, i), _fp8_weight(weight_cache, shape, i)
        return lambda: fp8_rowwise_mm(x_codes, x_scale, w_codes_t, w_scale)

    zq_bench.gpu(make_fn=make_fn, family="baseline",
                 method="fp8_rowwise", role="baseline", shape=shape, m=m, flops=2 * m * shape.n * shape.k,
                 notes=_fp8_notes(shape, check), scales="per-token [M,1] x per-channel [1,N] fp32",
                 bytes_moved=m * shape.k + 4 * m + shape.n * shape.k + 4 * shape.n + 2 * m * shape.n, **check)


def test_fp8_rowwise_dynamic(zq_bench, weight_cache, shape, m):
    *_, check = _fp8_weight(weight_cache, shape)
    x0 = _acts(m, shape.k, torch.bfloat16)
    # bytes: X read once as bf16, the e4m3 activations and scales written and read back, weights, output
    moved = 2 * m * shape.k + 2 * (m * shape.k + 4 * m) + shape.n * shape.k + 4 * shape.n + 2 * m * shape.n

    def make_fn(i):
        x, (w_codes_t, w_scale, _) = _copy(x0, i), _fp8_weight(weight_cache, shape, i)
        return lambda: fp8_rowwise_linear(x, w_codes_t, w_scale)

    zq_bench.gpu(make_fn=make_fn, family="baseline",
                 method="fp8_rowwise_dynamic", role="baseline", shape=shape, m=m, flops=2 * m * shape.n * shape.k,
                 scales="per-token [M,1] x per-channel [1,N] fp32", bytes_moved=moved,
                 notes=["activation cast (absmax per row, scale, clamp, e4m3) in one fused Triton launch, "
                        "then _scaled_mm", *_fp8_notes(shape, check)], **check)


def convert_weight_to_int4pack(q_unsigned: torch.Tensor, inner_k_tiles: int = 8) -> torch.Tensor:
    """tinygemm's weight layout from unsigned codes `q_unsigned[N, K]` in 0..15 (CUDA).

    torch >= 2.5 (the 2.11 of the GPU image and 2.13 alike) takes uint8 `[N, K/2]` with element
    2i in the HIGH nibble (the opposite of our packing); torch <= 2.4 took int32 `[N, K]`. Try the
    new signature, fall back to the old one on the dtype error.
    """
    packed_u8 = ((q_unsigned[:, ::2] << 4) | q_unsigned[:, 1::2]).to(torch.uint8).contiguous()
    try:
        return torch.ops.aten._convert_weight_to_int4pack(packed_u8, inner_k_tiles)
    except RuntimeError as exc:
        if "Int" not in str(exc) and "int32" not in str(exc):
            raise
        return torch.ops.aten._convert_weight_to_int4pack(q_unsigned.to(torch.int32).contiguous(), inner_k_tiles)


def _torch_int4_weight(cache, shape, i=0):
    """Copy i of the layer's tinygemm weights (later copies clones of copy 0, with its check).

    Symmetric int4 codes as tinygemm wants them: w = (q_u - 8) * scale + zero, zero = 0. The
    packing layout differs across torch versions, so one product is checked against the
    dequantized weight when the layer is made: a misread layout shows up in the JSON
    (`check_rel_err`, `notes`) instead of timing garbage silently.
    """
    def make():
        gen = torch.Generator(device="cuda").manual_seed(1)
        q_u = torch.randint(0, 16, (shape.n, shape.k), device="cuda", dtype=torch.int32, generator=gen)
        scale = torch.rand(shape.k // GROUP, shape.n, device="cuda", generator=gen) * 0.01 + 0.001
        scales_and_zeros = torch.stack([scale, torch.zeros_like(scale)], dim=2).to(torch.bfloat16).contiguous()
        packed = convert_weight_to_int4pack(q_u)
        w_deq = (q_u.float() - 8) * scales_and_zeros[..., 0].float().t().repeat_interleave(GROUP, dim=1)
        probe = torch.randn(8, shape.k, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref = probe.float() @ w_deq.t()
        got = torch.ops.aten._weight_int4pack_mm(probe, packed, GROUP, scales_and_zeros).float()
        err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        del w_deq, ref, got
        return packed, scales_and_zeros, err

    return cache.copy(("torch_int4", shape.name), i, make)


def test_torch_int4_wo(zq_bench, weight_cache, shape, m):
    *_, err = _torch_int4_weight(weight_cache, shape)
    x0 = _acts(m, shape.k, torch.bfloat16)

    def make_fn(i):
        x, (packed, sz, _) = _copy(x0, i), _torch_int4_weight(weight_cache, shape, i)
        return lambda: torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, sz)

    notes = []
    if err > 2e-2:
        notes.append(f"layout check FAILED: relative error {err:.3g} against the dequantized weight")
        warnings.warn(f"torch int4 layout check failed on {shape.name}: rel err {err:.3g}")
    zq_bench.gpu(make_fn=make_fn, family="baseline",
                 method="torch_int4_wo", role="baseline", shape=shape, m=m,
                 flops=2 * m * shape.n * shape.k, notes=notes, check_rel_err=err, group_size=GROUP,
                 bytes_moved=2 * m * shape.k + shape.n * shape.k // 2 + 4 * (shape.k // GROUP) * shape.n
                 + 2 * m * shape.n)


def _w4_packed(cache, shape, groups, i=0):
    def make():
        gen = torch.Generator(device="cuda").manual_seed(2)
        qw = torch.randint(0, 256, (shape.n, shape.k // 2), device="cuda", dtype=torch.uint8, generator=gen)
        sw = torch.rand(shape.n, groups, device="cuda", generator=gen) * 0.01 + 0.001
        return qw, sw.squeeze(1) if groups == 1 else sw.contiguous()

    return cache.copy(("zq_w4", shape.name, groups), i, make)


def test_zq_w4a16(zq_bench, weight_cache, zq_kernel, shape, m):
    w4a16_gemm = zq_kernel("zqkernels.gpu.w4a16", "w4a16_gemm")
    x0 = _acts(m, shape.k)

    def make_fn(i):
        x, (qw, sw) = _copy(x0, i), _w4_packed(weight_cache, shape, shape.k // GROUP, i)
        return lambda: w4a16_gemm(x, qw, sw, group_size=GROUP, check_finite=False)

    zq_bench.gpu(make_fn=make_fn, family="baseline", method="zq_w4a16",
                 role="baseline", shape=shape, m=m, flops=2 * m * shape.n * shape.k, group_size=GROUP,
                 bytes_moved=2 * m * shape.k + shape.n * shape.k // 2 + 4 * shape.n * (shape.k // GROUP)
                 + 2 * m * shape.n)


def _gemlite():
    try:
        import gemlite  # noqa: F401
        from gemlite import helper
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"gemlite is not importable here ({type(exc).__name__}: {exc}); its baselines are skipped")
    return gemlite, helper


def _gemlite_layer(cache, key, i, build):
    """Copy i of a gemlite layer, each copy built by `build()`: a layer keeps its tensors inside a
    module, so a copy is a layer of its own, not a clone."""
    if (*key, i) not in cache:
        cache[(*key, i)] = build()
    return cache[(*key, i)]


def _gemlite_make_fn(cache, key, build, x0):
    def make_fn(i):
        layer, x = _gemlite_layer(cache, key, i, build), _copy(x0, i)
        return lambda: layer(x)

    return make_fn


def test_gemlite_a16w4(zq_bench, weight_cache, shape, m):
    gemlite, helper = _gemlite()

    def build():
        gen = torch.Generator(device="cuda").manual_seed(3)
        q_u = torch.randint(0, 16, (shape.n, shape.k), device="cuda", dtype=torch.uint8, generator=gen)
        scales = (torch.rand(shape.n, shape.k // GROUP, device="cuda", generator=gen) * 0.01 + 0.001).half()
        zeros = torch.full_like(scales, 8.0)  # symmetric: w = (q_u - 8) * scale
        return helper.A16Wn(device="cuda", dtype=torch.float16).from_weights(q_u, scales, zeros, W_nbits=4,
                                                                            group_size=GROUP)

    key = ("gemlite_a16w4", shape.name)
    x0 = _acts(m, shape.k)
    try:
        _gemlite_layer(weight_cache, key, 0, build)(x0)
    except Exception as exc:  # noqa: BLE001 - an optional peer that does not run here is skipped, loudly
        pytest.skip(f"gemlite {getattr(gemlite, '__version__', '?')} A16W4 does not run here: {type(exc).__name__}: {exc}")
    zq_bench.gpu(make_fn=_gemlite_make_fn(weight_cache, key, build, x0), family="baseline", method="gemlite_a16w4",
                 role="baseline", shape=shape,
                 m=m, flops=2 * m * shape.n * shape.k, group_size=GROUP,
                 gemlite_version=getattr(gemlite, "__version__", None),
                 bytes_moved=2 * m * shape.k + shape.n * shape.k // 2 + 4 * shape.n * (shape.k // GROUP)
                 + 2 * m * shape.n)


# kind: (gemlite.helper processor, unit of its math)
GEMLITE_A8W8 = {"int8": ("A8W8_int8_dynamic", "TOPS"), "fp8": ("A8W8_fp8_dynamic", "TFLOP/s")}


@pytest.mark.parametrize("kind", list(GEMLITE_A8W8))
def test_gemlite_a8w8(zq_bench, weight_cache, shape, m, kind):
    gemlite, helper = _gemlite()
    processor, ops_unit = GEMLITE_A8W8[kind]

    def build():
        return getattr(helper, processor)(device="cuda", dtype=torch.float16).from_weights(
            _fp16_weight(weight_cache, shape).clone())

    key = (f"gemlite_a8w8_{kind}", shape.name)
    x0 = _acts(m, shape.k)
    try:
        _gemlite_layer(weight_cache, key, 0, build)(x0)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"gemlite {getattr(gemlite, '__version__', '?')} A8W8 {kind} does not run here: "
                    f"{type(exc).__name__}: {exc}")
    zq_bench.gpu(make_fn=_gemlite_make_fn(weight_cache, key, build, x0), family="baseline",
                 method=f"gemlite_a8w8_{kind}", role="baseline", shape=shape,
                 m=m, flops=2 * m * shape.n * shape.k, ops_unit=ops_unit,
                 gemlite_version=getattr(gemlite, "__version__", None),
                 notes=[f"dynamic per-token {kind} activation quantization included in the timed call"],
                 bytes_moved=2 * m * shape.k + shape.n * shape.k + 4 * shape.n + 2 * m * shape.n)
