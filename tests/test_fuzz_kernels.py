"""Properties of the CPU kernels and the hybrid executor under bad input and faults.

- `zqkernels.cpu.lut`: adversarial x / out / row_scale / token_tile / hand-built tables give a
  ValueError naming the argument, or the oracle's product (`reference.lut_matmul`), finite.
- `zqkernels.hybrid.zipper_linear` with a CPU stand-in for the GPU part, under a drawn fault in
  each part (raises, bad input, slow, slower than the join timeout, stuck for ever): the call
  returns the oracle's result or raises (ValueError for bad input, HybridError naming the part
  otherwise) within a hard limit, and the next healthy call is correct. Never a hang.
"""
from __future__ import annotations

import os
import re
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import reference as R
from zqkernels import hybrid as H
from zqkernels.cpu import lut as L

HARD_LIMIT_S = 10.0
REAL_LUT = L.lut_matmul


def within(limit_s, fn, *args, **kwargs):
    box = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test thread
            box["exc"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(limit_s)
    assert not t.is_alive(), f"did not return within {limit_s} s (a hang)"
    if "exc" in box:
        raise box["exc"]
    return box["value"]


def names_one_of(msg, names):
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", msg) for n in names)


# ------------------------------------------------------------------------------- cpu.lut
BAD_X = ["nan", "inf", "float16", "int64", "strided", "rank1", "wrong_k", "list"]
BAD_OUT = ["shape", "dtype", "readonly", "strided", "list"]
BAD_SCALE = ["nan", "inf", "int", "shape", "huge"]
BAD_TILE = [0, -3, 2.5, True, "8"]
BAD_LUT = ["float_patterns", "ids_out_of_range", "float_ids", "uint64_ids", "indptr_decreasing", "groups_out_of_range",
           "no_field"]


def _bad_x(kind, x):
    return {"nan": lambda: np.where(np.arange(x.size).reshape(x.shape) == 0, np.nan, x).astype(x.dtype),
            "inf": lambda: np.full_like(x, np.inf),
            "float16": lambda: x.astype(np.float16),
            "int64": lambda: x.astype(np.int64),
            "strided": lambda: np.repeat(x, 2, axis=1)[:, ::2],
            "rank1": lambda: x[0],
            "wrong_k": lambda: np.zeros((x.shape[0], x.shape[1] + 1), x.dtype),
            "list": lambda: x.tolist()}[kind]()


def _bad_lut(kind, lut):
    f = {k: getattr(lut, k) for k in ("indptr", "entry_ids", "entry_groups", "patterns", "pattern_groups",
                                      "group_size", "shape")}
    if kind == "float_patterns":
        f["patterns"] = f["patterns"].astype(np.float64) + 0.5
    elif kind == "ids_out_of_range":
        f["entry_ids"] = f["entry_ids"] + 10_000
    elif kind == "float_ids":
        f["entry_ids"] = f["entry_ids"].astype(np.float64) + 0.25
    elif kind == "uint64_ids":
        f["entry_ids"] = f["entry_ids"].astype(np.uint64) + np.uint64(2**63)
    elif kind == "indptr_decreasing":
        f["indptr"] = f["indptr"][::-1].copy()
    elif kind == "groups_out_of_range":
        f["pattern_groups"] = f["pattern_groups"] + 1000
    else:
        return object()
    return R.PatternLUT(**f)


@settings(max_examples=int(os.environ.get("ZQ_FUZZ_EXAMPLES", 60)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), m=st.integers(1, 40), n=st.integers(1, 12), k=st.integers(1, 20),
       g=st.sampled_from([1, 3, 4]), dtype=st.sampled_from([np.float32, np.float64]),
       fault=st.sampled_from([None] * 4 + [("x", b) for b in BAD_X] + [("out", b) for b in BAD_OUT]
                             + [("row_scale", b) for b in BAD_SCALE] + [("token_tile", b) for b in BAD_TILE]
                             + [("lut", b) for b in BAD_LUT]))
@example(seed=0, m=1, n=1, k=1, g=1, dtype=np.float32, fault=("x", "strided"))  # a contiguous "strided" view
def test_cpu_lut_refuses_naming_the_argument_or_equals_the_oracle(seed, m, n, k, g, dtype, fault):
    rng = np.random.default_rng(seed)
    q = (rng.integers(-3, 4, (n, k)) * (rng.random((n, k)) < 0.4)).astype(np.int8)
    ref_lut = R.build_pattern_lut(q, group_size=g)
    x = (rng.standard_normal((m, k)) * 3).astype(dtype)
    lut, out, scale, tile = ref_lut, None, rng.uniform(0.5, 2, n), None
    if fault is not None:
        arg, kind = fault
        if arg == "x":
            x = _bad_x(kind, x)
            if kind == "strided" and x.flags.c_contiguous:  # one column: a strided view is contiguous, valid
                fault = None
        elif arg == "out":
            out = {"shape": np.zeros((m, n + 1), dtype), "dtype": np.zeros((m, n), np.float16),
                   "readonly": np.zeros((m, n), dtype), "strided": np.zeros((m, 2 * n), dtype)[:, ::2],
                   "list": [[0.0] * n] * m}[kind]
            if kind == "readonly":
                out.flags.writeable = False
            if kind == "strided" and out.flags.c_contiguous:  # one element per row or column: a valid out
                fault = None
        elif arg == "row_scale":
            scale = {"nan": np.full(n, np.nan), "inf": np.full(n, np.inf), "int": np.ones(n, np.int64),
                     "shape": np.ones(n + 1), "huge": np.full(n, 1e300)}[kind]
        elif arg == "token_tile":
            tile = kind
        else:
            lut = _bad_lut(kind, ref_lut)
            value_faults = {"ids_out_of_range": ref_lut.entry_ids, "uint64_ids": ref_lut.entry_ids,
                            "groups_out_of_range": ref_lut.pattern_groups}
            if (kind in value_faults and value_faults[kind].size == 0) or (
                    kind == "indptr_decreasing" and np.array_equal(ref_lut.indptr, ref_lut.indptr[::-1])):
                fault = None  # nothing to corrupt in an empty table: still a valid one
    try:
        y = within(HARD_LIMIT_S, L.lut_matmul, x, lut, out=out, row_scale=scale, token_tile=tile)
    except ValueError as exc:
        assert fault is not None, f"valid input refused: {exc}"
        names = {"x": ["x"], "out": ["out"], "row_scale": ["row_scale"], "token_tile": ["token_tile"],
                 "lut": ["lut"]}[fault[0]]
        assert names_one_of(str(exc), names), f"{exc!r} does not name {names}"
        return
    if fault is not None and fault[0] == "row_scale" and fault[1] == "huge" and dtype == np.float64:
        pass  # 1e300 is a valid float64 scale
    else:
        assert fault is None, f"{fault} accepted"
    assert np.all(np.isfinite(y)), "a silent NaN"
    want = R.lut_matmul(x.astype(np.float64), ref_lut) * np.asarray(scale, np.float64)[None, :]
    bound = (g + int(np.diff(ref_lut.indptr).max(initial=0)) + 3) * (2.0**-23 if dtype == np.float32 else 2.0**-52) * (
        np.abs(x.astype(np.float64)) @ np.abs(q.astype(np.float64)).T) * np.abs(scale)[None, :]
    assert np.all(np.abs(y - want) <= bound + 1e-300)  # float rounding of the table and the sums


def test_sparse_matmul_and_prepare_csr_refuse_bad_codes():
    x = np.ones((2, 4))
    for q, name in ((np.full((2, 4), 0.5), "q_high"), (np.full((2, 4), 2**64 - 1, np.uint64), "q_high"),
                    (np.full((2, 4), 300), "q_high")):
        with pytest.raises(ValueError, match=name):
            L.sparse_matmul(x, q)
    with pytest.raises(ValueError, match="x holds NaN"):
        L.sparse_matmul(np.full((2, 4), np.nan), np.ones((2, 4), np.int8))


# ------------------------------------------------------------------------------- hybrid faults
TIMEOUT_S = 0.15
CPU_FAULTS = ["ok", "raise", "raise_value", "slow", "late", "stuck"]
GPU_FAULTS = ["ok", "raise", "raise_value", "bad_shape", "not_tensor"]


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 12))
    w[:, 2] *= 40
    codes = R.zipper_quantize(w, outlier_ratio=0.2)
    return H.ZipperWeights.prepare(codes, np.exp(0.2 * rng.standard_normal(12)), device="cpu",
                                   lut_dtype=np.float64, join_timeout_s=TIMEOUT_S)


@pytest.fixture(scope="module")
def release():
    ev = threading.Event()
    yield ev
    ev.set()  # no stuck stand-in outlives the module


def _cpu_stand_in(fault, release):
    def run(x, lut, out=None, row_scale=None, **kwargs):
        if fault == "raise":
            raise RuntimeError("cpu part failed on purpose")
        if fault == "raise_value":
            raise ValueError("x holds NaN or Inf")
        if fault == "slow":
            time.sleep(TIMEOUT_S / 5)
        if fault == "late":
            time.sleep(TIMEOUT_S * 3)
            out[...] = np.nan  # written after the caller gave up: must reach no one
            return out
        if fault == "stuck":
            release.wait(120)
            return out
        return REAL_LUT(x, lut, out=out, row_scale=row_scale, **kwargs)

    return run


def _gpu_stand_in(fault):
    def run(x, weights):
        if fault == "raise":
            raise RuntimeError("gpu part failed on purpose")
        if fault == "raise_value":
            raise ValueError("x holds NaN or Inf")
        if fault == "bad_shape":
            return torch.zeros(x.shape[0], 5)
        if fault == "not_tensor":
            return np.zeros((x.shape[0], 6))
        return H.reference_gpu_part(x, weights)

    return run


@settings(max_examples=int(os.environ.get("ZQ_FUZZ_EXAMPLES", 30)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cpu=st.sampled_from(CPU_FAULTS), gpu=st.sampled_from(GPU_FAULTS), nan_x=st.booleans(),
       m=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_hybrid_under_any_fault_returns_the_oracle_or_raises_naming_the_part_never_hangs(
        layer, release, monkeypatch, cpu, gpu, nan_x, m, seed):
    layer.join_timeout_s = TIMEOUT_S
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((m, 12)) * 2).float()
    if nan_x:
        x[m // 2, 5] = float("nan")
    monkeypatch.setattr(L, "lut_matmul", _cpu_stand_in(cpu, release))
    t0 = time.perf_counter()
    try:
        y = within(HARD_LIMIT_S, H.zipper_linear, x, layer, mode="hybrid", gpu_part=_gpu_stand_in(gpu), out_dtype=torch.float64)
        exc = None
    except Exception as e:  # noqa: BLE001 - classified below
        exc, y = e, None
    elapsed = time.perf_counter() - t0
    assert elapsed < TIMEOUT_S + 5.0, f"took {elapsed:.2f} s, the bound is join_timeout_s={TIMEOUT_S}"
    clean = cpu in ("ok", "slow") and gpu == "ok" and not nan_x
    if clean:
        assert exc is None, f"a healthy call failed: {exc!r}"
        ref = H.reference_linear(x, layer)
        assert np.all(np.isfinite(y.numpy()))
        assert np.allclose(y.numpy(), ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max(initial=1.0))
    else:
        assert exc is not None, f"cpu={cpu} gpu={gpu} nan_x={nan_x}: a result came back"
        if isinstance(exc, ValueError):
            # bad input (NaN x, named by either part or the executor's own check) or a bad gpu_part output
            assert "x holds NaN or Inf" in str(exc) or "gpu_part returned" in str(exc), exc
            assert nan_x or "raise_value" in (cpu, gpu) or gpu in ("bad_shape", "not_tensor")
        else:
            assert isinstance(exc, H.HybridError), f"unexpected {type(exc).__name__}: {exc}"
            text = str(exc)
            assert ("CPU part" in text) or ("GPU part" in text), text
            if cpu in ("late", "stuck") and not nan_x:  # NaN x: the worker refuses it before the stand-in runs
                assert isinstance(exc, TimeoutError) or "did not finish" in text
                assert f"join_timeout_s={TIMEOUT_S:g}" in text and "waited" in text
    # whatever happened, the next healthy call is correct and prompt
    monkeypatch.setattr(L, "lut_matmul", REAL_LUT)
    layer.join_timeout_s = 30.0
    x2 = torch.randn(3, 12)
    y2 = within(HARD_LIMIT_S, H.zipper_linear, x2, layer, mode="hybrid", gpu_part=H.reference_gpu_part, out_dtype=torch.float64)
    ref2 = H.reference_linear(x2, layer)
    assert np.allclose(y2.numpy(), ref2, rtol=1e-9, atol=1e-9 * np.abs(ref2).max(initial=1.0))


def test_no_worker_thread_keeps_the_process_alive():
    """Whatever the fault tests above left behind is a daemon thread (the interpreter can exit)."""
    lingering = [t for t in threading.enumerate() if t.name.startswith("zq-lut")]
    assert all(t.daemon for t in lingering), [t.name for t in lingering if not t.daemon]
