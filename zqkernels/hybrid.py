"""ZipperQuant's hybrid executor: the dense low part on the GPU, the sparse high part on the CPU (DESIGN.md §2.6).

    Y = scale_m * Δ_n * (qx @ q_low.T)      GPU: fused smooth+quantize, W4A4 GEMM, one stream
      + 16 * Δ_n * (X' @ q_high.T)          CPU: pattern-LUT product on one worker thread

with `X' = float32(x) * inv_s` (IEEE float32 mul, `inv_s = float32(1 / s)`), the definition the
GPU quantizer uses, so every mode computes the same X'.

One call of `zipper_linear(x, weights, mode="hybrid")` on CUDA:
1. a copy stream waits for `x` and copies it (its own dtype: fp16 is half the bytes of X') into a
   pinned host buffer, recording `d2h_done`;
2. the worker thread is handed the job; it waits on `d2h_done` (a host wait on the worker, not on
   the main thread), smooths on the CPU (`x32 * inv_s32`, bit-identical to the GPU's), and runs
   `zqkernels.cpu.lut.lut_matmul` with the row scale `16 * Δ_n` fused, writing the pinned output;
3. meanwhile the main thread launches activation quantization and the W4A4 GEMM (fp32 out) on the
   current stream; nothing on this path waits for the host;
4. the join: a bounded wait for the worker (the host sync of the critical path; the worker has
   also checked X' for NaN/Inf on the host), then an async H2D of the high part on the current
   stream and one add.
Faults never hang a call. Every wait on the worker is bounded by `join_timeout_s`, also when the
GPU part raises (its error is re-raised once the worker has finished or the bound has passed). A
CPU part that times out is abandoned: its buffers are dropped (it may still write them) and its
worker thread is retired, so the next call gets a fresh worker and fresh buffers; a CPU part that
raises has finished, and its worker serves the next call. Workers are daemon threads: a worker
stuck for ever does not keep the process from exiting. A failure
raises `HybridError` (`HybridTimeout`, also a TimeoutError, for a timeout) naming the part that
failed, what it raised and how long the caller waited, chained to the part's own exception; a
`ValueError` (bad input, the argument named) from either part propagates as it is. The worker
also refuses non-finite X' (NaN/Inf in x, or x / s beyond float32) with a ValueError: the pattern
table would carry a NaN straight into the output.
Pinned buffers live in `ZipperWeights`, grown to the largest M seen (power-of-two capacity) per
activation dtype and reused. Reuse is safe because each buffer's last reader is fenced: the worker
waits on the previous call's `h2d_done` before overwriting the output buffer, and the input buffer
is only rewritten after the previous worker has been joined.

Without CUDA the same threading, buffer and join logic runs when the caller passes an explicit
stand-in for the GPU part (`gpu_part=reference_gpu_part`, the reference W4A4 product via torch on
the CPU); `ZipperWeights` on `device="cpu"` refuses `mode="hybrid"` without one, never silently.

`mode="gpu"` runs the high part on the GPU too (`zqkernels.gpu.zipper_high`), `mode="reference"`
the numpy oracle, and `mode="auto"` picks hybrid or gpu per (N, K, M) from measurements kept as
data in `zqkernels/configs/hybrid_auto.json` (written by `perf/hybrid_device.py`); with no
measurement for the device and shape it raises `NoAutoMeasurement` instead of guessing.
"""
from __future__ import annotations

import itertools
import json
import math
import queue
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
import torch

import reference
from reference.validation import check_group_size
from reference.zipper import check_zipper_codes
from zqkernels.cpu import lut as cpu_lut
from zqkernels.layouts import DenseInt4, ZipperHighGPU

MODES = ("hybrid", "gpu", "reference", "auto")
AUTO_TABLE_PATH = Path(__file__).with_name("configs") / "hybrid_auto.json"
_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LUT_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


class NoAutoMeasurement(LookupError):
    """mode="auto" found no measured decision for this device and layer shape."""


class HybridError(RuntimeError):
    """A part of a hybrid call failed. `part`: "cpu", "gpu" or "gpu+cpu"; `waited_s`: how long the
    caller waited on the CPU worker. The part's own exception is the `__cause__`."""

    def __init__(self, message, part, waited_s):
        super().__init__(message)
        self.part = part
        self.waited_s = waited_s


class HybridTimeout(HybridError, TimeoutError):
    """The CPU part (or a device event) did not finish within `join_timeout_s`."""


# -------------------------------------------------------------------------------------------
# The CPU worker


class _Worker:
    """One daemon thread running CPU parts in submission order.

    A daemon, so a part stuck for ever (a device wait that never returns, a runaway stand-in)
    cannot keep the process from exiting; a stuck worker is retired and replaced (`_retire`),
    never waited on without a bound."""

    _ids = itertools.count()

    def __init__(self):
        self._jobs = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=f"zq-lut-{next(self._ids)}", daemon=True)
        self.thread.start()

    def submit(self, fn, *args):
        future = futures.Future()
        self._jobs.put((future, fn, args))
        return future

    def retire(self):
        self._jobs.put(None)  # the thread ends once the job it is running returns

    def _loop(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(exc)


# One live worker for the whole process: layers run one after another. An abandoned worker may
# still be inside a Numba kernel when its replacement launches one; `zqkernels.cpu.lut`
# serializes launches where Numba's threading layer needs it.
_WORKER = None
_WORKER_LOCK = threading.Lock()


def _current_worker():
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = _Worker()
        return _WORKER


def _retire(worker):
    """Stop handing jobs to `worker`; the next call starts a fresh one."""
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is worker:
            _WORKER = None
    worker.retire()


@dataclass
class _HostBuffers:
    """Host staging for one activation dtype, capacity rows; views [:M] are contiguous."""

    capacity: int
    x_host: torch.Tensor  # [cap, K] x.dtype, pinned on CUDA
    xs32: torch.Tensor  # [cap, K] float32, X' on the host
    xs64: torch.Tensor | None  # [cap, K] float64 when the LUT runs in float64
    y_host: torch.Tensor  # [cap, N] LUT dtype, pinned on CUDA
    d2h_done: object = None  # torch.cuda.Event or None on CPU
    h2d_done: object = None


@dataclass
class ZipperWeights:
    """One ZipperQuant layer prepared once: packed low codes and scales on the device, the LUT on
    the CPU, the reference codes for mode="reference". Build with `ZipperWeights.prepare`."""

    codes: reference.ZipperCodes
    device: torch.device
    act_group_size: int | None
    inv_smooth: torch.Tensor | None  # float32 [K] on device
    inv_smooth_host: torch.Tensor | None  # float32 [K] on the CPU
    low_layout: DenseInt4  # the low codes packed on the device, with Δ_n
    qw_packed: torch.Tensor  # uint8 [N, K/2] on device (low codes): low_layout.packed
    w_scale: torch.Tensor  # float32 [N] on device (Δ_n): low_layout.scale
    lut: cpu_lut.LutArrays
    high_row_scale: np.ndarray  # [N] 16 * Δ_n in the LUT dtype
    lut_dtype: np.dtype
    cpu_threads: int
    join_timeout_s: float
    _buffers: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _copy_stream: object = field(default=None, repr=False)
    _high_gpu: object = field(default=None, repr=False)
    _low_ref: torch.Tensor | None = field(default=None, repr=False)
    last_timing: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self):
        return tuple(int(d) for d in self.codes.q_low.shape)

    @classmethod
    def prepare(cls, codes, smooth=None, device="cuda", act_group_size=None, lut=None, lut_group_size=4,
                lut_dtype=np.float32, cpu_threads=None, join_timeout_s=300.0):
        """codes: reference.ZipperCodes of the smoothed weight W' [N, K]; smooth: s [K] (X' = X / s)
        or None; lut: an optional prebuilt reference.PatternLUT of codes.q_high (else built here
        with `lut_group_size`); lut_dtype: float32 (fast) or float64 (the oracle's precision);
        cpu_threads: Numba threads of the worker (None: all cores, but one on a CUDA host)."""
        q_low, q_high, scale = check_zipper_codes(codes)  # the oracle's checks: fields, ranges, finite scales
        n, k = q_low.shape
        if k % 2:
            raise ValueError(f"codes: K must be even to pack int4 low codes, got K={k}")
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA GPU is available")
        act_group_size = check_group_size("act_group_size", act_group_size)
        lut_dtype = np.dtype(lut_dtype)
        if lut_dtype not in _LUT_DTYPES:
            raise ValueError(f"lut_dtype must be float32 or float64, got {lut_dtype}")
        if lut is None:
            lut = reference.build_pattern_lut(q_high, group_size=lut_group_size)
        elif tuple(lut.shape) != (n, k):
            raise ValueError(f"lut was built for shape {tuple(lut.shape)}, the codes have shape {(n, k)}")
        inv_dev = inv_host = None
        if smooth is not None:
            s = np.asarray(smooth, dtype=np.float64)
            if s.shape != (k,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
                raise ValueError(f"smooth must be a positive finite [K={k}] vector, got shape {s.shape}")
            with np.errstate(over="ignore"):
                inv32 = (1.0 / s).astype(np.float32)
            if not np.all(np.isfinite(inv32) & (inv32 > 0)):
                raise ValueError("smooth holds values whose float32 inverse 1/s is 0 or Inf (s beyond float32 range)")
            inv_host = torch.from_numpy(inv32)
            inv_dev = inv_host.to(device)
        with np.errstate(over="ignore"):
            high_row_scale = (16.0 * scale).astype(lut_dtype)
        if not np.all(np.isfinite(high_row_scale)):
            raise ValueError(f"codes.scale is too large for a {lut_dtype} pattern table (16 * scale overflows)")
        if cpu_threads is None:
            # On a GPU host one core stays free for the main thread, which launches the GPU part
            # while the worker computes; a CPU-only run has nothing else to do.
            all_threads = numba.config.NUMBA_NUM_THREADS
            cpu_threads = max(1, all_threads - 1) if device.type == "cuda" else all_threads
        if not (1 <= int(cpu_threads) <= numba.config.NUMBA_NUM_THREADS):
            raise ValueError(f"cpu_threads must lie in [1, {numba.config.NUMBA_NUM_THREADS}], got {cpu_threads}")
        _check_timeout(join_timeout_s)
        low = DenseInt4.from_codes(q_low, scale, None, device)
        w = cls(
            codes=codes,
            device=device,
            act_group_size=act_group_size,
            inv_smooth=inv_dev,
            inv_smooth_host=inv_host,
            low_layout=low,
            qw_packed=low.packed,
            w_scale=low.scale,
            lut=cpu_lut.prepare_lut(lut),
            high_row_scale=high_row_scale,
            lut_dtype=lut_dtype,
            cpu_threads=int(cpu_threads),
            join_timeout_s=float(join_timeout_s),
        )
        if device.type == "cuda":
            w._copy_stream = torch.cuda.Stream(device=device)
        return w

    # -- host buffers -----------------------------------------------------------------------
    def buffers(self, m, x_dtype):
        """The host buffers for M tokens of x_dtype, allocated (pinned on CUDA) once per capacity."""
        bufs = self._buffers.get(x_dtype)
        if bufs is not None and bufs.capacity >= m:
            return bufs
        cap = 1 << max(0, math.ceil(math.log2(max(1, m))))
        n, k = self.shape
        pin = self.device.type == "cuda"
        old = self._buffers.get(x_dtype)
        if old is not None and old.h2d_done is not None:
            # The old pinned block may still feed the last H2D copy.
            _wait_event(old.h2d_done, self.join_timeout_s, "the previous call's H2D copy of the high part")
        bufs = _HostBuffers(
            capacity=cap,
            x_host=torch.empty((cap, k), dtype=x_dtype, pin_memory=pin),
            xs32=torch.empty((cap, k), dtype=torch.float32),
            xs64=torch.empty((cap, k), dtype=torch.float64) if self.lut_dtype == np.float64 else None,
            y_host=torch.empty((cap, n), dtype=_LUT_DTYPES[self.lut_dtype], pin_memory=pin),
            d2h_done=torch.cuda.Event() if pin else None,
            h2d_done=torch.cuda.Event() if pin else None,
        )
        self._buffers[x_dtype] = bufs
        return bufs

    def high_gpu(self):
        """The high part as `layouts.ZipperHighGPU` for mode="gpu" (built on first use)."""
        if self._high_gpu is None:
            self._high_gpu = ZipperHighGPU.from_codes(self.codes.q_high, self.codes.scale, self.device)
        return self._high_gpu


# -------------------------------------------------------------------------------------------
# The parts


def smooth_host(x_host, inv_smooth_host, out32):
    """X' = float32(x) * inv_s on the CPU, IEEE float32 like the GPU quantizer; into out32."""
    out32.copy_(x_host)
    if inv_smooth_host is not None:
        out32.mul_(inv_smooth_host)
    return out32


def gpu_low_part(x, weights):
    """Low part on the GPU: smooth + quantize + W4A4 GEMM as the launch table says for this M
    (`w4a4.w4a4_linear`), float32 [M, N], current stream."""
    from zqkernels.gpu.w4a4 import w4a4_linear

    return w4a4_linear(x, weights.inv_smooth, weights.qw_packed, weights.w_scale, weights.act_group_size,
                       torch.float32)


def reference_gpu_part(x, weights):
    """CPU stand-in for `gpu_low_part` (float64 [M, N] on the CPU): the reference activation
    quantization, then the dequantized W4A4 product as a torch float64 matmul. Explicitly passed
    as `gpu_part=` so a CPU-only run proves the hybrid plumbing; never chosen silently."""
    xs = smooth_host(x.detach().cpu(), weights.inv_smooth_host, torch.empty(x.shape, dtype=torch.float32))
    qx, sx = reference.quantize_activations(xs.numpy().astype(np.float64), group_size=weights.act_group_size)
    deq = torch.from_numpy(reference.dequantize(qx, sx, weights.act_group_size))
    if weights._low_ref is None:
        q_low = torch.from_numpy(np.asarray(weights.codes.q_low, dtype=np.float64))
        weights._low_ref = (q_low * torch.from_numpy(np.asarray(weights.codes.scale, dtype=np.float64))[:, None]).T.contiguous()
    return deq @ weights._low_ref


def _check_finite_host(x_host, xs):
    """X' must be finite: one NaN would spread through the pattern table to whole output rows."""
    if not bool(torch.isfinite(xs).all()):
        if not bool(torch.isfinite(x_host).all()):
            raise ValueError("x holds NaN or Inf")
        raise ValueError("x / s overflows float32 (x * inv_s holds Inf): x or 1/smooth too large")


def _cpu_high_part(weights, bufs, m, abandoned):
    """The worker's job: wait for the activations, smooth, LUT product with 16*Δ_n fused.
    `abandoned` is set by a caller that stopped waiting: the buffers are then no longer this job's."""
    t0 = time.perf_counter()
    numba.set_num_threads(weights.cpu_threads)  # thread-local in Numba: set on the worker itself
    if bufs.d2h_done is not None:
        bufs.d2h_done.synchronize()
    if bufs.h2d_done is not None:
        bufs.h2d_done.synchronize()  # the previous call's H2D has finished reading y_host
    t1 = time.perf_counter()
    if abandoned.is_set():
        return None
    xs = smooth_host(bufs.x_host[:m], weights.inv_smooth_host, bufs.xs32[:m])
    _check_finite_host(bufs.x_host[:m], xs)
    if bufs.xs64 is not None:
        xs = bufs.xs64[:m].copy_(xs)
    y = bufs.y_host[:m]
    if abandoned.is_set():
        return None
    cpu_lut.lut_matmul(xs.numpy(), weights.lut, out=y.numpy(), row_scale=weights.high_row_scale, check_finite=False)
    t2 = time.perf_counter()
    return {"worker_wait_s": t1 - t0, "worker_compute_s": t2 - t1}


def _check_timeout(join_timeout_s):
    if (isinstance(join_timeout_s, bool) or not isinstance(join_timeout_s, (int, float, np.floating, np.integer))
            or not (0 < float(join_timeout_s) < math.inf)):
        raise ValueError(f"join_timeout_s must be a positive finite number of seconds, got {join_timeout_s!r}")


def _wait_event(event, timeout_s, what):
    """A CUDA event wait with a bound (polling: `Event.synchronize` has none)."""
    t0 = time.perf_counter()
    while not event.query():
        waited = time.perf_counter() - t0
        if waited >= timeout_s:
            raise HybridTimeout(f"zipper_linear: {what} did not complete within join_timeout_s={timeout_s:g} s "
                                f"(waited {waited:.2f} s)", part="gpu", waited_s=waited)
        time.sleep(1e-4)


def _add_note(exc, note):
    if hasattr(exc, "add_note"):  # Python >= 3.11
        exc.add_note(note)


class _Call:
    """One hybrid call's handle on its CPU part: join it with a bound, or abandon it."""

    def __init__(self, weights, bufs, m, x_dtype):
        self.weights, self.x_dtype = weights, x_dtype
        self.abandoned = threading.Event()
        self.worker = _current_worker()
        self.future = self.worker.submit(_cpu_high_part, weights, bufs, m, self.abandoned)
        self.waited_s = 0.0

    def wait(self):
        """True when the CPU part finished (returned or raised) within join_timeout_s; otherwise
        the part is abandoned: its buffers are dropped (it may still write them) and its worker
        retired, so no later call shares either."""
        t0 = time.perf_counter()
        done, _ = futures.wait([self.future], timeout=self.weights.join_timeout_s)
        self.waited_s = time.perf_counter() - t0
        if done:
            return True
        self.abandoned.set()
        self.weights._buffers.pop(self.x_dtype, None)
        _retire(self.worker)
        return False

    def timeout_text(self):
        return (f"the CPU part (pattern-LUT worker) did not finish within join_timeout_s="
                f"{self.weights.join_timeout_s:g} s (waited {self.waited_s:.2f} s); it was abandoned and its "
                "worker replaced")

    def join(self):
        """The CPU part's timing dict, or the error of a CPU part that failed or timed out."""
        if not self.wait():
            raise HybridTimeout(f"zipper_linear: {self.timeout_text()}", part="cpu", waited_s=self.waited_s)
        exc = self.future.exception()
        if exc is None:
            return self.future.result()
        if isinstance(exc, ValueError):  # bad input, already named by the check that refused it
            raise exc
        raise HybridError(f"zipper_linear: the CPU part (pattern-LUT worker) raised {type(exc).__name__}: {exc} "
                          f"(the caller waited {self.waited_s:.2f} s)", part="cpu", waited_s=self.waited_s) from exc

    def fail(self, gpu_exc):
        """The GPU part raised: wait (bounded) for the CPU part, which still reads and writes the
        buffers, then raise. Bad input (ValueError) and interrupts propagate as they are, with a
        note on the CPU part; any other failure becomes a HybridError naming both parts."""
        if self.wait():
            cpu_exc = self.future.exception()
            cpu_text = None if cpu_exc is None else f"the CPU part also raised {type(cpu_exc).__name__}: {cpu_exc}"
        else:
            cpu_text = self.timeout_text()
        if isinstance(gpu_exc, ValueError) or not isinstance(gpu_exc, Exception):
            if cpu_text:
                _add_note(gpu_exc, f"zipper_linear: {cpu_text}")
            raise gpu_exc
        where = f"; {cpu_text}" if cpu_text else f" (the CPU part finished; the caller waited {self.waited_s:.2f} s for it)"
        raise HybridError(f"zipper_linear: the GPU part raised {type(gpu_exc).__name__}: {gpu_exc}{where}",
                          part="gpu+cpu" if cpu_text else "gpu", waited_s=self.waited_s) from gpu_exc


def _hybrid(x, weights, gpu_part):
    m = x.shape[0]
    cuda = weights.device.type == "cuda"
    t_start = time.perf_counter()
    with weights._lock:  # one call per layer at a time: the buffers are per layer
        bufs = weights.buffers(m, x.dtype)
        if cuda:
            main = torch.cuda.current_stream(weights.device)
            copy = weights._copy_stream
            copy.wait_stream(main)  # x is produced on the main stream
            with torch.cuda.stream(copy):
                bufs.x_host[:m].copy_(x, non_blocking=True)
                bufs.d2h_done.record(copy)
        else:
            bufs.x_host[:m].copy_(x)
        call = _Call(weights, bufs, m, x.dtype)
        try:
            y = gpu_part(x, weights)
        except BaseException as exc:  # noqa: BLE001 - re-raised by fail(), after the CPU part
            call.fail(exc)
        t_launched = time.perf_counter()
        timing = call.join()
        t_joined = time.perf_counter()
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != (m, weights.shape[0]) or not y.dtype.is_floating_point:
            got = (tuple(y.shape), y.dtype) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"gpu_part returned {got}, expected a float tensor of shape {(m, weights.shape[0])}")
        y_high = bufs.y_host[:m]
        if cuda:
            y_high = y_high.to(weights.device, non_blocking=True)
            bufs.h2d_done.record(main)
        y = y.add_(y_high) if y.dtype.itemsize >= 4 else y.float().add_(y_high)
    timing.update(launch_s=t_launched - t_start, join_wait_s=t_joined - t_launched)
    weights.last_timing = timing
    return y


def _gpu(x, weights):
    from zqkernels.gpu.zipper_high import zipper_gpu_linear

    return zipper_gpu_linear(x, weights.low_layout, weights.high_gpu(), weights.inv_smooth, weights.act_group_size)


def reference_linear(x, weights):
    """The oracle for `zipper_linear`: reference.zipper_matmul on X' = float32(x) * inv_s, float64."""
    x_cpu = x.detach().cpu()
    xs = smooth_host(x_cpu, weights.inv_smooth_host, torch.empty(x.shape, dtype=torch.float32))
    _check_finite_host(x_cpu, xs)
    return reference.zipper_matmul(xs.numpy().astype(np.float64), weights.codes, act_bits=4,
                                   act_group_size=weights.act_group_size)


# -------------------------------------------------------------------------------------------
# mode="auto": measured decisions, kept as data


def _auto_device_key(device):
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device)


def load_auto_table(path=AUTO_TABLE_PATH):
    with open(path) as fh:
        return json.load(fh)


def auto_mode(n, k, m, device, table=None):
    """The measured choice ("hybrid" or "gpu") for layer shape (N, K) and M tokens on `device`.

    Uses the entry measured at M if there is one, else the measured M nearest in log2 (the
    decision changes slowly with M; the gap is reported in the error if nothing is measured).
    Raises NoAutoMeasurement when the table holds nothing for this device and shape.
    """
    table = load_auto_table() if table is None else table
    dev_key = _auto_device_key(torch.device(device))
    dev = table.get("devices", {}).get(dev_key)
    shape_key = f"{n}x{k}"
    if dev is None or shape_key not in dev.get("entries", {}):
        measured = sorted(table.get("devices", {}))
        raise NoAutoMeasurement(
            f"mode='auto': no measurement for shape {shape_key} on device {dev_key!r} in {AUTO_TABLE_PATH.name} "
            f"(devices measured: {measured or 'none'}); run perf/hybrid_device.py on this device and commit its "
            f"hybrid_auto.json, or pass mode='hybrid' or mode='gpu'"
        )
    entries = dev["entries"][shape_key]
    ms = sorted(int(key) for key in entries)
    best = min(ms, key=lambda mm: (abs(math.log2(mm) - math.log2(max(1, m))), mm))
    return entries[str(best)]["mode"]


# -------------------------------------------------------------------------------------------
# The entry point


def _check_x(x, weights):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    n, k = weights.shape
    if x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]} but the weights were prepared for K={k}")
    if x.shape[0] < 1:
        raise ValueError(f"x must hold at least one token, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous")
    if x.device != weights.device and not (x.device.type == weights.device.type == "cuda"
                                           and weights.device.index is None):
        raise ValueError(f"x is on {x.device}, the weights on {weights.device}")


def zipper_linear(x, weights, mode="gpu", gpu_part=None, out_dtype=None):
    """`Y = X' @ W'.T` of a ZipperQuant layer, [M, N], with X' = float32(x) * inv_s.

    x: [M, K] fp16|bf16|fp32 contiguous on `weights.device`. weights: `ZipperWeights`.
    mode: "gpu" (both parts on the GPU; the default: faster than the hybrid at every shape and M
    measured, `configs/hybrid_auto.json`), "hybrid" (GPU low part overlapped with the CPU LUT),
    "reference" (the numpy oracle, float64 then cast), "auto" (measured choice of hybrid/gpu).
    gpu_part: callable (x, weights) -> [M, N] float tensor replacing the GPU low part (required on
    a CPU device: pass `reference_gpu_part`). out_dtype: result dtype (None: x.dtype).
    """
    if not isinstance(weights, ZipperWeights):
        raise ValueError(f"weights must be ZipperWeights (ZipperWeights.prepare), got {type(weights).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_x(x, weights)
    _check_timeout(weights.join_timeout_s)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise ValueError(f"out_dtype must be a torch floating dtype, got {out_dtype!r}")
    if mode == "auto":
        mode = auto_mode(*weights.shape, x.shape[0], weights.device)
    if mode == "reference":
        y = torch.from_numpy(reference_linear(x, weights)).to(weights.device)
    elif mode == "hybrid":
        if gpu_part is None:
            if weights.device.type != "cuda":
                raise ValueError(
                    "mode='hybrid' on a CPU device needs an explicit gpu_part stand-in "
                    "(gpu_part=zqkernels.hybrid.reference_gpu_part); no silent fallback"
                )
            gpu_part = gpu_low_part
        y = _hybrid(x, weights, gpu_part)
    else:  # gpu
        if weights.device.type != "cuda":
            raise ValueError("mode='gpu' needs CUDA weights (ZipperWeights.prepare(..., device='cuda'))")
        if gpu_part is not None:
            raise ValueError("gpu_part applies to mode='hybrid' only")
        y = _gpu(x, weights)
    return y.to(out_dtype)
