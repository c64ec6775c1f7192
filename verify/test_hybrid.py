"""The hybrid executor (`zqkernels.hybrid`) equals the oracle and its plumbing holds.

Without a GPU the hybrid path runs with the explicit CPU stand-in for the GPU part
(`gpu_part=reference_gpu_part`): the copy into the host buffers, the worker thread, the Numba LUT
with the fused 16*Δ_n scale, the join and the add are the real ones, so CI proves them. With a GPU
the `gpu`-marked tests compare mode="hybrid" / mode="gpu" with `reference.zipper_matmul`.

Tolerances (next to each assert): with a float64 LUT the result is the oracle's up to summation
order, 1e-12 of the absolute sum; with a float32 LUT the high part may err by the float32 bound
of `verify/test_lut.py`; on the GPU the low part's float32 epilogue adds ~1e-6 relative.
"""
import dataclasses
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as R
from strategies import examples
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
    H.zipper_linear(torch.randn(5, 10), w, mode="hybrid", gpu_part=H.reference_gpu_part)
    first = w.buffers(5, torch.float32)
    ptr = first.x_host.data_ptr()
    for m in (1, 8, 3, 8):
        H.zipper_linear(torch.randn(m, 10), w, mode="hybrid", gpu_part=H.reference_gpu_part)
        assert w.buffers(m, torch.float32) is first and first.x_host.data_ptr() == ptr
    H.zipper_linear(torch.randn(9, 10), w, mode="hybrid", gpu_part=H.reference_gpu_part)
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
    y = H.zipper_linear(x, w, mode="hybrid", gpu_part=gpu_side, out_dtype=torch.float64)
    assert np.allclose(y.numpy(), H.reference_linear(x, w), rtol=1e-5, atol=1e-5)


def test_worker_exception_propagates_and_the_next_call_works(monkeypatch):
    rng = np.random.default_rng(4)
    codes, s = make_layer(rng, 6, 10)
    w = H.ZipperWeights.prepare(codes, s, device="cpu", lut_dtype=np.float64)

    def boom(*args, **kwargs):
        raise RuntimeError("lut worker failed on purpose")

    monkeypatch.setattr(cpu_lut, "lut_matmul", boom)
    with pytest.raises(RuntimeError, match="on purpose"):
        H.zipper_linear(torch.randn(3, 10), w, mode="hybrid", gpu_part=H.reference_gpu_part)
    monkeypatch.undo()
    x = torch.randn(3, 10)
    y = H.zipper_linear(x, w, mode="hybrid", gpu_part=H.reference_gpu_part, out_dtype=torch.float64)
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
        H.zipper_linear(torch.randn(2, 10), w, mode="hybrid", gpu_part=bad_gpu)
    assert done.is_set()  # the worker had finished before the error reached the caller


# ------------------------------------------------------------------------------- faults: never a hang
# Each fault test runs the call on a daemon thread and fails if it has not returned within a hard
# limit (no pytest-timeout plugin needed): a hang is a test failure, not a stuck suite.
HARD_LIMIT_S = 10.0


def within(limit_s, fn, *args, **kwargs):
    """fn(*args, **kwargs) on a daemon thread: its result, or its exception re-raised here; an
    AssertionError when it is still running after `limit_s`."""
    box = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            box["exc"] = exc

    t = threading.Thread(target=target, daemon=True)
    t0 = time.perf_counter()
    t.start()
    t.join(limit_s)
    assert not t.is_alive(), f"the call did not return within {limit_s} s (a hang)"
    box["elapsed_s"] = time.perf_counter() - t0
    if "exc" in box:
        raise box["exc"]
    return box["value"]


def timed(limit_s, fn, *args, **kwargs):
    """(exception or None, seconds) of a call that must return within `limit_s`."""
    t0 = time.perf_counter()
    try:
        within(limit_s, fn, *args, **kwargs)
    except AssertionError:
        raise
    except BaseException as exc:  # noqa: BLE001
        return exc, time.perf_counter() - t0
    return None, time.perf_counter() - t0


@pytest.fixture
def layer():
    rng = np.random.default_rng(6)
    codes, s = make_layer(rng, 6, 10)
    return H.ZipperWeights.prepare(codes, s, device="cpu", join_timeout_s=0.2, lut_dtype=np.float64)


@pytest.fixture
def release():
    """An event the stuck stand-ins wait on; set at teardown so no test thread outlives its test."""
    ev = threading.Event()
    yield ev
    ev.set()


def assert_healthy_call(w, monkeypatch):
    """After a fault: the real CPU part again, a fresh worker, a result equal to the oracle, fast."""
    monkeypatch.setattr(cpu_lut, "lut_matmul", REAL_LUT_MATMUL)
    w.join_timeout_s = 30.0
    x = torch.randn(3, 10)
    y = within(HARD_LIMIT_S, H.zipper_linear, x, w, mode="hybrid", gpu_part=H.reference_gpu_part, out_dtype=torch.float64)
    low, high = abs_bounds(x, w)
    assert np.all(np.abs(y.numpy() - H.reference_linear(x, w)) <= 1e-12 * (low + high))  # float64 LUT: summation order


REAL_LUT_MATMUL = cpu_lut.lut_matmul


def test_a_stuck_worker_raises_a_timeout_naming_the_cpu_part_and_is_replaced(layer, release, monkeypatch):
    entered = threading.Event()

    def stuck(*args, **kwargs):
        entered.set()
        release.wait(60)

    monkeypatch.setattr(cpu_lut, "lut_matmul", stuck)
    exc, elapsed = timed(HARD_LIMIT_S, H.zipper_linear, torch.randn(2, 10), layer, mode="hybrid", gpu_part=H.reference_gpu_part)
    assert isinstance(exc, H.HybridTimeout) and isinstance(exc, TimeoutError)
    assert exc.part == "cpu" and 0.2 <= exc.waited_s < HARD_LIMIT_S
    assert "CPU part" in str(exc) and "join_timeout_s=0.2" in str(exc) and "waited 0.2" in str(exc)
    assert elapsed < 0.2 + 5.0  # the bound plus scheduling slack on a loaded 2-core machine
    assert entered.is_set()
    stuck_threads = [t for t in threading.enumerate() if t.name.startswith("zq-lut") and t.is_alive()]
    assert all(t.daemon for t in stuck_threads)  # a worker stuck for ever cannot keep the process alive
    assert torch.float32 not in layer._buffers  # the stuck worker's buffers are never handed out again
    assert_healthy_call(layer, monkeypatch)  # while the stuck worker still blocks: a fresh one serves


def test_gpu_part_failing_while_the_worker_is_stuck_returns_within_the_bound(layer, release, monkeypatch):
    monkeypatch.setattr(cpu_lut, "lut_matmul", lambda *a, **k: release.wait(60))

    def bad_gpu(x, weights):
        raise RuntimeError("gpu part failed on purpose")

    exc, elapsed = timed(HARD_LIMIT_S, H.zipper_linear, torch.randn(2, 10), layer, mode="hybrid", gpu_part=bad_gpu)
    assert isinstance(exc, H.HybridError) and exc.part == "gpu+cpu"
    assert isinstance(exc.__cause__, RuntimeError) and "on purpose" in str(exc.__cause__)
    text = str(exc)
    assert "GPU part raised RuntimeError: gpu part failed on purpose" in text
    assert "CPU part" in text and "join_timeout_s=0.2" in text and "waited" in text
    assert elapsed < 0.2 + 5.0
    assert_healthy_call(layer, monkeypatch)


def test_a_slow_worker_times_out_and_its_late_writes_reach_no_later_call(layer, monkeypatch):
    """The slow part finishes after its caller gave up and then poisons the buffers it was given;
    the next call, still running when that happens, must not share them."""
    poisoned = threading.Event()

    def slow(x, lut, out=None, row_scale=None, **kwargs):
        time.sleep(0.6)
        out[...] = np.nan
        poisoned.set()
        return out

    monkeypatch.setattr(cpu_lut, "lut_matmul", slow)
    exc, _ = timed(HARD_LIMIT_S, H.zipper_linear, torch.randn(2, 10), layer, mode="hybrid", gpu_part=H.reference_gpu_part)
    assert isinstance(exc, H.HybridTimeout) and exc.part == "cpu"
    monkeypatch.setattr(cpu_lut, "lut_matmul", REAL_LUT_MATMUL)

    def gpu_after_poison(x, weights):
        assert poisoned.wait(HARD_LIMIT_S), "the slow worker never finished"
        return H.reference_gpu_part(x, weights)

    layer.join_timeout_s = 30.0
    x = torch.randn(2, 10)
    y = within(HARD_LIMIT_S, H.zipper_linear, x, layer, mode="hybrid", gpu_part=gpu_after_poison, out_dtype=torch.float64)
    low, high = abs_bounds(x, layer)
    assert np.all(np.abs(y.numpy() - H.reference_linear(x, layer)) <= 1e-12 * (low + high))


def test_both_parts_failing_names_both(layer, monkeypatch):
    def cpu_boom(*args, **kwargs):
        raise ArithmeticError("cpu part failed on purpose")

    def gpu_boom(x, weights):
        raise RuntimeError("gpu part failed on purpose")

    monkeypatch.setattr(cpu_lut, "lut_matmul", cpu_boom)
    exc, elapsed = timed(HARD_LIMIT_S, H.zipper_linear, torch.randn(2, 10), layer, mode="hybrid", gpu_part=gpu_boom)
    assert isinstance(exc, H.HybridError) and exc.part == "gpu+cpu" and elapsed < 5.0
    text = str(exc)
    assert "GPU part raised RuntimeError: gpu part failed on purpose" in text
    assert "CPU part also raised ArithmeticError: cpu part failed on purpose" in text
    assert_healthy_call(layer, monkeypatch)


def test_a_worker_that_raises_after_the_timeout_affects_nothing_later(layer, release, monkeypatch):
    finished = threading.Event()
    unhandled = []
    monkeypatch.setattr(threading, "excepthook", lambda args: unhandled.append(args))

    def late_boom(*args, **kwargs):
        release.wait(60)
        finished.set()
        raise RuntimeError("cpu part failed after its caller gave up")

    monkeypatch.setattr(cpu_lut, "lut_matmul", late_boom)
    exc, _ = timed(HARD_LIMIT_S, H.zipper_linear, torch.randn(2, 10), layer, mode="hybrid", gpu_part=H.reference_gpu_part)
    assert isinstance(exc, H.HybridTimeout)
    retired = [t for t in threading.enumerate() if t.name.startswith("zq-lut") and t.is_alive()]
    release.set()
    assert finished.wait(HARD_LIMIT_S)
    assert_healthy_call(layer, monkeypatch)  # the late exception is not delivered to this call
    assert_healthy_call(layer, monkeypatch)
    for t in retired:
        if t is not H._current_worker().thread:
            t.join(HARD_LIMIT_S)
            assert not t.is_alive(), "a retired worker did not end after its job"
    assert unhandled == []


def test_a_failed_cpu_part_names_the_part_and_the_worker_keeps_serving(layer, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("lut worker failed on purpose")

    monkeypatch.setattr(cpu_lut, "lut_matmul", boom)
    exc, _ = timed(HARD_LIMIT_S, H.zipper_linear, torch.randn(2, 10), layer, mode="hybrid", gpu_part=H.reference_gpu_part)
    assert isinstance(exc, H.HybridError) and exc.part == "cpu"
    assert "CPU part (pattern-LUT worker) raised RuntimeError: lut worker failed on purpose" in str(exc)
    assert_healthy_call(layer, monkeypatch)


def test_a_gpu_part_value_error_propagates_as_it_is(layer, monkeypatch):
    def bad_input(x, weights):
        raise ValueError("x holds NaN or Inf")

    exc, _ = timed(HARD_LIMIT_S, H.zipper_linear, torch.randn(2, 10), layer, mode="hybrid", gpu_part=bad_input)
    assert type(exc) is ValueError and str(exc) == "x holds NaN or Inf"
    assert_healthy_call(layer, monkeypatch)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("gpu_part", ["reference", "unchecked"])
def test_non_finite_x_is_refused_by_the_cpu_part_whatever_the_gpu_part_does(layer, monkeypatch, bad, gpu_part):
    """The worker checks X' on the host: a GPU part that lets NaN through (returns finite numbers)
    still ends in a ValueError naming x, never in a NaN (or wrong finite) output."""
    part = H.reference_gpu_part if gpu_part == "reference" else (lambda x, w: torch.zeros(x.shape[0], 6))
    x = torch.randn(3, 10)
    x[1, 4] = bad
    exc, _ = timed(HARD_LIMIT_S, H.zipper_linear, x, layer, mode="hybrid", gpu_part=part)
    assert type(exc) is ValueError and "x holds NaN or Inf" in str(exc)
    with pytest.raises(ValueError, match="x holds NaN or Inf"):
        H.zipper_linear(x, layer, mode="reference")
    assert_healthy_call(layer, monkeypatch)


def test_x_that_overflows_float32_once_smoothed_is_refused():
    rng = np.random.default_rng(11)
    codes, _ = make_layer(rng, 6, 10)
    w = H.ZipperWeights.prepare(codes, np.full(10, 1e-3), device="cpu")
    x = torch.full((2, 10), 1e38)
    with pytest.raises(ValueError, match="overflows float32"):
        within(HARD_LIMIT_S, H.zipper_linear, x, w, mode="hybrid", gpu_part=lambda x, w: torch.zeros(2, 6))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "5", True])
def test_join_timeout_must_be_a_positive_finite_number(bad):
    with pytest.raises(ValueError, match="join_timeout_s"):
        H.ZipperWeights.prepare(CODES, SMOOTH, device="cpu", join_timeout_s=bad)
    w = H.ZipperWeights.prepare(CODES, SMOOTH, device="cpu")
    w.join_timeout_s = bad
    with pytest.raises(ValueError, match="join_timeout_s"):
        H.zipper_linear(torch.randn(2, 10), w, mode="hybrid", gpu_part=H.reference_gpu_part)


def test_the_process_exits_while_a_worker_is_stuck_for_ever():
    """A stuck worker is a daemon thread: the interpreter still exits, with the caller's status."""
    script = (
        "import threading, numpy as np, torch\n"
        "import reference as R\n"
        "from zqkernels import hybrid as H\n"
        "from zqkernels.cpu import lut as L\n"
        "codes = R.zipper_quantize(np.random.default_rng(0).standard_normal((4, 8)) * 30, outlier_ratio=0.2)\n"
        "w = H.ZipperWeights.prepare(codes, None, device='cpu', join_timeout_s=0.2)\n"
        "L.lut_matmul = lambda *a, **k: threading.Event().wait()\n"
        "try:\n"
        "    H.zipper_linear(torch.randn(2, 8), w, mode='hybrid', gpu_part=H.reference_gpu_part)\n"
        "except TimeoutError as exc:\n"
        "    print('timed out:', exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "timed out: zipper_linear: the CPU part" in proc.stdout


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
        (lambda: H.zipper_linear(torch.randn(2, 10, dtype=torch.float64), W_CPU, mode="hybrid", gpu_part=H.reference_gpu_part), "dtype"),
        (lambda: H.zipper_linear(torch.randn(10, 2).T, W_CPU, mode="hybrid", gpu_part=H.reference_gpu_part), "contiguous"),
        (lambda: H.zipper_linear(torch.randn(2, 12), W_CPU, mode="hybrid", gpu_part=H.reference_gpu_part), "K=12"),
        (lambda: H.zipper_linear(torch.randn(10), W_CPU, mode="hybrid", gpu_part=H.reference_gpu_part), "2-D"),
        (lambda: H.zipper_linear(torch.randn(0, 10), W_CPU, mode="hybrid", gpu_part=H.reference_gpu_part), "at least one"),
        (lambda: H.zipper_linear(np.ones((2, 10), np.float32), W_CPU), "torch.Tensor"),
        (lambda: H.zipper_linear(torch.randn(2, 10), CODES), "ZipperWeights"),
        (lambda: H.zipper_linear(torch.randn(2, 10), W_CPU, mode="fast"), "mode"),
        (lambda: H.zipper_linear(torch.randn(2, 10), W_CPU, mode="hybrid"), "explicit gpu_part"),
        (lambda: H.zipper_linear(torch.randn(2, 10), W_CPU, mode="gpu"), "CUDA"),
        (lambda: H.zipper_linear(torch.randn(2, 10), W_CPU, mode="hybrid", gpu_part=lambda x, w: torch.zeros(2, 5)), "gpu_part returned"),
        (lambda: H.ZipperWeights.prepare(CODES, SMOOTH, device="cpu",
                                         lut=R.build_pattern_lut(np.zeros((6, 12), np.int8))), "another shape|built for shape"),
        (lambda: H.ZipperWeights.prepare(CODES, SMOOTH[:9], device="cpu"), "smooth"),
        (lambda: H.ZipperWeights.prepare(CODES, -SMOOTH, device="cpu"), "smooth"),
        (lambda: H.ZipperWeights.prepare(R.zipper_quantize(np.ones((3, 5))), None, device="cpu"), "even"),
        (lambda: H.ZipperWeights.prepare(CODES, SMOOTH, device="cpu", lut_dtype=np.float16), "lut_dtype"),
        (lambda: H.ZipperWeights.prepare(CODES, SMOOTH, device="cpu", cpu_threads=0), "cpu_threads"),
        (lambda: H.ZipperWeights.prepare(object(), None, device="cpu"), "ZipperCodes"),
        (lambda: H.ZipperWeights.prepare(CODES, np.full(10, 1e-300), device="cpu"), "smooth"),
        (lambda: H.ZipperWeights.prepare(CODES, np.full(10, 1e300), device="cpu"), "smooth"),
        (lambda: H.ZipperWeights.prepare(R.ZipperCodes(CODES.q_low.astype(np.float64) + 0.5, CODES.q_high, CODES.scale),
                                         None, device="cpu"), "q_low"),
        (lambda: H.ZipperWeights.prepare(R.ZipperCodes(CODES.q_low, CODES.q_high.astype(np.uint64) + np.uint64(2**63),
                                                       CODES.scale), None, device="cpu"), "q_high"),
        (lambda: H.ZipperWeights.prepare(R.ZipperCodes(CODES.q_low, CODES.q_high, np.full(6, 1e300)), None,
                                         device="cpu"), "too large"),
        (lambda: H.zipper_linear(torch.randn(2, 10), W_CPU, mode="hybrid", gpu_part=H.reference_gpu_part, out_dtype=torch.int32),
         "out_dtype"),
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
    assert np.all(np.abs(y.cpu().numpy() - H.reference_linear(x, w)) <= 4e-6 * low + gpu_high_bound(w) * high)


def gpu_high_bound(w):
    """mode="gpu"'s high part, relative to its magnitude: fp32 products and sums (1e-5), or for the
    dense layout X' rounded to bf16 (2**-9 per element) and summed on the tensor cores (test_zipper)."""
    return 2.0**-8 if w.high_gpu().method == "dense" else 1e-5


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
    assert np.all(np.abs(y_gpu_mode.numpy() - ref) <= 4e-6 * low + gpu_high_bound(w) * high)


DEVICE_X = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernels' device (CPU: interpreted)
# the fused GEMV's configs: one and a few tokens, a tile deeper than the activation groups, split K
FUSED_CONFIGS = [
    dict(variant="gemv", BLOCK_M=1, BLOCK_N=16, BLOCK_K=64, SPLIT_K=1, num_warps=4, num_stages=1),
    dict(variant="gemv", BLOCK_M=2, BLOCK_N=8, BLOCK_K=128, SPLIT_K=3, num_warps=4, num_stages=1),
    dict(variant="gemv", BLOCK_M=4, BLOCK_N=32, BLOCK_K=32, SPLIT_K=0, num_warps=2, num_stages=2),
]


def fused_bound(x, w):
    """The fused GEMV against the oracle: the low part's codes exact (the quantizer's), its sums and
    the activation scale in float32 (4e-6 of its magnitude, as the GPU part's), the high part's
    products exact and summed in float32 over at most K terms (2**-18 of its magnitude for K up to
    a few hundred; the float32 X' is the oracle's own)."""
    low, high = abs_bounds(x, w)
    return 4e-6 * low + 2.0**-18 * high


@pytest.mark.parametrize("ci", range(len(FUSED_CONFIGS)))
@settings(max_examples=examples(4), deadline=None)
@given(seed=st.integers(0, 2**32 - 1), m=st.sampled_from([1, 2, 3]), k2=st.sampled_from([4, 21, 32, 64]),
       act_group=st.sampled_from([None, 32, 64]), x_dtype=st.sampled_from([torch.float16, torch.float32]),
       huge=st.booleans())
def test_fused_gemv_is_the_oracles_zipper_product(ci, seed, m, k2, act_group, x_dtype, huge):
    """`zipper_high.zipper_gemv` (the low part quantized and multiplied, the dense high part on X',
    one launch) equals `reference.zipper_matmul` for drawn layers, K even or not a multiple of 8
    (the bytes path), activation groups, split K, one huge activation, all-zero tokens and layers
    without outliers."""
    from zqkernels.gpu.zipper_high import zipper_gemv
    from zqkernels.layouts import ZipperHighGPU

    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 40)), 2 * k2
    codes, s = make_layer(rng, n, k, outlier_cols=int(rng.integers(0, 4)), outlier_ratio=0.05)
    w = H.ZipperWeights.prepare(codes, s, device=DEVICE_X, act_group_size=act_group)
    high = ZipperHighGPU.from_codes(codes.q_high, codes.scale, DEVICE_X, method="dense")  # also when empty
    x = rng.standard_normal((m, k))
    if huge:
        x[0, rng.integers(k)] = 3e4
    if m > 1:
        x[-1] = 0.0  # an all-zero token: scale 0, codes 0
    xt = torch.from_numpy(x).to(x_dtype).to(DEVICE_X)
    y = zipper_gemv(xt, w.low_layout, high, w.inv_smooth, act_group, config=FUSED_CONFIGS[ci])
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert np.all(np.abs(y.cpu().numpy() - H.reference_linear(xt, w)) <= fused_bound(xt, w))


def test_fused_gemv_refuses_what_it_cannot_run():
    from zqkernels.gpu.zipper_high import zipper_gemv
    from zqkernels.layouts import ZipperHighGPU

    rng = np.random.default_rng(3)
    codes, s = make_layer(rng, 8, 32)
    w = H.ZipperWeights.prepare(codes, s, device=DEVICE_X)
    x = torch.randn(1, 32).to(DEVICE_X)
    high = w.high_gpu()
    ell = ZipperHighGPU.from_codes(codes.q_high, codes.scale, DEVICE_X, method="ell")
    bad_scale = dataclasses.replace(high, row_scale=high.row_scale * 2)
    for call, match in (
        (lambda: zipper_gemv(x, w.low_layout, ell, w.inv_smooth), "dense"),
        (lambda: zipper_gemv(x, w.low_layout, bad_scale, w.inv_smooth), "16 x low.scale"),
        (lambda: zipper_gemv(x, w.low_layout, high, w.inv_smooth, config=dict(FUSED_CONFIGS[0], variant="splitk")),
         "gemv"),
        (lambda: zipper_gemv(x[:, :30], w.low_layout, high, w.inv_smooth), "inv_smooth|K"),
        (lambda: zipper_gemv(torch.full_like(x, float("nan")), w.low_layout, high, w.inv_smooth), "NaN|finite"),
    ):
        with pytest.raises(ValueError, match=match):
            call()


@GPU
@needs_gpu
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("act_group", [None, 32])
@pytest.mark.parametrize("n, k", [(4096, 4096), (1024, 14336)])
def test_fused_gemv_llama_shapes_compiled(m, act_group, n, k):
    """The fused GEMV compiled at LLaMA widths on a split tile and, where the W4A4 table's bucket
    names its gemv, on those tiles (the layers' choice), against the oracle (the layouts built
    directly: no CPU table)."""
    from zqkernels.gpu.zipper_high import zipper_gemv
    from zqkernels.layouts import DenseInt4, ZipperHighGPU

    rng = np.random.default_rng(m + k)
    codes, s = make_layer(rng, n, k, outlier_cols=16, outlier_ratio=0.05)
    low = DenseInt4.from_codes(codes.q_low, codes.scale, None, "cuda")
    high = ZipperHighGPU.from_codes(codes.q_high, codes.scale, "cuda", method="dense")
    inv = torch.from_numpy(1.0 / s).float().cuda()
    x = torch.from_numpy(rng.standard_normal((m, k))).half().cuda()
    xs = (x.float() * inv).double().cpu().numpy()  # X' as the kernel forms it, float32
    ref = R.zipper_matmul(xs, codes, act_bits=4, act_group_size=act_group)
    qx, sx = R.quantize_activations(xs, group_size=act_group)
    scale = np.abs(codes.scale)
    mag_low = np.abs(R.dequantize(qx, sx, act_group)) @ (np.abs(codes.q_low.astype(np.float64)) * scale[:, None]).T
    mag_high = 16.0 * scale * (np.abs(xs) @ np.abs(codes.q_high.astype(np.float64)).T)
    bound = 4e-6 * mag_low + 2.0**-16 * mag_high  # float32 sums of up to 14,336 terms
    from zqkernels.gpu import configs

    table = configs.launch_config("w4a4", "group" if act_group else "per_token", m, x.device, n, k)
    for cfg in [dict(FUSED_CONFIGS[1], BLOCK_N=32, BLOCK_K=512)] + ([table] if table["variant"] == "gemv" else []):
        y = zipper_gemv(x, low, high, inv, act_group, config=cfg)
        assert np.all(np.abs(y.cpu().numpy() - ref) <= bound)


def test_the_default_mode_is_the_measured_fastest():
    """mode defaults to "gpu", which beat the hybrid at every shape and M measured."""
    import inspect
    import json

    assert inspect.signature(H.zipper_linear).parameters["mode"].default == "gpu"
    table = json.loads(H.AUTO_TABLE_PATH.read_text())
    modes = {e["mode"] for dev in table["devices"].values() for shape in dev["entries"].values() for e in shape.values()}
    assert modes == {"gpu"}


@pytest.mark.parametrize("gpu_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_join_adds_the_high_part_whatever_dtype_the_gpu_part_returns(gpu_dtype):
    """Every output dtype a GPU part may return (w4a4_gemm gives fp16 / bf16 / fp32) is joined
    with the CPU high part: the result equals the oracle within the GPU part's own rounding
    (half an ulp of its dtype on the low part) plus float32 of the table product."""
    rng = np.random.default_rng(21)
    codes, s = make_layer(rng, 12, 40)
    w = H.ZipperWeights.prepare(codes, s, device="cpu")
    x = torch.randn(5, 40)
    low = H.reference_gpu_part(x, w)  # float64 on the CPU
    y = H.zipper_linear(x, w, mode="hybrid", gpu_part=lambda xx, ww: H.reference_gpu_part(xx, ww).to(gpu_dtype),
                        out_dtype=torch.float64)
    ref = H.reference_linear(x, w)
    eps = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, torch.float64: 2.0**-53}[gpu_dtype]
    lo, hi = abs_bounds(x, w)
    tol = eps * np.abs(low.numpy()) + 2.0**-20 * (lo + hi) + 1e-30  # tolerance: low-part rounding + fp32 table
    assert np.all(np.abs(y.numpy() - ref) <= tol), gpu_dtype
    # the high part matters here, so a join that dropped or negated it would fail
    assert np.abs(ref - low.numpy()).max() > 100 * tol.max()
