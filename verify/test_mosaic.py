"""ZipperEngine equals the oracle: `zqkernels.gpu.mosaic` vs `reference.mosaic_*` (DESIGN.md §3).

Laws:
- `mosaic_w4a4_gemm_int32` (the fused kernel's own accumulators): base == qx @ qb.T and
  residual == Σ_b qx_b @ qr_b.T, exactly; their sum equals `reference.mosaic_dequantize` of the
  codes with unit scales, times qx (integers, exact in float64).
- `mosaic_w4a4_gemm` (fused), `mosaic_w4a4_gemm_unfused` and `mosaic_w4a16_gemm` are within
  `eps_out * |ref| + 2**-20 * mag` of `reference.mosaic_matmul` (float64), where eps_out is the
  output dtype's rounding (fp16 2**-10, bf16 2**-7, fp32 2**-22: 2x the half-ulp), mag the same
  product on absolute values, and 2**-20 a generous bound for the float32 scale products and the
  float32 accumulation of residual blocks (a few hundred fp32 roundings of 2**-24 each).
- any launch config (tile shapes, unroll) gives the same result.
- groups of 32 (weights, activations or both; a 64-deep residual block then spans two groups):
  every variant, stepping K 32 deep (one natural-order int8 dot per step), equals the oracle as
  above, its int32 accumulators exactly.
- the bf16 `dequant` variant (compiled: sa * qx and the weight in bf16 before the MMA) within
  `eps_out * |ref| + (2**-20 + FOLD) * mag`, FOLD = 2**-6 (the bf16 roundings); under the
  interpreter it computes in fp32 and FOLD is 0; a bucket naming it runs its `no_tma` config where
  K is not a multiple of 32, and the int32 entry point refuses it.
Residual block sets are drawn per row-block: empty, every K-block, or random (densities 0, one
block, ~5 %, 100 %), on M = 1, N and K not multiples of the block, values with ties and outliers.
Outputs are poisoned (0x7F7F7F7F / NaN) so an unwritten element fails.
Under TRITON_INTERPRET=1 (no GPU) shapes stay small; the `gpu` tests run LLaMA-3-8B sizes compiled.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as R
from strategies import MATRIX_KINDS, examples, matrices
from zqkernels.gpu.mosaic import (
    VARIANTS,
    _table_config,
    mosaic_w4a4_gemm,
    mosaic_w4a4_gemm_int32,
    mosaic_w4a4_gemm_unfused,
    mosaic_w4a16_gemm,
)
from zqkernels.layouts import MosaicBlocks

prepare_mosaic = MosaicBlocks.from_codes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEVICE == "cuda"
EPS_OUT = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-22}
POISON_I32 = 0x7F7F7F7F
# Residual blocks whose bk holds a compiled int8 dot (BLOCK_K/2 >= 32) and a tile that divides them.
BLOCKS = [(64, 64), (32, 64), (16, 64), (64, 128)]
# Explicit configs of every shipped variant (`mosaic.VARIANTS`), each run deterministically
# (parametrized). BLOCK_N divides bn or is a multiple of it (a tile over several row-blocks, whose
# residual list is the union of theirs). inloop steps inside the blocks (BLOCK_K = 64 divides every
# bk above); reslate and splitk step their base loop independently of bk (BLOCK_K > bk too).
INLOOP = [
    dict(variant="inloop", BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, UNROLL=1, SPLIT_K=1, num_warps=4, num_stages=1),
    dict(variant="inloop", BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, UNROLL=2, SPLIT_K=1, num_warps=4, num_stages=2),
    dict(variant="inloop", BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, UNROLL=2, SPLIT_K=3, num_warps=4, num_stages=2),
    dict(variant="inloop", BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, UNROLL=3, SPLIT_K=0, num_warps=4, num_stages=2),
]
RESLATE = [
    dict(variant="reslate", BLOCK_M=16, BLOCK_N=128, BLOCK_K=256, GROUP_M=8, num_warps=8, num_stages=3),
    dict(variant="reslate", BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=2, num_warps=4, num_stages=3),
    dict(variant="reslate", BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=2),
]
SPLITK = [
    dict(variant="splitk", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, GROUP_M=1, num_warps=4, num_stages=3),
    dict(variant="splitk", BLOCK_M=16, BLOCK_N=128, BLOCK_K=256, SPLIT_K=3, GROUP_M=1, num_warps=4, num_stages=3),
    dict(variant="splitk", BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=0, num_warps=4, num_stages=2),
    dict(variant="splitk", BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2, num_warps=4, num_stages=2),
]
ALL = INLOOP + RESLATE + SPLITK
K64 = [c for c in ALL if c["BLOCK_K"] == 64]  # one K step per group of 64 or 128
WIDE = [c for c in ALL if c["BLOCK_K"] > 64]  # the base loop wider than a 64-deep block
# K steps of 32, each one group of 32: the natural-order dot, and the residual block (bk >= 64) in
# two or more steps. Tiles inside one row-block or over several (BLOCKS' bn of 16 to 64); K split.
K32 = [
    dict(variant="inloop", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, UNROLL=2, SPLIT_K=2, num_warps=4, num_stages=2),
    dict(variant="reslate", BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2),
    dict(variant="splitk", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=3, GROUP_M=1, num_warps=4, num_stages=2),
]
# The bf16 variant (TMA descriptors: K a multiple of 32); kept out of ALL, whose laws hold every
# config to the integer variants' fp32 bound. BLOCK_K divides bk and the groups.
DEQUANT = [
    dict(variant="dequant", BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1),
    dict(variant="dequant", BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=2, num_warps=4, num_stages=2),
]
W4A16_CONFIGS = [
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, UNROLL=1, num_warps=4, num_stages=1),
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, UNROLL=3, num_warps=4, num_stages=2),
    dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, UNROLL=2, num_warps=4, num_stages=2),
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, UNROLL=3, num_warps=4, num_stages=2),
]


def _ids(cfgs):
    return ["table" if c is None else "-".join(f"{k}{v}" for k, v in c.items() if k not in ("num_warps", "num_stages"))
            for c in cfgs]


def test_every_variant_has_explicit_configs():
    integer = set(VARIANTS) - {"dequant"}
    assert {c["variant"] for c in ALL} == integer and {c["variant"] for c in DEQUANT} == {"dequant"}
    assert {c["variant"] for c in K64} == integer and {c["variant"] for c in WIDE} >= {"reslate", "splitk"}
    assert {c["variant"] for c in K32} == integer and any(c["BLOCK_K"] == 32 for c in W4A16_CONFIGS)


def dev(a):
    return torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE)


@st.composite
def mosaic_codes(draw, max_n=130, max_k=260, group_sizes=(None,), k_multiple=2):
    """MosaicCodes drawn directly: base codes with extremes, and a residual block set chosen per
    row-block (none / every K-block / random), so empty N-tiles and full N-tiles both occur."""
    bn, bk = draw(st.sampled_from(BLOCKS))
    n = draw(st.integers(1, max_n))
    k = k_multiple * draw(st.integers(1, max_k // k_multiple))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    nbr, nbc = -(-n // bn), -(-k // bk)
    style = draw(st.sampled_from(["per_row_block", "density_0", "one_block", "five_percent", "all"]))
    if style == "per_row_block":
        modes = rng.integers(0, 3, size=nbr)  # 0 empty, 1 every K-block, 2 random half
        kept = np.array([(r, c) for r in range(nbr) for c in range(nbc)
                         if modes[r] == 1 or (modes[r] == 2 and rng.random() < 0.5)], dtype=np.int64)
    else:
        total = nbr * nbc
        count = {"density_0": 0, "one_block": 1, "five_percent": math.ceil(0.05 * total), "all": total}[style]
        flat = np.sort(rng.choice(total, size=count, replace=False))
        kept = np.stack(np.divmod(flat, nbc), axis=1).astype(np.int64)
    kept = kept.reshape(-1, 2)
    b = kept.shape[0]
    q_base = rng.integers(-8, 8, size=(n, k)).astype(np.int8)
    q_res = rng.integers(-8, 8, size=(b, bn, bk)).astype(np.int8)
    if draw(st.booleans()):  # the extreme codes: every product is +64
        q_base[:] = -8
        q_res[:] = -8
    for i, (r, c) in enumerate(kept):  # the oracle's format: zero past the matrix edge
        q_res[i, n - r * bn:, :] = 0
        q_res[i, :, k - c * bk:] = 0
    group_size = draw(st.sampled_from(group_sizes))
    sb_shape = (n,) if group_size is None else (n, -(-k // group_size))
    scale_base = rng.uniform(0.0, 2.0, size=sb_shape)
    scale_base[rng.random(sb_shape) < 0.1] = 0.0  # zero scales (all-zero weight rows)
    scale_res = rng.uniform(0.0, 0.3, size=(b, bn))
    return R.MosaicCodes(q_base=q_base, scale_base=scale_base, block_index=kept, q_res=q_res,
                         scale_res=scale_res, block=(bn, bk), group_size=group_size)


def unit_scales(codes):
    return R.MosaicCodes(q_base=codes.q_base, scale_base=np.ones(codes.q_base.shape[0]),
                         block_index=codes.block_index, q_res=codes.q_res,
                         scale_res=np.ones_like(codes.scale_res), block=codes.block, group_size=None)


def abs_codes(codes):
    return R.MosaicCodes(q_base=np.abs(codes.q_base.astype(np.int64)), scale_base=np.abs(codes.scale_base),
                         block_index=codes.block_index, q_res=np.abs(codes.q_res.astype(np.int64)),
                         scale_res=np.abs(codes.scale_res), block=codes.block, group_size=codes.group_size)


def w4a4_inputs(x, act_group_size):
    qx, sx = R.quantize_activations(x, group_size=act_group_size)
    return qx, sx, dev(R.pack_int4(qx)), dev(sx.astype(np.float32))


# Absolute floor: fp16's subnormal spacing (2**-24); bf16 and fp32 share float32's exponent range.
TINY = {torch.float16: 2.0**-24, torch.bfloat16: 1e-30, torch.float32: 1e-30}


# The dequant variant, compiled, forms sa * qx and the weight (sb * qb + sr * qr) in bf16 before its
# MMA: the activation and each scaled term rounded (2**-8 each, relative), the scales too, and the
# weight's sum: under 2**-6 of |qx sa| @ |W|.T. Under the interpreter it computes in fp32.
FOLD = 2.0**-6 if GPU else 0.0


def bound(ref, mag, dtype, folded=False):
    return EPS_OUT[dtype] * np.abs(ref) + (2.0**-20 + (FOLD if folded else 0.0)) * mag + TINY[dtype]


def runs_dequant(cfg, m, w, act_group_size, qxp):
    """True when this launch (an explicit config, or the table's for M) runs the dequant variant."""
    from zqkernels.gpu.configs import tma_or_fallback
    from zqkernels.gpu.mosaic import dequant_takes

    cfg = dict(cfg) if cfg is not None else _table_config(m, w, act_group_size, "w4a4")
    return tma_or_fallback(cfg, dequant_takes(qxp, w), ("dequant",))[0] == "dequant"


def assert_close(out, ref, mag, dtype, what, folded=False):
    y = out.detach().cpu().double().numpy()
    assert np.all(np.isfinite(y)), f"{what}: non-finite (unwritten?) outputs"
    err = np.abs(y - ref)
    tol = bound(ref, mag, dtype, folded)  # tolerance: eps_out * |ref| + 2**-20 (FOLD) * |qx| @ |W|.T (module doc)
    worst = np.unravel_index(np.argmax(err - tol), err.shape)
    assert np.all(err <= tol), f"{what}: |err| {err[worst]} > tol {tol[worst]} at {worst}"


def act_matrix(draw, m, k):
    return draw(matrices(shape=(m, k), kinds=MATRIX_KINDS))


# ------------------------------------------------------------------------------------------------
# Exact integer accumulators of the fused kernel


@pytest.mark.parametrize("cfg", [None] + ALL + K32, ids=_ids([None] + ALL + K32))
@settings(max_examples=examples(5))
@given(codes=mosaic_codes(), m=st.sampled_from([1, 3, 17]), seed=st.integers(0, 2**32 - 1))
def test_fused_int32_accumulators_equal_integer_products(codes, m, seed, cfg):
    n, k = codes.q_base.shape
    rng = np.random.default_rng(seed)
    qx = rng.integers(-8, 8, size=(m, k)).astype(np.int8)
    if rng.random() < 0.3:
        qx[:] = -8
    w = prepare_mosaic(codes, DEVICE)
    base = torch.full((m, n), POISON_I32, dtype=torch.int32, device=DEVICE)
    res = torch.full((m, n), POISON_I32, dtype=torch.int32, device=DEVICE)
    b, r = mosaic_w4a4_gemm_int32(dev(R.pack_int4(qx)), w, out=(base, res), config=cfg)
    assert b.data_ptr() == base.data_ptr() and r.data_ptr() == res.data_ptr()
    q64 = qx.astype(np.int64)
    want_base = q64 @ codes.q_base.astype(np.int64).T
    # The oracle's dequantization with unit scales is the integer weight base + residual.
    want_total = q64.astype(np.float64) @ R.mosaic_dequantize(unit_scales(codes)).T
    np.testing.assert_array_equal(b.cpu().numpy(), want_base)
    np.testing.assert_array_equal((b.cpu().numpy().astype(np.int64) + r.cpu().numpy()).astype(np.float64), want_total)


# ------------------------------------------------------------------------------------------------
# Float outputs against reference.mosaic_matmul


def _float_case(codes, draw, act_group_size, max_m):
    """A drawn M (1 among the draws) and activations for `codes`: (m, n, packed activations, their
    scales, the prepared weights, the oracle's product, the magnitude `assert_close` scales by)."""
    n, k = codes.q_base.shape
    m = draw(st.sampled_from([1, draw(st.integers(1, max_m))]))
    x = act_matrix(draw, m, k)
    qx, sx, qxp, sxt = w4a4_inputs(x, act_group_size)
    w = prepare_mosaic(codes, DEVICE)
    ref = R.mosaic_matmul(x, codes, act_group_size=act_group_size)
    mag = np.abs(R.dequantize(qx, sx, act_group_size)) @ R.mosaic_dequantize(abs_codes(codes)).T
    return m, n, qxp, sxt, w, ref, mag


def _into_poisoned(fn, m, n, out_dtype, *args, **kwargs):
    """fn(*args, out_dtype=..., out=<NaN-filled [m, n]>, **kwargs), checked to return that buffer."""
    out = torch.full((m, n), float("nan"), dtype=out_dtype, device=DEVICE)
    y = fn(*args, out_dtype=out_dtype, out=out, **kwargs)
    assert y.data_ptr() == out.data_ptr()
    return y


@pytest.mark.parametrize("cfg", [None] + K64, ids=_ids([None] + K64))
@settings(max_examples=examples(6))
@given(codes=mosaic_codes(group_sizes=(None, None, 64, 128)), data=st.data(),
       act_group_size=st.sampled_from([None, None, 64, 128]),
       out_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_fused_matches_reference_mosaic_matmul(codes, data, act_group_size, out_dtype, cfg):
    m, n, qxp, sxt, w, ref, mag = _float_case(codes, data.draw, act_group_size, 20)
    if out_dtype == torch.float16 and np.abs(ref).max() > 6e4:
        return  # beyond fp16's range: the product itself is not representable
    y = _into_poisoned(mosaic_w4a4_gemm, m, n, out_dtype, qxp, sxt, w, act_group_size=act_group_size, config=cfg)
    assert_close(y, ref, mag, out_dtype, "fused", runs_dequant(cfg, m, w, act_group_size, qxp))


@pytest.mark.parametrize("unfused", [False, True])
@pytest.mark.parametrize("cfg", WIDE, ids=_ids(WIDE))
@settings(max_examples=examples(4))
@given(codes=mosaic_codes(group_sizes=(None, 256)), data=st.data(), act_group_size=st.sampled_from([None, 256]),
       out_dtype=st.sampled_from([torch.float32, torch.float16]))
def test_wide_base_step_matches_reference(codes, data, act_group_size, out_dtype, cfg, unfused):
    """BLOCK_K > bk (reslate and splitk, the large-M and decode paths): K not a multiple of
    BLOCK_K, groups of 256."""
    m, n, qxp, sxt, w, ref, mag = _float_case(codes, data.draw, act_group_size, 40)
    if out_dtype == torch.float16 and np.abs(ref).max() > 6e4:
        return
    if unfused:  # the baseline adds its residual to the stored output: fp32 (no double rounding)
        out_dtype = torch.float32
    fn = mosaic_w4a4_gemm_unfused if unfused else mosaic_w4a4_gemm
    y = _into_poisoned(fn, m, n, out_dtype, qxp, sxt, w, act_group_size=act_group_size, config=cfg)
    assert_close(y, ref, mag, out_dtype, "wide-K " + cfg["variant"])


# (weight group, activation group) pairs holding a group of 32, beside per-channel / per-token scales, a
# coarser group, and a group of 96 (a multiple of 32 that is no power of two).
GROUPS_32 = [(32, 32), (32, None), (None, 32), (64, 32), (32, 128), (96, 32)]


@pytest.mark.parametrize("cfg", K32, ids=_ids(K32))
@settings(max_examples=examples(4))
@given(data=st.data(), groups=st.sampled_from(GROUPS_32),
       out_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_groups_of_32_match_reference(data, groups, out_dtype, cfg):
    """Every variant with weight and/or activation groups of 32, fused and unfused: each 32-deep
    K step rescaled by its own groups' scales, a residual block's two halves by theirs; K (drawn
    up to 200) rarely a multiple of 32 or 64, M = 1, all-zero rows among the drawn activations."""
    w_group, act_group_size = groups
    codes = data.draw(mosaic_codes(max_n=100, max_k=200, group_sizes=(w_group,)))
    m, n, qxp, sxt, w, ref, mag = _float_case(codes, data.draw, act_group_size, 20)
    if out_dtype == torch.float16 and np.abs(ref).max() > 6e4:
        return  # beyond fp16's range: the product itself is not representable
    y = _into_poisoned(mosaic_w4a4_gemm, m, n, out_dtype, qxp, sxt, w, act_group_size=act_group_size, config=cfg)
    assert_close(y, ref, mag, out_dtype, "fused, groups " + str(groups))
    # The unfused baseline adds its residual to the stored output: fp32 (no double rounding).
    y = _into_poisoned(mosaic_w4a4_gemm_unfused, m, n, torch.float32, qxp, sxt, w, act_group_size=act_group_size,
                       config=cfg)
    assert_close(y, ref, mag, torch.float32, "unfused, groups " + str(groups))


def _table_config_laws(codes, x, act_group_size, m, label):
    """At the launch table's own config for M: the fused and unfused W4A4 products (fp32 out) and
    the W4A16 one (on x in bf16: no outlier overflows) against the oracle, each into a poisoned
    buffer. Returns (the activation codes, the prepared weights)."""
    n = codes.q_base.shape[0]
    qx, sx, qxp, sxt = w4a4_inputs(x, act_group_size)
    w = prepare_mosaic(codes, DEVICE)
    ref = R.mosaic_matmul(x, codes, act_group_size=act_group_size)
    mag = np.abs(R.dequantize(qx, sx, act_group_size)) @ R.mosaic_dequantize(abs_codes(codes)).T
    folded = runs_dequant(None, m, w, act_group_size, qxp)
    for fn in (mosaic_w4a4_gemm, mosaic_w4a4_gemm_unfused):
        y = _into_poisoned(fn, m, n, torch.float32, qxp, sxt, w, act_group_size=act_group_size)
        assert_close(y, ref, mag, torch.float32, f"{fn.__name__} {label}", folded)
    xt = torch.from_numpy(x).to(torch.bfloat16)
    x_used = xt.double().numpy()
    y = _into_poisoned(mosaic_w4a16_gemm, m, n, torch.float32, xt.to(DEVICE), w)
    mag16 = np.abs(x_used) @ R.mosaic_dequantize(abs_codes(codes)).T
    assert_close(y, R.mosaic_matmul(x_used, codes, act_bits=None), mag16, torch.float32, "w4a16 " + label)
    return qx, w


# One M in each bucket of the launch table: the interpreter's, and (compiled) the GPU's; see below.
TABLE_M = [1, 8, 16, 40] + ([100, 300] if GPU else [])


def test_launch_table_sends_groups_of_32_through_every_variant():
    w = prepare_mosaic(R.mosaic_quantize(np.ones((8, 96)), np.ones(96), density=0.5, group_size=32), DEVICE)
    cfgs = [_table_config(m, w, 32, "w4a4") for m in TABLE_M]
    if not GPU:  # the interpreter's table reaches every integer variant; a GPU's tuned w4a4_group names its winners
        assert {c["variant"] for c in cfgs} == set(VARIANTS) - {"dequant"}
    assert all(c["BLOCK_K"] == 32 for c in cfgs) and _table_config(1, w, None, "w4a16")["BLOCK_K"] == 32


@pytest.mark.parametrize("act_group, w_group, section", [(None, None, "w4a4"), (32, None, "w4a4_group"),
                                                         (None, 64, "w4a4_group"), (64, 32, "w4a4_group")])
def test_group_products_read_the_group_section_of_the_table(act_group, w_group, section, monkeypatch):
    """A W4A4 product with activation or base-weight groups takes its tiles from the table's
    `w4a4_group` section (tuned with groups), a per-token one from `w4a4`; W4A16 from `w4a16`."""
    import zqkernels.gpu.mosaic as mosaic_module

    asked = []
    real = mosaic_module.launch_config
    monkeypatch.setattr(mosaic_module, "launch_config",
                        lambda family, scales, m, device: asked.append((family, scales)) or real(family, scales, m,
                                                                                                  device))
    w = prepare_mosaic(R.mosaic_quantize(np.ones((8, 128)), np.ones(128), density=0.5, group_size=w_group), DEVICE)
    _table_config(40, w, act_group, "w4a4")
    _table_config(40, w, None, "w4a16")
    assert asked == [("mosaic", section), ("mosaic", "w4a16")]


@pytest.mark.parametrize("m", TABLE_M)
@settings(max_examples=examples(2))
@given(codes=mosaic_codes(max_n=100, max_k=200, group_sizes=(32,)), data=st.data(),
       act_group_size=st.sampled_from([32, None, 64]))
def test_launch_table_groups_of_32_match_reference(codes, data, act_group_size, m):
    """The launch table's own variant at each M with base-weight groups of 32 (and activation
    groups of 32, 64 or per token): fused, unfused and W4A16 against the oracle."""
    _table_config_laws(codes, act_matrix(data.draw, m, codes.q_base.shape[1]), act_group_size, m,
                       "default config, groups of 32")


# Every bucket of the launch table: the interpreter's (splitk <= 8 < inloop <= 16 < reslate), and compiled the
# GPU's (splitk <= 16 < inloop <= 64 < reslate).
@pytest.mark.parametrize("m", TABLE_M)
@settings(max_examples=examples(4), deadline=None)
@given(codes=mosaic_codes(max_n=140, max_k=600, group_sizes=(None, 64, 256)), data=st.data(),
       act_group_size=st.sampled_from([None, 64, 256]))
def test_default_configs_at_small_and_large_m_match_reference(codes, data, act_group_size, m):
    """The launch table's own choice at each M (under the interpreter its table sends M <= 8 to
    splitk, M <= 16 to inloop and larger M to reslate), BLOCK_K shrunk to divide a 64-group, for
    the fused, unfused, int32 and W4A16 entry points."""
    qx, w = _table_config_laws(codes, act_matrix(data.draw, m, codes.q_base.shape[1]), act_group_size, m,
                               "default config")
    if codes.group_size is None:
        b, r = mosaic_w4a4_gemm_int32(dev(R.pack_int4(qx)), w)
        q64 = qx.astype(np.int64)
        np.testing.assert_array_equal(b.cpu().numpy(), q64 @ codes.q_base.astype(np.int64).T)
        want_total = q64.astype(np.float64) @ R.mosaic_dequantize(unit_scales(codes)).T
        np.testing.assert_array_equal((b.cpu().numpy().astype(np.int64) + r.cpu().numpy()).astype(np.float64),
                                      want_total)


@pytest.mark.parametrize("cfg", [None] + K64, ids=_ids([None] + K64))
@settings(max_examples=examples(4))
@given(codes=mosaic_codes(group_sizes=(None, 64)), data=st.data(), act_group_size=st.sampled_from([None, 64]))
def test_unfused_baseline_matches_reference(codes, data, act_group_size, cfg):
    n, k = codes.q_base.shape
    m = data.draw(st.integers(1, 20))
    x = act_matrix(data.draw, m, k)
    qx, sx, qxp, sxt = w4a4_inputs(x, act_group_size)
    w = prepare_mosaic(codes, DEVICE)
    ref = R.mosaic_matmul(x, codes, act_group_size=act_group_size)
    mag = np.abs(R.dequantize(qx, sx, act_group_size)) @ R.mosaic_dequantize(abs_codes(codes)).T
    out = torch.full((m, n), float("nan"), dtype=torch.float32, device=DEVICE)
    y = mosaic_w4a4_gemm_unfused(qxp, sxt, w, act_group_size=act_group_size, out_dtype=torch.float32, out=out,
                                 config=cfg)
    # Two launches: the base is rounded to the output dtype once before the residual is added.
    assert_close(y, ref, mag, torch.float32, "unfused", runs_dequant(cfg, m, w, act_group_size, qxp))


@pytest.mark.parametrize("cfg", [None] + W4A16_CONFIGS, ids=_ids([None] + W4A16_CONFIGS))
@settings(max_examples=examples(6))
@given(codes=mosaic_codes(group_sizes=(None, 32, 64)), data=st.data(),
       x_dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_w4a16_variant_matches_reference(codes, data, x_dtype, cfg):
    n, k = codes.q_base.shape
    if codes.group_size is not None and cfg is not None and codes.group_size % cfg["BLOCK_K"]:
        cfg = dict(cfg, BLOCK_K=codes.group_size)  # one weight scale per K step
    m = data.draw(st.sampled_from([1, data.draw(st.integers(1, 20))]))
    x = act_matrix(data.draw, m, k)
    xt = torch.from_numpy(x).to(x_dtype)
    if not torch.isfinite(xt).all():
        return  # an outlier beyond fp16's range is not an fp16 input
    x_used = xt.double().numpy()  # the kernel sees the rounded activations
    w = prepare_mosaic(codes, DEVICE)
    ref = R.mosaic_matmul(x_used, codes, act_bits=None)
    mag = np.abs(x_used) @ R.mosaic_dequantize(abs_codes(codes)).T
    out = torch.full((m, n), float("nan"), dtype=torch.float32, device=DEVICE)
    y = mosaic_w4a16_gemm(xt.to(DEVICE), w, out_dtype=torch.float32, out=out, config=cfg)
    # fp16/bf16 x int4 products are exact in fp32; only the fp32 accumulation rounds.
    assert_close(y, ref, mag, torch.float32, "w4a16")


# Each config against the first in-loop config unsplit, one test per config, so a compiled run
# spreads their compilation over pytest-xdist workers instead of one test compiling them all.
_SAME_OUTPUT = [("inloop-unsplit", dict(c, SPLIT_K=1)) for c in INLOOP[1:]] + [("any", c) for c in [None] + ALL]


@pytest.mark.parametrize("kind, cfg", _SAME_OUTPUT,
                         ids=[f"{kind}-{i}" for kind, i in zip([k for k, _ in _SAME_OUTPUT],
                                                                _ids([c for _, c in _SAME_OUTPUT]))])
@settings(max_examples=examples(8))
@given(codes=mosaic_codes(max_n=70, max_k=200), data=st.data())
def test_every_launch_config_gives_the_same_output(kind, cfg, codes, data):
    n, k = codes.q_base.shape
    m = data.draw(st.integers(1, 33))
    x = act_matrix(data.draw, m, k)
    qx, sx, qxp, sxt = w4a4_inputs(x, None)
    w = prepare_mosaic(codes, DEVICE)
    ref = mosaic_w4a4_gemm(qxp, sxt, w, out_dtype=torch.float32, config=dict(INLOOP[0], SPLIT_K=1)).cpu()
    out = mosaic_w4a4_gemm(qxp, sxt, w, out_dtype=torch.float32, config=cfg).cpu()
    scale = float(ref.abs().max())
    if kind == "inloop-unsplit":
        # Unsplit in-loop configs sum the same int32 partials per K step and add the scaled residual
        # steps in the same K order: identical under the interpreter. Compiled, the compiler may
        # contract a multiply-add into an FMA differently per config: 1e-6 of the largest output then.
        torch.testing.assert_close(out, ref, rtol=0, atol=0.0 if not GPU else 1e-6 * scale)
    else:
        # Split-K (and the table's own choice) sums fp32 partials of whole K ranges, reslate and
        # splitk add the residual to the folded base: a few fp32 roundings in another order.
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6 * scale + 1e-30)


def test_real_mosaic_quantize_layer_matches_reference():
    rng = np.random.default_rng(7)
    n, k = 96, 200
    wt = rng.standard_normal((n, k)) * (1 + 20 * (rng.random(k) < 0.02))
    codes = R.mosaic_quantize(wt, rng.random(k) + 0.1, density=0.2)
    assert codes.block_index.shape[0] > 0
    x = rng.standard_normal((5, k))
    qx, sx, qxp, sxt = w4a4_inputs(x, None)
    w = prepare_mosaic(codes, DEVICE)
    ref = R.mosaic_matmul(x, codes)
    mag = np.abs(R.dequantize(qx, sx)) @ R.mosaic_dequantize(abs_codes(codes)).T
    assert_close(mosaic_w4a4_gemm(qxp, sxt, w, out_dtype=torch.float32), ref, mag, torch.float32, "fused")
    # The residual must matter here, or the test could not tell the fused kernel from the base.
    base_only = R.mosaic_matmul(x, R.MosaicCodes(codes.q_base, codes.scale_base, np.zeros((0, 2), np.int64),
                                                 np.zeros((0, 64, 64), np.int8), np.zeros((0, 64)), (64, 64)))
    assert np.abs(base_only - ref).max() > 1e-3 * np.abs(ref).max()


def test_zero_tokens_give_an_empty_output():
    codes = R.mosaic_quantize(np.ones((8, 64)), np.ones(64), density=0.5)
    w = prepare_mosaic(codes, DEVICE)
    y = mosaic_w4a4_gemm(torch.zeros((0, 32), dtype=torch.uint8, device=DEVICE),
                         torch.zeros(0, dtype=torch.float32, device=DEVICE), w)
    assert tuple(y.shape) == (0, 8)


# ------------------------------------------------------------------------------------------------
# Validation: ValueError naming the bad argument, never a silent fallback


def _small_codes(**change):
    rng = np.random.default_rng(1)
    base = R.mosaic_quantize(rng.standard_normal((70, 130)), np.ones(130), density=0.3)
    fields = dict(q_base=base.q_base, scale_base=base.scale_base, block_index=base.block_index, q_res=base.q_res,
                  scale_res=base.scale_res, block=base.block, group_size=base.group_size)
    fields.update(change)
    return R.MosaicCodes(**fields)


def test_prepare_rejects_block_lists_that_do_not_match_the_weight():
    good = _small_codes()
    assert good.block_index.shape[0] >= 2
    bi = good.block_index
    bad = {
        "outside the": dict(block_index=bi + np.array([[5, 0]])),
        "sorted": dict(block_index=bi[::-1].copy(), q_res=good.q_res[::-1].copy(), scale_res=good.scale_res[::-1].copy()),
        "q_res": dict(q_res=good.q_res[:, :32]),
        "scale_res": dict(scale_res=good.scale_res[:-1]),
        "scale_base": dict(scale_base=good.scale_base[:-1]),
        "odd K": dict(q_base=np.zeros((70, 131), np.int8), scale_base=np.ones(70)),
        "codes outside": dict(q_base=good.q_base * 2),
    }
    for what, change in bad.items():
        with pytest.raises(ValueError, match=what):
            prepare_mosaic(_small_codes(**change), DEVICE)
    dup = np.concatenate([bi, bi[:1]])
    with pytest.raises(ValueError, match="sorted|density"):
        prepare_mosaic(_small_codes(block_index=dup, q_res=np.concatenate([good.q_res, good.q_res[:1]]),
                                    scale_res=np.concatenate([good.scale_res, good.scale_res[:1]])), DEVICE)
    # A nonzero code past the edge of the matrix (the last column-block holds only 2 real columns).
    edge = np.array([[0, 2]] + [[1, 0]], dtype=np.int64)
    q = np.zeros((2, 64, 64), np.int8)
    q[0, 0, 10] = 1
    with pytest.raises(ValueError, match="past the matrix edge"):
        prepare_mosaic(_small_codes(block_index=edge, q_res=q, scale_res=np.ones((2, 64))), DEVICE)


def test_prepare_rejects_more_blocks_than_the_grid_holds():
    good = _small_codes()
    nbr, nbc = 2, 3
    bi = np.array([(r, c) for r in range(nbr) for c in range(nbc)] * 2, dtype=np.int64)
    with pytest.raises(ValueError, match="density"):
        prepare_mosaic(_small_codes(block_index=bi, q_res=np.zeros((len(bi), 64, 64), np.int8),
                                    scale_res=np.ones((len(bi), 64))), DEVICE)
    assert good.block_index.shape[0] <= nbr * nbc


def test_entry_points_reject_bad_arguments():
    w = prepare_mosaic(_small_codes(), DEVICE)
    w24 = prepare_mosaic(R.mosaic_quantize(np.ones((70, 130)), np.ones(130), density=0.3, block=(24, 64)), DEVICE)
    qx = torch.zeros((3, 65), dtype=torch.uint8, device=DEVICE)
    sx = torch.ones(3, dtype=torch.float32, device=DEVICE)
    cases = [
        (lambda: mosaic_w4a4_gemm(qx.to(torch.int8), sx, w), "uint8"),
        (lambda: mosaic_w4a4_gemm(qx[:, :64].contiguous(), sx, w), r"\[M, 65\]"),
        (lambda: mosaic_w4a4_gemm(torch.zeros((65, 3), dtype=torch.uint8, device=DEVICE).t(), sx, w), "contiguous"),
        (lambda: mosaic_w4a4_gemm(qx, sx.double(), w), "float32"),
        (lambda: mosaic_w4a4_gemm(qx, sx[:2], w), "shape"),
        (lambda: mosaic_w4a4_gemm(qx, sx, w, act_group_size=64), "shape"),
        (lambda: mosaic_w4a4_gemm(qx, torch.ones((3, 3), device=DEVICE), w, act_group_size=48), "multiple of 32"),
        (lambda: mosaic_w4a4_gemm(qx, sx, w, config=dict(variant="splitk", BLOCK_M=16, BLOCK_N=32, BLOCK_K=16)),
         "BLOCK_K=16 must be >= 32"),
        (lambda: mosaic_w4a4_gemm(qx, torch.ones((3, 5), device=DEVICE), w, act_group_size=32,
                                  config=dict(variant="reslate", BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)),
         "act_group_size=32 must be a multiple of BLOCK_K=64"),
        (lambda: mosaic_w4a4_gemm(qx, sx, w, out_dtype=torch.int32), "out_dtype"),
        (lambda: mosaic_w4a4_gemm(qx, sx, "weights"), "MosaicBlocks"),
        (lambda: mosaic_w4a4_gemm(qx, sx, w24, config=dict(variant="inloop", BLOCK_M=16, BLOCK_N=16, BLOCK_K=64)),
         "BLOCK_N=16 must divide"),
        (lambda: mosaic_w4a4_gemm(qx, sx, w, config=dict(variant="inloop", BLOCK_M=16, BLOCK_N=32, BLOCK_K=128)),
         "BLOCK_K=128 must divide"),
        (lambda: mosaic_w4a4_gemm(qx, sx, w, config=dict(variant="persistent", BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)),
         "variant must be one of"),
        (lambda: mosaic_w4a16_gemm(torch.zeros((3, 130), dtype=torch.float16, device=DEVICE), w,
                                   config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128)), "must divide"),
        (lambda: mosaic_w4a4_gemm(qx, sx, w, out=torch.zeros((3, 70), device=DEVICE)), "out must be"),
        (lambda: mosaic_w4a4_gemm_unfused(qx, sx[:1], w), "shape"),
        (lambda: mosaic_w4a16_gemm(torch.zeros((3, 130), device=DEVICE), w), "float16 or bfloat16"),
        (lambda: mosaic_w4a16_gemm(torch.zeros((3, 128), dtype=torch.float16, device=DEVICE), w), r"\[M, 130\]"),
    ]
    if GPU:
        cases.append((lambda: mosaic_w4a4_gemm(qx.cpu(), sx, w), "device|on cpu"))
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


# ------------------------------------------------------------------------------------------------
# The bf16 variant


@pytest.mark.parametrize("cfg", DEQUANT, ids=_ids(DEQUANT))
@settings(max_examples=examples(5))
@given(codes=mosaic_codes(max_k=256, group_sizes=(None, 32, 64), k_multiple=32), data=st.data(),
       act_group_size=st.sampled_from([None, 32, 64]), residual=st.booleans(),
       out_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_dequant_matches_reference(codes, data, act_group_size, residual, out_dtype, cfg):
    """The dequant variant, fused (and with the residual compiled out, as the unfused baseline
    runs it), against the oracle within the bf16 bound FOLD: base and residual in one MMA a step,
    per-channel or grouped base scales, per-token or grouped activations, a residual block
    spanning several K steps, K a multiple of 32 (TMA rows), M = 1 among the draws."""
    cfg = dict(cfg, BLOCK_K=min([cfg["BLOCK_K"]] + [g for g in (act_group_size, codes.group_size) if g]))
    m, n, qxp, sxt, w, ref, mag = _float_case(codes, data.draw, act_group_size, 20)
    fn = mosaic_w4a4_gemm if residual else mosaic_w4a4_gemm_unfused
    if not residual:
        out_dtype = torch.float32  # the unfused baseline adds its residual to the stored output
    y = _into_poisoned(fn, m, n, out_dtype, qxp, sxt, w, act_group_size=act_group_size, config=cfg)
    assert_close(y, ref, mag, out_dtype, f"dequant, {'fused' if residual else 'unfused'}", folded=True)


@settings(max_examples=examples(4))
@given(codes=mosaic_codes(max_k=200, group_sizes=(32,)), data=st.data())
def test_a_dequant_bucket_runs_what_tma_cannot_take_on_its_no_tma_config(codes, data):
    """A launch-table bucket naming dequant runs its `no_tma` config where a TMA descriptor cannot
    take the operands (K not a multiple of 32): that config's own output bit for bit, while the
    dequant config alone refuses; and the int32 entry point refuses the dequant variant."""
    n, k = codes.q_base.shape
    m, n, qxp, sxt, w, ref, mag = _float_case(codes, data.draw, 32, 20)
    bucket = dict(DEQUANT[0], no_tma=K32[1])
    y = mosaic_w4a4_gemm(qxp, sxt, w, act_group_size=32, out_dtype=torch.float32, config=bucket)
    if k % 32:
        assert torch.equal(y, mosaic_w4a4_gemm(qxp, sxt, w, act_group_size=32, out_dtype=torch.float32,
                                               config=K32[1]))  # exact: the same launch
        with pytest.raises(ValueError, match="dequant variant needs K"):
            mosaic_w4a4_gemm(qxp, sxt, w, act_group_size=32, config=DEQUANT[0])
    assert_close(y, ref, mag, torch.float32, "dequant bucket", folded=k % 32 == 0)
    with pytest.raises(ValueError, match="bf16"):
        mosaic_w4a4_gemm_int32(qxp, prepare_mosaic(dataclasses_replace_group(codes), DEVICE), config=DEQUANT[0])


def dataclasses_replace_group(codes):
    """The same codes with per-channel base scales (the int32 entry point's requirement)."""
    return R.MosaicCodes(q_base=codes.q_base, scale_base=np.ones(codes.q_base.shape[0]),
                         block_index=codes.block_index, q_res=codes.q_res, scale_res=codes.scale_res,
                         block=codes.block, group_size=None)


# ------------------------------------------------------------------------------------------------
# Compiled, LLaMA-3-8B sizes (GPU only)

LLAMA = {"o": (4096, 4096), "qkv": (6144, 4096), "down": (4096, 14336)}


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: compiled kernels on LLaMA-3-8B sizes")
@pytest.mark.parametrize("shape", list(LLAMA))
@pytest.mark.parametrize("m", [1, 16, 300])
def test_llama_sizes_compiled(shape, m):
    n, k = LLAMA[shape]
    rng = np.random.default_rng(m)
    nbr, nbc = n // 64, k // 64
    flat = np.sort(rng.choice(nbr * nbc, size=int(0.05 * nbr * nbc), replace=False))
    bi = np.stack(np.divmod(flat, nbc), 1).astype(np.int64)
    codes = R.MosaicCodes(q_base=rng.integers(-8, 8, size=(n, k)).astype(np.int8), scale_base=rng.uniform(0.1, 1, n),
                          block_index=bi, q_res=rng.integers(-8, 8, size=(len(bi), 64, 64)).astype(np.int8),
                          scale_res=rng.uniform(0, 0.1, size=(len(bi), 64)), block=(64, 64))
    w = prepare_mosaic(codes, DEVICE)
    qx = rng.integers(-8, 8, size=(m, k)).astype(np.int8)
    b, r = mosaic_w4a4_gemm_int32(dev(R.pack_int4(qx)), w)
    qd = torch.from_numpy(qx).double().to(DEVICE)
    np.testing.assert_array_equal(b.cpu().numpy(), (qd @ torch.from_numpy(codes.q_base).double().to(DEVICE).T).cpu().numpy())
    total = qd @ torch.from_numpy(R.mosaic_dequantize(unit_scales(codes))).to(DEVICE).T
    np.testing.assert_array_equal((b.double() + r.double()).cpu().numpy(), total.cpu().numpy())
    sx = rng.uniform(0.01, 1, m)
    ref = (qx * sx[:, None]) @ R.mosaic_dequantize(codes).T
    y = mosaic_w4a4_gemm(dev(R.pack_int4(qx)), dev(sx.astype(np.float32)), w, out_dtype=torch.float32)
    yu = mosaic_w4a4_gemm_unfused(dev(R.pack_int4(qx)), dev(sx.astype(np.float32)), w, out_dtype=torch.float32)
    for out in (y, yu):
        rel = np.linalg.norm(out.cpu().double().numpy() - ref) / np.linalg.norm(ref)
        assert rel < 1e-6  # fp32 scale products and residual accumulation only


def test_w4a16_unrolled_steps_past_k_read_no_group_scale():
    """Regression (a CI flake): with K < BLOCK_K * UNROLL the W4A16 kernel's unrolled steps past K
    loaded a group scale past the tensor's end, and garbage * 0 can be NaN. NaN is planted right
    after the scales so such a read fails every time."""
    import dataclasses

    rng = np.random.default_rng(7)
    n, k, m = 128, 8, 10
    w_f = rng.standard_normal((n, k))
    x = rng.standard_normal((m, k))
    codes = R.mosaic_quantize(w_f, np.mean(x**2, axis=0), density=0.05, block=(16, 64), group_size=64)
    w = prepare_mosaic(codes, DEVICE)
    sb = w.scale_base
    buf = torch.full((sb.numel() + 4096,), float("nan"), dtype=sb.dtype, device=sb.device)
    buf[: sb.numel()] = sb.reshape(-1)
    w = dataclasses.replace(w, scale_base=buf[: sb.numel()].view(sb.shape))
    xt = torch.from_numpy(x).to(torch.float16)
    out = torch.full((m, n), float("nan"), dtype=torch.float32, device=DEVICE)
    y = mosaic_w4a16_gemm(xt.to(DEVICE), w, out_dtype=torch.float32, out=out).cpu().numpy()
    ref = R.mosaic_matmul(xt.double().numpy(), codes, act_bits=None)
    mag = np.abs(xt.double().numpy()) @ R.mosaic_dequantize(abs_codes(codes)).T
    assert np.all(np.isfinite(y))
    assert np.all(np.abs(y - ref) <= 2.0**-20 * mag + 1e-30)  # fp32 accumulation of exact products


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: compiled kernels on LLaMA-3-8B sizes")
@pytest.mark.parametrize("shape", list(LLAMA))
@pytest.mark.parametrize("m", [256, 1024])
@pytest.mark.parametrize("act_group, tile", [(32, (128, 128, 8)), (None, (128, 64, 4))])
def test_dequant_llama_sizes_compiled(shape, m, act_group, tile):
    """The dequant variant in the accuracy configuration (groups of 32 both sides, 16 x 128 residual
    blocks at density 0.3), compiled, against the float64 oracle on the same codes: bf16 operands,
    fp32 accumulation (relative error in the norm, far under the per-element FOLD)."""
    n, k = LLAMA[shape]
    rng = np.random.default_rng(m + n)
    bn, bk = 16, 128
    nbr, nbc = n // bn, k // bk
    flat = np.sort(rng.choice(nbr * nbc, size=int(0.3 * nbr * nbc), replace=False))
    bi = np.stack(np.divmod(flat, nbc), 1).astype(np.int64)
    codes = R.MosaicCodes(q_base=rng.integers(-8, 8, size=(n, k)).astype(np.int8),
                          scale_base=rng.uniform(0.1, 1, (n, k // 32)), block_index=bi,
                          q_res=rng.integers(-8, 8, size=(len(bi), bn, bk)).astype(np.int8),
                          scale_res=rng.uniform(0, 0.1, size=(len(bi), bn)), block=(bn, bk), group_size=32)
    w = prepare_mosaic(codes, DEVICE)
    qx = rng.integers(-8, 8, size=(m, k)).astype(np.int8)
    sx = rng.uniform(0.01, 1, (m, k // 32) if act_group else m)
    bm, bnt, warps = tile
    cfg = dict(variant="dequant", BLOCK_M=bm, BLOCK_N=bnt, BLOCK_K=32, GROUP_M=8, num_warps=warps, num_stages=4)
    y = mosaic_w4a4_gemm(dev(R.pack_int4(qx)), dev(sx.astype(np.float32)), w, act_group_size=act_group,
                         out_dtype=torch.float32, config=cfg).cpu().double().numpy()
    xs = qx * (np.repeat(sx, 32, axis=1) if act_group else sx[:, None])
    ref = xs @ R.mosaic_dequantize(codes).T
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 4e-3  # bf16 operands: 2**-8 per rounding, random signs
