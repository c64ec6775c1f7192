"""The fused activation quantizer equals the oracle bit for bit: `zqkernels.gpu.actquant` vs
`reference.quantize_activations` + `reference.pack_int4` (DESIGN.md §1, the float32 contract).

Everything here is exact, in both layouts: packed bytes equal the oracle's packed codes, int8 codes
([M, K], one per byte; K may be odd) equal the oracle's codes and the unpacked packed bytes, float32
scales equal (the oracle returns float64 arrays holding float32 values) and do not depend on the
layout. Without a GPU the kernel runs under TRITON_INTERPRET=1 on small shapes; with one, compiled,
on LLaMA-sized rows too. Outputs are poisoned before each run.
"""
import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import reference as R
from strategies import examples, matrices
from zqkernels.gpu.actquant import LAYOUTS, quantize_activations, quantize_silu_mul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FINFO_MAX = {"float16": 65504.0, "bfloat16": 3.0e38, "float32": 3.0e38}


def run_kernel(x, inv, group, config=None, layout="int4"):
    """Our kernel with poisoned outputs (0xA5 packed bytes, int8 code 99 -- no code --, NaN
    scales): an unwritten element fails."""
    m, k = x.shape
    if layout == "int8":
        out = torch.full((m, k), 99, dtype=torch.int8, device=x.device)
    else:
        out = torch.full((m, k // 2), 0xA5, dtype=torch.uint8, device=x.device)
    shape = (m,) if group is None else (m, -(-k // group))
    out_scales = torch.full(shape, float("nan"), dtype=torch.float32, device=x.device)
    q, s = quantize_activations(x, inv, group, layout=layout, out=out, out_scales=out_scales, config=config)
    assert q.data_ptr() == out.data_ptr() and s.data_ptr() == out_scales.data_ptr()
    return q.cpu().numpy(), s.cpu().numpy()


def oracle(x, inv, group):
    """The oracle on exactly the float32 values the kernel quantizes (x * inv_smooth in IEEE fp32)."""
    x32 = x.float().cpu()
    if inv is not None:
        x32 = x32 * inv.cpu()  # one IEEE float32 multiply per element, as in the kernel
    return R.quantize_activations(x32.numpy(), bits=4, group_size=group)


def check_equal(x, inv, group, config=None):
    """Both layouts (int4 where K is even) hold the oracle's codes and scales, bit for bit."""
    qr, sr = oracle(x, inv, group)
    q8, s8 = run_kernel(x, inv, group, config, layout="int8")
    # exact: codes and float32 scales are defined bit for bit
    assert q8.dtype == np.int8
    np.testing.assert_array_equal(q8, qr)
    np.testing.assert_array_equal(s8.astype(np.float64), sr)
    if x.shape[1] % 2 == 0:
        q4, s4 = run_kernel(x, inv, group, config, layout="int4")
        np.testing.assert_array_equal(q4, R.pack_int4(qr))  # exact
        np.testing.assert_array_equal(R.unpack_int4(q4), q8)  # exact: the same codes in either layout
        np.testing.assert_array_equal(s4, s8)  # exact


@st.composite
def activations(draw, max_rows=6, max_cols=160):
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    # an odd K has no packed form: int8 codes only
    x = draw(matrices(max_rows=max_rows, max_cols=max_cols, min_cols=1, even_cols=draw(st.booleans())))
    x = np.clip(x, -FINFO_MAX[dtype], FINFO_MAX[dtype])
    group = draw(st.sampled_from([None, 32, 64, 128]))
    smooth = draw(st.booleans())
    return dtype, x, group, smooth


@settings(max_examples=examples(25))
@given(activations(), st.integers(0, 2**32 - 1))
@example(("float16", np.full((1, 2), 0.0), None, False), 0)  # all-zero row: scale 0, codes 0
@example(("float32", np.array([[7.0, 0.5, 1.5, 2.5, -0.5, -1.5]]), None, False), 0)  # ties -> even
@example(("float32", np.array([[1e-40, 3e-45, -1e-41, 0.0]]), None, False), 0)  # subnormal absmax
@example(("float16", np.array([[0.5, -7.0, 1.5]]), 32, False), 0)  # odd K, one short group: int8 only
def test_codes_and_scales_equal_oracle(case, seed):
    dtype, x, group, smooth = case
    xt = torch.from_numpy(x).to(DTYPES[dtype]).to(DEVICE)
    inv = None
    if smooth:
        rng = np.random.default_rng(seed)
        inv = torch.from_numpy(rng.uniform(0.05, 20.0, x.shape[1]).astype(np.float32)).to(DEVICE)
    check_equal(xt, inv, group)


@settings(max_examples=examples(15))
@given(st.integers(1, 4), st.sampled_from([32, 64, 128]), st.integers(1, 5), st.integers(-6, 5), st.integers(0, 2**32 - 1))
def test_group_ties_round_half_to_even(m, group, n_groups, e, seed):
    """Every group's absmax is 7 * 2**e: its scale is exactly 2**e and every other element is a
    tie (n + 0.5); K is a multiple of neither the group (short last group) nor the tile (and odd
    for int8 codes alone, now and then)."""
    rng = np.random.default_rng(seed)
    k = group * n_groups - int(rng.integers(0, group))
    x = (rng.integers(-7, 7, size=(m, k)) + 0.5) * 2.0**e
    x[:, ::group] = 7.0 * 2.0**e * rng.choice([-1.0, 1.0], size=x[:, ::group].shape)
    check_equal(torch.from_numpy(x).to(torch.float16).to(DEVICE), None, group)


def boundary_rows(rng, m, k, group, exps):
    """float32 rows whose every element sits within a few ulps of a rounding boundary
    ((j + 0.5) * scale, j in -7..6) of its own group's scale, with that group's absmax 7 * 2**e *
    (1 + f) for a random significand (all ones now and then) and e drawn from `exps`."""
    g = k if group is None else group
    x = np.empty((m, k), dtype=np.float32)
    for r in range(m):
        for g0 in range(0, k, g):
            n = min(g, k - g0)
            frac = np.float32(1.0) - np.float32(2.0**-23) if rng.random() < 0.3 else np.float32(1 + rng.random())
            amax = np.float32(7.0 * 2.0 ** int(rng.choice(exps))) * frac
            scale = amax / np.float32(7.0)  # the oracle's float32 scale
            j = rng.integers(-7, 7, n) + 0.5
            v = (j * scale).astype(np.float32)
            v = (v.view(np.int32) + rng.integers(-3, 4, n).astype(np.int32)).view(np.float32)
            v = np.clip(v, -amax, amax)
            v[0] = amax * rng.choice([-1, 1])
            x[r, g0:g0 + n] = v
    return x


@pytest.mark.parametrize("group", [None, 32, 128])
@pytest.mark.parametrize("exps", [(-99, -20, 0, 3, 60, 100), (-126, -110, -101)],
                         ids=["reciprocal_path", "division_path"])
@settings(max_examples=examples(8))
@given(m=st.integers(1, 3), k=st.integers(2, 300), seed=st.integers(0, 2**32 - 1))
def test_quotients_at_rounding_boundaries_equal_oracle(group, exps, m, k, seed):
    """Codes of elements a few ulps from a half-integer quotient, on scales whose significand may
    be all ones: the kernel's reciprocal path (every scale of a program >= FAST_MIN_SCALE: one
    multiply and two FMAs an element) and its division path (a tiny scale: div_rn an element)
    both give the oracle's IEEE-division codes, bit for bit."""
    rng = np.random.default_rng(seed)
    x = boundary_rows(rng, m, k, group, exps)
    check_equal(torch.from_numpy(x).to(DEVICE), None, group)


def _markstein_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "perf" / "check_markstein_quotient.py"
    spec = importlib.util.spec_from_file_location("check_markstein_quotient", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _round_to_float32(fr):
    """A Fraction rounded to the nearest float32 (ties to even), normal range: exact integer arithmetic."""
    from fractions import Fraction

    if fr == 0:
        return np.float32(0.0)
    sign, fr = (-1 if fr < 0 else 1), abs(fr)
    e = fr.numerator.bit_length() - fr.denominator.bit_length()
    if Fraction(2) ** e > fr:
        e -= 1  # 2**e <= fr < 2**(e + 1)
    scaled = fr / Fraction(2) ** (e - 23)  # in [2**23, 2**24)
    q, r = divmod(scaled.numerator, scaled.denominator)
    if 2 * r > scaled.denominator or (2 * r == scaled.denominator and q & 1):
        q += 1
    return np.float32(sign * q * 2.0 ** (e - 23))


_f32 = st.floats(min_value=-2.0**40, max_value=2.0**40, allow_nan=False, allow_infinity=False, width=32).filter(
    lambda v: v == 0 or abs(v) >= 2.0**-40)


@settings(max_examples=examples(60))
@given(a=_f32, b=_f32, c=_f32, cancel=st.sampled_from(["none", "product", "product_ulps"]),
       ulps=st.integers(-3, 3))
@example(a=1.0 + 2.0**-23, b=1.0 - 2.0**-23, c=-1.0, cancel="none", ulps=0)  # only the fused result is nonzero
@example(a=3.0, b=1.0 / 3.0, c=-1.0, cancel="none", ulps=0)
# 8390641 * 16773151 = 2**47 + 124463: a * b = 2**-24 + 124463 * 2**-71, so a * b + 1 lies just above
# the float32 midpoint 1 + 2**-24; rounded to float64 first it would be the midpoint, then 1.0 (even)
@example(a=8390641 * 2.0**-23, b=16773151 * 2.0**-48, c=1.0, cancel="none", ulps=0)
@example(a=-8390641 * 2.0**-23, b=16773151 * 2.0**-48, c=-1.0, cancel="none", ulps=0)
def test_the_emulated_fma_rounds_once(a, b, c, cancel, ulps):
    """The check's float32 fma (float64 with rounding to odd) is the exact a * b + c rounded once
    to the nearest float32, also where the sum cancels the product (c = -fl(a * b), +- a few ulps),
    where a float64 sum rounded twice would be off."""
    from fractions import Fraction

    a, b, c = np.float32(a), np.float32(b), np.float32(c)
    if cancel != "none":
        c = -np.float32(np.float64(a) * np.float64(b))
        if cancel == "product_ulps" and c != 0:
            c = (np.array([c]).view(np.int32) + np.int32(ulps)).view(np.float32)[0]
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    assume(exact == 0 or 2.0**-126 <= abs(exact) < 2.0**127)  # the emulation's contract: normal results
    got = _markstein_check().fma_fp32(np.array([a]), np.array([b]), np.array([c]))[0]
    if exact == 0:
        assert got == 0, (a, b, c)  # a Fraction has no signed zero; the codes do not see the sign
    else:
        assert got.view(np.int32) == _round_to_float32(exact).view(np.int32), (a, b, c)


@settings(max_examples=examples(3))
@given(seed=st.integers(0, 2**32 - 1), it=st.integers(0, 2))
def test_the_reciprocal_quotient_is_ieee_division(seed, it):
    """The arithmetic of the reciprocal path alone, on 200,000 pairs a draw at rounding boundaries
    (perf/check_markstein_quotient.py; its committed run covers 3e8): fma-corrected x * (1 / d)
    equals numpy's float32 x / d wherever the code can depend on it."""
    assert _markstein_check().one_round(np.random.default_rng(seed), it, 200_000) == 0


# Every path of the kernel, reached deterministically: (config, activation groups, min K). A
# per-token row longer than ONE_PASS_MAX_K takes the two-pass path; per-group programs take one or
# several groups each.
PATHS = {
    "per_token_one_pass": (dict(ONE_PASS_MAX_K=4096, ROW_CHUNK=64), [None], 2),
    "per_token_two_passes": (dict(ONE_PASS_MAX_K=64, ROW_CHUNK=32), [None], 66),
    "per_group_many_per_program": (dict(GROUP_BLOCK=1024), [32, 64, 128], 2),
    "per_group_one_per_program": (dict(GROUP_BLOCK=32), [32, 64, 128], 2),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@settings(max_examples=examples(8))
@given(data=st.data(), smooth=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_every_kernel_path_equals_oracle(path, data, smooth, seed):
    config, groups, min_cols = PATHS[path]
    dtype = data.draw(st.sampled_from(sorted(DTYPES)))
    x = data.draw(matrices(max_rows=5, max_cols=300, min_cols=min_cols, even_cols=data.draw(st.booleans())))
    x = np.clip(x, -FINFO_MAX[dtype], FINFO_MAX[dtype])
    group = data.draw(st.sampled_from(groups))
    inv = None
    if smooth:
        inv = torch.from_numpy(np.random.default_rng(seed).uniform(0.05, 20.0, x.shape[1]).astype(np.float32)).to(DEVICE)
    xt = torch.from_numpy(x).to(DTYPES[dtype]).to(DEVICE)
    if not torch.isfinite(xt.float() * (inv if inv is not None else 1.0)).all():
        return  # smoothing overflowed fp32: the non-finite contract below, not this law
    check_equal(xt, inv, group, config)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_gets_no_code(path, bad, layout):
    """NaN or Inf: ValueError naming the token by default; with check_finite=False its group gets
    scale NaN and codes 0, and every other group equals the oracle (never a code for a NaN)."""
    config, groups, _ = PATHS[path]
    group = groups[-1]
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 200)).astype(np.float32)
    x[1, 150] = bad
    xt = torch.from_numpy(x).to(DEVICE)
    with pytest.raises(ValueError, match="NaN or Inf.*token 1"):
        quantize_activations(xt, None, group, layout=layout, config=config)
    q, s = quantize_activations(xt, None, group, layout=layout, config=config, check_finite=False)
    q = q.cpu().numpy() if layout == "int8" else R.unpack_int4(q.cpu().numpy())
    s = s.cpu().numpy().reshape(3, -1)
    g = 0 if group is None else 150 // group
    lo, hi = (0, 200) if group is None else (g * group, min(200, (g + 1) * group))
    assert np.isnan(s[1, g]) and np.all(q[1, lo:hi] == 0)
    ok = np.ones(s.shape, bool)
    ok[1, g] = False
    assert np.all(np.isfinite(s[ok]))
    good = np.delete(x, 1, axis=0)
    qr, sr = R.quantize_activations(good, group_size=group)
    np.testing.assert_array_equal(np.delete(q, 1, axis=0), qr)  # exact
    np.testing.assert_array_equal(np.delete(s, 1, axis=0).reshape(sr.shape).astype(np.float64), sr)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("k", [4096, 14336])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_llama_rows_equal_oracle_compiled(k, group, dtype):
    gen = torch.Generator(device="cuda").manual_seed(k + (group or 0))
    x = torch.randn(64, k, generator=gen, device="cuda").to(dtype)
    x[3] = 0
    x[5, 7] = 3000.0
    inv = torch.rand(k, generator=gen, device="cuda") * 4 + 0.25
    check_equal(x, inv, group)
    check_equal(x, None, group)


def silu_mul_expected(h):
    """x = silu(gate) * up as `quantize_silu_mul` defines it, for h = [gate | up]: on the GPU torch's
    own ops (CUDA's expf, IEEE division); under the interpreter the same formula with numpy's
    float32 exp, the interpreter's exp."""
    k = h.shape[1] // 2
    if h.is_cuda:
        return torch.nn.functional.silu(h[:, :k]) * h[:, k:]
    g = h[:, :k].float().numpy()
    with np.errstate(over="ignore"):
        silu = g / (np.float32(1.0) + np.exp(-g))
    return (torch.from_numpy(silu).to(h.dtype).float() * h[:, k:].float()).to(h.dtype)


def run_silu_mul(h, inv, group, config, layout):
    """`quantize_silu_mul` with poisoned outputs, as `run_kernel`."""
    m, k = h.shape[0], h.shape[1] // 2
    out = (torch.full((m, k), 99, dtype=torch.int8, device=h.device) if layout == "int8" else
           torch.full((m, k // 2), 0xA5, dtype=torch.uint8, device=h.device))
    out_scales = torch.full((m,) if group is None else (m, -(-k // group)), float("nan"), device=h.device)
    q, s = quantize_silu_mul(h, inv, group, layout=layout, out=out, out_scales=out_scales, config=config)
    assert q.data_ptr() == out.data_ptr() and s.data_ptr() == out_scales.data_ptr()
    return q.cpu().numpy(), s.cpu().numpy()


def check_silu_mul(h, inv, group, config=None):
    """The gated quantizer's codes and scales are the quantizer's on silu(gate) * up, bit for bit, in
    both layouts (that quantizer equals the oracle: the laws above)."""
    x = silu_mul_expected(h)
    for layout in LAYOUTS if x.shape[1] % 2 == 0 else ("int8",):
        q, s = run_silu_mul(h, inv, group, config, layout)
        qr, sr = quantize_activations(x, inv, group, layout=layout, config=config)
        np.testing.assert_array_equal(q, qr.cpu().numpy())  # exact
        np.testing.assert_array_equal(s, sr.cpu().numpy())  # exact


@pytest.mark.parametrize("path", sorted(PATHS))
@settings(max_examples=examples(8))
@given(data=st.data(), smooth=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_silu_mul_codes_equal_the_quantizer_on_silu_times_up(path, data, smooth, seed):
    config, groups, min_cols = PATHS[path]
    dtype = data.draw(st.sampled_from(sorted(DTYPES)))
    group = data.draw(st.sampled_from(groups))
    h = data.draw(matrices(max_rows=5, max_cols=150, min_cols=min_cols, even_cols=data.draw(st.booleans())))
    h = np.concatenate([h, data.draw(matrices(shape=h.shape))], axis=1)  # gate of one kind, up of another
    h = np.clip(h, -FINFO_MAX[dtype], FINFO_MAX[dtype])
    k = h.shape[1] // 2
    inv = None
    if smooth:
        inv = torch.from_numpy(np.random.default_rng(seed).uniform(0.05, 20.0, k).astype(np.float32)).to(DEVICE)
    ht = torch.from_numpy(h).to(DTYPES[dtype]).to(DEVICE)
    x = silu_mul_expected(ht)
    if not torch.isfinite(x.float() * (inv if inv is not None else 1.0)).all():
        return  # silu * up (or smoothing) overflowed: the quantizer's non-finite contract, checked above
    check_silu_mul(ht, inv, group, config)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_silu_mul_at_its_extremes(path, dtype):
    """Gates where silu is 0, -0 (exp(-g) overflows), tiny or the gate itself, ups of 0 and signs;
    a row whose product is all zero (scale 0, codes 0)."""
    config, groups, min_cols = PATHS[path]
    gate = np.array([0.0, -60.0, -100.0, 20.0, -3.0, 1e-3, 2.0, 88.0] * 9)[:max(8, min_cols)]
    up = np.array([1.0, 5.0, -2.0, 0.0, -1.0, 7.0, 0.25, -0.5] * 9)[:gate.size]
    h = np.stack([np.concatenate([gate, up]), np.concatenate([gate, np.zeros_like(up)])])
    check_silu_mul(torch.from_numpy(h).to(DTYPES[dtype]).to(DEVICE), None, groups[-1], config)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("k", [14336, 18944])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_silu_mul_llama_rows_equal_torch_compiled(k, group, dtype):
    """LLaMA-3-8B's (and Qwen's) MLP width, compiled: bit for bit torch's F.silu(gate) * up, quantized."""
    gen = torch.Generator(device="cuda").manual_seed(k + (group or 0))
    h = (torch.randn(64, 2 * k, generator=gen, device="cuda") * 3).to(dtype)
    h[3] = 0
    h[5, 7] = 200.0
    inv = torch.rand(k, generator=gen, device="cuda") * 4 + 0.25
    check_silu_mul(h, inv, group)
    check_silu_mul(h, None, group)


def test_silu_mul_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="halves of equal width"):
        quantize_silu_mul(_x(k=9))
    with pytest.raises(ValueError, match="K must be even"):
        quantize_silu_mul(_x(k=14))  # K = 7 cannot be packed
    with pytest.raises(ValueError, match=r"inv_smooth must have shape \(4,\)"):
        quantize_silu_mul(_x(k=8), torch.ones(8, device=DEVICE))


def _x(m=2, k=8, dtype=torch.float16):
    return torch.randn(m, k).to(dtype).to(DEVICE)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (_x(k=7), None, None), "K must be even"),  # packed (the default layout) only
        (lambda: (_x().to(torch.int32), None, None), "dtype"),
        (lambda: (_x(k=16)[:, ::2], None, None), "contiguous"),
        (lambda: (_x()[0], None, None), "2-D"),
        (lambda: (_x(), torch.ones(7, device=DEVICE), None), "inv_smooth"),
        (lambda: (_x(), torch.ones(8, dtype=torch.float16, device=DEVICE), None), "inv_smooth"),
        (lambda: (_x(), None, 48), "group_size"),
        (lambda: (np.zeros((2, 8)), None, None), "torch.Tensor"),
    ],
)
def test_bad_arguments_raise_value_error(make, match):
    x, inv, group = make()
    with pytest.raises(ValueError, match=match):
        quantize_activations(x, inv, group)


def test_bad_out_buffer_raises_value_error():
    with pytest.raises(ValueError, match="out"):
        quantize_activations(_x(), out=torch.empty(2, 3, dtype=torch.uint8, device=DEVICE))


@pytest.mark.parametrize("layout, out, match", [
    ("int8", torch.empty(2, 4, dtype=torch.uint8), "out must be a torch.int8 tensor of shape \\(2, 8\\)"),
    ("int8", torch.empty(2, 4, dtype=torch.int8), "out must be a torch.int8 tensor of shape \\(2, 8\\)"),
    ("int4", torch.empty(2, 8, dtype=torch.int8), "out must be a torch.uint8 tensor of shape \\(2, 4\\)"),
    ("int8", torch.empty(8, 2, dtype=torch.int8).t(), "out must be contiguous"),
    ("int16", None, "layout must be one of"),
    (None, None, "layout must be one of"),
    (8, None, "layout must be one of"),
])
def test_bad_layout_or_out_buffer_for_the_layout_raises(layout, out, match):
    with pytest.raises(ValueError, match=match):
        quantize_activations(_x(), layout=layout, out=None if out is None else out.to(DEVICE))
