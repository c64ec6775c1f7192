"""The W4A4 GEMM equals the oracle: `zqkernels.gpu.w4a4` vs `reference` (DESIGN.md §1, §4).

Every law holds for both activation layouts: packed uint8 [M, K/2] and int8 codes [M, K].
- `w4a4_gemm_int32`: the int32 accumulators equal the int64 product of the codes exactly.
- `w4a4_gemm`: within `eps_out * |ref| + 2**-20 * |x| @ |w|.T` of `reference.w4a4_matmul` (float64),
  eps_out the output dtype's rounding (fp16 2**-10, bf16 2**-7, fp32 2**-22, each 2x the half-ulp)
  and 2**-20 a generous fp32 bound for the int32 -> fp32 conversion and the per-group fp32
  accumulation (at most a few hundred fp32 roundings, each 2**-24 of the magnitude sum); and the
  output with int8 activations equals the packed one bit for bit (inside the kernel the two differ
  by a power-of-two factor only: 16x against 256x the code product).
Shapes: M = 1, N and K not multiples of any tile, K not a multiple of the activation group; under
TRITON_INTERPRET=1 the launcher uses tiny tiles and splits K (split-K path) on small outputs.
Outputs are poisoned (0x7F7F7F7F / NaN) so an unwritten element fails.
"""
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import reference as R
from strategies import codes, examples, matrices
from zqkernels.gpu.actquant import quantize_activations
from zqkernels.gpu.w4a4 import ACT_LAYOUTS, w4a4_gemm, w4a4_gemm_int32, w4a4_gemv_quant

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS_OUT = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-22}
# Outputs that round into the dtype's subnormal range carry an absolute error of up to half its
# smallest subnormal step (fp16: 2**-25), which no relative bound covers; 2**-24 as in test_mosaic.
TINY = {torch.float16: 2.0**-24, torch.bfloat16: 1e-30, torch.float32: 1e-30}
POISON_I32 = 0x7F7F7F7F

# Explicit configs, each run deterministically (parametrized): every variant of `w4a4.VARIANTS`,
# both K orders, both orientations, split and unsplit; the same result whatever the tiles (the
# law tested below). None is the launch table's choice.
CONFIGS = [
    None,
    dict(variant="splitk", BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=3, GROUP_M=1, PLANES=True, num_warps=4,
         num_stages=1),
    dict(variant="gemm", BLOCK_M=32, BLOCK_N=16, BLOCK_K=128, GROUP_M=2, PLANES=False, num_warps=4, num_stages=1),
    dict(variant="splitk", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, GROUP_M=1, PLANES=False, num_warps=4,
         num_stages=1),
    dict(variant="splitk", BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2, GROUP_M=1, PLANES=True, SWAP_AB=True,
         num_warps=4, num_stages=1),
    dict(variant="splitk", BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, SPLIT_K=1, GROUP_M=1, PLANES=False, SWAP_AB=True,
         num_warps=4, num_stages=1),
    dict(variant="gemm", BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, PLANES=True, num_warps=4, num_stages=1),
    dict(variant="gemv", BLOCK_M=1, BLOCK_N=16, BLOCK_K=32, SPLIT_K=2, num_warps=4, num_stages=1),
    dict(variant="gemv", BLOCK_M=2, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=1),
]
GEMV_SPLIT, GEMV_WIDE = CONFIGS[-2], CONFIGS[-1]
# The tma variant takes int8 activation codes and K a multiple of 32 only (its own laws below).
TMA_CONFIGS = [
    dict(variant="tma", BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=2),
    dict(variant="tma", BLOCK_M=32, BLOCK_N=16, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=1),
]


def dev(a, dtype=None):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return (t if dtype is None else t.to(dtype)).to(DEVICE)


def acts(qx, layout):
    """Activation codes int8 [M, K] as the kernel takes them in `layout`."""
    return dev(R.pack_int4(qx)) if layout == "int4" else dev(qx.astype(np.int8))


def int32_product(qx, qw, config=None, layout="int4"):
    m, n = qx.shape[0], qw.shape[0]
    out = torch.full((m, n), POISON_I32, dtype=torch.int32, device=DEVICE)
    y = w4a4_gemm_int32(acts(qx, layout), dev(R.pack_int4(qw)), out=out, config=config)
    assert y.data_ptr() == out.data_ptr()
    return y.cpu().numpy()


def random_scales(rng, m, n, k, group):
    """float32 activation scales [M, ceil(K / group)] ([M, 1] per token) and weight scales [N]."""
    g = 1 if group is None else -(-k // group)
    return (rng.uniform(1e-3, 1e-1, (m, g)).astype(np.float32), rng.uniform(1e-3, 1e-1, n).astype(np.float32))


@st.composite
def operands(draw, max_m=20, max_n=40, max_k=300):
    k = draw(st.integers(1, max_k // 2)) * 2
    m = draw(st.sampled_from([1, draw(st.integers(1, max_m))]))
    n = draw(st.integers(1, max_n))
    qx = draw(codes(-8, 7, shape=(m, k)))
    qw = draw(codes(-8, 7, shape=(n, k)))
    if draw(st.booleans()):  # the largest magnitudes: every product is +64
        qx[:] = -8
        qw[:] = -8
    if m > 1 and draw(st.booleans()):
        qx[draw(st.integers(0, m - 1))] = 0  # a zero row (zero scale)
    return qx.astype(np.int8), qw.astype(np.int8)


def test_every_variant_has_an_explicit_config():
    from zqkernels.gpu.w4a4 import VARIANTS

    assert {c["variant"] for c in CONFIGS + TMA_CONFIGS if c} == set(VARIANTS)


@st.composite
def tma_operands(draw):
    """Operands the tma variant takes: K a multiple of 32; M and N any (its boxes past them are zero-filled)."""
    qx, qw = draw(operands(max_k=320))
    k = 32 * draw(st.integers(1, 10))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    grow = lambda a: np.concatenate([a, rng.integers(-8, 8, (a.shape[0], k)).astype(np.int8)], axis=1)[:, :k]
    return grow(qx), grow(qw)


@pytest.mark.parametrize("ci", range(len(TMA_CONFIGS)))
@settings(max_examples=examples(6))
@given(ops=tma_operands())
def test_tma_int32_accumulators_equal_int64_product(ops, ci):
    qx, qw = ops
    exact = qx.astype(np.int64) @ qw.astype(np.int64).T
    np.testing.assert_array_equal(int32_product(qx, qw, TMA_CONFIGS[ci], "int8").astype(np.int64), exact)  # exact


@pytest.mark.parametrize("ci", range(len(TMA_CONFIGS)))
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@settings(max_examples=examples(3))
@given(ops=tma_operands(), group=st.sampled_from([None, 32, 64, 128]), seed=st.integers(0, 2**32 - 1))
def test_tma_scaled_output_equals_the_gemm_variant(ops, group, out_dtype, ci, seed):
    """The tma variant's scaled output equals the gemm variant's on the same int8 codes, bit for
    bit: the same int32 tile dots, the same per-group rescale order, the same epilogue."""
    qx, qw = ops
    m, k = qx.shape
    n = qw.shape[0]
    sx, sw = random_scales(np.random.default_rng(seed), m, n, k, group)
    sw = dev(sw)
    sx_t = dev(sx[:, 0] if group is None else sx)
    cfg = TMA_CONFIGS[ci]
    ref_cfg = dict(variant="gemm", BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                   GROUP_M=cfg["GROUP_M"], PLANES=False, num_warps=4, num_stages=1)
    out = torch.full((m, n), float("nan"), dtype=out_dtype, device=DEVICE)
    y = w4a4_gemm(acts(qx, "int8"), sx_t, dev(R.pack_int4(qw)), sw, act_group_size=group, out_dtype=out_dtype,
                  out=out, config=cfg)
    assert y.data_ptr() == out.data_ptr()
    ref = w4a4_gemm(acts(qx, "int8"), sx_t, dev(R.pack_int4(qw)), sw, act_group_size=group, out_dtype=out_dtype,
                    config=ref_cfg)
    assert torch.equal(y, ref)  # exact


@settings(max_examples=examples(6))
@given(data=st.data())
def test_a_tma_bucket_runs_what_tma_cannot_take_on_its_no_tma_config(data):
    """A launch-table bucket naming tma takes int8 codes through tma, and through its `no_tma`
    config what a descriptor cannot take: packed codes, K not a multiple of 32, an offset (not
    16-byte aligned) activation row. Every case gives the int64 product of the codes exactly, and
    those three are the no_tma config's own output bit for bit (not a tma launch, which refuses them)."""
    case = data.draw(st.sampled_from(["int8", "packed", "k", "offset"]))
    m, n = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 24))
    k = data.draw(st.sampled_from([48, 80, 100] if case == "k" else [64, 96, 128]))
    qx, qw = data.draw(codes(-8, 7, shape=(m, k))), data.draw(codes(-8, 7, shape=(n, k)))
    no_tma = dict(CONFIGS[1])
    bucket = dict(TMA_CONFIGS[0], act_layout="int8", no_tma=no_tma)
    a = acts(qx, "int4" if case == "packed" else "int8")
    if case == "offset":  # the same codes one byte into a buffer: contiguous, base not 16-byte aligned
        a = torch.cat([torch.zeros(1, dtype=torch.int8, device=DEVICE), a.reshape(-1)])[1:].view(m, k)
    pw = dev(R.pack_int4(qw))
    got = w4a4_gemm_int32(a, pw, config=bucket).cpu().numpy()
    np.testing.assert_array_equal(got.astype(np.int64), qx.astype(np.int64) @ qw.astype(np.int64).T)  # exact
    if case != "int8":
        np.testing.assert_array_equal(got, w4a4_gemm_int32(a, pw, config=no_tma).cpu().numpy())
        with pytest.raises(ValueError):  # what the bucket routes around
            w4a4_gemm_int32(a, pw, config=TMA_CONFIGS[0])


@pytest.mark.parametrize("what", ["packed", "k", "offset"])
def test_tma_refuses_what_a_descriptor_cannot_take(what):
    cfg = TMA_CONFIGS[0]
    k = 48 if what == "k" else 64
    qx = torch.zeros(4 * k + 1, dtype=torch.int8, device=DEVICE)[1:].view(4, k)  # contiguous, base 1 byte off
    if what != "offset":
        qx = torch.zeros(4, k, dtype=torch.int8, device=DEVICE)
    if what == "packed":
        qx = torch.zeros(4, k // 2, dtype=torch.uint8, device=DEVICE)
    qw = torch.zeros(8, k // 2, dtype=torch.uint8, device=DEVICE)
    match = {"packed": "int8 activation codes", "k": "multiple of 32", "offset": "16-byte aligned"}[what]
    with pytest.raises(ValueError, match=match):
        w4a4_gemm_int32(qx, qw, config=cfg)


@pytest.mark.parametrize("layout", ACT_LAYOUTS)
@pytest.mark.parametrize("ci", range(len(CONFIGS)))
@settings(max_examples=examples(6))
@given(ops=operands())
def test_int32_accumulators_equal_int64_product(ops, ci, layout):
    qx, qw = ops
    exact = qx.astype(np.int64) @ qw.astype(np.int64).T
    np.testing.assert_array_equal(int32_product(qx, qw, CONFIGS[ci], layout).astype(np.int64), exact)  # exact


@pytest.mark.parametrize("ci", range(len(CONFIGS)))
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@settings(max_examples=examples(3))
@given(ops=operands(), group=st.sampled_from([None, 32, 64, 128]), seed=st.integers(0, 2**32 - 1))
def test_scaled_output_matches_oracle(ops, group, out_dtype, ci, seed):
    qx, qw = ops
    m, k = qx.shape
    n = qw.shape[0]
    sx, sw = random_scales(np.random.default_rng(seed), m, n, k, group)
    sx[qx.reshape(m, -1).any(axis=1) == 0] = 0.0  # a zero row has a zero scale, as quantization gives
    sx_t = dev(sx[:, 0] if group is None else sx)
    ys = {}
    for layout in ACT_LAYOUTS:
        out = torch.full((m, n), float("nan"), dtype=out_dtype, device=DEVICE)
        ys[layout] = w4a4_gemm(acts(qx, layout), sx_t, dev(R.pack_int4(qw)), dev(sw), act_group_size=group,
                               out_dtype=out_dtype, out=out, config=CONFIGS[ci])
        assert ys[layout].dtype == out_dtype and ys[layout].data_ptr() == out.data_ptr()
    # exact: the layouts' dots differ by a power of two, which the epilogue takes back exactly
    assert torch.equal(ys["int8"], ys["int4"])
    y = ys["int4"]
    sx64 = sx[:, 0].astype(np.float64) if group is None else sx.astype(np.float64)
    ref = R.w4a4_matmul(qx, sx64, qw, sw.astype(np.float64), act_group_size=group)
    mag = R.w4a4_matmul(np.abs(qx), sx64, np.abs(qw), sw.astype(np.float64), act_group_size=group)
    got = y.float().cpu().numpy().astype(np.float64)
    assert np.all(np.isfinite(got))
    # tolerance: output rounding + fp32 accumulation of scaled partials (module docstring)
    np.testing.assert_array_less(np.abs(got - ref), EPS_OUT[out_dtype] * np.abs(ref) + 2.0**-20 * mag + TINY[out_dtype])


def test_split_k_counters_reset_between_calls():
    """The last-arriving program resets its tile counter: ten calls in a row all complete."""
    rng = np.random.default_rng(1)
    qx = rng.integers(-8, 8, (3, 256)).astype(np.int8)
    qw = rng.integers(-8, 8, (20, 256)).astype(np.int8)
    exact = qx.astype(np.int64) @ qw.astype(np.int64).T
    for i in range(10):
        np.testing.assert_array_equal(int32_product(qx, qw, CONFIGS[1], ACT_LAYOUTS[i % 2]), exact)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("m", [300, 2100])
@pytest.mark.parametrize("n, k", [(4096, 4096), (4096, 14336), (1000, 4000)])
@pytest.mark.parametrize("block_m", [128, 64])
def test_tma_llama_shapes_compiled(block_m, m, n, k):
    """The tma variant at the H200 table's tiles (128 x 128 per token, 64 x 128 for groups),
    compiled, on LLaMA-sized layers (M, N not tile multiples): int32 exact, and with groups of 128
    equal to the gemm variant bit for bit."""
    cfg = dict(variant="tma", BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    gen = torch.Generator(device="cuda").manual_seed(m + n + k)
    qx = torch.randint(-8, 8, (m, k), generator=gen, device="cuda", dtype=torch.int8)
    qw = torch.randint(-8, 8, (n, k), generator=gen, device="cuda", dtype=torch.int8)
    pw = dev(R.pack_int4(qw.cpu().numpy()))
    out = torch.full((m, n), POISON_I32, dtype=torch.int32, device="cuda")
    assert torch.equal(w4a4_gemm_int32(qx, pw, out=out, config=cfg).double(), qx.double() @ qw.double().T)
    sx = torch.rand(m, -(-k // 128), generator=gen, device="cuda") * 0.1 + 1e-3
    sw = torch.rand(n, generator=gen, device="cuda") * 0.1 + 1e-3
    ref_cfg = dict(cfg, variant="gemm", PLANES=False, num_warps=8, num_stages=3)
    y = w4a4_gemm(qx, sx, pw, sw, act_group_size=128, out_dtype=torch.float32, config=cfg)
    assert torch.equal(y, w4a4_gemm(qx, sx, pw, sw, act_group_size=128, out_dtype=torch.float32, config=ref_cfg))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("layout", ACT_LAYOUTS)
@pytest.mark.parametrize("m", [1, 16, 100, 256, 1024])
@pytest.mark.parametrize("n, k", [(4096, 4096), (4096, 14336), (6144, 4096), (1000, 4000)])
def test_llama_shapes_int32_exact_compiled(m, n, k, layout):
    gen = torch.Generator(device="cuda").manual_seed(m * n + k)
    qx = torch.randint(-8, 8, (m, k), generator=gen, device="cuda", dtype=torch.int8)
    qw = torch.randint(-8, 8, (n, k), generator=gen, device="cuda", dtype=torch.int8)
    px, pw = acts(qx.cpu().numpy(), layout), dev(R.pack_int4(qw.cpu().numpy()))
    exact = qx.double() @ qw.double().T  # |sum| <= 64 K < 2**53: exact in float64
    out = torch.full((m, n), POISON_I32, dtype=torch.int32, device="cuda")
    assert torch.equal(w4a4_gemm_int32(px, pw, out=out).double(), exact)
    for group in (None, 128):
        g = 1 if group is None else -(-k // group)
        sx = torch.rand(m, g, generator=gen, device="cuda") * 0.1 + 1e-3
        sw = torch.rand(n, generator=gen, device="cuda") * 0.1 + 1e-3
        sx_t = sx[:, 0].contiguous() if group is None else sx
        y = w4a4_gemm(px, sx_t, pw, sw, act_group_size=group).double()
        ref = R.w4a4_matmul(qx.cpu().numpy(), sx_t.double().cpu().numpy(), qw.cpu().numpy(),
                            sw.double().cpu().numpy(), act_group_size=group)
        ref = torch.from_numpy(ref).cuda()
        err = (y - ref).norm() / ref.norm()
        assert err < 1e-3, err  # fp16 output rounding (2**-11 relative per element)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("n, k", [(4096, 4096), (4096, 14336), (1000, 4002)])
def test_llama_shapes_gemv_quant_compiled(m, n, k):
    """The fused GEMV on the M = 1 bucket's tiles (K = 4002: rows of 2001 bytes, the byte path),
    against the quantizer + gemv product: per-token exactly; groups of 128 against the float64
    product of the quantizer's codes, within the fp16 output's rounding and the fp32 bound."""
    from zqkernels.gpu.configs import launch_config

    gen = torch.Generator(device="cuda").manual_seed(m + n + k)
    x = torch.randn(m, k, generator=gen, device="cuda").half()
    x[0, 7] = 300.0  # one outlier channel
    inv = torch.rand(k, generator=gen, device="cuda") + 0.5
    pw = torch.randint(0, 256, (n, k // 2), generator=gen, device="cuda", dtype=torch.uint8)
    sw = torch.rand(n, generator=gen, device="cuda") * 0.1 + 1e-3
    for group, scales in ((None, "per_token"), (128, "group")):
        cfg = launch_config("w4a4", scales, 1, torch.device("cuda"))
        assert cfg["variant"] == "gemv" and cfg["BLOCK_K"] >= 128, cfg
        out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        fused = w4a4_gemv_quant(x, inv, pw, sw, group, out=out, config=cfg)
        qx, sx = quantize_activations(x, inv, group)
        if group is None:
            assert torch.equal(fused, w4a4_gemm(qx, sx, pw, sw, group, config=cfg))  # exact
            continue
        cx, cw = unpack_gpu(qx), unpack_gpu(pw)
        ref, mag = torch.zeros(m, n, dtype=torch.float64, device="cuda"), torch.zeros_like(fused, dtype=torch.float64)
        for gi in range(sx.shape[1]):
            sl, s_g = slice(gi * group, (gi + 1) * group), sx[:, gi:gi + 1].double()
            ref += (cx[:, sl] @ cw[:, sl].T) * s_g
            mag += (cx[:, sl].abs() @ cw[:, sl].abs().T) * s_g
        ref, mag = ref * sw.double(), mag * sw.double()
        # fp16 output rounding + the fp32 accumulation bound of test_scaled_output_matches_oracle
        assert bool(((fused.double() - ref).abs() <= 2.0**-10 * ref.abs() + 2.0**-20 * mag + 2.0**-24).all())


def unpack_gpu(p):
    """Packed uint8 codes [R, K/2] -> float64 codes [R, K] on p's device (low nibble first)."""
    lo = (p & 15).to(torch.int16)
    hi = (p >> 4).to(torch.int16)
    both = torch.stack([lo, hi], dim=-1).reshape(p.shape[0], -1)
    return torch.where(both >= 8, both - 16, both).double()


def _misaligned(t):
    """The same values at a data pointer 1 byte past a 4-byte boundary (still contiguous)."""
    buf = torch.empty(t.numel() + 4, dtype=t.dtype, device=t.device)
    start = (4 - buf.data_ptr() % 4) % 4 + 1
    out = buf[start:start + t.numel()].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 4 == 1
    return out


# The gemv variant's load paths, each deterministically: int32 words (K a multiple of 8, rows
# 4-byte aligned) or bytes assembled into words (K not a multiple of 8, or a misaligned pointer);
# per-token int32, and group scales with several groups per K tile (BLOCK_K 64, groups of 32) and
# one group over several tiles (BLOCK_K 32, groups of 64).
@pytest.mark.parametrize("layout", ACT_LAYOUTS)
@pytest.mark.parametrize("k, misalign", [(256, False), (136, False), (130, False), (256, True)])
def test_gemv_load_paths_equal_the_oracle(k, misalign, layout):
    from zqkernels.gpu import w4a4

    rng = np.random.default_rng(k + misalign)
    m, n = 3, 37
    qx = rng.integers(-8, 8, (m, k)).astype(np.int8)
    qw = rng.integers(-8, 8, (n, k)).astype(np.int8)
    qx[1] = -8
    qw[0] = -8  # the largest magnitude: products of +64
    px, pw = acts(qx, layout), dev(R.pack_int4(qw))
    if misalign:
        px, pw = _misaligned(px), _misaligned(pw)
    words = pw.shape[1] % 4 == 0 and px.data_ptr() % 4 == 0 and pw.data_ptr() % 4 == 0
    assert words == (k % 8 == 0 and not misalign)  # the path this case is for
    exact = qx.astype(np.int64) @ qw.astype(np.int64).T
    for cfg in (GEMV_SPLIT, GEMV_WIDE):
        out = torch.full((m, n), POISON_I32, dtype=torch.int32, device=DEVICE)
        np.testing.assert_array_equal(w4a4.w4a4_gemm_int32(px, pw, out=out, config=cfg).cpu().numpy(), exact)
        for group in (32, 64):
            g = -(-k // group)
            sx = rng.uniform(1e-3, 1e-1, (m, g)).astype(np.float32)
            sw = rng.uniform(1e-3, 1e-1, n).astype(np.float32)
            y = w4a4.w4a4_gemm(px, dev(sx), pw, dev(sw), act_group_size=group, out_dtype=torch.float32, config=cfg)
            ref = R.w4a4_matmul(qx, sx.astype(np.float64), qw, sw.astype(np.float64), act_group_size=group)
            mag = R.w4a4_matmul(np.abs(qx), sx.astype(np.float64), np.abs(qw), sw.astype(np.float64),
                                act_group_size=group)
            # fp32 accumulation of the rescaled int32 group sums (module docstring)
            np.testing.assert_array_less(np.abs(y.double().cpu().numpy() - ref), 2.0**-22 * np.abs(ref) + 2.0**-20 * mag)


FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FINITE_MAX = {"float16": 6e4, "bfloat16": 3e38, "float32": 3e38}


@st.composite
def float_acts(draw):
    """x [M, K] (K even) of an adversarial kind (ties, an outlier, zero rows, ...) in a float dtype,
    the weights' codes, and an optional smoothing vector."""
    dtype = draw(st.sampled_from(sorted(FLOAT_DTYPES)))
    x = draw(matrices(max_rows=3, max_cols=200, min_cols=2, even_cols=True))
    x = np.clip(x, -FINITE_MAX[dtype], FINITE_MAX[dtype])
    n = draw(st.integers(1, 40))
    qw = draw(codes(-8, 7, shape=(n, x.shape[1])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    inv = rng.uniform(0.05, 20.0, x.shape[1]).astype(np.float32) if draw(st.booleans()) else None
    return dtype, x, qw.astype(np.int8), inv


def _fused_and_two_step(dtype, x, qw, inv, group, cfg, out_dtype=torch.float32):
    """(fused output, quantizer + gemv output, float64 oracle product of the quantizer's codes and
    scales, the same with |codes|: the magnitude an fp32 accumulation error scales with)."""
    xt = dev(x).to(FLOAT_DTYPES[dtype])
    inv_t = None if inv is None else dev(inv)
    pw = dev(R.pack_int4(qw))
    sw = np.random.default_rng(0).uniform(1e-3, 1e-1, qw.shape[0]).astype(np.float32)
    out = torch.full((x.shape[0], qw.shape[0]), float("nan"), dtype=out_dtype, device=DEVICE)
    fused = w4a4_gemv_quant(xt, inv_t, pw, dev(sw), group, out_dtype, out=out, config=cfg, check_finite=False)
    assert fused.data_ptr() == out.data_ptr()
    qx, sx = quantize_activations(xt, inv_t, group, check_finite=False)
    two_step = w4a4_gemm(qx, sx, pw, dev(sw), group, out_dtype, config=cfg, check_finite=False)
    cx, s64 = R.unpack_int4(qx.cpu().numpy()), sx.cpu().numpy().astype(np.float64)
    ref = np.full((x.shape[0], qw.shape[0]), np.nan)
    mag = ref.copy()
    ok = np.isfinite(s64.reshape(x.shape[0], -1)).all(axis=1)  # a non-finite row has no oracle product
    if ok.any():
        ref[ok] = R.w4a4_matmul(cx[ok], s64[ok], qw, sw.astype(np.float64), act_group_size=group)
        mag[ok] = R.w4a4_matmul(np.abs(cx[ok]), s64[ok], np.abs(qw), sw.astype(np.float64), act_group_size=group)
    return fused, two_step, ref, mag


def _assert_fused_right(fused, two_step, ref, mag, group, rows=slice(None)):
    """Per-token: the two-step output exactly (the same integers, the same epilogue). Groups: the
    oracle's product of the quantizer's codes within the fp32 accumulation bound of
    `test_scaled_output_matches_oracle` (the fp32 order of the group sums is the compiler's)."""
    if group is None:
        assert torch.equal(fused[rows], two_step[rows])  # exact
    else:
        got = fused[rows].double().cpu().numpy()
        np.testing.assert_array_less(np.abs(got - ref[rows]), EPS_OUT[fused.dtype] * np.abs(ref[rows])
                                     + 2.0**-20 * mag[rows] + TINY[fused.dtype])


# The GEMV with the quantizer in its prologue gives the quantizer's codes and scales bit for bit.
@pytest.mark.parametrize("cfg", [GEMV_SPLIT, GEMV_WIDE], ids=["split", "wide"])
@settings(max_examples=examples(5))
@given(case=float_acts(), group=st.sampled_from([None, 32, 64]))
@example(case=("float32", np.array([[7.0, 0.5, 1.5, 2.5, -0.5, -1.5]]), np.ones((3, 6), np.int8), None), group=None)
@example(case=("float16", np.zeros((2, 8)), np.full((5, 8), -8, np.int8), None), group=32)  # all-zero rows
@example(case=("bfloat16", np.array([[0.12573022, -0.13210486, 0.64042265, 0.10490012, -0.53566937, 0.36159505,
                                      1.30400005, 0.94708096, -0.70373524, -1.26542147, -0.62327446, 0.04132598,
                                      -2.32503077, -0.21879166]]),
               np.array([[5, 2, 0, -4, -4, -8, -7, -8, -6, 5, 2, 6, 0, -8]], np.int8), None), group=32)
def test_gemv_quant_equals_quantizer_then_gemv(case, group, cfg):
    dtype, x, qw, inv = case
    _assert_fused_right(*_fused_and_two_step(dtype, x, qw, inv, group, cfg), group)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_gemv_quant_output_dtypes_and_a_non_finite_row(out_dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 128))
    x[1, 5] = np.inf  # its token's outputs are NaN, the others finite and right
    qw = rng.integers(-8, 8, (24, 128)).astype(np.int8)
    for group in (None, 32):
        fused, two_step, ref, mag = _fused_and_two_step("float32", x, qw, None, group, GEMV_SPLIT, out_dtype)
        assert fused.dtype == out_dtype
        assert torch.isnan(fused[1]).all() and torch.isfinite(fused[[0, 2]]).all()
        _assert_fused_right(fused, two_step, ref, mag, group, rows=[0, 2])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: w4a4_gemv_quant(_c(1, 16), None, _p(3), _s(3)), "x dtype must be"),
        (lambda: w4a4_gemv_quant(_f(1, 15), None, _p(3), _s(3)), "K must be even"),
        (lambda: w4a4_gemv_quant(_f(1, 32), None, _p(3), _s(3)), "qw_packed has K/2=8"),
        (lambda: w4a4_gemv_quant(_f(1, 16), None, _p(3), _s(4)), "w_scale"),
        (lambda: w4a4_gemv_quant(_f(1, 16), _s(8), _p(3), _s(3)), "inv_smooth"),
        (lambda: w4a4_gemv_quant(_f(1, 16), None, _p(3), _s(3), act_group_size=48), "group_size"),
        (lambda: w4a4_gemv_quant(_f(1, 16), None, _p(3), _s(3), config=CONFIGS[1]), "gemv variant"),
        (lambda: w4a4_gemv_quant(_f(1, 16) * float("nan"), None, _p(3), _s(3)), "x holds NaN or Inf"),
    ],
)
def test_gemv_quant_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_gemv_refuses_a_block_k_below_four_words():
    qx, qw = _p(1, 8), _p(3, 8)
    with pytest.raises(ValueError, match="gemv config BLOCK_K must be a power of two >= 32"):
        w4a4_gemm_int32(qx, qw, config=dict(GEMV_SPLIT, BLOCK_K=16))


def _p(r=4, c=8):
    return torch.zeros(r, c, dtype=torch.uint8, device=DEVICE)


def _c(r=4, k=16):
    return torch.zeros(r, k, dtype=torch.int8, device=DEVICE)


def _f(r, k):
    return torch.ones(r, k, dtype=torch.float16, device=DEVICE)


def _s(*shape):
    return torch.ones(*shape, dtype=torch.float32, device=DEVICE)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: w4a4_gemm(_p().to(torch.int8), _s(4), _p(3), _s(3)), "qx_packed int8 codes with K=8"),  # [M, K/2]
        (lambda: w4a4_gemm(_p().to(torch.int16), _s(4), _p(3), _s(3)), "qx_packed must be uint8 .* or int8"),
        (lambda: w4a4_gemm(_c(4, 32)[:, ::2], _s(4), _p(3), _s(3)), "qx_packed must be contiguous"),
        (lambda: w4a4_gemm(_c(4, 15), _s(4), _p(3), _s(3)), "qx_packed: int8 codes .* even K"),
        (lambda: w4a4_gemm(_c(4, 16)[None], _s(4), _p(3), _s(3)), "qx_packed must be a non-empty 2-D"),
        (lambda: w4a4_gemm(_c(0, 16), _s(0), _p(3), _s(3)), "qx_packed must be a non-empty 2-D"),
        (lambda: w4a4_gemm(_c(4, 16), _s(4), _p(3), _s(3), act_group_size=32), "act_scale"),
        (lambda: w4a4_gemm(_c(4, 16), _s(4), _p(3), _s(3), config=dict(CONFIGS[1], act_layout="int2")),
         "act_layout"),
        (lambda: w4a4_gemm_int32(_c(4, 16), _p(3, 4)), "qw_packed has K/2=4"),
        (lambda: w4a4_gemm(_p(), _s(4), _p(3, 9), _s(3)), "K/2"),
        (lambda: w4a4_gemm(_p(4, 16)[:, ::2], _s(4), _p(3), _s(3)), "contiguous"),
        (lambda: w4a4_gemm(_p(), _s(5), _p(3), _s(3)), "act_scale"),
        (lambda: w4a4_gemm(_p(), _s(4).double(), _p(3), _s(3)), "act_scale"),
        (lambda: w4a4_gemm(_p(), _s(4), _p(3), _s(4)), "w_scale"),
        (lambda: w4a4_gemm(_p(), _s(4, 1), _p(3), _s(3), act_group_size=48), "act_group_size"),
        (lambda: w4a4_gemm(_p(), _s(4), _p(3), _s(3), act_group_size=32), "act_scale"),
        (lambda: w4a4_gemm(_p(), _s(4), _p(3), _s(3), out_dtype=torch.int8), "out_dtype"),
        (lambda: w4a4_gemm(_p(0, 8), _s(0), _p(3), _s(3)), "qx_packed"),
        (lambda: w4a4_gemm_int32(_p(), _p(3).to(torch.int32)), "qw_packed"),
        (lambda: w4a4_gemm_int32(_p(), _p(3), out=torch.empty(4, 3, dtype=torch.float32, device=DEVICE)), "out"),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
