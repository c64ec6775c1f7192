"""The W4A16 GEMM matches the oracle: `zqkernels.gpu.w4a16` vs `reference.w4a16_matmul`.

Tolerance: `|y - ref| <= eps_out * |ref| + 2**-18 * (|x| @ |dequantize(qw, sw)|.T)`, eps_out the
output dtype's rounding (fp16 2**-10, bf16 2**-7: 2x the half-ulp); 2**-18 covers the fp32
tensor-core accumulation over K <= 300 plus the per-group fp32 rescale (each step 2**-24 of the
magnitude sum; Hopper's MMA accumulates with a few bits less than IEEE fp32, hence the margin).
The products x * (16 * code) are exact in fp32, so nothing else rounds.
Shapes: M = 1, N and K not multiples of any tile, K not a multiple of the group.
Outputs are poisoned with NaN so an unwritten element fails.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as R
from strategies import codes, examples, matrices
from zqkernels.gpu.w4a16 import w4a16_gemm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS_OUT = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# Outputs that round into the dtype's subnormal range carry an absolute error of up to half its
# smallest subnormal step (fp16: 2**-25), which no relative bound covers; 2**-24 as in test_mosaic.
TINY = {torch.float16: 2.0**-24, torch.bfloat16: 1e-30, torch.float32: 1e-30}
# Each run deterministically (parametrized): every variant of `w4a16.VARIANTS`, both K orders and
# orientations, split and unsplit. None is the launch table's choice.
CONFIGS = [
    None,
    dict(variant="splitk", BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=3, GROUP_M=1, SWAP_AB=True, num_warps=4,
         num_stages=1),
    dict(variant="gemm", BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1),
    dict(variant="splitk", BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=2, GROUP_M=1, SWAP_AB=True, PLANES=True,
         num_warps=4, num_stages=1),
    dict(variant="gemm", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, PLANES=True, num_warps=4, num_stages=1),
    dict(variant="splitk", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, GROUP_M=1, num_warps=4, num_stages=1),
]


def test_every_variant_has_an_explicit_config():
    from zqkernels.gpu.w4a16 import VARIANTS

    assert {c["variant"] for c in CONFIGS if c} == set(VARIANTS)


def dev(a, dtype=None):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return (t if dtype is None else t.to(dtype)).to(DEVICE)


@pytest.mark.parametrize("ci", range(len(CONFIGS)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@settings(max_examples=examples(3))
@given(data=st.data(), group=st.sampled_from([None, 32, 64, 128]), seed=st.integers(0, 2**32 - 1))
def test_output_matches_oracle(data, group, dtype, ci, seed):
    k = data.draw(st.integers(1, 150)) * 2
    m = data.draw(st.sampled_from([1, data.draw(st.integers(1, 20))]))
    n = data.draw(st.integers(1, 40))
    x = np.clip(data.draw(matrices(shape=(m, k))), -6e4, 6e4)
    qw = data.draw(codes(-8, 7, shape=(n, k))).astype(np.int8)
    rng = np.random.default_rng(seed)
    g = 1 if group is None else -(-k // group)
    sw = rng.uniform(1e-4, 1e-2, (n, g)).astype(np.float32)
    sw_t = dev(sw[:, 0] if group is None else sw)
    xt = dev(x.astype(np.float32), dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    y = w4a16_gemm(xt, dev(R.pack_int4(qw)), sw_t, group_size=group, out=out, config=CONFIGS[ci])
    assert y.dtype == dtype and y.data_ptr() == out.data_ptr()
    x64 = xt.double().cpu().numpy()  # the values the kernel saw (rounded to fp16/bf16)
    sw64 = sw[:, 0].astype(np.float64) if group is None else sw.astype(np.float64)
    ref = R.w4a16_matmul(x64, qw, sw64, group_size=group)
    mag = np.abs(x64) @ np.abs(R.dequantize(qw, sw64, group)).T
    got = y.double().cpu().numpy()
    finite = np.abs(ref) < 6e4 if dtype == torch.float16 else np.ones_like(ref, dtype=bool)
    assert not np.isnan(got).any()
    # tolerance: output rounding + fp32 accumulation (module docstring)
    np.testing.assert_array_less(np.abs(got - ref)[finite], (EPS_OUT[dtype] * np.abs(ref) + 2.0**-18 * mag + TINY[dtype])[finite])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16, 100, 256])
@pytest.mark.parametrize("n, k", [(4096, 4096), (4096, 14336), (1000, 4000)])
@pytest.mark.parametrize("group", [None, 128])
def test_llama_shapes_compiled(m, n, k, group):
    gen = torch.Generator(device="cuda").manual_seed(m + n + k)
    x = torch.randn(m, k, generator=gen, device="cuda").to(torch.float16)
    qw = torch.randint(-8, 8, (n, k), generator=gen, device="cuda", dtype=torch.int8)
    g = 1 if group is None else -(-k // group)
    sw = torch.rand(n, g, generator=gen, device="cuda") * 0.01 + 1e-3
    sw_t = sw[:, 0].contiguous() if group is None else sw
    y = w4a16_gemm(x, torch.from_numpy(R.pack_int4(qw.cpu().numpy())).cuda(), sw_t, group_size=group).double()
    ref = torch.from_numpy(R.w4a16_matmul(x.double().cpu().numpy(), qw.cpu().numpy(),
                                          sw_t.double().cpu().numpy(), group_size=group)).cuda()
    assert (y - ref).norm() / ref.norm() < 1e-3  # fp16 output rounding, 2**-11 per element


def _x(m=4, k=8, dtype=torch.float16):
    return torch.randn(m, k).to(dtype).to(DEVICE)


def _p(r=3, c=4):
    return torch.zeros(r, c, dtype=torch.uint8, device=DEVICE)


def _s(*shape):
    return torch.ones(*shape, dtype=torch.float32, device=DEVICE)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: w4a16_gemm(_x(dtype=torch.float32), _p(), _s(3)), "dtype"),
        (lambda: w4a16_gemm(_x(k=7), _p(), _s(3)), "even"),
        (lambda: w4a16_gemm(_x(k=16)[:, ::2], _p(), _s(3)), "contiguous"),
        (lambda: w4a16_gemm(_x(), _p(3, 5), _s(3)), "K/2"),
        (lambda: w4a16_gemm(_x(), _p().to(torch.int8), _s(3)), "qw_packed"),
        (lambda: w4a16_gemm(_x(), _p(), _s(4)), "w_scale"),
        (lambda: w4a16_gemm(_x(), _p(), _s(3).half()), "w_scale"),
        (lambda: w4a16_gemm(_x(), _p(), _s(3, 1), group_size=100), "group_size"),
        (lambda: w4a16_gemm(_x(), _p(), _s(3), group_size=32), "w_scale"),
        (lambda: w4a16_gemm(_x(), _p(), _s(3), out=_s(4, 3)), "out"),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
