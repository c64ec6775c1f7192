"""The FP8 rowwise peer of perf/bench_baselines.py, checked on the CPU.

torch's `float8_e4m3fn` dtype and `torch._scaled_mm` both exist in the CPU build, so the operands
the GPU benchmark times are made and multiplied here by the same functions: the per-row scale and
the e4m3 cast (the torch definition, and the fused Triton kernel under Triton's CPU interpreter)
against a numpy model of the format (round to nearest even on 3 mantissa bits, subnormals below
2^-6), the operand layout `_scaled_mm` asks for (row-major A, column-major B, float32 scales
[M, 1] and [1, N]), and the product against float64 arithmetic. Without a GPU the benchmarks
themselves are collected and skip with a reason.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "perf"))
GPU = torch.cuda.is_available()
if not GPU:  # Triton picks interpreted or compiled when a kernel is decorated: before the import
    os.environ.setdefault("TRITON_INTERPRET", "1")
import bench_baselines as B  # noqa: E402

DEVICE = "cuda" if GPU else "cpu"

E4M3_MAX = 448.0


def e4m3_round(v: np.ndarray) -> np.ndarray:
    """Nearest e4m3fn value of each float64 in [-448, 448], ties to even: 3 mantissa bits, exponent
    floor(log2|v|) but at least -6 (below 2^-6 the spacing stays 2^-9: subnormals)."""
    a = np.abs(v)
    _, ex = np.frexp(a)  # a = m * 2^ex with m in [0.5, 1): floor(log2 a) = ex - 1, exactly
    step = np.ldexp(1.0, np.maximum(ex - 1, -6) - 3)
    return np.sign(v) * np.rint(a / step) * step


def numpy_rowwise(x32: np.ndarray):
    """The contract of `fp8_rowwise_quantize` in numpy float32: scale = absmax * f32(1/448)
    (1 for an all-zero row), codes = e4m3(clamp(x / scale, -448, 448))."""
    amax = np.abs(x32).max(axis=1, keepdims=True)
    scale = np.where(amax > 0, amax * np.float32(1.0 / E4M3_MAX), np.float32(1.0)).astype(np.float32)
    quotient = np.clip(x32 / scale, -E4M3_MAX, E4M3_MAX).astype(np.float32)
    return e4m3_round(quotient.astype(np.float64)), scale


# rows with 448 in them have scale exactly 1, so these land on e4m3 rounding midpoints unchanged
TIES = [1.0625, -1.1875, 17.0, 3.0 * 2.0**-10, 2.0**-10, 248.0, -272.0, 0.0]


@st.composite
def activations(draw):
    m = draw(st.integers(1, 6))
    k = draw(st.integers(1, 40))  # K need not be a multiple of anything for the cast
    kind = draw(st.sampled_from(["normal", "outlier", "zero_row", "ties", "tiny"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    if kind == "outlier":  # one enormous value: the rest of its row goes subnormal or to zero
        x[rng.integers(m), rng.integers(k)] = np.float32(draw(st.sampled_from([1e4, -3e5, 6.5e4])))
    elif kind == "zero_row":
        x[rng.integers(m)] = 0.0
    elif kind == "ties":
        x = np.array(rng.choice(TIES, size=(m, k)), dtype=np.float32)
        x[:, 0] = E4M3_MAX
    elif kind == "tiny":
        x *= np.float32(1e-30)
    return x


@settings(max_examples=150, deadline=None)
@given(activations())
@example(np.zeros((1, 16), np.float32))
@example(np.array([[448.0, 1.0625, 17.0, 3.0 * 2.0**-10, -0.0]], np.float32))
def test_rowwise_cast_matches_the_numpy_model_of_e4m3(x):
    codes, scale = B.fp8_rowwise_quantize(torch.from_numpy(x))
    want_codes, want_scale = numpy_rowwise(x)
    # the fused kernel the dynamic benchmark times gives the same bits (zeros may differ in sign)
    fused_codes, fused_scale = B.fp8_rowwise_cast(torch.from_numpy(x).to(DEVICE))
    assert fused_codes.dtype == torch.float8_e4m3fn and tuple(fused_scale.shape) == (x.shape[0], 1)
    np.testing.assert_array_equal(fused_scale.cpu().numpy(), want_scale)
    np.testing.assert_array_equal(fused_codes.cpu().float().numpy().astype(np.float64), want_codes)
    assert codes.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert tuple(scale.shape) == (x.shape[0], 1)
    np.testing.assert_array_equal(scale.numpy(), want_scale)  # exact: the same float32 operations
    np.testing.assert_array_equal(codes.float().numpy().astype(np.float64), want_codes)  # exact
    assert not torch.isnan(codes.float()).any()
    # the absmax element of every nonzero row maps to +-448, so the whole e4m3 range is used
    nonzero = np.abs(x).max(axis=1) > 0
    top = np.abs(codes.float().numpy()).max(axis=1)
    assert np.all(top[nonzero] == E4M3_MAX) and np.all(top[~nonzero] == 0)


@settings(max_examples=60, deadline=None)
@given(activations())
def test_dequantized_rows_are_within_half_an_e4m3_step(x):
    codes, scale = B.fp8_rowwise_quantize(torch.from_numpy(x))
    back = codes.float().numpy().astype(np.float64) * scale.numpy().astype(np.float64)
    x64 = x.astype(np.float64)
    s = scale.numpy().astype(np.float64)
    # half a step: 2^-4 relative for normals; 2^-10 * scale absolute in the subnormal range;
    # plus the float32 rounding of the quotient (2^-24 relative)
    bound = 2.0**-4 * np.abs(x64) * (1 + 2.0**-20) + 2.0**-10 * s
    assert np.all(np.abs(back - x64) <= bound)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="t: expected a 2-D tensor"):
        B.fp8_rowwise_quantize(torch.ones(4))
    with pytest.raises(ValueError, match="x: expected a 2-D tensor with unit stride"):
        B.fp8_rowwise_cast(torch.ones(32, 16).t())


def test_fused_cast_of_bf16_rows_longer_than_its_block():
    """K past the kernel's block (several passes per row), bf16 input as the benchmark feeds it."""
    k = B.FP8_CAST_MAX_BLOCK + 40
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, k, generator=gen).to(torch.bfloat16)
    x[0, k - 1] = 300.0  # the absmax in the last, partial block
    codes, scale = B.fp8_rowwise_cast(x.to(DEVICE))
    want_codes, want_scale = B.fp8_rowwise_quantize(x)
    assert torch.equal(scale.cpu(), want_scale) and torch.equal(codes.cpu().float(), want_codes.float())
    assert codes[0, k - 1].float().item() == 448.0


def test_weight_operand_is_the_layout_scaled_mm_asks_for():
    n, k = 48, 32
    w = torch.randn(n, k) * 0.02
    w_codes_t, w_scale = B.fp8_rowwise_weight(w)
    assert tuple(w_codes_t.shape) == (k, n) and w_codes_t.stride() == (1, k)  # column-major [K, N]
    assert tuple(w_scale.shape) == (1, n) and w_scale.is_contiguous() and w_scale.dtype == torch.float32
    codes, scale = B.fp8_rowwise_quantize(w)
    assert torch.equal(w_codes_t.t().float(), codes.float()) and torch.equal(w_scale.t(), scale)


@pytest.mark.parametrize("m, n, k", [(1, 16, 16), (5, 32, 48), (16, 64, 256)])
def test_scaled_mm_product_on_the_cpu(m, n, k):
    """The benchmark's call of `torch._scaled_mm` (rowwise scales, bf16 out, fast accumulation)
    runs in the CPU build and equals the float64 product of the dequantized operands."""
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    x[0, 0] = 40.0  # an outlier channel
    w = torch.randn(n, k, generator=gen) * 0.02
    w_codes_t, w_scale = B.fp8_rowwise_weight(w)
    x_codes, x_scale = B.fp8_rowwise_quantize(x)
    got = B.fp8_rowwise_mm(x_codes, x_scale, w_codes_t, w_scale)
    assert got.dtype == torch.bfloat16 and tuple(got.shape) == (m, n)
    a = x_codes.double() * x_scale.double()
    b = w_codes_t.double() * w_scale.double()
    ref = a @ b
    # bf16 output rounding (2^-9 relative, 2^-8 with margin) + fp32 accumulation of K terms
    bound = 2.0**-8 * ref.abs() + (k + 2) * 2.0**-24 * (a.abs() @ b.abs())
    assert torch.all((got.double() - ref).abs() <= bound)

    # the dynamic layer is the same cast (fused) and product, and stays near the unquantized product
    dyn = B.fp8_rowwise_linear(x.to(DEVICE), w_codes_t.to(DEVICE), w_scale.to(DEVICE)).cpu()
    if not GPU:
        assert torch.equal(dyn, got)
    exact = x.double() @ w.double().t()
    # two e4m3 roundings (2^-4 relative each) per term, bf16 output, subnormal floor
    loose = (2 * 2.0**-4 + 2.0**-8) * (x.double().abs() @ w.double().abs().t()) + 2.0**-8 * exact.abs() + 1e-6
    assert torch.all((dyn.double() - exact).abs() <= loose)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_fp8_and_gemlite_benchmarks_are_collected_and_skip_with_a_reason(tmp_path):
    out = tmp_path / "peers.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "perf/", "-q", "-p", "no:cacheprovider", "-rs", "-k", "fp8 or gemlite",
         "--shapes", "llama3-8b.o", "--m", "1,4096", "--benchmark-json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 5), proc.stdout + proc.stderr  # everything skipped
    skipped = json.loads(out.read_text())["zq_perf"]["skipped"]
    ids = [s["nodeid"] for s in skipped]
    for name in ("test_fp8_rowwise[", "test_fp8_rowwise_dynamic[", "test_gemlite_a16w4[", "test_gemlite_a8w8["):
        assert sum(i.split("::")[-1].startswith(name) for i in ids) >= 2, (name, ids)
    assert any("int8" in i for i in ids if "gemlite_a8w8" in i) and any("fp8" in i for i in ids if "gemlite_a8w8" in i)
    assert all("no CUDA GPU on this machine" in s["reason"] for s in skipped)
    assert all(i.startswith("perf/bench_baselines.py::") for i in ids)
