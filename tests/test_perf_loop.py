"""The kernel developer's loop of perf/README.md works, on a CPU benchmark (no GPU needed):

    pytest perf/ -k <name> --benchmark-autosave
    pytest perf/ -k <name> --benchmark-compare --benchmark-compare-fail=median:10%

and `pytest perf/` without a GPU skips the GPU benchmarks with a reason and still writes valid
JSON. The saved run is edited to stand for a faster or slower past, so the outcome is decided by
the comparison, not by this machine's timing noise.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CPU_BENCH = "oracle_w4a4"  # perf/bench_w4a4.py::test_oracle_w4a4_cpu, the numpy oracle on a tiny layer

sys.path.insert(0, str(ROOT / "perf"))
from shapes import DEFAULT_SHAPES, SHAPES, select_m, select_shapes  # noqa: E402


def pytest_perf(*args, timeout=300):
    cmd = [sys.executable, "-m", "pytest", "perf/", "-q", "-p", "no:cacheprovider", *map(str, args)]
    # a run of this file under pytest-xdist must not pass its worker's identity on: pytest-benchmark
    # disables itself in a process that looks like an xdist worker
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _scale_saved_stats(storage: Path, factor: float):
    saved = sorted(storage.rglob("*.json"))
    assert len(saved) == 1, saved
    data = json.loads(saved[0].read_text())
    for bench in data["benchmarks"]:
        for key in ("min", "max", "mean", "median", "q1", "q3", "stddev", "iqr", "ld15iqr", "hd15iqr", "total"):
            if isinstance(bench["stats"].get(key), (int, float)):
                bench["stats"][key] *= factor
    saved[0].write_text(json.dumps(data))


def test_autosave_then_compare_fails_on_regression_and_passes_otherwise(tmp_path):
    storage = tmp_path / "bench"
    store = f"--benchmark-storage=file://{storage}"
    first = pytest_perf("-k", CPU_BENCH, "--benchmark-autosave", store, "--benchmark-max-time=0.1")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "1 passed" in first.stdout

    _scale_saved_stats(storage, 100.0)  # the saved run was 100x slower: now is an improvement
    ok = pytest_perf("-k", CPU_BENCH, store, "--benchmark-compare", "--benchmark-compare-fail=median:10%",
                     "--benchmark-max-time=0.1")
    assert ok.returncode == 0, ok.stdout + ok.stderr

    _scale_saved_stats(storage, 1e-4)  # now 100x faster than this run: a regression
    bad = pytest_perf("-k", CPU_BENCH, store, "--benchmark-compare", "--benchmark-compare-fail=median:10%",
                      "--benchmark-max-time=0.1")
    assert bad.returncode != 0
    assert "Performance has regressed" in bad.stdout + bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_without_gpu_gpu_benchmarks_skip_with_reason_and_json_stays_valid(tmp_path):
    out = tmp_path / "out.json"
    proc = pytest_perf("-k", "w4a4 and not oracle", "--m", "1", "--benchmark-json", out, "-rs")
    assert proc.returncode in (0, 5), proc.stdout + proc.stderr  # everything skipped
    assert "no CUDA GPU on this machine" in proc.stdout
    data = json.loads(out.read_text())
    assert data["benchmarks"] == []
    assert data["zq_perf"]["skipped"] and all("no CUDA GPU" in s["reason"] for s in data["zq_perf"]["skipped"])

    out2 = tmp_path / "cpu.json"
    proc = pytest_perf("-k", "w4a4", "--m", "1", "--benchmark-json", out2, "--benchmark-max-time=0.1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out2.read_text())
    [bench] = data["benchmarks"]
    assert bench["extra_info"]["method"] == "oracle_w4a4" and bench["extra_info"]["time_us"] > 0


def test_shape_and_m_selection():
    assert [s.name for s in select_shapes(None)] == list(DEFAULT_SHAPES)
    assert len(select_shapes("all")) == len(SHAPES) == 16
    assert {s.name for s in select_shapes("*.down")} == {"llama3-8b.down", "qwen3-8b.down"}
    assert all(s.model == "qwen3-8b" for s in select_shapes("qwen3-8b")) and len(select_shapes("qwen3-8b")) == 8
    by = {s.name: (s.n, s.k) for s in SHAPES}
    assert by["llama3-8b.gate_up"] == (28672, 4096) and by["llama3-8b.down"] == (4096, 14336)
    assert by["qwen3-8b.kv"] == (1024, 4096) and by["qwen3-8b.gate_up"] == (24576, 4096)
    assert by["qwen3-8b.qkv"] == (6144, 4096) and by["qwen3-8b.down"] == (4096, 12288)
    with pytest.raises(ValueError, match="matches no shape"):
        select_shapes("gpt5.q")
    assert select_m("1, 4096") == [1, 4096] and select_m(None) == [1, 16, 64, 256, 1024, 4096]
    with pytest.raises(ValueError, match="--m"):
        select_m("0")


def test_bad_option_is_a_usage_error():
    proc = pytest_perf("--shapes", "nonsense", "--collect-only")
    assert proc.returncode == 4 and "matches no shape" in proc.stdout + proc.stderr


def test_a_bench_file_named_on_the_command_line_is_collected_once():
    def collect(target):
        proc = subprocess.run([sys.executable, "-m", "pytest", target, "--collect-only", "-q", "-p",
                               "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        return [line for line in proc.stdout.splitlines() if line.startswith("perf/bench_w4a4.py::")]

    from_file, from_folder = collect("perf/bench_w4a4.py"), collect("perf/")
    assert from_file and len(from_file) == len(set(from_file))
    assert sorted(from_file) == sorted(from_folder)
