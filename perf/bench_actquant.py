"""Fused activation quantization (`zqkernels.gpu.actquant.quantize_activations`).

x [M, K] fp16 times `inv_smooth` [K] (smoothing), per-token (or per-token-per-group-of-128)
absmax, round half to even, int4 packing. A bandwidth-bound kernel: the figure of merit is GB/s
of bytes read + written against the device's copy bandwidth (the report shows the fraction).
K comes from each selected layer shape (its input width); N is recorded but unused. Timed back to
back over copies of x and the smoothing vector (perf/conftest.py).
"""
from __future__ import annotations

import pytest
import torch
from timing import clone_operands

pytestmark = pytest.mark.gpu

GROUP = 128


def _run(zq_bench, zq_kernel, shape, m, group_size):
    quantize_activations = zq_kernel("zqkernels.gpu.actquant", "quantize_activations")
    inputs = (torch.randn(m, shape.k, device="cuda", dtype=torch.float16), torch.rand(shape.k, device="cuda") + 0.5)
    scales = m if group_size is None else m * -(-shape.k // group_size)
    moved = 2 * m * shape.k + 4 * shape.k + m * shape.k // 2 + 4 * scales

    def make_fn(i):
        x, inv_s = clone_operands(inputs) if i else inputs
        return lambda: quantize_activations(x, inv_s, group_size=group_size, check_finite=False)

    zq_bench.gpu(make_fn=make_fn, family="actquant",
                 method="zq_actquant" if group_size is None else f"zq_actquant_g{group_size}", role="component",
                 shape=shape, m=m, bytes_moved=moved, act_group_size=group_size)


def test_zq_actquant(zq_bench, zq_kernel, shape, m):
    _run(zq_bench, zq_kernel, shape, m, None)


def test_zq_actquant_g128(zq_bench, zq_kernel, shape, m):
    _run(zq_bench, zq_kernel, shape, m, GROUP)


def _run_gated(zq_bench, zq_kernel, shape, m, fused):
    """silu(gate) * up quantized: in the quantizer (`quantize_silu_mul`, reads [gate | up]) or as a
    model without it runs it (torch's silu and mul, then `quantize_activations`). Same codes."""
    actquant = "zqkernels.gpu.actquant"
    quantize = zq_kernel(actquant, "quantize_silu_mul" if fused else "quantize_activations")
    inputs = (torch.randn(m, 2 * shape.k, device="cuda", dtype=torch.float16), torch.rand(shape.k, device="cuda") + 0.5)
    moved = 4 * m * shape.k + 4 * shape.k + m * shape.k // 2 + 4 * m  # the fused form's own traffic, for both

    def make_fn(i):
        h, inv_s = clone_operands(inputs) if i else inputs
        if fused:
            return lambda: quantize(h, inv_s, check_finite=False)
        gate, up = h[:, :shape.k], h[:, shape.k:]
        return lambda: quantize(torch.nn.functional.silu(gate) * up, inv_s, check_finite=False)

    zq_bench.gpu(make_fn=make_fn, family="actquant", method="zq_actquant_silu_mul" if fused else "torch_silu_mul_actquant",
                 role="component", shape=shape, m=m, bytes_moved=moved)


def test_zq_actquant_silu_mul(zq_bench, zq_kernel, shape, m):
    _run_gated(zq_bench, zq_kernel, shape, m, True)


def test_torch_silu_mul_actquant(zq_bench, zq_kernel, shape, m):
    _run_gated(zq_bench, zq_kernel, shape, m, False)
