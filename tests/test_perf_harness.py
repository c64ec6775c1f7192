"""The GPU timing harness of perf/conftest.py and perf/timing.py, run without a GPU: CUDA calls
and do_bench stubbed, so CI checks what it records (fields, graph fallback, back-to-back replays
over the copies a factory makes, pedantic rounds, speedups) and that the scripts outside pytest
time through the same module."""
import ast
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

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
    monkeypatch.setattr(timing, "l2_cache_bytes", lambda device=None: L2)
    calls = {"bench": [], "captured": []}

    def fake_do_bench(fn, warmup_ms, rep_ms):
        fn()
        calls["bench"].append(fn)
        n = getattr(fn, "calls", None)  # a graph's replay: a fixed 6 us, then 4 us per call
        return 0.015 if n is None else 0.006 + 0.004 * n  # ms; eager 15 us, a one-call replay 10 us

    class Graph:
        def __init__(self, fns):
            def replay():
                for f in fns:
                    f()

            replay.calls = len(fns)
            self.replay = replay

    def fake_capture(fns):
        fns = timing._as_calls(fns)
        calls["captured"].append(len(fns))
        if calls.get("capture_fails"):
            raise RuntimeError("operation not permitted when stream is capturing")
        if len(fns) > 1 and calls.get("back_to_back_fails"):
            raise RuntimeError("CUDA out of memory")
        return Graph(fns)

    monkeypatch.setattr(timing, "do_bench_median_ms", fake_do_bench)
    monkeypatch.setattr(timing, "capture_graph", fake_capture)
    return mod, calls


L2 = 50 * 2**20  # an H100's L2 size, as the driver reports it


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
        self.opts = {"--bench-warmup-ms": 5.0, "--bench-rep-ms": 25.0, "--no-cuda-graph": no_graph,
                     "--replay-l2-multiple": 3.0, "--replay-max-calls": 64}

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
    # a plain closure: one call per replay, and the record says so
    assert info["calls_per_replay"] == 1 and info["time_us_graph_single"] == pytest.approx(10.0)
    assert "fn given" in info["single_call_reason"] and info["l2_cache_bytes"] == L2
    assert info["replay"] == mod.REPLAY_SINGLE
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


class Factory:
    """make_fn(i) for the harness: records which copies were asked for and which ran."""

    def __init__(self, returns=None):
        self.made, self.ran, self.returns = [], [], returns or {}

    def __call__(self, i):
        self.made.append(i)
        if i in self.returns:
            return self.returns[i]
        return lambda: self.ran.append(i)


def _gpu(mod, make_fn=None, fn=None, config=None, **kw):
    args = dict(family="x", method="y", role="ours", shape=_shape(), m=1, bytes_moved=10 * 2**20)
    args.update(kw)
    bench = FakeBenchmark(mod.cuda_synchronized_perf_counter)
    return mod.Harness(bench, config or FakeConfig(mod)).gpu(fn, make_fn=make_fn, **args), bench


def test_factory_is_timed_back_to_back_over_its_copies(harness_mod):
    mod, calls = harness_mod
    make = Factory()
    info, bench = _gpu(mod, make_fn=make, flops=10**9)
    n = 15  # the smallest N with N * 10 MiB >= 3 * 50 MiB
    assert make.made == list(range(n))  # each copy's closure made once
    assert calls["captured"] == [1, n]  # copy 0 alone, then all N in one graph
    assert info["calls_per_replay"] == n and info["single_call_reason"] is None
    assert info["time_us"] == pytest.approx((6 + 4 * n) / n) and info["time_us_graph"] == info["time_us"]
    assert info["time_us_graph_single"] == pytest.approx(10.0) and info["time_us_eager"] == pytest.approx(15.0)
    assert info["bytes_per_call"] == 10 * 2**20 and info["l2_cache_bytes"] == L2
    assert info["gbps"] == pytest.approx(10 * 2**20 / (info["time_us"] * 1e-6) / 1e9)
    assert info["tflops"] == pytest.approx(1e9 / (info["time_us"] * 1e-6) / 1e12)
    assert "back-to-back" in info["replay"]
    # eager and pedantic ran copy 0 alone; the back-to-back replay ran every copy in order
    replayed = make.ran[make.ran.index(1) - 1:][:n]
    assert replayed == list(range(n)) and set(make.ran) == set(range(n))
    assert bench.pedantic_calls == [(200, 2, 1)]  # rounds from the single-call figure (25 ms / 10 us)


def test_replay_options_and_bytes_per_call_set_the_number_of_copies(harness_mod):
    mod, _ = harness_mod
    config = FakeConfig(mod)
    config.opts["--replay-max-calls"] = 4
    make = Factory()
    info, _ = _gpu(mod, make_fn=make, config=config)
    assert make.made == [0, 1, 2, 3] and info["calls_per_replay"] == 4
    make = Factory()  # one call already spans three L2s: no copies, the single-call figure
    info, _ = _gpu(mod, make_fn=make, bytes_per_call=200 * 2**20)
    assert make.made == [0] and info["calls_per_replay"] == 1 and info["bytes_per_call"] == 200 * 2**20
    assert info["time_us"] == pytest.approx(10.0) and info["single_call_reason"] is None
    config = FakeConfig(mod)
    config.opts["--replay-l2-multiple"] = 1.0
    info, _ = _gpu(mod, make_fn=Factory(), config=config)
    assert info["calls_per_replay"] == 5  # 5 * 10 MiB = 1 * 50 MiB
    with pytest.raises(ValueError, match="--replay-max-calls"):
        mod.check_replay_options(0, 3.0)
    with pytest.raises(ValueError, match="--replay-l2-multiple"):
        mod.check_replay_options(64, float("nan"))
    mod.check_replay_options(1, 0.0)


def test_harness_refuses_a_factory_of_non_callables_and_ambiguous_arguments(harness_mod):
    mod, calls = harness_mod
    with pytest.raises(ValueError, match=r"make_fn: make_fn\(0\) .*NoneType"):
        _gpu(mod, make_fn=Factory(returns={0: None}))
    with pytest.raises(ValueError, match=r"make_fn: make_fn\(3\) .*tuple"):
        _gpu(mod, make_fn=Factory(returns={3: (1, 2)}))
    with pytest.raises(ValueError, match="exactly one"):
        _gpu(mod, make_fn=Factory(), fn=lambda: None)
    with pytest.raises(ValueError, match="exactly one"):
        _gpu(mod)
    with pytest.raises(ValueError, match="make_fn: expected a callable factory"):
        _gpu(mod, make_fn=[lambda: None])
    with pytest.raises(ValueError, match="fn: expected a callable"):
        _gpu(mod, fn=3)
    assert calls["bench"] == []  # refused before anything was timed


def test_factory_without_capture_makes_copy_zero_only(harness_mod):
    mod, calls = harness_mod
    for config, graph in ((FakeConfig(mod, no_graph=True), True), (FakeConfig(mod), False)):
        make = Factory()
        info, _ = _gpu(mod, make_fn=make, config=config, graph=graph)
        assert make.made == [0] and info["primary_mode"] == "eager" and info["time_us"] == pytest.approx(15.0)
        assert info["calls_per_replay"] is None and info["time_us_graph_single"] is None
        assert info["l2_cache_bytes"] is None and info["replay"] is None
    assert calls["captured"] == []


def test_failed_back_to_back_capture_keeps_the_single_call_figure_and_says_why(harness_mod):
    mod, calls = harness_mod
    calls["back_to_back_fails"] = True
    info, _ = _gpu(mod, make_fn=Factory())
    assert info["primary_mode"] == "graph" and info["time_us"] == pytest.approx(10.0)
    assert info["calls_per_replay"] == 1 and "15 calls per replay failed" in info["single_call_reason"]
    assert "out of memory" in info["single_call_reason"] and info["graph_error"] is None
    assert info["replay"] == mod.REPLAY_SINGLE


def test_weight_cache_copies_are_made_once_as_clones_of_copy_zero(harness_mod):
    mod, _ = harness_mod
    cache, made = mod.WeightCache(), []

    def make():
        made.append(1)
        w = torch.arange(12.0).reshape(3, 4)
        return w.t(), {"check": 0.5}

    w0, check0 = cache.copy(("fp8", "o"), 0, make)
    w2, check2 = cache.copy(("fp8", "o"), 2, make)
    assert cache.copy(("fp8", "o"), 2, make)[0] is w2 and cache.copy(("fp8", "o"), 0, make)[0] is w0
    assert made == [1] and set(cache) == {("fp8", "o", 0), ("fp8", "o", 2)}
    assert torch.equal(w0, w2) and w2.stride() == w0.stride() and w2.data_ptr() != w0.data_ptr()
    assert check2 == check0
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="copy index"):
            cache.copy(("fp8", "o"), bad, make)


def test_every_gpu_benchmark_passes_a_factory():
    """Ours and the peers are timed the same way: every `zq_bench.gpu(...)` in perf/bench_*.py
    hands over `make_fn`, none a bare closure."""
    files = set()
    for path in sorted((ROOT / "perf").glob("bench_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "gpu":
                files.add(path.name)
                keywords = {k.arg for k in node.keywords}
                assert "make_fn" in keywords and not node.args, f"{path.name}:{node.lineno} passes no make_fn"
    assert files == {f"bench_{f}.py" for f in ("actquant", "baselines", "mosaic", "rmsnorm", "w4a4", "zipper")}


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
