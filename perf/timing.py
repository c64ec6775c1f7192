"""How perf/ times GPU work. One implementation, imported by the pytest harness (perf/conftest.py)
and by the scripts run outside pytest on a GPU host (perf/hybrid_device.py, the tune scripts).

Kernel time (the figure to quote):
- `do_bench_median_ms(fn)`: `triton.testing.do_bench` with `return_mode="median"`: CUDA events
  around every call, the L2 cache flushed (do_bench zeroes a 256 MB buffer) before each, so a
  weight-streaming kernel is timed from HBM, not from a warm L2.
- `capture_graph(fns)` / `graph_median_ms(fns)`: one call of each closure captured in a CUDA
  graph, the replay timed by `do_bench_median_ms`, divided by the number of calls. Replaying a
  graph removes Python and launch overhead, which at M = 1 is as long as the kernel itself.
- `time_gpu(fn)`: both of the above for one closure; where capture fails (a host synchronization,
  a CPU worker) the eager figure stands and `graph_error` says why.

Work that joins on the host (the hybrid GPU + CPU executor) cannot be measured by CUDA events
alone, since the CPU half runs outside every stream:
- `wall_median_ms(fn, reps)`: wall clock around `torch.cuda.synchronize()`, median and minimum.
- `event_median_ms(fn, stream)`: CUDA events on one given stream (a copy on a side stream).
- `cuda_synchronized_perf_counter`: pytest-benchmark's timer for GPU work (synchronize, then read
  the wall clock), so its statistics measure finished work, not launches.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

DEFAULT_WARMUP_MS = 5.0
DEFAULT_REP_MS = 25.0


def cuda_synchronized_perf_counter() -> float:
    """pytest-benchmark timer for GPU work: wait for the device, then read the wall clock."""
    torch.cuda.synchronize()
    return time.perf_counter()


def do_bench_median_ms(fn: Callable[[], object], warmup_ms: float = DEFAULT_WARMUP_MS,
                       rep_ms: float = DEFAULT_REP_MS) -> float:
    """Median milliseconds of `fn()` by `triton.testing.do_bench` (CUDA events, L2 flushed)."""
    import triton.testing

    try:
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    except TypeError:  # a Triton without return_mode
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5]))


def _as_calls(fns) -> list:
    calls = [fns] if callable(fns) else list(fns)
    if not calls or not all(callable(f) for f in calls):
        raise ValueError("fns: expected a callable or a non-empty sequence of callables")
    return calls


def capture_graph(fns: Callable[[], object] | Sequence[Callable[[], object]]) -> torch.cuda.CUDAGraph:
    """A CUDA graph holding one call of each of `fns`, in order.

    Each closure runs once on a side stream first, as `torch.cuda.graph` asks before capture (the
    allocator and cuBLAS workspaces settle, Triton kernels are compiled and tuned outside it).
    """
    calls = _as_calls(fns)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in calls:
            f()
    torch.cuda.synchronize()
    return graph


def graph_median_ms(fns, warmup_ms: float = DEFAULT_WARMUP_MS, rep_ms: float = DEFAULT_REP_MS) -> float:
    """Median milliseconds per call of `fns` replayed as one CUDA graph (L2 flushed per replay)."""
    calls = _as_calls(fns)
    graph = capture_graph(calls)
    try:
        return do_bench_median_ms(graph.replay, warmup_ms, rep_ms) / len(calls)
    finally:
        del graph


@dataclass
class GpuTiming:
    eager_ms: float
    graph_ms: float | None
    graph_error: str | None
    graph: object | None  # the captured graph, kept alive for more replays; None where eager

    @property
    def primary_ms(self) -> float:
        return self.graph_ms if self.graph_ms is not None else self.eager_ms

    @property
    def primary_mode(self) -> str:
        return "graph" if self.graph_ms is not None else "eager"

    def primary_fn(self, fn):
        """What reproduces the primary figure: the graph's replay, or `fn` itself."""
        return self.graph.replay if self.graph is not None else fn


def time_gpu(fn: Callable[[], object], warmup_ms: float = DEFAULT_WARMUP_MS, rep_ms: float = DEFAULT_REP_MS,
             capture: bool = True, no_capture_reason: str = "not captured") -> GpuTiming:
    """`fn` timed eagerly and, when `capture`, as a replayed CUDA graph (see the module docstring).

    A failed capture is recorded in `graph_error` (the eager figure stands), never raised: some
    callables cannot be captured (a host join) and the benchmark is still worth its eager time.
    """
    torch.cuda.synchronize()
    eager_ms = do_bench_median_ms(fn, warmup_ms, rep_ms)
    if not capture:
        return GpuTiming(eager_ms, None, no_capture_reason, None)
    try:
        graph = capture_graph(fn)
        graph_ms = do_bench_median_ms(graph.replay, warmup_ms, rep_ms)
    except Exception as exc:  # noqa: BLE001 - recorded, the eager figure stands
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - a broken capture can leave the stream in error
            pass
        return GpuTiming(eager_ms, None, f"{type(exc).__name__}: {exc}"[:400], None)
    return GpuTiming(eager_ms, graph_ms, None, graph)


def wall_median_ms(fn: Callable[[], object], reps: int, sync: bool = True) -> tuple[float, float]:
    """(median, min) milliseconds of `fn()` by the wall clock, after one untimed call.

    With `sync`, the device is synchronized before and after every call, so the time covers the
    GPU work `fn` launched and whatever it did on the host; without, host work only.
    """
    if reps < 1:
        raise ValueError(f"reps: {reps} must be >= 1")
    fn()
    if sync:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3


def event_median_ms(fn: Callable[[], object], stream, reps: int = 10) -> float:
    """Median milliseconds of `fn()` issued on `stream`, by CUDA events recorded on that stream."""
    if reps < 1:
        raise ValueError(f"reps: {reps} must be >= 1")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        with torch.cuda.stream(stream):
            start.record(stream)
            fn()
            end.record(stream)
        end.synchronize()
        out.append(start.elapsed_time(end))
    return statistics.median(out)
