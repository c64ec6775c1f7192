"""W4A4 GEMM (`zqkernels.gpu.w4a4.w4a4_gemm`): packed int4 activations x packed int4 weights.

- zq_w4a4:      the GEMM alone, per-token activation scales (inputs already quantized), packed
                int4 activations.
- zq_w4a4_i8:   the same GEMM on activation codes held as int8 bytes (one code per byte).
- zq_w4a4_g128: the GEMM alone, per-token-per-group-of-128 activation scales, activation codes in
                the launch table's layout for this M.
- zq_w4a4_aq:   what a layer runs: fp16 X -> `quantize_activations` (fused smoothing) -> GEMM,
                in the activation layout the launch table names for this M (`w4a4.act_layout`),
                the fair figure beside cuBLAS FP16, which takes fp16 X too ("fused" buckets
                excepted: those run zq_w4a4_fused's one launch).
- zq_w4a4_fused: fp16 X -> `w4a4_gemv_quant` (the quantizer inside the gemv GEMV), M <= 4.
Integer math on Hopper's INT8 tensor cores (no INT4 MMA): rates are TOPS. Each benchmark hands
the harness a factory of calls over copies of its operands (perf/conftest.py: back-to-back timing).

`test_oracle_w4a4_cpu` times the numpy oracle on a tiny layer on the CPU, so `pytest perf/ -k w4a4`
runs something (and the iterate loop can be tried) on a machine without a GPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from timing import clone_operands

GROUP = 128


def _weights(cache, shape, i=0):
    """Copy i of the layer's packed weights and per-channel scales."""
    def make():
        gen = torch.Generator(device="cuda").manual_seed(4)
        qw = torch.randint(0, 256, (shape.n, shape.k // 2), device="cuda", dtype=torch.uint8, generator=gen)
        sw = torch.rand(shape.n, device="cuda", generator=gen) * 0.01 + 0.001
        return qw, sw

    return cache.copy(("w4a4_weights", shape.name), i, make)


def _packed_acts(m, k, groups):
    qx = torch.randint(0, 256, (m, k // 2), device="cuda", dtype=torch.uint8)
    sx = torch.rand(m, device="cuda") * 0.1 + 0.01 if groups is None else torch.rand(m, groups, device="cuda") * 0.1 + 0.01
    return qx, sx


def _gemm_bytes(m, n, k, act_scale_count):
    return m * k // 2 + 4 * act_scale_count + n * k // 2 + 4 * n + 2 * m * n


def _bench_per_token(zq_bench, weight_cache, w4a4_gemm, shape, m, acts, method, bytes_moved, **extra):
    """`w4a4_gemm` on per-token activation codes `acts` (either layout) against copy i of the weights."""
    def make_fn(i):
        qx, sx = clone_operands(acts) if i else acts
        qw, sw = _weights(weight_cache, shape, i)
        return lambda: w4a4_gemm(qx, sx, qw, sw, check_finite=False)

    zq_bench.gpu(make_fn=make_fn, family="w4a4", method=method, role="ours", shape=shape, m=m,
                 flops=2 * m * shape.n * shape.k, ops_unit="TOPS", bytes_moved=bytes_moved, **extra)


@pytest.mark.gpu
def test_zq_w4a4(zq_bench, weight_cache, zq_kernel, shape, m):
    """The GEMM as the layers run it: activation codes in the launch table's layout for this M
    (packed; int8 codes where the bucket names them, e.g. for the tma variant)."""
    w4a4_gemm = zq_kernel("zqkernels.gpu.w4a4", "w4a4_gemm")
    layout = zq_kernel("zqkernels.gpu.w4a4", "act_layout")(m, None, torch.device("cuda"))
    if layout == "int8":
        acts = (torch.randint(-8, 8, (m, shape.k), device="cuda", dtype=torch.int8),
                torch.rand(m, device="cuda") * 0.1 + 0.01)
        _bench_per_token(zq_bench, weight_cache, w4a4_gemm, shape, m, acts, "zq_w4a4",
                         _gemm_bytes(m, shape.n, shape.k, m) + m * shape.k // 2, act_layout=layout,
                         notes=["activation codes as int8 bytes [M, K], as the table's bucket names"])
    else:
        _bench_per_token(zq_bench, weight_cache, w4a4_gemm, shape, m, _packed_acts(m, shape.k, None), "zq_w4a4",
                         _gemm_bytes(m, shape.n, shape.k, m), act_layout="int4")


@pytest.mark.gpu
def test_zq_w4a4_i8(zq_bench, weight_cache, zq_kernel, shape, m):
    w4a4_gemm = zq_kernel("zqkernels.gpu.w4a4", "w4a4_gemm")
    acts = (torch.randint(-8, 8, (m, shape.k), device="cuda", dtype=torch.int8),
            torch.rand(m, device="cuda") * 0.1 + 0.01)
    _bench_per_token(zq_bench, weight_cache, w4a4_gemm, shape, m, acts, "zq_w4a4_i8",
                     _gemm_bytes(m, shape.n, shape.k, m) + m * shape.k // 2,
                     notes=["activation codes as int8 bytes [M, K]"])


@pytest.mark.gpu
def test_zq_w4a4_g128(zq_bench, weight_cache, zq_kernel, shape, m):
    """Groups of 128, the activation codes in the launch table's layout for this M, as `zq_w4a4`."""
    w4a4_gemm = zq_kernel("zqkernels.gpu.w4a4", "w4a4_gemm")
    groups = -(-shape.k // GROUP)
    layout = zq_kernel("zqkernels.gpu.w4a4", "act_layout")(m, GROUP, torch.device("cuda"))
    acts = _packed_acts(m, shape.k, groups)
    moved = _gemm_bytes(m, shape.n, shape.k, m * groups)
    if layout == "int8":
        acts = (torch.randint(-8, 8, (m, shape.k), device="cuda", dtype=torch.int8), acts[1])
        moved += m * shape.k // 2

    def make_fn(i):
        qx, sx = clone_operands(acts) if i else acts
        qw, sw = _weights(weight_cache, shape, i)
        return lambda: w4a4_gemm(qx, sx, qw, sw, act_group_size=GROUP, check_finite=False)

    zq_bench.gpu(make_fn=make_fn, family="w4a4", method="zq_w4a4_g128",
                 role="ours", shape=shape, m=m, flops=2 * m * shape.n * shape.k, ops_unit="TOPS",
                 act_group_size=GROUP, bytes_moved=moved, act_layout=layout)


@pytest.mark.gpu
def test_zq_w4a4_aq(zq_bench, weight_cache, zq_kernel, shape, m):
    w4a4_gemm = zq_kernel("zqkernels.gpu.w4a4", "w4a4_gemm")
    quantize_activations = zq_kernel("zqkernels.gpu.actquant", "quantize_activations")
    act_layout = zq_kernel("zqkernels.gpu.w4a4", "act_layout")(m, None, torch.device("cuda"))
    if act_layout == "fused":
        act_layout = "int4"  # the two launches a fused bucket saves, timed as the gemv would take them
    inputs = (torch.randn(m, shape.k, device="cuda", dtype=torch.float16), torch.rand(shape.k, device="cuda") + 0.5)

    def make_fn(i):
        x, inv_s = clone_operands(inputs) if i else inputs
        qw, sw = _weights(weight_cache, shape, i)

        def layer():  # the layers run it unchecked, in the table's layout for this M
            qx, sx = quantize_activations(x, inv_s, layout=act_layout, check_finite=False)
            return w4a4_gemm(qx, sx, qw, sw, check_finite=False)

        return layer

    # bytes: X read once as fp16, the activation codes written and read back, weights, output
    code_bytes = m * shape.k if act_layout == "int8" else m * shape.k // 2
    moved = 2 * m * shape.k + 4 * shape.k + 2 * (code_bytes + 4 * m) + shape.n * shape.k // 2 + 4 * shape.n \
        + 2 * m * shape.n
    zq_bench.gpu(make_fn=make_fn, family="w4a4", method="zq_w4a4_aq", role="ours", shape=shape, m=m,
                 flops=2 * m * shape.n * shape.k, ops_unit="TOPS", bytes_moved=moved, act_layout=act_layout,
                 notes=[f"activation quantization (smoothing, per-token scales, {act_layout} codes) + GEMM, "
                        "two launches"])


@pytest.mark.gpu
def test_zq_w4a4_fused(zq_bench, weight_cache, zq_kernel, shape, m):
    """The layer's product in one launch, `w4a4_gemv_quant` (quantizer in the GEMV's prologue), on
    the M = 1 bucket's gemv tiles: beside `zq_w4a4_aq` it says whether a gemv bucket should be
    "fused". At M > 4 the gemv variant loses to splitk by 3-7x (DESIGN.md): not timed there."""
    if m > 4:
        pytest.skip("the fused GEMV is for M <= 4")
    from zqkernels.gpu.configs import launch_config

    gemv_quant = zq_kernel("zqkernels.gpu.w4a4", "w4a4_gemv_quant")
    cfg = launch_config("w4a4", "per_token", 1, torch.device("cuda"), shape.n, shape.k)
    if cfg["variant"] != "gemv":
        pytest.skip(f"this GPU's M = 1 bucket is {cfg['variant']}, not gemv")
    inputs = (torch.randn(m, shape.k, device="cuda", dtype=torch.float16), torch.rand(shape.k, device="cuda") + 0.5)

    def make_fn(i):
        x, inv_s = clone_operands(inputs) if i else inputs
        qw, sw = _weights(weight_cache, shape, i)
        return lambda: gemv_quant(x, inv_s, qw, sw, config=cfg, check_finite=False)

    moved = 2 * m * shape.k + 4 * shape.k + shape.n * shape.k // 2 + 4 * shape.n + 2 * m * shape.n
    zq_bench.gpu(make_fn=make_fn, family="w4a4", method="zq_w4a4_fused", role="ours", shape=shape, m=m,
                 flops=2 * m * shape.n * shape.k, ops_unit="TOPS", bytes_moved=moved,
                 notes=["smoothing + per-token quantization inside the gemv GEMV, one launch"])


# The oracle on the CPU: tiny, fixed layer (not the --shapes grid), so it runs anywhere in seconds.
ORACLE_M, ORACLE_N, ORACLE_K = 16, 256, 256


def test_oracle_w4a4_cpu(zq_bench):
    import reference

    rng = np.random.default_rng(0)
    qx = rng.integers(-8, 8, size=(ORACLE_M, ORACLE_K)).astype(np.int8)
    qw = rng.integers(-8, 8, size=(ORACLE_N, ORACLE_K)).astype(np.int8)
    sx = rng.random(ORACLE_M) + 0.1
    sw = rng.random(ORACLE_N) + 0.1
    zq_bench.cpu(lambda: reference.w4a4_matmul(qx, sx, qw, sw), family="w4a4", method="oracle_w4a4",
                 role="oracle", shape_name=f"tiny-{ORACLE_N}x{ORACLE_K}", m=ORACLE_M, n=ORACLE_N, k=ORACLE_K,
                 flops=2 * ORACLE_M * ORACLE_N * ORACLE_K,
                 notes=["numpy oracle (float64) on the CPU: the definition, not a kernel"])
