"""ZipperQuant's high part on the GPU equals the oracle: `zqkernels.gpu.zipper_high` vs `reference`.

Laws:
- `zipper_high_gpu(x, high, out)` adds exactly the high part of `reference.zipper_matmul` to `out`:
  with the low codes zeroed the oracle IS the high part, `16 * Δ_n * (X' @ q_high.T)`; within
  `2**-20 * mag + 2**-22 * (|out_before| + |ref|)`, mag = 16 Δ |X'| @ |q_high|.T (fp32 products and
  sums: each rounding is 2**-24 of a partial magnitude; 2**-20 covers a few dozen of them).
- with integer activations and Δ = 1/16 every product and partial sum is an integer below 2**24:
  the result equals the oracle exactly, for both layouts.
- the "dense" layout (q_high packed as int4, the 16-bit tensor-core GEMM of `w4a16` accumulating
  into out) multiplies X' in 16 bits: an fp32 X' rounds to bf16 (2**-9 relative per element, so
  2**-8 * mag covers it), fp16 / bf16 are taken as they are; its fp32 tensor-core sums within
  2**-18 * mag (test_w4a16's accumulation bound). It holds codes in [-8, 7] with K even and
  refuses others by name; codes drawn for it are clipped into [-8, 7].
- every layout computes the same function; an all-zero high part leaves `out` untouched; bad
  arguments raise ValueError.
- every tile, BLOCK_E (slots / columns summed a step: 1, or several with the last step partly
  past the end) included, gives the same: the launch table's, and tiles drawn explicitly.
Shapes: M = 1, K odd and tiny, rows with no outlier and rows with many, codes up to ±127.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as R
from strategies import examples, matrices
from zqkernels.gpu.zipper_high import VARIANTS, zipper_high_gpu
from zqkernels.layouts import ZIPPER_HIGH_METHODS as METHODS
from zqkernels.layouts import ZipperHighGPU

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEVICE == "cuda"
X_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (BLOCK_M, BLOCK_N, BLOCK_E): None is the launch table's; the others reach one slot a step,
# several (a last step past E / C), a one-row tile and a tile wider than N
BLOCKS = [None, (16, 16, 1), (4, 16, 8), (1, 32, 2), (2, 128, 16)]


@st.composite
def high_codes(draw, max_n=70, max_k=90):
    """ZipperCodes: from `reference.zipper_quantize` of an adversarial weight, or drawn directly
    (sparse q_high with extremes, some rows empty, some dense)."""
    if draw(st.booleans()):
        w = draw(matrices(max_rows=max_n, max_cols=max_k, kinds=("normal", "outlier", "heavy_tail", "zero_rows")))
        return R.zipper_quantize(w, outlier_ratio=draw(st.sampled_from([0.0, 0.01, 0.05, 0.2])),
                                 high_bits=draw(st.sampled_from([4, 8])))
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, max_k))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    density = draw(st.sampled_from([0.0, 0.005, 0.05, 0.5, 1.0]))
    q_high = np.where(rng.random((n, k)) < density, rng.integers(-128, 128, size=(n, k)), 0)
    if q_high.size and draw(st.booleans()):
        q_high.flat[rng.integers(q_high.size)] = draw(st.sampled_from([-128, 127]))
    q_high[rng.random(n) < 0.2] = 0  # rows without outliers
    return R.ZipperCodes(q_low=rng.integers(-8, 8, size=(n, k)).astype(np.int8), q_high=q_high.astype(np.int8),
                         scale=rng.uniform(0.0, 0.1, size=n))


def prepare(codes, method="auto"):
    return ZipperHighGPU.from_codes(codes.q_high, codes.scale, DEVICE, method=method)


def for_method(codes, method):
    """The codes a layout can hold: the dense layout's int4 codes are q_high clipped to [-8, 7]."""
    if method != "dense":
        return codes
    return R.ZipperCodes(q_low=codes.q_low, q_high=np.clip(codes.q_high, -8, 7).astype(np.int8), scale=codes.scale)


def dense_refuses_odd_k(codes, method):
    """True (after checking the refusal) where the dense layout cannot hold these codes: K odd."""
    if method == "dense" and codes.q_high.shape[1] % 2:
        with pytest.raises(ValueError, match="K even"):
            prepare(codes, method)
        return True
    return False


def tolerance_of(method, x_dtype, mag, before, ref):
    """The module's bounds: fp32 products and sums (columns, ell), or 16-bit X' (fp32 rounded to
    bf16) times exact codes summed on the tensor cores (dense)."""
    tol = 2.0**-22 * (np.abs(before) + np.abs(ref)) + 1e-30
    if method == "dense":
        return tol + (2.0**-8 if x_dtype == torch.float32 else 0.0) * mag + 2.0**-18 * mag
    return tol + 2.0**-20 * mag


def test_every_layout_has_a_kernel():
    assert set(VARIANTS) == set(METHODS)


def high_only(codes):
    return R.ZipperCodes(q_low=np.zeros_like(codes.q_low), q_high=codes.q_high, scale=codes.scale)


def to_dev(a, dtype):
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype).to(DEVICE)


@settings(max_examples=examples(40))
@given(codes=high_codes(), data=st.data(), x_dtype=st.sampled_from(X_DTYPES), method=st.sampled_from(METHODS),
       block=st.sampled_from(BLOCKS))
def test_high_part_is_added_to_out_as_the_oracle_says(codes, data, x_dtype, method, block):
    codes = for_method(codes, method)
    if dense_refuses_odd_k(codes, method):
        return
    block = None if method == "dense" else block  # dense: the w4a16 table's tiles (test_w4a16 draws others)
    n, k = codes.q_high.shape
    m = data.draw(st.sampled_from([1, data.draw(st.integers(1, 40))]))
    x = data.draw(matrices(shape=(m, k)))
    xt = to_dev(x, x_dtype)
    if not torch.isfinite(xt).all():
        return  # an outlier beyond fp16's range is not an fp16 input
    x_used = xt.cpu().double().numpy()  # the kernel sees the rounded activations
    before = np.random.default_rng(m).standard_normal((m, n)).astype(np.float32)
    out = to_dev(before.copy(), torch.float32)  # a copy: on the CPU the tensor would alias `before`
    high = prepare(codes, method)
    y = zipper_high_gpu(xt, high, out, block=block)
    assert y.data_ptr() == out.data_ptr()
    ref = R.zipper_matmul(x_used, high_only(codes))  # the low part is zero: the high part alone
    mag = 16.0 * codes.scale[None, :] * (np.abs(x_used) @ np.abs(codes.q_high.astype(np.float64)).T)
    got = y.cpu().double().numpy() - before.astype(np.float64)
    tol = tolerance_of(method, x_dtype, mag, before, ref)  # module doc
    assert np.all(np.isfinite(got))
    assert np.all(np.abs(got - ref) <= tol), f"max excess {np.max(np.abs(got - ref) - tol)}"


@settings(max_examples=examples(40))
@pytest.mark.parametrize("block", BLOCKS)
@given(codes=high_codes(), data=st.data(), method=st.sampled_from(METHODS))
def test_integer_activations_give_the_exact_sparse_product(codes, data, method, block):
    codes = for_method(codes, method)
    if dense_refuses_odd_k(codes, method):
        return
    block = None if method == "dense" else block
    n, k = codes.q_high.shape
    m = data.draw(st.integers(1, 20))
    x = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).integers(-20, 21, size=(m, k)).astype(np.float64)
    unit = R.ZipperCodes(q_low=codes.q_low, q_high=codes.q_high, scale=np.full(n, 1.0 / 16.0))
    out = torch.full((m, n), 0.0, dtype=torch.float32, device=DEVICE)
    zipper_high_gpu(to_dev(x, torch.float32), prepare(unit, method), out, block=block)
    # |sum| <= 20 * 128 * K < 2**24: every partial sum is an exact float32 integer (dense: the
    # integers are exact in bf16 too, and the tensor cores' fp32 sums of integers below 2**24 are exact).
    np.testing.assert_array_equal(out.cpu().double().numpy(), R.sparse_matmul(x, codes.q_high))


@settings(max_examples=examples(20))
@given(codes=high_codes(), data=st.data())
def test_every_layout_agrees(codes, data):
    codes = for_method(codes, "dense")  # codes every layout holds
    n, k = codes.q_high.shape
    m = data.draw(st.integers(1, 20))
    # activations exact in bf16, so the dense layout multiplies the same values as the others
    x = to_dev(data.draw(matrices(shape=(m, k), kinds=("normal", "integers", "zero_rows"))), torch.bfloat16)
    x = x.to(torch.float32)
    mag = 16.0 * codes.scale[None, :] * (np.abs(x.cpu().double().numpy()) @ np.abs(codes.q_high.astype(np.float64)).T)
    outs = {}
    for method in METHODS:
        if dense_refuses_odd_k(codes, method):
            continue
        out = torch.zeros((m, n), dtype=torch.float32, device=DEVICE)
        outs[method] = zipper_high_gpu(x, prepare(codes, method), out).cpu().double().numpy()
    scale = float(np.abs(outs["columns"]).max()) + 1e-30
    for method, got in outs.items():
        # Different summation orders: 1e-6 relative in fp32 (columns ascending in both, grouped
        # differently), the tensor cores' accumulation bound for dense.
        tol = 1e-6 * scale + (2.0**-18 * mag if method == "dense" else 0.0)
        assert np.all(np.abs(got - outs["columns"]) <= tol), method


@settings(max_examples=examples(20))
@given(data=st.data(), x_dtype=st.sampled_from(X_DTYPES))
def test_dense_smoothing_is_torchs_bf16_rounding_of_the_float32_product(data, x_dtype):
    """The dense layout's X' is float32(x) * inv_s rounded half to even to bf16, torch's bits exactly
    (ties, huge values rounding to Inf, NaN kept NaN)."""
    from zqkernels.gpu.zipper_high import _dense_acts

    m, k = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 70))
    x = torch.from_numpy(np.ascontiguousarray(data.draw(matrices(shape=(m, k))))).to(x_dtype)
    inv = torch.from_numpy(np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).uniform(0.1, 4.0, k)).float()
    if x_dtype == torch.float32 and data.draw(st.booleans()):
        x.view(-1)[0] = float("nan")
        x.view(-1)[-1] = 3.3e38  # times inv_s up to 4: past float32's range, or rounds to bf16's Inf
    want = (x.float() * inv).to(torch.bfloat16)
    got = _dense_acts(x.to(DEVICE), inv.to(DEVICE)).cpu()
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16)[~want.isnan()], want.view(torch.int16)[~want.isnan()])
    assert torch.equal(got.isnan(), want.isnan())


def test_all_zero_high_part_leaves_out_untouched():
    codes = R.ZipperCodes(q_low=np.ones((5, 8), np.int8), q_high=np.zeros((5, 8), np.int8), scale=np.ones(5))
    out = torch.arange(15, dtype=torch.float32, device=DEVICE).reshape(3, 5)
    for method in METHODS:
        high = prepare(codes, method)
        assert high.nnz == 0
        y = zipper_high_gpu(torch.ones((3, 8), device=DEVICE), high, out.clone())
        torch.testing.assert_close(y, out, rtol=0, atol=0)


def test_prepare_picks_a_layout_and_counts_what_it_keeps():
    rng = np.random.default_rng(3)
    q_high = np.zeros((40, 64), np.int8)
    q_high[:, 5] = rng.integers(1, 5, size=40)  # one outlier channel, int4 codes: the tensor-core pass
    codes = R.ZipperCodes(q_low=np.zeros((40, 64), np.int8), q_high=q_high, scale=np.ones(40))
    high = prepare(codes)
    assert (high.method, high.width, high.nnz) == ("dense", 64, 40)
    assert tuple(high.values.shape) == (40, 32) and high.values.dtype == torch.uint8
    q_high[0, 5] = 9  # beyond int4, in one channel: the column pass
    high = prepare(R.ZipperCodes(q_low=q_high * 0, q_high=q_high, scale=np.ones(40)))
    assert (high.method, high.width, high.nnz) == ("columns", 1, 40)
    assert tuple(high.values.shape) == (1, 40)  # only the chosen layout is built and uploaded
    q_high = np.zeros((40, 64), np.int8)
    q_high[np.arange(40), np.arange(40)] = 9  # scattered beyond int4: one per row, all in different columns
    high = prepare(R.ZipperCodes(q_low=q_high * 0, q_high=q_high, scale=np.ones(40)))
    assert (high.method, high.width) == ("ell", 1)
    assert tuple(high.values.shape) == (1, 40)
    q_high = q_high[:, :63]  # int4 codes but K odd: not dense
    assert prepare(R.ZipperCodes(q_low=q_high * 0, q_high=(q_high > 0).astype(np.int8), scale=np.ones(40))).method == "ell"


def test_bad_arguments_raise_value_error():
    codes = R.zipper_quantize(np.random.default_rng(0).standard_t(2, size=(6, 10)), outlier_ratio=0.1)
    high = prepare(codes, "ell")  # a layout whose tiles `block` sets
    x = torch.zeros((2, 10), device=DEVICE)
    out = torch.zeros((2, 6), device=DEVICE)
    cases = [
        (lambda: zipper_high_gpu(x.double(), high, out), "x_smoothed"),
        (lambda: zipper_high_gpu(x[:, :9], high, out), r"\[M, 10\]"),
        (lambda: zipper_high_gpu(torch.zeros((10, 2), device=DEVICE).t(), high, out), "contiguous"),
        (lambda: zipper_high_gpu(x, high, out.half()), "float32"),
        (lambda: zipper_high_gpu(x, high, out[:1]), "shape"),
        (lambda: zipper_high_gpu(x, high, torch.zeros((6, 2), device=DEVICE).t()), "contiguous"),
        (lambda: zipper_high_gpu(x, "high", out), "ZipperHighGPU"),
        (lambda: zipper_high_gpu(x, high, out, block=(16, 16)), r"\(BLOCK_M, BLOCK_N, BLOCK_E\)"),
        (lambda: zipper_high_gpu(x, high, out, block=(16, 16, 3)), "BLOCK_E=3 must be a power of two"),
        (lambda: zipper_high_gpu(x, high, out, block=(0, 16, 1)), "BLOCK_M=0"),
        (lambda: prepare(codes, method="sparse"), "method"),
        (lambda: prepare(R.ZipperCodes(codes.q_low, codes.q_high * 0 + 9, codes.scale), method="dense"), r"\[-8, 7\]"),
        (lambda: zipper_high_gpu(x, prepare(R.ZipperCodes(codes.q_low, codes.q_high * 0 + 1, codes.scale), "dense"),
                                 out, block=(16, 16, 1)), "block=None"),
        (lambda: prepare(R.ZipperCodes(codes.q_low, codes.q_high.astype(np.float32), codes.scale)), "integer"),
        (lambda: prepare(R.ZipperCodes(codes.q_low, codes.q_high, codes.scale[:-1])), "scale"),
        (lambda: prepare(R.ZipperCodes(codes.q_low, codes.q_high.astype(np.int16) * 300, codes.scale)), "outside"),
        (lambda: prepare(R.ZipperCodes(codes.q_low, codes.q_high, np.full(6, np.nan))), "NaN"),
    ]
    if GPU:
        cases.append((lambda: zipper_high_gpu(x.cpu(), high, out), "on cpu"))
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
    assert isinstance(high, ZipperHighGPU)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: compiled kernels on LLaMA-3-8B sizes")
@pytest.mark.parametrize("m", [1, 16, 512])
def test_llama_o_size_compiled(m):
    rng = np.random.default_rng(m)
    n, k = 4096, 4096
    w = rng.standard_normal((n, k)) * 0.02
    w[:, rng.choice(k, 20, replace=False)] *= 20  # outlier input channels after smoothing
    codes = R.zipper_quantize(w, outlier_ratio=0.01)
    x = rng.standard_normal((m, k)).astype(np.float32)
    ref = R.zipper_matmul(x.astype(np.float64), high_only(codes))
    for method in METHODS:
        out = torch.zeros((m, n), dtype=torch.float32, device=DEVICE)
        zipper_high_gpu(to_dev(x, torch.float32), prepare(codes, method), out)
        rel = np.linalg.norm(out.cpu().double().numpy() - ref) / np.linalg.norm(ref)
        # fp32 products and sums of a few dozen terms per output; dense: X' rounded to bf16
        # (2**-9 per element, in random directions)
        assert rel < (2.0**-9 if method == "dense" else 1e-6), method
