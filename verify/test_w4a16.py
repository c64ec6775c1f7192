"""The W4A16 GEMM matches the oracle: `zqkernels.gpu.w4a16` vs `reference.w4a16_matmul`.

Tolerance: `|y - ref| <= eps_out * |ref| + 2**-18 * (|x| @ |dequantize(qw, sw)|.T)`, eps_out the
output dtype's rounding (fp16 2**-10, bf16 2**-7: 2x the half-ulp); 2**-18 covers the fp32
tensor-core accumulation over K <= 300 plus the per-group fp32 rescale (each step 2**-24 of the
magnitude sum; Hopper's MMA accumulates with a few bits less than IEEE fp32, hence the margin).
The products x * (16 * code) are exact in fp32, so nothing else rounds.
Shapes: M = 1, N and K not multiples of any tile, K not a multiple of the group.
Outputs are poisoned with NaN so an unwritten element fails; with accumulate=True the float32 out
holds random values and only the product may be added to it (one fp32 rounding, 2**-23 relative).
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
# The tma variant folds group scales into the 16-bit weights: the scale rounded to the dtype, then
# the scaled weight (each a half-ulp: 2 x 2**-11 for fp16, 2 x 2**-8 for bf16, relative), and for
# fp16 a weight in the subnormal range off by up to half its smallest step (2**-25) absolute.
FOLD = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
FOLD_TINY = {torch.float16: 2.0**-25, torch.bfloat16: 0.0}
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
    # gemv: a K tile inside a group, and (BLOCK_K 256 against groups of 32-128) spanning several
    dict(variant="gemv", BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, SPLIT_K=3, GROUP_M=1, num_warps=4, num_stages=1),
    dict(variant="gemv", BLOCK_M=2, BLOCK_N=8, BLOCK_K=256, SPLIT_K=1, GROUP_M=1, num_warps=2, num_stages=2),
]


# The tma variant takes K a multiple of 32 only (its own laws below): a K tile deeper than the
# smaller groups (clamped), tiles wider and taller than the other.
TMA_CONFIGS = [
    dict(variant="tma", BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=2),
    dict(variant="tma", BLOCK_M=32, BLOCK_N=16, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=1),
    # K split over programs (the small-M form): three shares, and the launcher's choice
    dict(variant="tma", BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, SPLIT_K=3, num_warps=4, num_stages=2),
    dict(variant="tma", BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, SPLIT_K=0, num_warps=4, num_stages=2),
]


def test_every_variant_has_an_explicit_config():
    from zqkernels.gpu.w4a16 import VARIANTS

    assert {c["variant"] for c in CONFIGS + TMA_CONFIGS if c} == set(VARIANTS)


def dev(a, dtype=None):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return (t if dtype is None else t.to(dtype)).to(DEVICE)


def runs_tma(cfg, x, pw, group):
    """True when this launch (an explicit config, or the launch table's) runs the tma variant."""
    from zqkernels.gpu import configs, w4a16

    m, k = x.shape
    cfg = dict(cfg) if cfg is not None else configs.launch_config("w4a16", "group", m, x.device, pw.shape[0], k)
    return configs.tma_or_fallback(cfg, w4a16.tma_takes(x, pw))[0] == "tma"


def check_against_oracle(data, group, dtype, cfg, seed, k, accumulate=None):
    """The launch's output against `reference.w4a16_matmul` within the module's tolerance, for
    drawn M, N, activations and codes at this K, written to a NaN-poisoned `out` or (drawn)
    accumulated into a float32 `out` holding random values; returns (x, packed codes, scales,
    output)."""
    m = data.draw(st.sampled_from([1, data.draw(st.integers(1, 20))]))
    n = data.draw(st.integers(1, 40))
    x = np.clip(data.draw(matrices(shape=(m, k))), -6e4, 6e4)
    qw = data.draw(codes(-8, 7, shape=(n, k))).astype(np.int8)
    rng = np.random.default_rng(seed)
    g = 1 if group is None else -(-k // group)
    sw = rng.uniform(1e-4, 1e-2, (n, g)).astype(np.float32)
    sw_t = dev(sw[:, 0] if group is None else sw)
    xt = dev(x.astype(np.float32), dtype)
    if accumulate is None:
        accumulate = data.draw(st.booleans())
    before = np.random.default_rng(seed + 1).standard_normal((m, n)).astype(np.float32)
    if accumulate:
        out = dev(before.copy())
    else:
        out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)
    pw = dev(R.pack_int4(qw))
    y = w4a16_gemm(xt, pw, sw_t, group_size=group, out=out, accumulate=accumulate, config=cfg)
    assert y.dtype == (torch.float32 if accumulate else dtype) and y.data_ptr() == out.data_ptr()
    x64 = xt.double().cpu().numpy()  # the values the kernel saw (rounded to fp16/bf16)
    sw64 = sw[:, 0].astype(np.float64) if group is None else sw.astype(np.float64)
    ref = R.w4a16_matmul(x64, qw, sw64, group_size=group)
    mag = np.abs(x64) @ np.abs(R.dequantize(qw, sw64, group)).T
    got = y.double().cpu().numpy()
    if accumulate:  # out += the product, rounded once to float32
        got = got - before
        finite = np.ones_like(ref, dtype=bool)
        eps_out, tiny = 2.0**-23 * (np.abs(ref) + np.abs(before)), 1e-30
    else:
        finite = np.abs(ref) < 6e4 if dtype == torch.float16 else np.ones_like(ref, dtype=bool)
        eps_out, tiny = EPS_OUT[dtype] * np.abs(ref), TINY[dtype]
    assert not np.isnan(got).any()
    # tolerance: output rounding + fp32 accumulation (module docstring), + the folded group scales'
    # roundings where the tma variant ran with groups
    tol = eps_out + 2.0**-18 * mag + tiny
    if group is not None and runs_tma(cfg, xt, pw, group):
        tol = tol + FOLD[dtype] * mag + FOLD_TINY[dtype] * np.abs(x64).sum(axis=1, keepdims=True)
    np.testing.assert_array_less(np.abs(got - ref)[finite], tol[finite])
    return xt, pw, sw_t, y


@pytest.mark.parametrize("ci", range(len(CONFIGS)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@settings(max_examples=examples(3))
@given(data=st.data(), group=st.sampled_from([None, 32, 64, 128]), seed=st.integers(0, 2**32 - 1))
def test_output_matches_oracle(data, group, dtype, ci, seed):
    check_against_oracle(data, group, dtype, CONFIGS[ci], seed, data.draw(st.integers(1, 150)) * 2)


@pytest.mark.parametrize("ci", range(len(TMA_CONFIGS)))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@settings(max_examples=examples(3))
@given(data=st.data(), group=st.sampled_from([None, 32, 64, 128]), seed=st.integers(0, 2**32 - 1))
def test_tma_output_matches_oracle(data, group, dtype, ci, seed):
    """The tma variant (K a multiple of 32; M, N any: its boxes past them are zero-filled), the
    16-bit codes made without a conversion instruction on a GPU, within the same tolerance."""
    check_against_oracle(data, group, dtype, TMA_CONFIGS[ci], seed, 32 * data.draw(st.integers(1, 9)))


@settings(max_examples=examples(6))
@given(data=st.data(), group=st.sampled_from([None, 32]), seed=st.integers(0, 2**32 - 1))
def test_a_tma_bucket_runs_what_tma_cannot_take_on_its_no_tma_config(data, group, seed):
    """A launch-table bucket naming tma runs its `no_tma` config where a descriptor cannot take the
    operands (K not a multiple of 32, an activation row not 16-byte aligned): the oracle's output
    within tolerance, and the no_tma config's own output bit for bit, while the tma config alone
    refuses them."""
    case = data.draw(st.sampled_from(["k", "offset"]))
    k = data.draw(st.sampled_from([48, 80, 100] if case == "k" else [64, 96]))
    no_tma = dict(CONFIGS[2])
    bucket = dict(TMA_CONFIGS[0], no_tma=no_tma)
    xt, pw, sw_t, y = check_against_oracle(data, group, torch.float16, bucket, seed, k, accumulate=False)
    if case == "offset":  # the same activations one element into a buffer: base not 16-byte aligned
        xt = torch.cat([torch.zeros(1, dtype=xt.dtype, device=DEVICE), xt.reshape(-1)])[1:].view(xt.shape)
        y = w4a16_gemm(xt, pw, sw_t, group_size=group, config=bucket)
    assert torch.equal(y, w4a16_gemm(xt, pw, sw_t, group_size=group, config=no_tma))  # exact: the same launch
    with pytest.raises(ValueError, match="tma variant"):
        w4a16_gemm(xt, pw, sw_t, group_size=group, config=TMA_CONFIGS[0])


def llama_operands(m, n, k, group, dtype=torch.float16):
    """Seeded GPU operands of an [m, k] x [n, k] W4A16 product: (generator, x, packed codes, scales,
    float64 oracle product)."""
    gen = torch.Generator(device="cuda").manual_seed(m + n + k)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    qw = torch.randint(-8, 8, (n, k), generator=gen, device="cuda", dtype=torch.int8)
    g = 1 if group is None else -(-k // group)
    sw = torch.rand(n, g, generator=gen, device="cuda") * 0.01 + 1e-3
    sw_t = sw[:, 0].contiguous() if group is None else sw
    pw = torch.from_numpy(R.pack_int4(qw.cpu().numpy())).cuda()
    ref = torch.from_numpy(R.w4a16_matmul(x.double().cpu().numpy(), qw.cpu().numpy(),
                                          sw_t.double().cpu().numpy(), group_size=group)).cuda()
    return gen, x, pw, sw_t, ref


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16, 100, 256])
@pytest.mark.parametrize("n, k", [(4096, 4096), (4096, 14336), (1000, 4000)])
@pytest.mark.parametrize("group", [None, 128])
def test_llama_shapes_compiled(m, n, k, group):
    _, x, pw, sw_t, ref = llama_operands(m, n, k, group)
    y = w4a16_gemm(x, pw, sw_t, group_size=group).double()
    assert (y - ref).norm() / ref.norm() < 1e-3  # fp16 output rounding, 2**-11 per element


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("tile", [(128, 128, 8), (256, 128, 8), (128, 64, 4)])
@pytest.mark.parametrize("m", [100, 1024])
@pytest.mark.parametrize("n, k", [(4096, 4096), (4096, 14336)])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tma_llama_shapes_compiled(m, n, k, group, tile, dtype):
    """The tma variant at the H200 table's tiles (BLOCK_M x BLOCK_N x 64, warps), against the
    float64 product of the dequantized weights."""
    bm, bn, warps = tile
    cfg = dict(variant="tma", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, num_warps=warps, num_stages=3)
    _, x, pw, sw_t, ref = llama_operands(m, n, k, group, dtype)
    y = w4a16_gemm(x, pw, sw_t, group_size=group, config=cfg).double()
    # the output dtype's rounding (fp16 2**-11, bf16 2**-8 per element), fp32 accumulation and with
    # groups the folded scales (FOLD per weight, in random directions: far below it in the norm)
    assert (y - ref).norm() / ref.norm() < (1e-3 if dtype == torch.float16 else 8e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("tile", [(64, 128, 4), (128, 64, 4), (64, 256, 4)])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n, k", [(4096, 4096), (4096, 14336), (1000, 4000)])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tma_split_k_small_m_compiled(m, n, k, group, tile, dtype):
    """The tma variant at a few tokens (a 16-row activation box, K split over programs by the
    launcher), written to the activations' dtype and accumulated into float32, against the float64
    product of the dequantized weights."""
    bn, bk, warps = tile
    cfg = dict(variant="tma", BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1, SPLIT_K=0, num_warps=warps,
               num_stages=3)
    gen, x, pw, sw_t, ref = llama_operands(m, n, k, group, dtype)
    y = w4a16_gemm(x, pw, sw_t, group_size=group, config=cfg).double()
    # the output dtype's rounding and, with groups, the folded scales (as the large-M tma test)
    assert (y - ref).norm() / ref.norm() < (1e-3 if dtype == torch.float16 else 8e-3)
    before = torch.randn(m, n, generator=gen, device="cuda")
    acc = w4a16_gemm(x, pw, sw_t, group_size=group, out=before.clone(), accumulate=True, config=cfg).double()
    fold = 0.0 if group is None else FOLD[dtype]  # per weight, in random directions
    assert (acc - before.double() - ref).norm() / ref.norm() < 1e-5 + fold


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("tile", [(8, 1024, 4), (16, 2048, 8), (4, 4096, 4), (128, 128, 8)])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("n, k", [(4096, 4096), (4096, 14336), (1000, 4000)])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("split", [0, 1])
def test_gemv_llama_shapes_compiled(m, n, k, group, tile, split):
    """The gemv variant at the tune's tiles (with groups of 128 the deep ones span groups), written
    to fp16 and accumulated into float32, against the float64 product of the dequantized weights."""
    bn, bk, warps = tile
    cfg = dict(variant="gemv", BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1, num_warps=warps, num_stages=3,
               SPLIT_K=split)
    gen, x, pw, sw_t, ref = llama_operands(m, n, k, group)
    y = w4a16_gemm(x, pw, sw_t, group_size=group, config=cfg).double()
    assert (y - ref).norm() / ref.norm() < 1e-3  # fp16 output rounding, 2**-11 per element
    before = torch.randn(m, n, generator=gen, device="cuda")
    acc = w4a16_gemm(x, pw, sw_t, group_size=group, out=before.clone(), accumulate=True, config=cfg).double()
    assert (acc - before.double() - ref).norm() / ref.norm() < 1e-5  # fp32 sums and one fp32 rounding


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float_unpack_of_every_byte_is_its_two_codes(dtype):
    """`int4.unpack_lo_hi_float`'s inline-PTX form (compiled only) on all 256 byte values: the low
    and the high nibble's two's-complement codes, exactly."""
    import triton
    import triton.language as tl

    from zqkernels.gpu.int4 import unpack_lo_hi_float

    @triton.jit
    def kernel(p_ptr, lo_ptr, hi_ptr, DT: tl.constexpr):
        offs = tl.arange(0, 256)
        lo, hi = unpack_lo_hi_float(tl.load(p_ptr + offs), DT, True)
        tl.store(lo_ptr + offs, lo)
        tl.store(hi_ptr + offs, hi)

    p = torch.arange(256, dtype=torch.int32, device="cuda").to(torch.uint8)
    lo, hi = (torch.full((256,), float("nan"), dtype=dtype, device="cuda") for _ in range(2))
    kernel[(1,)](p, lo, hi, DT=tl.float16 if dtype == torch.float16 else tl.bfloat16)
    codes = R.unpack_int4(p.cpu().numpy()[None, :])[0]  # element 2i: low nibble of byte i
    assert torch.equal(lo.cpu().float(), torch.from_numpy(codes[0::2].astype(np.float32)))  # exact
    assert torch.equal(hi.cpu().float(), torch.from_numpy(codes[1::2].astype(np.float32)))  # exact


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
        (lambda: w4a16_gemm(_x(), _p(), _s(3), accumulate=True), "pass out"),
        (lambda: w4a16_gemm(_x(), _p(), _s(3), out=_s(4, 3).half(), accumulate=True), "float32"),
        (lambda: w4a16_gemm(_x(), _p(), _s(3), out=_s(4, 3), accumulate=1), "accumulate"),
        # the tma variant folds group scales into fp16 weights: 8 x 8188 is fp16's largest value
        (lambda: w4a16_gemm(_x(k=32), _p(3, 16), _s(3, 1) * 8189, group_size=32, config=TMA_CONFIGS[0]), "8188"),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
