"""The hybrid executor (`zqkernels.hybrid`) equals the oracle and its plumbing holds.

Without a GPU the hybrid path runs with the explicit CPU stand-in for the GPU part
(`gpu_part=reference_gpu_part`): the copy into the host buffers, the worker thread, the Numba LUT
with the fused 16*Δ_n scale, the join and the add are the real ones, so CI proves them. With a GPU
the `gpu`-marked tests compare mode="hybrid" / mode="gpu" with `reference.zipper_matmul`.

Tolerances (next to each assert): with a float64 LUT the result is the oracle's up to summation
order, 1e-12 of the absolute sum; with a float32 LUT the high part may err by the float32 bound
of `verify/test_lut.py`; on the GPU the low part's float32 epilogue adds ~1e-6 relative.
"""
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as R
from zqkernels import hybrid as H
from zqkernels.cpu import lut as cpu_lut

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: compiled GPU path not testable")


def make_layer(rng, n, k, outlier_cols=3, outlier_ratio=0.05):
    """Smoothed weights whose outliers sit in a few columns (what smoothing with high alpha makes)."""
    w = rng.standard_normal((n, k))
    cols = rng.choice(k, size=min(k, outlier_cols), replace=False)
    w[:, cols] *= rng.uniform(10, 60, size=cols.size)
    s = np.exp(0.3 * rng.standard_normal(k))
    return R.zipper_quantize(w * s, outlier_ratio=outlier_ratio), s


def abs_bounds(x, w):
    """(|low| abs sum, |high| abs sum) of the product, the scale of each part's rounding."""
    xs = H.smooth_host(x.detach().cpu(), w.inv_smooth_host, torch.empty(x.shape, dtype=torch.float32))
    xs = xs.numpy().astype(np.float64)
    qx, sx = R.quantize_activations(xs, group_size=w.act_group_size)
    deq = np.abs(R.dequantize(qx, sx, w.act_group_size))
    scale = np.abs(w.codes.scale)
    low = deq @ (np.abs(w.codes.q_low.astype(np.float64)) * scale[:, None]).T
    high = 16.0 * scale * (np.abs(xs) @ np.abs(w.codes.q_high.astype(np.float64)).T)
    return low, high


def max_row_entries(w):
    return int(np.diff(w.lut.indptr).max()) if w.shape[0] else 0


# ------------------------------------------------------------------------------- CPU plumbing
@settings(max_examples=30)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 24),
    k2=st.integers(1, 32),
    ms=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    smooth=st.booleans(),
    act_group=st.sampled_from([None, 4, 6]),
    lut_dtype=st.sampled_from([np.float64, np.float32]),
    x_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_hybrid_with_cpu_stand_in_equals_reference(seed, n, k2, ms, smooth, act_group, lut_dtype, x_dtype):
    rng = np.random.default_rng(seed)
    k = 2 * k2
    codes, s = make_layer(rng, n, k)
    w = H.ZipperWeights.prepare(codes, s if smooth else None, device="cpu", act_group_size=act_group,
                                lut_dtype=lut_dtype, lut_group_size=int(rng.integers(1, 6)))
    for m in ms:  # several calls: the buffers are grown and reused between them
        x = torch.from_numpy(rng.standard_normal((m, k)) * 3).to(x_dtype)
        y = H.zipper_linear(x, w, mode="hybrid", gpu_part=H.reference_gpu_part, out_dtype=torch.float64)
        ref = H.reference_linear(x, w)
        low, high = abs_bounds(x, w)
        if lut_dtype == np.float64:
            bound = 1e-12 * (low + high)  # the oracle up to summation order
        else:
            bound = 1e-12 * low + (w.lut.group_size + max_row_entries(w) + 3) * 2.0**-23 * high
        assert y.dtype == torch.float64 and y.shape == (m, n)
        assert np.all(np.abs(y.numpy() - ref) <= bound)
        assert set(w.last_timing) >= {"worker_compute_s", "join_wait_s", "launch_s"}


def test_reference_mode_is_the_oracle_and_out_dtype_defaults_to_x():
    rng = np.random.default_rng(1)
    codes, s = make_layer(rng, 8, 16)
    w = H.ZipperWeights.prepare(codes, s, device="cpu")
    x = torch.randn(3, 16)
    xs = (x * torch.from_numpy((1.0 / s).astype(np.float32))).numpy().astype(np.float64)
    ref = R.zipper_matmul(xs, codes)
    assert np.array_equal(H.zipper_linear(x, w, mode="reference", out_dtype=torch.float64).numpy(), ref)
    assert H.zipper_linear(x, w, mode="reference").dtype == torch.float32
    assert H.zipper_linear(x.half(), w, mode="hybrid", gpu_part=H.reference_gpu_part).dtype == torch.float16


def test_buffers_are_allocated_once_per_capacity_and_reused():
    rng = np.random.default_rng(2)
    codes, s = make_layer(rng, 6, 10)
    w = H.ZipperWeights.prepare(codes, s, device="cpu")
    H.zipper_linear(torch.randn(5, 10), w, gpu_part=H.reference_gpu_part)
    first = w.buffers(5, torch.float32)
    ptr = first.x_host.data_ptr()
    for m in (1, 8, 3, 8):
        H.zipper_linear(torch.randn(m, 10), w, gpu_part=H.reference_gpu_part)
        assert w.buffers(m, torch.float32) is first and first.x_host.data_ptr() == ptr
    H.zipper_linear(torch.randn(9, 10), w, gpu_part=H.reference_gpu_part)
    grown = w.buffers(9, torch.float32)
    assert grown is not first and grown.capacity == 16


def test_gpu_part_and_cpu_worker_run_concurrently(monkeypatch):
    """Each part waits for the other to have started: a serial executor would time out here."""
    rng = np.random.default_rng(3)
    codes, s = make_layer(rng, 6, 10)
    w = H.ZipperWeights.prepare(codes, s, device="cpu")
    gpu_started, cpu_started = threading.Event(), threading.Event()
    real = cpu_lut.lut_matmul

    def cpu_side(*args, **kwargs):
        cpu_started.set()
        assert gpu_started.wait(10), "the GPU part never started while the CPU part ran"
        return real(*args, **kwargs)

    def gpu_side(x, weights):
        gpu_started.set()
        assert cpu_started.wait(10), "the CPU part never started while the GPU part ran"
        return H.reference_gpu_part(x, weights)

    monkeypatch.setattr(cpu_lut, "lut_matmul", cpu_side)
    x = torch.randn(4, 10)
    y = H.zipper_linear(x, w, gpu_part=gpu_side, out_dtype=torch.float64)
    assert np.allclose(y.numpy(), H.reference_linear(x, w), rtol=1e-5, atol=1e-5)


def test_worker_exception_propagates_and_the_next_call_works(monkeypatch):
    rng = np.random.default_rng(4)
    codes, s = make_layer(rng, 6, 10)
    w = H.ZipperWeights.prepare(codes, s, device="cpu", lut_dtype=np.float64)

    def boom(*args, **kwargs):
        raise RuntimeError("lut worker failed on purpose")

    monkeypatch.setattr(cpu_lut, "lut_matmul", boom)
    with pytest.raises(RuntimeError, match="on purpose"):
        H.zipper_linear(torch.randn(3, 10), w, gpu_part=H.reference_gpu_part)
    monkeypatch.undo()
    x = torch.randn(3, 10)
    y = H.zipper_linear(x, w, gpu_part=H.reference_gpu_part, out_dtype=torch.float64)
    low, high = abs_bounds(x, w)
    assert np.all(np.abs(y.numpy() - H.reference_linear(x, w)) <= 1e-12 * (low + high))


def test_gpu_part_exception_propagates_after_the_worker_is_drained(monkeypatch):
    rng = np.random.default_rng(5)
    codes, s = make_layer(rng, 6, 10)
    w = H.ZipperWeights.prepare(codes, s, device="cpu")
    done = threading.Event()
    real = cpu_lut.lut_matmul

    def slow_cpu(*args, **kwargs):
        time.sleep(0.2)
        out = real(*args, **kwargs)
        done.set()
        return out

    def bad_gpu(x, weights):
        raise RuntimeError("gpu part failed on purpose")

    monkeypatch.setattr(cpu_lut, "lut_matmul", slow_cpu)
    with pytest.raises(RuntimeError, match="gpu part failed"):
        H.zipper_linear(torch.randn(2, 10), w, gpu_part=bad_gpu)
    assert done.is_set()  # the worker had finished before the error reached the caller


def test_a_worker_that_never_finishes_raises_timeout_not_a_hang(monkeypatch):
    rng = np.random.default_rng(6)
    codes, s = make_layer(rng, 6, 10)
    w = H.ZipperWeights.prepare(codes, s, device="cpu", join_timeout_s=0.2)
    release = threading.Event()

    def stuck(*args, **kwargs):
        release.wait(30)

    monkeypatch.setattr(cpu_lut, "lut_matmul", stuck)
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError, match="join_timeout_s"):
        H.zipper_linear(torch.randn(2, 10), w, gpu_part=H.reference_gpu_part)
    assert time.perf_counter() - t0 < 10
    assert torch.float32 not in w._buffers  # the stuck worker's buffers are never handed out again
    release.set()
    monkeypatch.undo()
    w.join_timeout_s = 60.0
    x = torch.randn(2, 10)
    y = H.zipper_linear(x, w, gpu_part=H.reference_gpu_part, out_dtype=torch.float64)
    assert np.allclose(y.numpy(), H.reference_linear(x, w), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- mode="auto"
def test_auto_without_measurement_says_so():
    rng = np.random.default_rng(7)
    codes, s = make_layer(rng, 6, 10)
    w = H.ZipperWeights.prepare(codes, s, device="cpu")
    with pytest.raises(H.NoAutoMeasurement, match="no measurement for shape 6x10"):
        H.zipper_linear(torch.randn(2, 10), w, mode="auto")


def test_auto_picks_the_measured_mode_nearest_in_log_m():
    table = {"devices": {"cpu": {"entries": {"6x10": {"1": {"mode": "hybrid"}, "64": {"mode": "gpu"}}}}}}
    assert H.auto_mode(6, 10, 1, "cpu", table) == "hybrid"
    assert H.auto_mode(6, 10, 4, "cpu", table) == "hybrid"
    assert H.auto_mode(6, 10, 16, "cpu", table) == "gpu"
    assert H.auto_mode(6, 10, 5000, "cpu", table) == "gpu"
    with pytest.raises(H.NoAutoMeasurement):
        H.auto_mode(6, 12, 1, "cpu", table)


def test_committed_auto_table_is_well_formed():
    table = H.load_auto_table()
    for dev in table["devices"].values():
        for shape, per_m in dev["entries"].items():
            n, k = (int(v) for v in shape.split("x"))
            assert n > 0 and k > 0
            assert all(int(m) > 0 and e["mode"] in ("hybrid", "gpu") for m, e in per_m.items())


# ------------------------------------------------------------------------------- bad input
RNG = np.random.default_rng(8)
CODES, SMOOTH = make_layer(RNG, 6, 10)
W_CPU = H.ZipperWeights.prepare(CODES, SMOOTH, device="cpu")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: H.zipper_linear(torch.randn(2, 10, dtype=torch.float64), W_CPU, gpu_part=H.reference_gpu_part), "dtype"),
        (lambda: H.zipper_linear(torch.randn(10, 2).T, W_CPU, gpu_part=H.reference_gpu_part), "contiguous"),
        (lambda: H.zipper_linear(torch.randn(2, 12), W_CPU, gpu_part=H.reference_gpu_part), "K=12"),
        (lambda: H.zipper_linear(torch.randn(10), W_CPU, gpu_part=H.reference_gpu_part), "2-D"),
        (lambda: H.zipper_linear(torch.randn(0, 10), W_CPU, gpu_part=H.reference_gpu_part), "at least one"),
        (lambda: H.zipper_linear(np.ones((2, 10), np.float32), W_CPU), "torch.Tensor"),
        (lambda: H.zipper_linear(torch.randn(2, 10), CODES), "ZipperWeights"),
        (lambda: H.zipper_linear(torch.randn(2, 10), W_CPU, mode="fast"), "mode"),
        (lambda: H.zipper_linear(torch.randn(2, 10), W_CPU, mode="hybrid"), "explicit gpu_part"),
        (lambda: H.zipper_linear(torch.randn(2, 10), W_CPU, mode="gpu"), "CUDA"),
        (lambda: H.zipper_linear(torch.randn(2, 10), W_CPU, gpu_part=lambda x, w: torch.zeros(2, 5)), "gpu_part returned"),
        (lambda: H.ZipperWeights.prepare(CODES, SMOOTH, device="cpu",
                                         lut=R.build_pattern_lut(np.zeros((6, 12), np.int8))), "another shape|built for shape"),
        (lambda: H.ZipperWeights.prepare(CODES, SMOOTH[:9], device="cpu"), "smooth"),
        (lambda: H.ZipperWeights.prepare(CODES, -SMOOTH, device="cpu"), "smooth"),
        (lambda: H.ZipperWeights.prepare(R.zipper_quantize(np.ones((3, 5))), None, device="cpu"), "even"),
        (lambda: H.ZipperWeights.prepare(CODES, SMOOTH, device="cpu", lut_dtype=np.float16), "lut_dtype"),
        (lambda: H.ZipperWeights.prepare(CODES, SMOOTH, device="cpu", cpu_threads=0), "cpu_threads"),
        (lambda: H.ZipperWeights.prepare(object(), None, device="cpu"), "ZipperCodes"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------- on the GPU
@GPU
@needs_gpu
@pytest.mark.parametrize("m", [1, 16, 64, 300])
@pytest.mark.parametrize("act_group", [None, 32])
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.float32])
def test_hybrid_on_gpu_equals_reference_zipper_matmul(m, act_group, x_dtype):
    rng = np.random.default_rng(m)
    n, k = 192, 256
    codes, s = make_layer(rng, n, k, outlier_cols=8, outlier_ratio=0.02)
    w = H.ZipperWeights.prepare(codes, s, device="cuda", act_group_size=act_group)
    for rep in range(3):  # buffer reuse across calls, the H2D fence included
        x = torch.from_numpy(rng.standard_normal((m, k))).to(x_dtype).cuda()
        y = H.zipper_linear(x, w, mode="hybrid", out_dtype=torch.float32)
        torch.cuda.synchronize()
        ref = H.reference_linear(x, w)
        low, high = abs_bounds(x, w)
        bound = 4e-6 * low + (w.lut.group_size + max_row_entries(w) + 3) * 2.0**-23 * high  # fp32 epilogue + fp32 LUT
        assert np.all(np.abs(y.cpu().numpy() - ref) <= bound)


@GPU
@needs_gpu
@pytest.mark.parametrize("m", [1, 64])
def test_gpu_mode_equals_reference_zipper_matmul(m):
    pytest.importorskip("zqkernels.gpu.zipper_high", reason="zqkernels.gpu.zipper_high not written yet")
    rng = np.random.default_rng(10 + m)
    codes, s = make_layer(rng, 192, 256, outlier_cols=8, outlier_ratio=0.02)
    w = H.ZipperWeights.prepare(codes, s, device="cuda")
    x = torch.randn(m, 256, device="cuda", dtype=torch.float16)
    y = H.zipper_linear(x, w, mode="gpu", out_dtype=torch.float32)
    low, high = abs_bounds(x, w)
    assert np.all(np.abs(y.cpu().numpy() - H.reference_linear(x, w)) <= 4e-6 * low + 1e-5 * high)


# ------------------------------------------------------------------------------- the real GPU parts, interpreted
INTERPRETED = not torch.cuda.is_available()


@pytest.mark.skipif(not INTERPRETED, reason="covered compiled by the gpu-marked tests")
@pytest.mark.parametrize("act_group", [None, 32])
@pytest.mark.parametrize("m", [1, 5])
def test_triton_low_part_as_gpu_part_and_gpu_mode_equal_reference_under_interpreter(act_group, m):
    """The Triton quantizer + W4A4 GEMM (and the GPU high part) run under TRITON_INTERPRET=1 on CPU
    tensors: the composition gpu_low_part / mode="gpu" uses (inv_s, Δ_n, act groups, 16 Δ_n) is
    the oracle's. Tolerances as on the GPU."""
    rng = np.random.default_rng(20 + m)
    codes, s = make_layer(rng, 40, 64, outlier_cols=4, outlier_ratio=0.05)
    w = H.ZipperWeights.prepare(codes, s, device="cpu", act_group_size=act_group)
    x = torch.from_numpy(rng.standard_normal((m, 64))).to(torch.float16)
    ref = H.reference_linear(x, w)
    low, high = abs_bounds(x, w)
    y = H.zipper_linear(x, w, mode="hybrid", gpu_part=H.gpu_low_part, out_dtype=torch.float32)
    bound = 4e-6 * low + (w.lut.group_size + max_row_entries(w) + 3) * 2.0**-23 * high
    assert np.all(np.abs(y.numpy() - ref) <= bound)
    pytest.importorskip("zqkernels.gpu.zipper_high")
    y_gpu_mode = H._gpu(x, w)  # mode="gpu" refuses a CPU device; its body is what is checked here
    assert np.all(np.abs(y_gpu_mode.numpy() - ref) <= 4e-6 * low + 1e-5 * high)
