"""The `zq` custom ops (`zqkernels.ops`) are well-formed torch ops equal to the launchers.

- `torch.library.opcheck`: the schema matches the implementation, the fake (meta) implementation
  gives the real outputs' shapes, dtypes and devices, and the op survives AOT dispatch (what
  `torch.compile` needs).
- each op's output equals the launcher's it wraps, exactly (the same kernel on the same inputs).
Small shapes: under the interpreter on the CPU, compiled on a GPU.
"""
import numpy as np
import pytest
import torch

import reference as R
from zqkernels import ops
from zqkernels.gpu.actquant import quantize_activations
from zqkernels.gpu.mosaic import mosaic_w4a4_gemm
from zqkernels.gpu.w4a4 import w4a4_gemm
from zqkernels.gpu.w4a16 import w4a16_gemm
from zqkernels.gpu.zipper_high import zipper_gpu_linear
from zqkernels.layouts import DenseInt4, MosaicBlocks, ZipperHighGPU

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# opcheck's AOT-dispatch test needs no autograd here (no input requires grad); the rest all run.
CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _rng():
    return np.random.default_rng(11)


def _dense(n, k, group=None):
    rng = _rng()
    q = rng.integers(-8, 8, (n, k)).astype(np.int8)
    s = rng.uniform(0.01, 0.1, n if group is None else (n, -(-k // group)))
    return DenseInt4.from_codes(q, s, group, DEVICE)


def _x(m, k, dtype=torch.float16):
    return torch.from_numpy(_rng().standard_normal((m, k))).to(dtype).to(DEVICE)


@pytest.mark.parametrize("group", [0, 32])
def test_quantize_activations_op(group):
    x = _x(3, 96)
    inv = torch.rand(96, device=DEVICE) + 0.5
    torch.library.opcheck(torch.ops.zq.quantize_activations, (x, inv, group), test_utils=CHECKS)
    q, s = torch.ops.zq.quantize_activations(x, inv, group)
    q2, s2 = quantize_activations(x, inv, group or None)
    assert torch.equal(q, q2) and torch.equal(s, s2)  # exact: the same kernel


@pytest.mark.parametrize("group", [0, 32])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
def test_w4a4_gemm_op(group, out_dtype):
    w = _dense(40, 96)
    qx, sx = quantize_activations(_x(5, 96), None, group or None)
    args = (qx, sx, w.packed, w.scale, group, out_dtype)
    torch.library.opcheck(torch.ops.zq.w4a4_gemm, args, test_utils=CHECKS)
    assert torch.equal(torch.ops.zq.w4a4_gemm(*args), w4a4_gemm(qx, sx, w.packed, w.scale, group or None, out_dtype))


@pytest.mark.parametrize("group", [0, 32])
def test_w4a16_gemm_op(group):
    w = _dense(40, 96, group or None)
    x = _x(5, 96)
    torch.library.opcheck(torch.ops.zq.w4a16_gemm, (x, w.packed, w.scale, group), test_utils=CHECKS)
    assert torch.equal(torch.ops.zq.w4a16_gemm(x, w.packed, w.scale, group), w4a16_gemm(x, w.packed, w.scale, group or None))


def test_mosaic_w4a4_gemm_op():
    rng = _rng()
    codes = R.mosaic_quantize(rng.standard_normal((70, 130)), rng.uniform(0.1, 1.0, 130), density=0.3)
    w = MosaicBlocks.from_codes(codes, DEVICE)
    qx, sx = quantize_activations(_x(4, 130), None, None)
    args = (qx, sx, *ops.mosaic_args(w), 0, torch.float32)
    torch.library.opcheck(torch.ops.zq.mosaic_w4a4_gemm, args, test_utils=CHECKS)
    assert torch.equal(torch.ops.zq.mosaic_w4a4_gemm(*args), mosaic_w4a4_gemm(qx, sx, w, out_dtype=torch.float32))


def test_zipper_gpu_linear_op():
    rng = _rng()
    codes = R.zipper_quantize(rng.standard_t(2, size=(40, 96)), outlier_ratio=0.05)
    low = DenseInt4.from_codes(codes.q_low, codes.scale, None, DEVICE)
    high = ZipperHighGPU.from_codes(codes.q_high, codes.scale, DEVICE)
    x = _x(3, 96)
    inv = torch.rand(96, device=DEVICE) + 0.5
    args = (x, low.packed, low.scale, inv, *ops.zipper_high_args(high), 0)
    torch.library.opcheck(torch.ops.zq.zipper_gpu_linear, args, test_utils=CHECKS)
    assert torch.equal(torch.ops.zq.zipper_gpu_linear(*args), zipper_gpu_linear(x, low, high, inv, None))
