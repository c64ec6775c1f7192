"""CPU benchmark of ZipperQuant's high part: pattern-LUT product vs the direct CSR product.

Compared, on the same data with the same thread count (all cores, `numba.set_num_threads` and
`torch.set_num_threads`):
  lut          zqkernels.cpu.lut.lut_matmul (build the per-token table, gather and add)
  sparse       zqkernels.cpu.lut.sparse_matmul (direct CSR, the same tiling and loops)
  scipy_csr    scipy.sparse.csr_matrix(q_high) @ x.T (single-threaded: scipy has no threads)
  torch_csr    torch.sparse_csr_tensor(q_high) @ x.T
Inputs:
  synthetic    q_high [4096, 4096] (the llama3-8b.o shape) with column-concentrated outliers: 32
               outlier groups of 4 channels, each row hits a group with probability 1/2 and takes
               one pattern from a palette of size hits / reuse, so E/U is the target reuse; 3/4 of
               a pattern's slots are nonzero (nnz/E ~ 3). Reuse 1, 2, 4, ..., 64 shows the crossover.
  realish      q_high of a llama3-8b.o-shaped layer: Gaussian weights, activation channel scales
               lognormal with 12 massive outlier channels, SmoothQuant alpha 0.8,
               reference.zipper_quantize(outlier_ratio=0.01). Its outliers are scattered, so a
               pattern holds one nonzero (nnz/E ~ 1.0): the table's saving is bounded by nnz/E.
Every result's extra_info: E, U, reuse (E/U), nnz, nnz_per_entry, M, N, K, shape, dtype, threads,
time_us (median), time_us_min, and on the `lut` result `ratio` = t_sparse / t_lut (median) with
`ratio_min` (min) and `ratio_vs` for every baseline; each baseline result gets `lut_speedup`.
`lut` runs after its baselines (parametrize order); alone (`-k lut`) it has no ratio.

Command (the 2-core development machine; pass the folder `perf/`, not the file, which the perf
conftest would collect twice), once per thread count:
    ZQ_BENCH_THREADS=1 python -m pytest perf/ -k bench_lut --m 1,64,1024 -p no:cacheprovider \
        --benchmark-min-rounds=15 --benchmark-json reports/results/cpu-2core/bench_lut.json
    ZQ_BENCH_THREADS=2 ... --benchmark-json reports/results/cpu-2core/bench_lut_2threads.json
    python perf/bench_lut.py reports/results/cpu-2core/bench_lut.json    # the summary table
(the committed JSONs have the per-round `stats.data` arrays dropped, see bench_lut.md there).
"""
from __future__ import annotations

import os

import numba
import numpy as np
import pytest
import scipy.sparse
import torch

import reference as R
from shapes import SHAPES_BY_NAME
from zqkernels.cpu import lut as L

# ZQ_BENCH_THREADS pins the thread count (both kernels, torch); default all cores. On a shared
# 2-core machine the 1-thread run is the stable one: a 2-thread parallel region stalls whenever
# another process holds one of the cores.
THREADS = int(os.environ.get("ZQ_BENCH_THREADS", numba.config.NUMBA_NUM_THREADS))
SHAPE_NAME = "llama3-8b.o"
N, K = SHAPES_BY_NAME[SHAPE_NAME].n, SHAPES_BY_NAME[SHAPE_NAME].k
REUSES = (1, 2, 4, 8, 16, 32, 64)
METHODS = ("sparse", "scipy_csr", "torch_csr", "lut")  # lut last: it reads its baselines' times
DTYPES = {"float32": np.float32}

_TIMES: dict = {}
_RECORDS: dict = {}
_DATA: dict = {}


def synthetic_high(n, k, reuse, g=4, outlier_groups=32, hit_rate=0.5, fill=0.75, seed=0):
    """Column-concentrated outliers with E/U close to `reuse` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    q = np.zeros((n, k), np.int8)
    for j in rng.choice(k // g, outlier_groups, replace=False):
        rows = np.nonzero(rng.random(n) < hit_rate)[0]
        p = max(1, int(round(len(rows) / reuse)))
        vals = rng.integers(1, 8, (p, g)) * rng.choice([-1, 1], (p, g)) * (rng.random((p, g)) < fill)
        vals[~vals.any(axis=1), 0] = 1
        pick = np.arange(len(rows)) % p  # every palette pattern used: E/U close to the target
        rng.shuffle(pick)
        q[rows, j * g:(j + 1) * g] = vals[pick]
    return q


def realish_high(n, k, alpha=0.8, seed=0):
    """q_high of a smoothed, ZipperQuant-quantized Gaussian layer with LLaMA-like activation outliers."""
    rng = np.random.default_rng(seed)
    act = np.exp(rng.normal(0.0, 0.6, k))
    big = rng.choice(k, 12, replace=False)
    act[big] *= rng.uniform(20, 100, 12)
    w = rng.standard_normal((n, k)) * np.exp(rng.normal(0.0, 0.2, (1, k))) * 0.02
    s = R.smooth_scales(act, np.abs(w).max(axis=0), alpha=alpha)
    return R.zipper_quantize(w * s, outlier_ratio=0.01).q_high


def _case(name):
    if name not in _DATA:
        q = realish_high(N, K) if name == "realish" else synthetic_high(N, K, int(name.removeprefix("reuse")))
        lut = R.build_pattern_lut(q, group_size=4)
        stats = L.lut_stats(lut)
        _DATA[name] = {
            "q": q,
            "lut": L.prepare_lut(lut),
            "csr": L.prepare_csr(q),
            "scipy": scipy.sparse.csr_matrix(q.astype(np.float32)),
            "torch": torch.from_numpy(q.astype(np.float32)).to_sparse_csr(),
            "stats": {key: stats[key] for key in ("E", "U", "reuse", "nnz", "nnz_per_entry", "build_per_entry",
                                                  "index_bytes", "table_bytes_per_token", "patterns_per_group_max")},
        }
    return _DATA[name]


def _call(method, data, x):
    if method == "lut":
        return lambda: L.lut_matmul(x, data["lut"])
    if method == "sparse":
        return lambda: L.sparse_matmul(x, data["csr"])
    if method == "scipy_csr":
        return lambda: data["scipy"] @ x.T
    if method == "torch_csr":
        xt = torch.from_numpy(x)
        return lambda: data["torch"] @ xt.T
    raise AssertionError(method)


def _expected(case, m, x):
    """float64 direct product and the float32 rounding bound of verify/test_lut.py, once per (case, M)."""
    key = ("expect", case, m)
    if key not in _DATA:
        data = _case(case)
        x64 = x.astype(np.float64)
        csr_abs = L.prepare_csr(np.abs(data["q"].astype(np.int16)))
        terms = 4 + int(np.diff(data["csr"].indptr).max()) + 2
        _DATA[key] = (L.sparse_matmul(x64, data["csr"]), terms * 2.0**-23 * L.sparse_matmul(np.abs(x64), csr_abs))
    return _DATA[key]


CASES = [f"reuse{r}" for r in REUSES] + ["realish"]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES)
def test_lut_vs_csr(zq_bench, case, method, dtype, m):
    numba.set_num_threads(THREADS)
    torch.set_num_threads(THREADS)
    data = _case(case)
    x = np.random.default_rng(m).standard_normal((m, K)).astype(DTYPES[dtype])
    fn = _call(method, data, x)
    got = fn()
    got = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    got = got.T if method in ("scipy_csr", "torch_csr") else got  # those return [N, M]
    expect, bound = _expected(case, m, x)
    assert np.all(np.abs(got - expect) <= bound), f"{method} disagrees with the direct product"
    threads = 1 if method == "scipy_csr" else THREADS
    info = zq_bench.cpu(
        fn, family="lut", method=method, role="baseline" if method != "lut" else "ours",
        shape_name=f"{SHAPE_NAME}.{case}", m=m, n=N, k=K, dtype=dtype, case=case, threads=threads,
        notes=[f"numba threading layer {numba.threading_layer()}", f"os.cpu_count()={os.cpu_count()}"],
        **data["stats"],
    )
    stats = zq_bench.benchmark.stats.stats
    info["time_us_min"] = stats.min * 1e6
    key = (case, m, dtype)
    _TIMES.setdefault(key, {})[method] = (stats.median, stats.min)
    _RECORDS.setdefault(key, {})[method] = info
    if method == "lut":
        t_lut, t_lut_min = _TIMES[key]["lut"]
        info["ratio_vs"] = {b: med / t_lut for b, (med, _) in _TIMES[key].items() if b != "lut"}
        info["ratio_vs_min"] = {b: mn / t_lut_min for b, (_, mn) in _TIMES[key].items() if b != "lut"}
        if "sparse" in _TIMES[key]:
            info["ratio"] = info["ratio_vs"]["sparse"]
            info["ratio_min"] = info["ratio_vs_min"]["sparse"]
        for b, rec in _RECORDS[key].items():
            if b != "lut":
                rec["lut_speedup"] = info["ratio_vs"][b]


def summarize(json_path):
    """Markdown table of a bench_lut JSON: per (case, M) the E/U, nnz/E, times and the lut ratios."""
    import json

    rows = {}
    for b in json.load(open(json_path))["benchmarks"]:
        info = b["extra_info"]
        if info.get("family") != "lut":
            continue
        key = (info["case"], info["M"], info["dtype"])
        rows.setdefault(key, {"info": info})[info["method"]] = (info["time_us"], info["time_us_min"])
    order = {c: i for i, c in enumerate(CASES)}
    lines = ["| case | E/U | nnz/E | M | lut us (med/min) | sparse us | scipy us (1 thread) | torch us | "
             "lut/sparse (med) | lut/sparse (min) | lut/torch (min) |", "|" + "---|" * 11]
    for (case, m, dtype), r in sorted(rows.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
        info = r["info"]

        def t(name):
            return f"{r[name][0]:.0f}/{r[name][1]:.0f}" if name in r else "-"

        def ratio(name, i):
            return f"{r[name][i] / r['lut'][i]:.2f}" if name in r and "lut" in r else "-"

        lines.append(f"| {case} | {info['reuse']:.1f} | {info['nnz_per_entry']:.2f} | {m} | {t('lut')} | {t('sparse')} | "
                     f"{t('scipy_csr')} | {t('torch_csr')} | {ratio('sparse', 0)} | {ratio('sparse', 1)} | {ratio('torch_csr', 1)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(summarize(sys.argv[1] if len(sys.argv) > 1 else "reports/results/cpu-2core/bench_lut.json"))
