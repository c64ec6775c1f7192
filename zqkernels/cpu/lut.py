"""ZipperQuant's sparse high part on the CPU: the pattern lookup table and its baseline (DESIGN.md §2.5).

`Y[m, n] = row_scale[n] * Σ_{e in row n} T[m, id_e]` with the per-token table
`T[m, u] = Σ_i x[m, j_u*g + i] * pattern_u[i]`: U·g multiply-adds per token build the table, then
E lookups and adds gather the output. The direct CSR product `x @ q_high.T` over the nonzeros
(`sparse_matmul`) is the baseline the table has to beat; it pays only when the reuse E/U is high.

Cache layout, the reason the kernels look the way they do: tokens are processed in tiles of `mt`.
Each tile of `x` is transposed once to `xt[K, mt]` and the table is kept as `T[U, mt]`, so one
entry id fetches `mt` contiguous partial products and the add runs as a SIMD loop over tokens;
the entry-id stream (E ids, each in the smallest unsigned width that holds U - 1) is read once per tile instead of once per token. Each output row
is summed in a per-thread accumulator of mt values (writing `out[m, n]` directly touched mt lines
N*itemsize apart, one L1 set: 2x slower), two entries per step to halve the add chain, stored to
`acc[n, :mt]`, and a blocked pass writes the scaled tile into `out`. `mt` is 128 bytes of tokens (32 float32 / 16
float64): measured on the 2-core Xeon over U from 1e3 to 6e4, per-token cost falls up to there and
rises beyond (a larger table tile spills L2 faster than the id stream is amortized); for M = 1 the
tile is one token and the gather is a scalar sum per row. The CSR baseline uses the same loops.

Both products accept float64 or float32 activations; the table, the accumulators and the output
have the activations' dtype (float32: faster, half the table bytes; float64: matches the oracle).
`fastmath` stays off: the float64 results must equal `reference.lut_matmul` on integer-valued
inputs exactly, which reassociation would not break there but would elsewhere.
Every function is compiled with `cache=True` (a second process loads the machine code from
`__pycache__`) and `nogil=True` (the hybrid executor runs them on a worker thread while the main
thread keeps launching GPU work).
"""
import contextlib
import threading
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from reference.validation import as_int_codes

# Tokens per tile: 128 bytes of one table row (two cache lines), see the module docstring.
_TILE_ROW_BYTES = 128
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class LutArrays:
    """A `reference.PatternLUT` laid out for the kernels; build with `prepare_lut` once per layer."""

    shape: tuple  # (N, K) of the q_high the table was built from
    group_size: int
    indptr: np.ndarray  # int32 [N+1] (int64 past 2^31 - 1 entries)
    # uint8 / uint16 / uint32 [E]: the smallest unsigned width that holds U - 1 (`uint_width`), as
    # the bits-per-weight count assumes; unsigned, so Numba skips the negative-index wraparound
    # (-20 % at M = 1)
    entry_ids: np.ndarray
    pattern_cols: np.ndarray  # int32 [U]: first input channel of each dictionary entry's group
    patterns64: np.ndarray  # float64 [U, g], zero-padded past K
    patterns32: np.ndarray  # float32 [U, g], the same small integers (exact in float32)

    @property
    def E(self):
        return int(self.entry_ids.size)

    @property
    def U(self):
        return int(self.patterns64.shape[0])

    @property
    def reuse(self):
        return self.E / self.U if self.U else 0.0

    def patterns_for(self, dtype):
        return self.patterns32 if np.dtype(dtype) == np.float32 else self.patterns64

    @property
    def nbytes(self):
        """Bytes the kernels stream: CSR indices, entry ids and one pattern copy (float32)."""
        return int(self.indptr.nbytes + self.entry_ids.nbytes + self.pattern_cols.nbytes + self.patterns32.nbytes)


@dataclass(frozen=True)
class CsrHigh:
    """`q_high` as CSR over output rows, the direct product's operand; build with `prepare_csr`."""

    shape: tuple  # (N, K)
    indptr: np.ndarray  # int32 [N+1] (int64 past 2^31 - 1 nonzeros)
    indices: np.ndarray  # [nnz] column of each nonzero, ascending per row, unsigned of `uint_width(K - 1)`
    values64: np.ndarray  # float64 [nnz]
    values32: np.ndarray  # float32 [nnz]

    @property
    def nnz(self):
        return int(self.indices.size)

    def values_for(self, dtype):
        return self.values32 if np.dtype(dtype) == np.float32 else self.values64


def uint_width(max_value):
    """The smallest unsigned numpy dtype holding every value in [0, max_value] (the width the
    bits-per-weight count charges, `reference.lut.uint_bytes`)."""
    from reference.lut import uint_bytes

    return {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[uint_bytes(max_value)]


def _offsets(indptr):
    """Row offsets as int32 where they fit (every entry count below 2^31), else int64."""
    return np.ascontiguousarray(indptr, dtype=np.int32 if int(indptr[-1]) < 2**31 else np.int64)


def prepare_lut(lut):
    """Check a `reference.PatternLUT` (or any object with its fields) and lay it out for the kernels."""
    for field in ("indptr", "entry_ids", "patterns", "pattern_groups", "group_size", "shape"):
        if not hasattr(lut, field):
            raise ValueError(f"lut must be a reference.PatternLUT, it has no field {field!r}")
    if len(lut.shape) != 2:
        raise ValueError(f"lut.shape must be (N, K), got {lut.shape!r}")
    n, k = (int(d) for d in lut.shape)
    g = int(lut.group_size)
    if g <= 0:
        raise ValueError(f"lut.group_size must be positive, got {lut.group_size!r}")
    # Integer dtypes checked before any cast: a float id would truncate, a uint64 one wrap.
    indptr = np.ascontiguousarray(as_int_codes("lut.indptr", lut.indptr, 0, np.iinfo(np.int64).max, rank=1))
    ids = as_int_codes("lut.entry_ids", lut.entry_ids, 0, np.iinfo(np.uint32).max, rank=1)
    patterns = as_int_codes("lut.patterns", lut.patterns, -128, 127)
    groups = np.ascontiguousarray(as_int_codes("lut.pattern_groups", lut.pattern_groups, 0,
                                               np.iinfo(np.int64).max, rank=1))
    if patterns.ndim != 2 or patterns.shape[1] != g:
        raise ValueError(f"lut.patterns must have shape [U, {g}], got {patterns.shape}")
    u = patterns.shape[0]
    if indptr.shape != (n + 1,) or indptr[0] != 0 or indptr[-1] != ids.size or np.any(np.diff(indptr) < 0):
        raise ValueError(f"lut.indptr must be a non-decreasing [N+1={n + 1}] array from 0 to E={ids.size}")
    if ids.size and (ids.min() < 0 or ids.max() >= u):
        raise ValueError(f"lut.entry_ids must lie in [0, U={u}), got [{ids.min()}, {ids.max()}]")
    n_grp = -(-k // g) if k else 0
    if groups.shape != (u,) or (u and (groups.min() < 0 or groups.max() >= n_grp)):
        raise ValueError(f"lut.pattern_groups must be [U={u}] group indices below {n_grp}")
    p64 = np.ascontiguousarray(patterns, dtype=np.float64)
    return LutArrays(
        shape=(n, k),
        group_size=g,
        indptr=_offsets(indptr),
        entry_ids=np.ascontiguousarray(ids, dtype=uint_width(max(u - 1, 0))),
        pattern_cols=np.ascontiguousarray(groups * g, dtype=np.int32 if k < 2**31 else np.int64),
        patterns64=p64,
        patterns32=np.ascontiguousarray(p64, dtype=np.float32),
    )


def prepare_csr(q_high):
    """`q_high` int [N, K] -> CsrHigh (row-major nonzeros, columns ascending)."""
    q = np.asarray(q_high)
    if q.ndim != 2 or not np.issubdtype(q.dtype, np.integer):
        raise ValueError(f"q_high must be an integer [N, K] array, got dtype {q.dtype} shape {q.shape}")
    q = as_int_codes("q_high", q, -128, 127)
    rows, cols = np.nonzero(q)
    indptr = np.zeros(q.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=q.shape[0]), out=indptr[1:])
    vals = q[rows, cols].astype(np.float64)
    return CsrHigh(
        shape=tuple(int(d) for d in q.shape),
        indptr=_offsets(indptr),
        indices=cols.astype(uint_width(max(q.shape[1] - 1, 0))),
        values64=vals,
        values32=vals.astype(np.float32),
    )


def default_token_tile(m, itemsize):
    """Tokens per tile: 128 bytes of tokens (32 float32 / 16 float64), at most M."""
    return max(1, min(max(1, m), _TILE_ROW_BYTES // itemsize))


# ----------------------------------------------------------------------------------------------
# Kernels (private): one parallel region per step of a token tile, the tile loop inside Numba so
# M in the thousands costs no Python round trips.


@njit(parallel=True, nogil=True, cache=True)
def _transpose_tile(x, m0, mcur, xt):
    k = x.shape[1]
    for c in prange(k):
        for t in range(mcur):
            xt[c, t] = x[m0 + t, c]


@njit(parallel=True, nogil=True, cache=True)
def _build_table_tile(xt, mcur, pattern_cols, patterns, table):
    # No branch on zero slots: with patterns ~3/4 full it mispredicted more than the multiply
    # costs, and multiplying the zero padding keeps 0 * x terms exactly like the oracle's einsum.
    u_count, g = patterns.shape
    if mcur == 1:
        for u in prange(u_count):
            c = pattern_cols[u]
            s = patterns[u, 0] * xt[c, 0]
            for i in range(1, g):
                s += patterns[u, i] * xt[c + i, 0]
            table[u, 0] = s
        return
    for u in prange(u_count):
        c = pattern_cols[u]
        for t in range(mcur):
            table[u, t] = patterns[u, 0] * xt[c, t]
        for i in range(1, g):
            p = patterns[u, i]
            for t in range(mcur):
                table[u, t] += p * xt[c + i, t]


@njit(parallel=True, nogil=True, cache=True)
def _gather_tile(table, mcur, indptr, entry_ids, n_chunks, acc):
    # acc[N, mt]: row r accumulates in its own contiguous mt values (writing out[m, r] directly
    # would touch mt cache lines N*itemsize apart, all in one L1 set). Two entries per step
    # halve the add dependency chain through acc.
    n = indptr.shape[0] - 1
    if mcur == 1:  # one token (decode): two register partial sums, no accumulator round trip
        for ch in prange(n_chunks):
            for r in range((n * ch) // n_chunks, (n * (ch + 1)) // n_chunks):
                acc[r, 0] = 0.0
                s0 = acc[r, 0]  # typed like the table: float32 sums stay float32
                s1 = s0
                e = indptr[r]
                e1 = indptr[r + 1]
                while e + 1 < e1:
                    s0 += table[entry_ids[e], 0]
                    s1 += table[entry_ids[e + 1], 0]
                    e += 2
                if e < e1:
                    s0 += table[entry_ids[e], 0]
                acc[r, 0] = s0 + s1
        return
    mt = table.shape[1]
    for ch in prange(n_chunks):
        # A fresh per-chunk accumulator: LLVM knows it aliases neither the table nor acc, so the
        # adds are not reloaded after every store (-25% against accumulating in acc[r] itself).
        a = np.empty(mt, dtype=table.dtype)
        lo_row = (n * ch) // n_chunks
        hi_row = (n * (ch + 1)) // n_chunks
        for r in range(lo_row, hi_row):
            for t in range(mcur):
                a[t] = 0.0
            e = indptr[r]
            e1 = indptr[r + 1]
            while e + 1 < e1:
                u0 = entry_ids[e]
                u1 = entry_ids[e + 1]
                for t in range(mcur):
                    a[t] += table[u0, t] + table[u1, t]
                e += 2
            if e < e1:
                u = entry_ids[e]
                for t in range(mcur):
                    a[t] += table[u, t]
            for t in range(mcur):
                acc[r, t] = a[t]


@njit(parallel=True, nogil=True, cache=True)
def _scatter_tile(acc, mcur, row_scale, m0, out):
    # acc[N, mt] -> out[m0:m0+mcur, :] scaled, in blocks of 64 rows so the writes are contiguous.
    n = acc.shape[0]
    n_blocks = (n + 63) // 64
    for b in prange(n_blocks):
        r0 = b * 64
        r1 = min(n, r0 + 64)
        for t in range(mcur):
            for r in range(r0, r1):
                out[m0 + t, r] = acc[r, t] * row_scale[r]


@njit(nogil=True, cache=True)
def _lut_matmul_kernel(x, indptr, entry_ids, pattern_cols, patterns, row_scale, mt, n_chunks, xt, table, acc, out):
    m = x.shape[0]
    for m0 in range(0, m, mt):
        mcur = min(mt, m - m0)
        _transpose_tile(x, m0, mcur, xt)
        _build_table_tile(xt, mcur, pattern_cols, patterns, table)
        _gather_tile(table, mcur, indptr, entry_ids, n_chunks, acc)
        _scatter_tile(acc, mcur, row_scale, m0, out)


@njit(parallel=True, nogil=True, cache=True)
def _csr_tile(xt, mcur, indptr, indices, values, n_chunks, acc):
    # The same loop structure as _gather_tile (row accumulators, two nonzeros per step), so the
    # comparison measures the table's arithmetic saving, not a difference in tuning.
    n = indptr.shape[0] - 1
    if mcur == 1:  # the same one-token specialization as _gather_tile
        for ch in prange(n_chunks):
            for r in range((n * ch) // n_chunks, (n * (ch + 1)) // n_chunks):
                acc[r, 0] = 0.0
                s0 = acc[r, 0]
                s1 = s0
                e = indptr[r]
                e1 = indptr[r + 1]
                while e + 1 < e1:
                    s0 += values[e] * xt[indices[e], 0]
                    s1 += values[e + 1] * xt[indices[e + 1], 0]
                    e += 2
                if e < e1:
                    s0 += values[e] * xt[indices[e], 0]
                acc[r, 0] = s0 + s1
        return
    mt = xt.shape[1]
    for ch in prange(n_chunks):
        a = np.empty(mt, dtype=xt.dtype)  # as in _gather_tile
        lo_row = (n * ch) // n_chunks
        hi_row = (n * (ch + 1)) // n_chunks
        for r in range(lo_row, hi_row):
            for t in range(mcur):
                a[t] = 0.0
            e = indptr[r]
            e1 = indptr[r + 1]
            while e + 1 < e1:
                c0 = indices[e]
                v0 = values[e]
                c1 = indices[e + 1]
                v1 = values[e + 1]
                for t in range(mcur):
                    a[t] += v0 * xt[c0, t] + v1 * xt[c1, t]
                e += 2
            if e < e1:
                c = indices[e]
                v = values[e]
                for t in range(mcur):
                    a[t] += v * xt[c, t]
            for t in range(mcur):
                acc[r, t] = a[t]


@njit(nogil=True, cache=True)
def _sparse_matmul_kernel(x, indptr, indices, values, row_scale, mt, n_chunks, xt, acc, out):
    m = x.shape[0]
    for m0 in range(0, m, mt):
        mcur = min(mt, m - m0)
        _transpose_tile(x, m0, mcur, xt)
        _csr_tile(xt, mcur, indptr, indices, values, n_chunks, acc)
        _scatter_tile(acc, mcur, row_scale, m0, out)


@njit(parallel=True, nogil=True, cache=True)
def _lut_matvec_kernel(x, indptr, entry_ids, pattern_cols, patterns, row_scale, n_chunks, table, out):
    # M = 1 (decode): x[0] is already contiguous over K and out[0] over N, so no transpose and no
    # scatter pass; a 1-D table and two register partial sums per row.
    u_count, g = patterns.shape
    k = x.shape[1]
    for u in prange(u_count):
        c = pattern_cols[u]
        s = patterns[u, 0] * x[0, c]
        for i in range(1, g):
            if c + i < k:  # the last group may be short; x has no padding here
                s += patterns[u, i] * x[0, c + i]
        table[u] = s
    n = indptr.shape[0] - 1
    for ch in prange(n_chunks):
        for r in range((n * ch) // n_chunks, (n * (ch + 1)) // n_chunks):
            out[0, r] = 0.0
            s0 = out[0, r]
            s1 = s0
            e = indptr[r]
            e1 = indptr[r + 1]
            while e + 1 < e1:
                s0 += table[entry_ids[e]]
                s1 += table[entry_ids[e + 1]]
                e += 2
            if e < e1:
                s0 += table[entry_ids[e]]
            out[0, r] = (s0 + s1) * row_scale[r]


@njit(parallel=True, nogil=True, cache=True)
def _csr_matvec_kernel(x, indptr, indices, values, row_scale, n_chunks, out):
    # The one-token specialization of the baseline, the same shape as _lut_matvec_kernel's gather.
    n = indptr.shape[0] - 1
    for ch in prange(n_chunks):
        for r in range((n * ch) // n_chunks, (n * (ch + 1)) // n_chunks):
            out[0, r] = 0.0
            s0 = out[0, r]
            s1 = s0
            e = indptr[r]
            e1 = indptr[r + 1]
            while e + 1 < e1:
                s0 += values[e] * x[0, indices[e]]
                s1 += values[e + 1] * x[0, indices[e + 1]]
                e += 2
            if e < e1:
                s0 += values[e] * x[0, indices[e]]
            out[0, r] = (s0 + s1) * row_scale[r]


@njit(parallel=True, nogil=True, cache=True)
def _lut_table_kernel(x, pattern_cols, patterns, k, out):
    u_count, g = patterns.shape
    m = x.shape[0]
    for u in prange(u_count):
        c = pattern_cols[u]
        for t in range(m):
            acc = 0.0
            for i in range(g):
                if c + i < k:
                    acc += patterns[u, i] * x[t, c + i]
            out[t, u] = acc


# ----------------------------------------------------------------------------------------------
# Numba's workqueue threading layer aborts the process when two threads launch parallel kernels at
# once (the hybrid executor may replace a timed-out worker that is still inside a kernel). Under
# that layer, and before the first launch (no layer chosen yet), launches are serialized; omp and
# tbb are thread-safe and run them concurrently.
_LAUNCH_LOCK = threading.Lock()


def _launch_guard():
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run in this process yet
        layer = None
    return _LAUNCH_LOCK if layer in (None, "workqueue") else contextlib.nullcontext()


# Entry points: validate, allocate, dispatch on dtype. No silent conversions: a float16 x, a
# strided view or a table built for another K is a ValueError naming the argument.


def _check_x(x, k, what, check_finite=True):
    if not isinstance(x, np.ndarray):
        raise ValueError(f"x must be a numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"x must have rank 2 [M, K], got shape {x.shape}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32 or float64, got dtype {x.dtype}")
    if not x.flags.c_contiguous:
        raise ValueError("x must be C-contiguous (row-major [M, K])")
    if x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]} but the {what} was built for K={k}")
    if check_finite and not np.all(np.isfinite(x)):
        raise ValueError("x holds NaN or Inf")


def _check_out(out, m, n, dtype):
    if out is None:
        return np.empty((m, n), dtype=dtype)
    if not isinstance(out, np.ndarray) or out.shape != (m, n) or out.dtype != dtype:
        got = (getattr(out, "shape", None), getattr(out, "dtype", type(out).__name__))
        raise ValueError(f"out must be a {dtype} array of shape ({m}, {n}), got {got}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be C-contiguous and writeable")
    return out


def _check_row_scale(row_scale, n, dtype):
    if row_scale is None:
        return np.ones(n, dtype=dtype)
    s = np.asarray(row_scale)
    if s.shape != (n,) or not np.issubdtype(s.dtype, np.floating):
        raise ValueError(f"row_scale must be a float array of shape ({n},), got {s.dtype} {s.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        s = np.ascontiguousarray(s, dtype=dtype)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"row_scale holds NaN or Inf (or values beyond {np.dtype(dtype)})")
    return s


def _check_tile(token_tile, m, itemsize):
    if token_tile is None:
        return default_token_tile(m, itemsize)
    if not isinstance(token_tile, (int, np.integer)) or isinstance(token_tile, bool) or token_tile <= 0:
        raise ValueError(f"token_tile must be a positive integer or None, got {token_tile!r}")
    return int(token_tile)


def _row_chunks(n):
    # 8 chunks per thread balance rows of very different lengths (outlier-heavy rows) under
    # the static schedule; read here, not inside the kernel, so the kernels stay cacheable.
    return max(1, min(n, 8 * numba.get_num_threads()))


def _as_lut_arrays(lut):
    return lut if isinstance(lut, LutArrays) else prepare_lut(lut)


def lut_build(x, lut):
    """The per-token table `T[M, U]` (`reference.lut_table`), in x's dtype (float32 or float64)."""
    la = _as_lut_arrays(lut)
    _check_x(x, la.shape[1], "table")
    out = np.empty((x.shape[0], la.U), dtype=x.dtype)
    with _launch_guard():
        _lut_table_kernel(x, la.pattern_cols, la.patterns_for(x.dtype), la.shape[1], out)
    return out


def lut_matmul(x, lut, out=None, row_scale=None, token_tile=None, check_finite=True):
    """`x @ q_high.T` through the pattern table: `out[m, n] = row_scale[n] * Σ_{e in row n} T[m, id_e]`.

    x: float32|float64 [M, K] C-contiguous. lut: `LutArrays` (or a `reference.PatternLUT`,
    converted on every call: prepare it once instead). out: optional [M, N] in x's dtype.
    row_scale: optional [N] (the hybrid passes `16 * Δ_n`, fusing the high part's scaling).
    token_tile: tokens per tile (None: `default_token_tile`). check_finite: refuse NaN/Inf in x
    (one NaN spreads to whole output rows); False for a caller that has checked x itself.
    """
    la = _as_lut_arrays(lut)
    _check_x(x, la.shape[1], "table", check_finite)
    m, (n, k) = x.shape[0], la.shape
    out = _check_out(out, m, n, x.dtype)
    scale = _check_row_scale(row_scale, n, x.dtype)
    mt = _check_tile(token_tile, m, x.dtype.itemsize)
    if m == 0:
        return out
    if m == 1 and token_tile in (None, 1):
        table = np.empty(la.U, dtype=x.dtype)
        with _launch_guard():
            _lut_matvec_kernel(x, la.indptr, la.entry_ids, la.pattern_cols, la.patterns_for(x.dtype), scale,
                               _row_chunks(n), table, out)
        return out
    g = la.group_size
    # xt covers whole groups: the last group's zero-padded slots read zeros, never past the end.
    xt = np.zeros((max(1, -(-k // g)) * g, mt), dtype=x.dtype)
    table = np.empty((la.U, mt), dtype=x.dtype)
    acc = np.empty((n, mt), dtype=x.dtype)
    with _launch_guard():
        _lut_matmul_kernel(x, la.indptr, la.entry_ids, la.pattern_cols, la.patterns_for(x.dtype), scale, mt,
                           _row_chunks(n), xt, table, acc, out)
    return out


def sparse_matmul(x, csr, out=None, row_scale=None, token_tile=None):
    """The direct product `x @ q_high.T` over the CSR nonzeros, tiled like `lut_matmul` (its baseline).

    csr: `CsrHigh` (or an integer q_high [N, K], converted on every call).
    """
    c = csr if isinstance(csr, CsrHigh) else prepare_csr(csr)
    _check_x(x, c.shape[1], "CSR matrix")
    m, (n, k) = x.shape[0], c.shape
    out = _check_out(out, m, n, x.dtype)
    scale = _check_row_scale(row_scale, n, x.dtype)
    mt = _check_tile(token_tile, m, x.dtype.itemsize)  # the table product's tile rule
    if m == 0:
        return out
    with _launch_guard():
        if m == 1 and token_tile in (None, 1):
            _csr_matvec_kernel(x, c.indptr, c.indices, c.values_for(x.dtype), scale, _row_chunks(n), out)
            return out
        xt = np.zeros((max(1, k), mt), dtype=x.dtype)
        acc = np.empty((n, mt), dtype=x.dtype)
        _sparse_matmul_kernel(x, c.indptr, c.indices, c.values_for(x.dtype), scale, mt, _row_chunks(n), xt, acc,
                              out)
    return out


def lut_stats(lut):
    """Table statistics of one layer: `reference.lut_stats` (E, U, reuse = E/U, index/pattern bytes,
    table bytes per token, patterns per group) plus what decides whether the table pays here:

    nnz            nonzeros of q_high (the direct product's multiply-adds per token)
    nnz_per_entry  nnz / E: the most the gather can save over the direct product; with scattered
                   outliers a pattern holds one nonzero and this is ~1 (no saving), whatever E/U is
    build_per_entry  U * group_size / E: table-build multiply-adds per gathered entry (~g / reuse)
    kernel_bytes   bytes of the prepared layout the kernels stream (`LutArrays.nbytes`)
    """
    import reference

    if isinstance(lut, LutArrays):
        raise ValueError("lut_stats needs the reference.PatternLUT, not the prepared LutArrays")
    stats = dict(reference.lut_stats(lut))
    nz_per_pattern = np.count_nonzero(np.asarray(lut.patterns), axis=1)
    nnz = int(nz_per_pattern[np.asarray(lut.entry_ids, dtype=np.int64)].sum()) if stats["E"] else 0
    stats["nnz"] = nnz
    stats["nnz_per_entry"] = nnz / stats["E"] if stats["E"] else 0.0
    stats["build_per_entry"] = stats["U"] * lut.group_size / stats["E"] if stats["E"] else 0.0
    stats["kernel_bytes"] = prepare_lut(lut).nbytes
    return stats


def lut_report(layers):
    """One `lut_stats` row per named layer, `layers` a mapping name -> reference.PatternLUT
    (rows are plain dicts: `pandas.DataFrame(lut_report(...))` makes the report table)."""
    return [{"layer": name, **lut_stats(lut)} for name, lut in layers.items()]
