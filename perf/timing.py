"""How perf/ times GPU work. One implementation, imported by the pytest harness (perf/conftest.py)
and by the scripts run outside pytest on a GPU host (perf/hybrid_device.py, the tune scripts).

Kernel time (the figure to quote):
- `do_bench_median_ms(fn)`: `triton.testing.do_bench` with `return_mode="median"`: CUDA events
  around every call, the L2 cache flushed (do_bench zeroes a 256 MB buffer) before each, so a
  weight-streaming kernel is timed from HBM, not from a warm L2.
- `capture_graph(fns)` / `graph_median_ms(fns)`: one call of each closure captured in ONE CUDA
  graph, the replay timed by `do_bench_median_ms` (the L2 flushed before every replay), divided by
  the number of calls. Replaying a graph removes Python and launch overhead, which at M = 1 is as
  long as the kernel itself.
- `time_gpu(fns)`: `fns[0]` eagerly, `fns[0]` alone in a graph (one call per replay), and, when
  `fns` holds more than one closure, all of them back to back in one graph (the primary figure,
  per call); where capture fails (a host synchronization, a CPU worker) the eager figure stands
  and `graph_error` says why.

Back-to-back calls on rotated copies. A replay of one captured call costs more than its kernel: a
fixed part (the graph's launch, the L2 state the flush leaves behind) comes with every replay. On
the H200, cuBLAS FP16 at M = 1 on llama3-8b.o replays in 18.8 us
(reports/results/h200/perf_tuned_w4a4.json) where its 33.6 MB take 7.8 us at the ~4.3 TB/s the H200
copies at: at small M much of a single-call figure is that floor. In a model the layers run back to
back, each on its own weights, none of them in the L2. So the primary figure replays N calls, call
i on copy i of every operand (weights and activations in memory of their own: no call finds its
operands in the L2 from the call before it), captured in ONE graph, and divides the replay's time
by N: the fixed cost of a replay counts 1/N per call. N comes from the bytes one call touches
(`calls_per_replay`): the smallest N with N * bytes >= L2_MULTIPLE (3) x the L2 size
(`torch.cuda.get_device_properties(d).L2_cache_size`), so one replay streams at least three L2s
from HBM; at least 1, at most MAX_CALLS_PER_REPLAY (64), and never more than MAX_COPY_BYTES (4 GiB)
of copies in all. A call that alone touches three L2s is timed one per replay (N = 1: its figure is
the single-call one).

Copies: the pytest harness takes a factory `make_fn(i)` from each benchmark (its weights copied
once per copy index for the whole run); the tune scripts hand over one closure and
`clone_call(fn)` makes each copy: the same function over clones of the tensors it holds (in its
closure cells and defaults, inside lists, tuples, dicts and dataclass layouts), with
`operand_bytes` the bytes those tensors occupy.

Work that joins on the host (the hybrid GPU + CPU executor) cannot be measured by CUDA events
alone, since the CPU half runs outside every stream:
- `wall_median_ms(fn, reps)`: wall clock around `torch.cuda.synchronize()`, median and minimum.
- `event_median_ms(fn, stream)`: CUDA events on one given stream (a copy on a side stream).
- `cuda_synchronized_perf_counter`: pytest-benchmark's timer for GPU work (synchronize, then read
  the wall clock), so its statistics measure finished work, not launches.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

DEFAULT_WARMUP_MS = 5.0
DEFAULT_REP_MS = 25.0

# Back-to-back replays (see the module docstring): the copies of one replay span at least
# L2_MULTIPLE L2 sizes, with at most MAX_CALLS_PER_REPLAY calls and MAX_COPY_BYTES of copies.
L2_MULTIPLE = 3.0
MAX_CALLS_PER_REPLAY = 64
MAX_COPY_BYTES = 4 * 2**30


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def calls_per_replay(bytes_per_call: int, l2_bytes: int, l2_multiple: float = L2_MULTIPLE,
                     max_calls: int = MAX_CALLS_PER_REPLAY, max_copy_bytes: int = MAX_COPY_BYTES) -> int:
    """N, the calls one replay holds: the smallest N with N * bytes_per_call >= l2_multiple *
    l2_bytes (computed exactly, in fractions), then at most `max_calls` and at most
    max_copy_bytes // bytes_per_call (the N copies together), and at least 1.

    bytes_per_call: what one call touches (its operands and its output), >= 1. l2_bytes: the
    device's L2 size (>= 0; 0 gives N = 1). Raises ValueError naming a bad argument.
    """
    nbytes = _positive_int("bytes_per_call", bytes_per_call)
    l2 = _positive_int("l2_bytes", l2_bytes, minimum=0)
    if isinstance(l2_multiple, bool) or not isinstance(l2_multiple, (int, float)) \
            or not math.isfinite(l2_multiple) or l2_multiple < 0:
        raise ValueError(f"l2_multiple: expected a finite number >= 0, got {l2_multiple!r}")
    cap = _positive_int("max_calls", max_calls)
    mem = _positive_int("max_copy_bytes", max_copy_bytes)
    wanted = math.ceil(Fraction(l2_multiple) * l2 / nbytes)
    return max(1, min(wanted, cap, mem // nbytes))


def l2_cache_bytes(device=None) -> int:
    """The L2 size of a CUDA device (the current one by default), as the driver reports it."""
    if device is None:
        device = torch.cuda.current_device()
    return int(torch.cuda.get_device_properties(device).L2_cache_size)


# --------------------------------------------------------------------------- operand copies
# Objects passed through as they are: they hold no device memory a kernel streams.
_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size,
          np.ndarray, np.generic, type, types.ModuleType, types.BuiltinFunctionType)


def _holds_tensor(obj, depth=3) -> bool:
    """Whether an object of no known kind keeps a tensor in its attributes (a few levels down)."""
    if isinstance(obj, torch.Tensor):
        return True
    if depth == 0 or isinstance(obj, _ATOMS):
        return False
    if isinstance(obj, dict):
        return any(_holds_tensor(v, depth - 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return any(_holds_tensor(v, depth - 1) for v in obj)
    attrs = getattr(obj, "__dict__", None)
    return isinstance(attrs, dict) and any(_holds_tensor(v, depth - 1) for v in attrs.values())


def _refuse(obj):
    raise ValueError(f"a {type(obj).__module__}.{type(obj).__qualname__} holds tensors that cannot be copied "
                     f"generically (only tensors, functions, functools.partial, lists, tuples, dicts and "
                     f"dataclasses are walked); build that operand's copies explicitly")


def _clone(obj, memo):
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, torch.Tensor):
        # clone keeps the strides of a dense tensor (a transposed view stays column-major)
        out = obj.detach().clone()
    elif isinstance(obj, _ATOMS):
        out = obj
    elif isinstance(obj, types.FunctionType):
        cells = tuple(types.CellType() for _ in (obj.__closure__ or ()))
        out = types.FunctionType(obj.__code__, obj.__globals__, obj.__name__, None, cells or None)
        memo[key] = out  # before the cells: a local function may refer to itself
        for new, old in zip(cells, obj.__closure__ or ()):
            try:
                new.cell_contents = _clone(old.cell_contents, memo)
            except ValueError as exc:
                if "empty" not in str(exc):
                    raise
        out.__defaults__ = None if obj.__defaults__ is None else _clone(obj.__defaults__, memo)
        out.__kwdefaults__ = None if obj.__kwdefaults__ is None else _clone(obj.__kwdefaults__, memo)
        out.__dict__.update(obj.__dict__)
        out.__qualname__ = obj.__qualname__
    elif isinstance(obj, types.MethodType):
        out = types.MethodType(_clone(obj.__func__, memo), _clone(obj.__self__, memo))
    elif isinstance(obj, functools.partial):
        out = functools.partial(_clone(obj.func, memo), *_clone(obj.args, memo), **_clone(obj.keywords, memo))
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        out = type(obj)(*(_clone(v, memo) for v in obj))
    elif isinstance(obj, (list, tuple)):
        out = type(obj)(_clone(v, memo) for v in obj)
    elif isinstance(obj, dict):
        out = type(obj)((k, _clone(v, memo)) for k, v in obj.items())
    elif dataclasses.is_dataclass(obj):
        fields = {f.name: _clone(getattr(obj, f.name), memo) for f in dataclasses.fields(obj) if f.init}
        out = dataclasses.replace(obj, **fields)
    elif _holds_tensor(obj):
        _refuse(obj)
    else:
        out = obj
    memo[key] = out
    return out


def clone_operands(obj):
    """`obj` with every tensor it holds replaced by a clone (same values and strides, memory of its
    own), through lists, tuples, dicts and dataclasses (a packed-weight layout: rebuilt with
    `dataclasses.replace`, its caches copied too). A tensor reached twice is cloned once. Other
    values are shared; an object of another kind holding tensors is refused (ValueError)."""
    return _clone(obj, {})


def clone_call(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` again over clones of the tensors it holds: its closure cells and default arguments,
    through nested functions and `functools.partial` (as `clone_operands`). Module globals are
    not copied: a closure over a global tensor still shares it."""
    if not callable(fn):
        raise ValueError(f"fn: expected a callable, got {type(fn).__name__}")
    return _clone(fn, {})


def _tensors(obj, memo, out):
    key = id(obj)
    if key in memo:
        return
    memo.add(key)
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, _ATOMS):
        return
    elif isinstance(obj, types.FunctionType):
        for cell in obj.__closure__ or ():
            try:
                _tensors(cell.cell_contents, memo, out)
            except ValueError:  # an empty cell
                pass
        _tensors(obj.__defaults__, memo, out)
        _tensors(obj.__kwdefaults__, memo, out)
    elif isinstance(obj, types.MethodType):
        _tensors(obj.__func__, memo, out)
        _tensors(obj.__self__, memo, out)
    elif isinstance(obj, functools.partial):
        for part in (obj.func, obj.args, obj.keywords):
            _tensors(part, memo, out)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _tensors(v, memo, out)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, memo, out)
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _tensors(getattr(obj, f.name), memo, out)
    elif _holds_tensor(obj):
        _refuse(obj)


def operand_tensors(obj) -> list:
    """The tensors `obj` holds, each once, walked as `clone_operands` walks it (a function: its
    closure cells and defaults)."""
    found: list = []
    _tensors(obj, set(), found)
    return found


def operand_bytes(obj) -> int:
    """Bytes of the distinct tensor storages `obj` holds (`operand_tensors`): views of one storage
    count it once."""
    storages = {}
    for t in operand_tensors(obj):
        st = t.untyped_storage()
        storages[(t.device, st.data_ptr())] = st.nbytes()
    return int(sum(storages.values()))


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
    eager_ms: float  # fns[0] launched eagerly, one call per L2 flush
    graph_ms: float | None  # the graph figure per call: calls_per_replay calls per replay; None where eager
    graph_error: str | None  # why there is no graph figure
    graph: object | None  # the single-call graph of fns[0], kept alive for more replays; None where eager
    graph_single_ms: float | None = None  # fns[0] alone in a graph, one call per replay
    calls_per_replay: int | None = None  # the calls one replay of graph_ms held; None where eager
    back_to_back_error: str | None = None  # why more calls were wanted than graph_ms holds

    @property
    def primary_ms(self) -> float:
        return self.graph_ms if self.graph_ms is not None else self.eager_ms

    @property
    def primary_mode(self) -> str:
        return "graph" if self.graph_ms is not None else "eager"

    def single_call_fn(self, fn):
        """One call of fns[0] as cheaply as it can be issued: the single-call graph's replay, or
        `fn` itself where there is no graph."""
        return self.graph.replay if self.graph is not None else fn


def _error_text(exc) -> str:
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - a broken capture can leave the stream in error
        pass
    return f"{type(exc).__name__}: {exc}"[:400]


def time_gpu(fns: Callable[[], object] | Sequence[Callable[[], object]], warmup_ms: float = DEFAULT_WARMUP_MS,
             rep_ms: float = DEFAULT_REP_MS, capture: bool = True,
             no_capture_reason: str = "not captured") -> GpuTiming:
    """Time `fns` (see the module docstring): a callable, or the calls of one back-to-back replay,
    `fns[i]` over copy i of the operands.

    `fns[0]` is timed eagerly and, when `capture`, alone in a CUDA graph (`graph_single_ms`); with
    more than one closure, all of them back to back in one graph, the replay's time divided by
    their number (`graph_ms`, `calls_per_replay`). A failed capture is recorded, never raised:
    some callables cannot be captured (a host join) and the benchmark is still worth its eager
    time (`graph_error`); where the single call captures but the back-to-back graph fails (out
    of memory, say) the single-call figure stands and `back_to_back_error` says why.
    """
    calls = _as_calls(fns)
    first = calls[0]
    torch.cuda.synchronize()
    eager_ms = do_bench_median_ms(first, warmup_ms, rep_ms)
    if not capture:
        return GpuTiming(eager_ms, None, no_capture_reason, None)
    try:
        graph = capture_graph(first)
        single_ms = do_bench_median_ms(graph.replay, warmup_ms, rep_ms)
    except Exception as exc:  # noqa: BLE001 - recorded, the eager figure stands
        return GpuTiming(eager_ms, None, _error_text(exc), None)
    if len(calls) == 1:
        return GpuTiming(eager_ms, single_ms, None, graph, single_ms, 1)
    try:
        back_to_back = capture_graph(calls)
        try:
            per_call_ms = do_bench_median_ms(back_to_back.replay, warmup_ms, rep_ms) / len(calls)
        finally:
            del back_to_back  # its memory pool goes now
    except Exception as exc:  # noqa: BLE001 - recorded, the single-call figure stands
        return GpuTiming(eager_ms, single_ms, None, graph, single_ms, 1,
                         f"{len(calls)} calls per replay failed: {_error_text(exc)}")
    return GpuTiming(eager_ms, per_call_ms, None, graph, single_ms, len(calls))


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
