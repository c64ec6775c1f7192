"""Non-finite values never give a finite wrong answer from a kernel entry point.

By default (`check_finite=True`) each entry point refuses NaN or Inf in the float operands it
reads (activation and weight scales, float activations) with a ValueError naming the argument;
with `check_finite=False`, the layers' per-token path, a NaN propagates to the outputs that use
it, as through `torch.nn.Linear`. (`actquant`'s own law is in verify/test_actquant.py.)
"""
import numpy as np
import pytest
import torch

import reference as R
from zqkernels.gpu.mosaic import mosaic_w4a4_gemm, mosaic_w4a4_gemm_unfused, mosaic_w4a16_gemm
from zqkernels.gpu.w4a4 import w4a4_gemm
from zqkernels.gpu.w4a16 import w4a16_gemm
from zqkernels.gpu.zipper_high import zipper_high_gpu
from zqkernels.layouts import DenseInt4, MosaicBlocks, ZipperHighGPU

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RNG = np.random.default_rng(13)
M, N, K = 3, 40, 128


def _dense(group=None):
    q = RNG.integers(-8, 8, (N, K)).astype(np.int8)
    s = RNG.uniform(0.01, 0.1, N if group is None else (N, K // group))
    return DenseInt4.from_codes(q, s, group, DEVICE)


def _packed_acts():
    qx = torch.from_numpy(R.pack_int4(RNG.integers(-8, 8, (M, K)))).to(DEVICE)
    return qx, torch.rand(M, device=DEVICE) + 0.1


def _mosaic():
    codes = R.mosaic_quantize(RNG.standard_normal((N, K)), RNG.uniform(0.1, 1, K), density=0.5)
    return MosaicBlocks.from_codes(codes, DEVICE)


def _poison(t, bad):
    t = t.clone()
    t.view(-1)[1] = bad
    return t


def _cases(bad):
    w = _dense()
    w16 = _dense(64)
    mw = _mosaic()
    qx, sx = _packed_acts()
    x = torch.randn(M, K, device=DEVICE).half()
    high = ZipperHighGPU.from_codes(np.eye(N, K, dtype=np.int8) * 3, RNG.uniform(0.01, 0.1, N), DEVICE)
    out = torch.zeros(M, N, device=DEVICE)
    return {
        "w4a4 act_scale": ("act_scale", lambda **kw: w4a4_gemm(qx, _poison(sx, bad), w.packed, w.scale,
                                                               out_dtype=torch.float32, **kw)),
        "w4a4 w_scale": ("w_scale", lambda **kw: w4a4_gemm(qx, sx, w.packed, _poison(w.scale, bad),
                                                           out_dtype=torch.float32, **kw)),
        "w4a16 x": ("x", lambda **kw: w4a16_gemm(_poison(x, bad), w16.packed, w16.scale, 64, **kw)),
        "w4a16 w_scale": ("w_scale", lambda **kw: w4a16_gemm(x, w16.packed, _poison(w16.scale, bad), 64, **kw)),
        "mosaic act_scale": ("act_scale", lambda **kw: mosaic_w4a4_gemm(qx, _poison(sx, bad), mw,
                                                                        out_dtype=torch.float32, **kw)),
        "mosaic unfused act_scale": ("act_scale", lambda **kw: mosaic_w4a4_gemm_unfused(
            qx, _poison(sx, bad), mw, out_dtype=torch.float32, **kw)),
        "mosaic w4a16 x": ("x", lambda **kw: mosaic_w4a16_gemm(_poison(x, bad), mw, out_dtype=torch.float32, **kw)),
        "zipper high x": ("x_smoothed", lambda **kw: zipper_high_gpu(_poison(x.float(), bad), high, out.clone(), **kw)),
    }


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("case", sorted(_cases(0.0)))
def test_non_finite_operands_are_refused_by_name_or_propagate(case, bad):
    name, call = _cases(bad)[case]
    with pytest.raises(ValueError, match=f"{name} holds NaN or Inf"):
        call()
    y = call(check_finite=False)
    assert not torch.isfinite(y).all(), f"{case}: a non-finite operand gave an all-finite output"
