"""RMSNorm over rows of the layer's input width: `zqkernels.gpu.rmsnorm.rms_norm` (one launch)
beside transformers' LlamaRMSNorm arithmetic in torch (`torch_rmsnorm`: a float32 copy, square,
mean, rsqrt, product, cast, weight product: a kernel each). Both bandwidth-bound: the figure of
merit is GB/s of the fp16 row read and written. K comes from each selected layer shape (its input
width: 4096 is the LLaMA-3-8B hidden size); timed back to back over copies (perf/conftest.py).
"""
from __future__ import annotations

import pytest
import torch
from timing import clone_operands

pytestmark = pytest.mark.gpu

EPS = 1e-5


def _torch_rmsnorm(x, w):
    h = x.to(torch.float32)
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def _run(zq_bench, shape, m, method, fn):
    inputs = (torch.randn(m, shape.k, device="cuda", dtype=torch.float16),
              torch.rand(shape.k, device="cuda", dtype=torch.float16) + 0.5)

    def make_fn(i):
        x, w = clone_operands(inputs) if i else inputs
        return lambda: fn(x, w)

    zq_bench.gpu(make_fn=make_fn, family="rmsnorm", method=method, role="component", shape=shape, m=m,
                 bytes_moved=4 * m * shape.k + 2 * shape.k)


def test_zq_rmsnorm(zq_bench, zq_kernel, shape, m):
    rms_norm = zq_kernel("zqkernels.gpu.rmsnorm", "rms_norm")
    _run(zq_bench, shape, m, "zq_rmsnorm", lambda x, w: rms_norm(x, w, EPS))


def test_torch_rmsnorm(zq_bench, shape, m):
    _run(zq_bench, shape, m, "torch_rmsnorm", _torch_rmsnorm)
