"""Fuzz the GPU entry points with bad arguments: each call either raises a ValueError that names
an argument, or (the break left a valid input) returns a finite result. Never another exception
type, never a silent NaN. Under the interpreter on the CPU; compiled on a GPU.

Each case starts from one valid call and breaks one argument in one drawn way (wrong type, dtype,
rank, shape, device-less list, non-contiguous view, NaN, Inf, a bool or float where an int is
meant, a negative or huge size), so every argument of every entry point is attacked.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as R
from strategies import examples
from zqkernels.gpu.actquant import quantize_activations
from zqkernels.gpu.mosaic import mosaic_w4a4_gemm, mosaic_w4a4_gemm_int32, mosaic_w4a16_gemm
from zqkernels.gpu.w4a4 import w4a4_gemm, w4a4_gemm_int32
from zqkernels.gpu.w4a16 import w4a16_gemm
from zqkernels.gpu.zipper_high import zipper_high_gpu
from zqkernels.layouts import DenseInt4, MosaicBlocks, ZipperHighGPU

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
M, N, K = 3, 24, 128
_rng = np.random.default_rng(5)
W = DenseInt4.from_codes(_rng.integers(-8, 8, (N, K)), _rng.uniform(0.01, 0.1, N), None, DEVICE)
W64 = DenseInt4.from_codes(_rng.integers(-8, 8, (N, K)), _rng.uniform(0.01, 0.1, (N, 2)), 64, DEVICE)
MW = MosaicBlocks.from_codes(R.mosaic_quantize(_rng.standard_normal((N, K)), _rng.uniform(0.1, 1, K), density=0.5),
                             DEVICE)
HIGH = ZipperHighGPU.from_codes(np.eye(N, K, dtype=np.int8) * 2, _rng.uniform(0.01, 0.1, N), DEVICE)
X16 = torch.from_numpy(_rng.standard_normal((M, K))).half().to(DEVICE)
QX = torch.from_numpy(R.pack_int4(_rng.integers(-8, 8, (M, K)))).to(DEVICE)
SX = (torch.rand(M) + 0.1).to(DEVICE)


def _break(value, how):
    """One broken version of a valid argument."""
    if how == "none":
        return None
    if how == "list":
        return value.tolist() if isinstance(value, torch.Tensor) else [value]
    if how == "numpy":
        return value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if isinstance(value, torch.Tensor):
        if how == "dtype":
            return value.to(torch.float64) if value.is_floating_point() else value.to(torch.int32)
        if how == "rank":
            return value.reshape(-1) if value.dim() > 1 else value.reshape(1, -1)
        if how == "shape":
            return torch.cat([value, value[:1]], dim=0)
        if how == "strided":
            return torch.repeat_interleave(value, 2, dim=-1)[..., ::2] if value.dim() else value
        if how == "nan" and value.is_floating_point():
            v = value.clone()
            v.view(-1)[0] = float("nan")
            return v
        if how == "inf" and value.is_floating_point():
            v = value.clone()
            v.view(-1)[-1] = float("inf")
            return v
        if how == "empty":
            return value[:0]
        return value
    if how == "bool":
        return True
    if how == "float":
        return 32.5
    if how == "negative":
        return -64
    if how == "huge":
        return 2**40
    if how == "string":
        return "64"
    return value


HOWS = ("none", "list", "numpy", "dtype", "rank", "shape", "strided", "nan", "inf", "empty", "bool", "float",
        "negative", "huge", "string")

# entry point -> (callable, {argument name: valid value}); every argument is attacked by name.
CALLS = {
    "w4a4_gemm": (w4a4_gemm, dict(qx_packed=QX, act_scale=SX, qw_packed=W.packed, w_scale=W.scale,
                                  act_group_size=None, out_dtype=torch.float32)),
    "w4a4_gemm_int32": (w4a4_gemm_int32, dict(qx_packed=QX, qw_packed=W.packed)),
    "w4a16_gemm": (w4a16_gemm, dict(x=X16, qw_packed=W64.packed, w_scale=W64.scale, group_size=64)),
    "quantize_activations": (quantize_activations, dict(x=X16, inv_smooth=None, group_size=32)),
    "mosaic_w4a4_gemm": (mosaic_w4a4_gemm, dict(qx_packed=QX, act_scale=SX, weights=MW, act_group_size=None,
                                                out_dtype=torch.float32)),
    "mosaic_w4a4_gemm_int32": (mosaic_w4a4_gemm_int32, dict(qx_packed=QX, weights=MW)),
    "mosaic_w4a16_gemm": (mosaic_w4a16_gemm, dict(x=X16, weights=MW, out_dtype=torch.float32)),
    "zipper_high_gpu": (zipper_high_gpu, dict(x_smoothed=X16.float(), high=HIGH, out=torch.zeros(M, N, device=DEVICE))),
}
CASES = [(name, arg) for name, (_, args) in CALLS.items() for arg in args]


def _finite(y):
    ys = y if isinstance(y, tuple) else (y,)
    return all(not t.is_floating_point() or bool(torch.isfinite(t).all()) for t in ys)


@pytest.mark.parametrize("name, arg", CASES, ids=[f"{n}-{a}" for n, a in CASES])
@settings(max_examples=examples(12))
@given(how=st.sampled_from(HOWS))
def test_a_broken_argument_is_refused_by_name_or_the_call_is_correct(name, arg, how):
    fn, args = CALLS[name]
    call = dict(args)
    call[arg] = _break(args[arg], how)
    try:
        y = fn(**call)
    except ValueError as exc:
        msg = str(exc)
        # A mismatch between two arguments (rows of qx against act_scale) may name either of them.
        names = list(args) + ["K", "MosaicBlocks", "ZipperHighGPU"]
        assert any(n in msg for n in names), f"{name}({arg}={how}): ValueError names no argument: {msg}"
        return
    # Accepted: a break that leaves a valid input (one more row, a contiguous "strided" view); the
    # family laws prove such results against the oracle, here it must at least be finite.
    assert _finite(y), f"{name}({arg}={how}) returned non-finite values without a word"


@pytest.mark.parametrize("name, arg, how", [
    ("w4a4_gemm", "out_dtype", "numpy"),  # a non-dtype out_dtype reached torch.empty (TypeError)
    ("w4a16_gemm", "group_size", "numpy"),  # a 0-d array passed `in GROUPS` and crashed the kernel
    ("zipper_high_gpu", "out", "nan"),  # a NaN in the accumulated out came back without a word
])
def test_regressions_found_by_the_fuzz(name, arg, how):
    fn, args = CALLS[name]
    call = dict(args)
    call[arg] = _break(args[arg], how)
    with pytest.raises(ValueError, match=arg.split("_")[0]):
        fn(**call)


def test_numpy_integer_group_sizes_are_taken_as_ints():
    y = w4a4_gemm(QX, torch.rand(M, K // 32, device=DEVICE) + 0.1, W.packed, W.scale, act_group_size=np.int64(32),
                  out_dtype=torch.float32)
    y2 = w4a4_gemm(QX, torch.rand(M, K // 32, device=DEVICE) * 0 + 1, W.packed, W.scale, act_group_size=32,
                   out_dtype=torch.float32)
    assert y.shape == y2.shape == (M, N) and torch.isfinite(y).all()
