"""The GPU timing harness of perf/conftest.py and perf/timing.py, run without a GPU: CUDA calls
and do_bench stubbed, so CI checks what it records (fields, graph fallback, pedantic rounds,
speedups) and that the scripts outside pytest time through the same module."""
import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "perf"))
import timing  # noqa: E402


@pytest.fixture
def harness_mod(monkeypatch):
    spec = importlib.util.spec_from_file_location("zq_perf_conftest_under_test", ROOT / "perf" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.timing is timing  # the harness times through perf/timing.py, not a copy
    monkeypatch.setattr(mod.torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(mod, "device_name", lambda: "Stub GPU")
    calls = {"bench": []}

    def fake_do_bench(fn, warmup_ms, rep_ms):
        fn()
        calls["bench"].append(fn)
        return 0.010 if getattr(fn, "is_graph", False) else 0.015  # ms: graph 10 us, eager 15 us

    class Graph:
        def replay(self):
            calls.setdefault("replays", 0)
            calls["replays"] += 1

    def fake_capture(fns):
        if calls.get("capture_fails"):
            raise RuntimeError("operation not permitted when stream is capturing")
        g = Graph()
        g.replay.__func__.is_graph = True
        return g

    monkeypatch.setattr(timing, "do_bench_median_ms", fake_do_bench)
    monkeypatch.setattr(timing, "capture_graph", fake_capture)
    return mod, calls


class FakeBenchmark:
    def __init__(self, timer):
        self.extra_info = {}
        self._timer = timer
        self.pedantic_calls = []

    def pedantic(self, target, rounds, warmup_rounds, iterations):
        self.pedantic_calls.append((rounds, warmup_rounds, iterations))
        target()


class FakeConfig:
    def __init__(self, mod, no_graph=False):
        self.stash = {mod._RECORDS: []}
        self.opts = {"--bench-warmup-ms": 5.0, "--bench-rep-ms": 25.0, "--no-cuda-graph": no_graph}

    def getoption(self, name):
        return self.opts[name]


def _shape():
    from shapes import SHAPES_BY_NAME

    return SHAPES_BY_NAME["llama3-8b.o"]


def test_gpu_harness_records_graph_time_rates_and_speedups(harness_mod):
    mod, calls = harness_mod
    config, shape, m = FakeConfig(mod), _shape(), 16
    records = []
    for method, role in (("cublas_fp16", "baseline"), ("zq_w4a4", "ours"), ("zq_actquant", "component")):
        bench = FakeBenchmark(mod.cuda_synchronized_perf_counter)
        h = mod.Harness(bench, config)
        info = h.gpu(lambda: None, family="x", method=method, role=role, shape=shape, m=m,
                     flops=2 * m * shape.n * shape.k, bytes_moved=10_000_000, ops_unit="TOPS")
        assert bench.pedantic_calls == [(200, 2, 1)]  # 25 ms / 10 us, capped at 200 rounds
        records.append(info)
    info = records[1]
    assert info["timer"] == "cuda-events do_bench median" and info["primary_mode"] == "graph"
    assert info["time_us"] == pytest.approx(10.0) and info["time_us_eager"] == pytest.approx(15.0)
    assert info["time_us_graph"] == pytest.approx(10.0) and info["graph_error"] is None
    assert (info["shape"], info["M"], info["N"], info["K"], info["device"]) == ("llama3-8b.o", 16, 4096, 4096, "Stub GPU")
    assert info["gbps"] == pytest.approx(10_000_000 / 10e-6 / 1e9)
    assert info["tflops"] == pytest.approx(2 * 16 * 4096 * 4096 / 10e-6 / 1e12) and info["ops_unit"] == "TOPS"
    assert len(config.stash[mod._RECORDS]) == 3

    # the end-of-run hook: baseline time / this time, over baselines of the same shape and M only
    records[0]["time_us"] = 30.0
    mod._fill_speedups(config.stash[mod._RECORDS])
    assert records[1]["speedup"] == {"cublas_fp16": pytest.approx(3.0)}
    assert records[1]["speedup_eager"] == {"cublas_fp16": pytest.approx(1.0)}
    assert records[0]["speedup"] == {} and records[2]["speedup"] == {}


def test_failed_capture_falls_back_to_eager_and_says_why(harness_mod):
    mod, calls = harness_mod
    calls["capture_fails"] = True
    bench = FakeBenchmark(mod.cuda_synchronized_perf_counter)
    info = mod.Harness(bench, FakeConfig(mod)).gpu(lambda: None, family="x", method="y", role="ours",
                                                  shape=_shape(), m=1, bytes_moved=1000)
    assert info["primary_mode"] == "eager" and info["time_us"] == pytest.approx(15.0)
    assert "stream is capturing" in info["graph_error"] and info["tflops"] is None


def test_uncapturable_and_no_graph_option(harness_mod):
    mod, _ = harness_mod
    info = mod.Harness(FakeBenchmark(mod.cuda_synchronized_perf_counter), FakeConfig(mod)).gpu(
        lambda: None, family="x", method="hybrid", role="ours", shape=_shape(), m=1, bytes_moved=1, graph=False)
    assert info["primary_mode"] == "eager" and "not capturable" in info["graph_error"]
    info = mod.Harness(FakeBenchmark(mod.cuda_synchronized_perf_counter), FakeConfig(mod, no_graph=True)).gpu(
        lambda: None, family="x", method="y", role="ours", shape=_shape(), m=1, bytes_moved=1)
    assert info["graph_error"] == "--no-cuda-graph"


def test_foreign_timer_gets_a_synchronizing_target(harness_mod):
    mod, _ = harness_mod
    synced = []
    mod.torch.cuda.synchronize = lambda *a, **k: synced.append(1)  # monkeypatch restores it
    bench = FakeBenchmark(timer=lambda: 0.0)
    mod.Harness(bench, FakeConfig(mod)).gpu(lambda: None, family="x", method="y", role="ours", shape=_shape(),
                                            m=1, bytes_moved=1)
    n_with_target = len(synced)
    bench2 = FakeBenchmark(mod.cuda_synchronized_perf_counter)
    synced.clear()
    mod.Harness(bench2, FakeConfig(mod)).gpu(lambda: None, family="x", method="y", role="ours", shape=_shape(),
                                             m=1, bytes_moved=1)
    assert n_with_target == len(synced) + 1  # the wrapped target synchronized once more


def test_graph_median_is_per_call_and_bad_arguments_are_refused(monkeypatch):
    replays = []

    class Graph:
        def replay(self):
            replays.append(1)

    monkeypatch.setattr(timing, "capture_graph", lambda calls: Graph())
    monkeypatch.setattr(timing, "do_bench_median_ms", lambda fn, w, r: (fn(), 0.03)[1])
    assert timing.graph_median_ms([lambda: None] * 3) == pytest.approx(0.01)  # one replay holds 3 calls
    assert replays == [1]
    with pytest.raises(ValueError, match="fns"):
        timing.graph_median_ms([])
    with pytest.raises(ValueError, match="reps"):
        timing.wall_median_ms(lambda: None, 0, sync=False)


def test_wall_median_without_sync_times_host_work():
    calls = []
    median, best = timing.wall_median_ms(lambda: calls.append(1), 5, sync=False)
    assert len(calls) == 6 and 0 <= best <= median  # one untimed call, then five timed


PRIVATE_TIMERS = ("do_bench", "perf_counter", "Event", "CUDAGraph", "elapsed_time")


@pytest.mark.parametrize("script", ["hybrid_device.py", "pipeline_device.py", "models_device.py"])
def test_device_scripts_have_no_timer_of_their_own(script):
    """The scripts run outside pytest time through perf/timing.py: no do_bench call, CUDA event,
    graph capture or wall clock of their own (the time budget's clock is `time.time`)."""
    tree = ast.parse((ROOT / "perf" / script).read_text())
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & set(PRIVATE_TIMERS), sorted(names & set(PRIVATE_TIMERS))
    defs = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert not defs & {"do_bench_ms", "wall_median_ms", "event_ms", "bench_graph", "bench_eager"}
