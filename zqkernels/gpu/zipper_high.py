"""ZipperQuant's sparse high part on the GPU: `out += 16 * Δ_n * (X' @ q_high.T)` (DESIGN.md §2.4).

ZipperQuant sends this part to the CPU; on an H100 with ~3 TB/s and a ~25 µs PCIe round trip the
same few multiply-adds may be cheaper where the activations already are. Two layouts, both built
once by `prepare_zipper_high`, chosen per call (`method=`) or by the prepared default:

- "columns": the input channels that hold any nonzero `q_high` (after SmoothQuant the outliers sit
  in a few input channels) are gathered into a dense `Hc [N, C]`; one pass over those C columns of X:
  `out[m, n] += 16 Δ_n Σ_c X'[m, cols_c] Hc[n, c]`. Work M·N·C; pays when C << K.
- "ell": each output row keeps its own nonzeros (column, value), padded to the longest row
  (ELL, stored [E_max, N] so a tile's loads are coalesced); `out[m, n] += 16 Δ_n Σ_e X'[m, col[e, n]]
  val[e, n]`. Work M·N·E_max gathers; pays when the nonzeros are scattered over many columns.

Both read X' in float32 and multiply in IEEE float32 (no TF32: the high part carries the outliers,
whose error a 10-bit mantissa would amplify); `q_high` codes up to ±127 are exact in float32.
`out` is float32 [M, N] and is accumulated in place (the low GEMM's output), one program per tile,
so no atomics are needed.

Measured (H100, reports/results/h100/tune_mosaic_run3.json, a synthetic smoothed weight with 0.5 %
hot input channels and a Student-t tail, `zipper_quantize(outlier_ratio=0.01)`: 0.5 % of q_high
nonzero, spread over 99 % of the input channels): the column pass degenerates (C ~ K: a dense fp32
FMA GEMM, 1.8 ms for o at M = 16, not timed further); ELL costs 18 us (o) / 43 us (down) at M = 16,
i.e. about cuBLAS FP16's own time, and 2.4 ms / 8.0 ms at M = 4096 (M*N*E_max gathers: 0.55 G
and 1.7 G scattered 4-byte loads), 11x cuBLAS. On such scattered outliers the GPU high part only
pays at small M; the column pass pays only when the outliers really sit in a few channels.
"""
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

METHODS = ("columns", "ell")
# "auto" prefers columns while the dense column pass does no more work than the ELL gathers.
_COLUMNS_MAX_RATIO = 1.0


@dataclass(frozen=True)
class ZipperHighGPU:
    shape: tuple  # (N, K)
    row_scale: torch.Tensor  # float32 [N], 16 * Δ_n
    cols: torch.Tensor  # int32 [max(C,1)] input channels holding any nonzero q_high
    h_cols: torch.Tensor  # float32 [max(C,1), N]: q_high[:, cols].T (transposed: coalesced per column)
    n_cols: int  # C
    ell_cols: torch.Tensor  # int32 [max(E_max,1), N]
    ell_vals: torch.Tensor  # float32 [max(E_max,1), N] (0 in padding)
    e_max: int
    nnz: int
    default_method: str

    @property
    def device(self):
        return self.row_scale.device


def prepare_zipper_high(codes, device, method="auto"):
    """`reference.ZipperCodes` -> `ZipperHighGPU` on `device` (both layouts, float32 row scales).

    Raises ValueError on codes of the wrong rank/shape/dtype, q_high outside int8, non-finite
    scales, or an unknown method.
    """
    if method not in METHODS + ("auto",):
        raise ValueError(f"method must be one of {METHODS + ('auto',)}, got {method!r}")
    qh = np.asarray(codes.q_high)
    if qh.ndim != 2:
        raise ValueError(f"codes.q_high must be [N, K], got shape {qh.shape}")
    if not np.issubdtype(qh.dtype, np.integer):
        raise ValueError(f"codes.q_high must hold integer codes, got dtype {qh.dtype}")
    if qh.size and (qh.min() < -128 or qh.max() > 127):
        raise ValueError("codes.q_high holds codes outside int8")
    n, k = qh.shape
    scale = np.asarray(codes.scale, dtype=np.float64)
    if scale.shape != (n,):
        raise ValueError(f"codes.scale must have shape ({n},), got {scale.shape}")
    if not np.all(np.isfinite(scale)):
        raise ValueError("codes.scale holds NaN or Inf")
    q_low = np.asarray(codes.q_low)
    if q_low.shape != (n, k):
        raise ValueError(f"codes.q_low shape {q_low.shape} does not match q_high {qh.shape}")

    nz = qh != 0
    cols = np.flatnonzero(nz.any(axis=0)).astype(np.int32)
    c = cols.size
    h_cols = qh[:, cols].T.astype(np.float32) if c else np.zeros((1, n), dtype=np.float32)
    if c == 0:
        cols = np.zeros(1, dtype=np.int32)

    counts = nz.sum(axis=1)
    e_max = int(counts.max()) if n else 0
    ell_cols = np.zeros((max(e_max, 1), n), dtype=np.int32)
    ell_vals = np.zeros((max(e_max, 1), n), dtype=np.float32)
    rows, cidx = np.nonzero(qh)  # row-major: columns ascend within each row
    if rows.size:
        start = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=start[1:])
        slot = np.arange(rows.size) - start[rows]
        ell_cols[slot, rows] = cidx
        ell_vals[slot, rows] = qh[rows, cidx]
    if method == "auto":
        method = "columns" if c <= _COLUMNS_MAX_RATIO * e_max or e_max == 0 else "ell"
    dev = torch.device(device)
    return ZipperHighGPU(
        shape=(n, k),
        row_scale=torch.from_numpy((16.0 * scale).astype(np.float32)).to(dev),
        cols=torch.from_numpy(cols).to(dev),
        h_cols=torch.from_numpy(np.ascontiguousarray(h_cols)).to(dev),
        n_cols=int(c),
        ell_cols=torch.from_numpy(ell_cols).to(dev),
        ell_vals=torch.from_numpy(ell_vals).to(dev),
        e_max=e_max,
        nnz=int(rows.size),
        default_method=method,
    )


@triton.jit
def _high_columns_kernel(x_ptr, cols_ptr, h_ptr, rs_ptr, out_ptr, M, N, C, stride_xm,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c in range(0, C):  # rank-1 updates in IEEE fp32 FMAs: C is small by construction
        col = tl.load(cols_ptr + c)
        xv = tl.load(x_ptr + rm * stride_xm + col, mask=m_ok, other=0.0).to(tl.float32)
        hv = tl.load(h_ptr + c * N + rn, mask=n_ok, other=0.0)
        acc += xv[:, None] * hv[None, :]
    rs = tl.load(rs_ptr + rn, mask=n_ok, other=0.0)
    o_ptrs = out_ptr + rm[:, None] * N + rn[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(o_ptrs, tl.load(o_ptrs, mask=o_mask, other=0.0) + acc * rs[None, :], mask=o_mask)


@triton.jit
def _high_ell_kernel(x_ptr, ecol_ptr, eval_ptr, rs_ptr, out_ptr, M, N, E, stride_xm,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for e in range(0, E):
        col = tl.load(ecol_ptr + e * N + rn, mask=n_ok, other=0)
        val = tl.load(eval_ptr + e * N + rn, mask=n_ok, other=0.0)
        xg = tl.load(x_ptr + rm[:, None] * stride_xm + col[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        acc += xg.to(tl.float32) * val[None, :]
    rs = tl.load(rs_ptr + rn, mask=n_ok, other=0.0)
    o_ptrs = out_ptr + rm[:, None] * N + rn[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(o_ptrs, tl.load(o_ptrs, mask=o_mask, other=0.0) + acc * rs[None, :], mask=o_mask)


def _pick_tiles(m, n):
    # Small M: the work (M * N * E gathers) is tiny and latency-bound, so the tiles are narrow in N
    # to give every SM a few programs (H100 run 2: 16 x 128 tiles left o at M = 16 with 32
    # programs and 44 us; run 3: 16 x 16 tiles 18 us). Large M: tiles wide in N reuse each
    # gathered activation row segment over more output columns (run 3: 32 x 128 best, by 3-12 %).
    if m <= 16:
        return 16, (16 if n <= 8192 else 32)
    if m <= 256:
        return 32, 64
    return 32, 128


def zipper_high_gpu(x_smoothed, high, out, method=None, *, block=None):
    """`out += 16 * Δ_n * (x_smoothed @ q_high.T)` in place and return `out`.

    x_smoothed: fp16/bf16/fp32 [M, K] (X', already smoothed), rows contiguous; high: from
    `prepare_zipper_high`; out: float32 [M, N] contiguous on the same device. method: "columns",
    "ell" or None (the prepared default). `block=(BLOCK_M, BLOCK_N)` overrides the tiles (tuning).
    """
    if not isinstance(high, ZipperHighGPU):
        raise ValueError(f"high must be ZipperHighGPU from prepare_zipper_high, got {type(high).__name__}")
    n, k = high.shape
    if not isinstance(x_smoothed, torch.Tensor) or x_smoothed.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x_smoothed must be a float16/bfloat16/float32 tensor, got {getattr(x_smoothed, 'dtype', type(x_smoothed))}")
    if x_smoothed.dim() != 2 or x_smoothed.shape[1] != k:
        raise ValueError(f"x_smoothed must be [M, {k}], got {tuple(x_smoothed.shape)}")
    if x_smoothed.stride(1) != 1:
        raise ValueError("x_smoothed must be contiguous along K")
    m = x_smoothed.shape[0]
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32:
        raise ValueError(f"out must be a float32 tensor, got {getattr(out, 'dtype', type(out))}")
    if tuple(out.shape) != (m, n):
        raise ValueError(f"out must have shape {(m, n)}, got {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    for name, t in (("x_smoothed", x_smoothed), ("out", out)):
        if t.device != high.device:
            raise ValueError(f"{name} is on {t.device} but high is on {high.device}")
    if m * max(n, x_smoothed.stride(0)) >= 2**31:
        raise ValueError(f"M={m} rows exceed the kernels' int32 offsets for this shape; split M")
    method = high.default_method if method is None else method
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if m == 0 or high.nnz == 0:
        return out
    bm, bn = block if block is not None else _pick_tiles(m, n)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    if method == "columns":
        _high_columns_kernel[grid](x_smoothed, high.cols, high.h_cols, high.row_scale, out, m, n, high.n_cols,
                                   x_smoothed.stride(0), BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    else:
        _high_ell_kernel[grid](x_smoothed, high.ell_cols, high.ell_vals, high.row_scale, out, m, n, high.e_max,
                               x_smoothed.stride(0), BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return out
