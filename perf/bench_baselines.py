"""Peer kernels our 4-bit GEMMs are measured against, on the same shapes and M, in the same run.

- cublas_fp16:   `torch.matmul(x, w.t())`, fp16 x fp16 -> fp16 (cuBLAS; the W16A16 baseline).
- cublas_int8:   `torch._int_mm(x_int8, w_int8.t())` -> int32 (cuBLASLt). GEMM alone, inputs
                 already int8. It requires M > 16 and K, N multiples of 8: for M <= 16 the
                 activations are zero-padded to 32 rows and that padded call is timed (the
                 benchmark's `notes` and `padded_M` say so); TOPS count only the real M rows.
- torch_int4_wo: `torch.ops.aten._weight_int4pack_mm`, bf16 activations, int4 weights with
                 bf16 scale and zero per group of 128 (tinygemm), inner_k_tiles 8.
- zq_w4a16:      our `zqkernels.gpu.w4a16.w4a16_gemm`, fp16 activations, int4 weights, fp32
                 scales per group of 128: the W4A16 baseline ZipperQuant claims its speedup over.
- gemlite_a16w4 / gemlite_a8w8: gemlite's W4A16 (group 128) and dynamic A8W8 int8 layers, when
                 gemlite is importable (skipped with a reason otherwise).
"""
from __future__ import annotations

import warnings

import pytest
import torch

pytestmark = pytest.mark.gpu

GROUP = 128
INT_MM_MIN_ROWS = 32  # _int_mm needs M > 16; 32 keeps M a multiple of 8 too


def _fp16_weight(cache, shape):
    key = ("fp16", shape.name)
    if key not in cache:
        gen = torch.Generator(device="cuda").manual_seed(0)
        cache[key] = torch.randn(shape.n, shape.k, device="cuda", dtype=torch.float16, generator=gen) * 0.02
    return cache[key]


def _acts(m, k, dtype=torch.float16):
    return torch.randn(m, k, device="cuda", dtype=dtype)


def test_cublas_fp16(zq_bench, weight_cache, shape, m):
    w = _fp16_weight(weight_cache, shape)
    x = _acts(m, shape.k)
    zq_bench.gpu(lambda: torch.matmul(x, w.t()), family="baseline", method="cublas_fp16", role="baseline",
                 shape=shape, m=m, flops=2 * m * shape.n * shape.k,
                 bytes_moved=2 * (m * shape.k + shape.n * shape.k + m * shape.n))


def test_cublas_int8(zq_bench, weight_cache, shape, m):
    key = ("int8", shape.name)
    if key not in weight_cache:
        weight_cache[key] = torch.randint(-127, 128, (shape.n, shape.k), device="cuda", dtype=torch.int8)
    w = weight_cache[key]
    rows = max(m, INT_MM_MIN_ROWS) if m <= 16 else m
    notes = []
    if rows != m:
        notes.append(f"torch._int_mm needs M > 16: activations zero-padded from {m} to {rows} rows; "
                     f"the padded call is timed, TOPS count the {m} real rows")
    x = torch.zeros(rows, shape.k, device="cuda", dtype=torch.int8)
    x[:m] = torch.randint(-127, 128, (m, shape.k), device="cuda", dtype=torch.int8)
    zq_bench.gpu(lambda: torch._int_mm(x, w.t()), family="baseline", method="cublas_int8", role="baseline",
                 shape=shape, m=m, flops=2 * m * shape.n * shape.k, ops_unit="TOPS",
                 bytes_moved=rows * shape.k + shape.n * shape.k + 4 * rows * shape.n, notes=notes,
                 padded_M=rows)


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


def _torch_int4_weight(cache, shape):
    """Symmetric int4 codes as tinygemm wants them: w = (q_u - 8) * scale + zero, zero = 0.

    The packing layout differs across torch versions, so one product is checked against the
    dequantized weight when the layer is made: a misread layout shows up in the JSON
    (`check_rel_err`, `notes`) instead of timing garbage silently.
    """
    key = ("torch_int4", shape.name)
    if key not in cache:
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
        cache[key] = (packed, scales_and_zeros, err)
    return cache[key]


def test_torch_int4_wo(zq_bench, weight_cache, shape, m):
    packed, sz, err = _torch_int4_weight(weight_cache, shape)
    x = _acts(m, shape.k, torch.bfloat16)
    notes = []
    if err > 2e-2:
        notes.append(f"layout check FAILED: relative error {err:.3g} against the dequantized weight")
        warnings.warn(f"torch int4 layout check failed on {shape.name}: rel err {err:.3g}")
    zq_bench.gpu(lambda: torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, sz), family="baseline",
                 method="torch_int4_wo", role="baseline", shape=shape, m=m,
                 flops=2 * m * shape.n * shape.k, notes=notes, check_rel_err=err, group_size=GROUP,
                 bytes_moved=2 * m * shape.k + shape.n * shape.k // 2 + 4 * (shape.k // GROUP) * shape.n
                 + 2 * m * shape.n)


def _w4_packed(cache, shape, groups):
    key = ("zq_w4", shape.name, groups)
    if key not in cache:
        gen = torch.Generator(device="cuda").manual_seed(2)
        qw = torch.randint(0, 256, (shape.n, shape.k // 2), device="cuda", dtype=torch.uint8, generator=gen)
        sw = torch.rand(shape.n, groups, device="cuda", generator=gen) * 0.01 + 0.001
        cache[key] = (qw, sw.squeeze(1) if groups == 1 else sw.contiguous())
    return cache[key]


def test_zq_w4a16(zq_bench, weight_cache, zq_kernel, shape, m):
    w4a16_gemm = zq_kernel("zqkernels.gpu.w4a16", "w4a16_gemm")
    qw, sw = _w4_packed(weight_cache, shape, shape.k // GROUP)
    x = _acts(m, shape.k)
    zq_bench.gpu(lambda: w4a16_gemm(x, qw, sw, group_size=GROUP), family="baseline", method="zq_w4a16",
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


def test_gemlite_a16w4(zq_bench, weight_cache, shape, m):
    gemlite, helper = _gemlite()
    key = ("gemlite_a16w4", shape.name)
    try:
        if key not in weight_cache:
            gen = torch.Generator(device="cuda").manual_seed(3)
            q_u = torch.randint(0, 16, (shape.n, shape.k), device="cuda", dtype=torch.uint8, generator=gen)
            scales = (torch.rand(shape.n, shape.k // GROUP, device="cuda", generator=gen) * 0.01 + 0.001).half()
            zeros = torch.full_like(scales, 8.0)  # symmetric: w = (q_u - 8) * scale
            weight_cache[key] = helper.A16Wn(device="cuda", dtype=torch.float16).from_weights(
                q_u, scales, zeros, W_nbits=4, group_size=GROUP)
        layer = weight_cache[key]
        x = _acts(m, shape.k)
        layer(x)
    except Exception as exc:  # noqa: BLE001 - an optional peer that does not run here is skipped, loudly
        pytest.skip(f"gemlite {getattr(gemlite, '__version__', '?')} A16W4 does not run here: {type(exc).__name__}: {exc}")
    zq_bench.gpu(lambda: layer(x), family="baseline", method="gemlite_a16w4", role="baseline", shape=shape,
                 m=m, flops=2 * m * shape.n * shape.k, group_size=GROUP,
                 gemlite_version=getattr(gemlite, "__version__", None),
                 bytes_moved=2 * m * shape.k + shape.n * shape.k // 2 + 4 * shape.n * (shape.k // GROUP)
                 + 2 * m * shape.n)


def test_gemlite_a8w8(zq_bench, weight_cache, shape, m):
    gemlite, helper = _gemlite()
    key = ("gemlite_a8w8", shape.name)
    try:
        if key not in weight_cache:
            w = _fp16_weight(weight_cache, shape)
            weight_cache[key] = helper.A8W8_int8_dynamic(device="cuda", dtype=torch.float16).from_weights(w.clone())
        layer = weight_cache[key]
        x = _acts(m, shape.k)
        layer(x)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"gemlite {getattr(gemlite, '__version__', '?')} A8W8 does not run here: {type(exc).__name__}: {exc}")
    zq_bench.gpu(lambda: layer(x), family="baseline", method="gemlite_a8w8", role="baseline", shape=shape,
                 m=m, flops=2 * m * shape.n * shape.k, ops_unit="TOPS",
                 gemlite_version=getattr(gemlite, "__version__", None),
                 notes=["dynamic per-token int8 activation quantization included in the timed call"],
                 bytes_moved=2 * m * shape.k + shape.n * shape.k + 4 * shape.n + 2 * m * shape.n)
