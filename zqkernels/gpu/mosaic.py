"""MosaicQuant on the GPU: ZipperEngine, the fused dense-base + block-sparse-residual 4-bit GEMM.

Product (DESIGN.md §3.3), per token m and output channel n:

    Y[m, n] = sx[m] * (Δb[n] * (qx[m] @ qb[n]) + Σ_{kept blocks b in the row-block of n} Δr[b, n] * (qx_b[m] @ qr_b[n]))

Layout built once by `prepare_mosaic` (offline, like any weight packing):
- the base `qb` packed to int4 `[N, K/2]` and its scale (per channel `[N]` or per group `[N, G]`);
- the kept residual blocks packed block by block `[B, bn, bk/2]` with their row scales `[B, bn]`;
- a block-CSR over the residual row-blocks: `indptr[rb]:indptr[rb+1]` are the kept blocks of
  row-block rb and `kblock[b]` their column-blocks, ascending. `reference.mosaic_quantize` emits
  `block_index` sorted row-major, so the CSR order IS the storage order and block ids are positions.
  For output tiles wider than bn (BLOCK_N a multiple of bn) `MosaicGPUWeights.tile_lists` builds
  the same CSR per N-tile over the union of its row-blocks, with the block id of each row-block
  (-1 where it keeps none): the residual MMA of such a tile multiplies zeros in the absent part.

ZipperEngine (`mosaic_w4a4_gemm`) has two K walks in the same kernel (one launch either way):

- In-loop (the DESIGN.md §3.4 form; DEFAULT AT 16 < M <= 64): one program owns a [BLOCK_M, BLOCK_N]
  output tile (BLOCK_N divides bn, or is a multiple of it) and walks K in BLOCK_K steps (BLOCK_K
  divides bk, so each step lies inside one residual column-block, whose per-row scale is constant
  along the step). Every step does the dense base MMA; when the step's column-block is in the
  tile's CSR list, a second int8 MMA multiplies the SAME activation registers by the residual tile
  into a separate fp32 accumulator. X is read once. It can split K over programs (SPLIT_K).
- RES_LATE (`config=dict(..., RES_LATE=True)`; DEFAULT AT M > 64, unsplit, and M <= 16, split):
  the base K loop is
  `w4a4.w4a4_gemm`'s fast loop (`_fast_base_loop`: BLOCK_K 256 independent of bk = 64, the x16
  nibble unpack, clamped rows, GROUP_M swizzle, w4a4's large-M tile 128 x 128 / 8 warps / 3 stages,
  64 x 64 / 4 warps / 4 stages at M <= 256). Then the int32 base accumulator is folded to fp32 in
  place, and a short tail loop runs the tile's kept residual blocks (bk deep per step) into that
  same fp32 accumulator. The tail RE-READS each kept block's X tile (from L2: at 5 % density about
  5-10 % of the tile's X bytes) instead of reusing the tile already in registers, and that is the
  point: reuse needs a second accumulator live across the whole main loop, which at the large-M
  tile means 255 registers and spills (run 3: 128 x 64 in-loop, 20 spilled), while RES_LATE keeps
  one accumulator (128 x 128 x 256: 240 registers, 0 spills) and a main loop identical to the
  dense GEMM's. It departs from the design's "no second pass over X" for those 5 % of X tiles.
  Tail variants (`RES_PIPE`): 0 (default at M > 64) a plain loop; n > 0 `tl.range(num_stages=n)`;
  -1 manual prefetch (step i+1's X / residual tiles and scales loaded before step i's MMA).
  FAST_SPLIT=True (DEFAULT AT M <= 16, with SPLIT_K=0: about two programs per SM, RES_PIPE=-1):
  the same fast base loop split over K tiles (w4a4_gemm's small-M split-K structure, without its
  SWAP_AB), each split taking every SPLIT_K-th tail step; the last arrival sums the fp32 partials.

`mosaic_w4a4_gemm_unfused` is the baseline: the dense GEMM (the same fast loop when unsplit), then a
second kernel that re-reads X for every kept block and adds the residual into the stored output.

Measured (H100, reports/results/h100/tune_mosaic_run5.json, run 4 before it; every timed variant
verified against a float64 oracle first, integer accumulators exact; do_bench median with L2
flushed, and CUDA-graph replay), 5 % density, fused time / w4a4_gemm (graph):
- M = 4096: RES_LATE 128 x 128 x 256 takes 1.34-1.38x w4a4_gemm on o, qkv, gate_up, down (run 4:
  1.31-1.38x; the old in-loop default took 2.1-2.3x); on o at 0 % density 1.03x, 1 %: 1.08x,
  10 %: 1.67x, 20 %: 2.13x. The residual tail costs ~10 us per percent of density on o (53 us at
  5 %). Pipelining it did NOT help (run 5): tl.range with 2 / 3 stages is 1-13 % / 3-19 % slower,
  the manual prefetch equal within 1 % on gate_up, down and o at 0 %, 2-9 % slower on o, qkv and
  at 1-20 % on o, so RES_PIPE stays 0 there. Why: at 5 % a 128-wide tile (the union of two
  row-blocks' lists over 64 column-blocks) has only ~6 tail steps, and each tile's tail runs after
  its own base loop with nothing else to overlap: 53 us over ~7.8 waves of 1024 tiles on o is
  ~1.1 us per step, a chain of dependent loads (indptr -> kblock / bids -> X and residual tiles)
  that a 2-3 stage pipeline over ~6 iterations cannot hide; tl.range stages the tiles through
  shared memory (22 cp.async in the sm_90 PTX, Triton 3.9) and adds waits, the prefetch adds
  registers. Hiding it needs other work beside it (a persistent grid overlapping one tile's tail
  with the next tile's base loop, or the in-loop form without its register cost).
  cuBLAS FP16 / fused = 0.84-0.98 (w4a4_gemm itself is only 1.13-1.35x cuBLAS there).
- M = 256 (run 4, graph): RES_LATE 64 x 64 x 256: 1.19-1.40x w4a4_gemm.
- M = 16 (run 5, graph): the FAST_SPLIT default takes 1.06x (o), 1.15x (qkv, down), 1.16x
  (gate_up) w4a4_gemm, 1.74-2.45x faster than cuBLAS FP16 (the old in-loop default: 1.39-2.54x
  w4a4_gemm, 21.6-56.5 us against 13.8-39.5 us now). Eager (no graph) times at M = 16 are host
  launch bound (43-92 us for 13-40 us kernels) and scatter by +-30 % between variants. M = 1 is
  unmeasured (same bucket, same weight-bound work).
Targets: <= 1.15x at M <= 16 is met on o, qkv, down, just missed on gate_up (1.157x); <= 1.10x at
M >= 256 and >= 1.24x cuBLAS at M = 4096 are NOT met at 5 % (<= 1.10x holds up to ~1 %).

Nibbles become two int8 planes, the even elements and the odd elements; a dot over K is a sum, so
`dot(x_lo, w_lo) + dot(x_hi, w_hi)` is the dot over natural K order. The W4A4 kernels unpack each
nibble to SIXTEEN times its code (`byte << 4` and `byte & 0xF0`, both exact int8; the shared
`int4.unpack_lo_hi_x16`): a few 32-bit ops per four bytes (inline PTX, `pack=4`) instead of a sign
extension per nibble, which the first H100 run showed to be the bottleneck (the unpack cost more
ALU time than the MMAs). Each dot
then carries a factor 256 that the epilogue removes exactly (`>> 8`, or a power-of-two scale);
int32 holds it while 256 * 64 * K < 2**31, i.e. K < 131072 (checked).
"""
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import triton
import triton.language as tl

from zqkernels.gpu.int4 import unpack_interleaved, unpack_lo_hi_x16
from zqkernels.gpu.w4a4 import check_out

# Inline PTX does not run under Triton's CPU interpreter; there the same bytes are computed with
# int8 shifts and masks (identical results, checked by the tests against the compiled path on GPU).
_USE_ASM = os.environ.get("TRITON_INTERPRET", "0") != "1"
MAX_K = 131071  # 256 * 64 * K must stay below 2**31 in the int32 accumulators

# Launch configurations as data: M bucket -> tile shape. M <= 16: FAST_SPLIT RES_LATE (w4a4's wide
# base loop split over K, auto split, prefetched tail), the fastest verified variant on every
# LLaMA-3-8B shape at M = 16 in reports/results/h100/tune_mosaic_run5.json (CUDA-graph timing;
# 1.2-2.2x faster than run 3's in-loop config, kept in tune_mosaic.OLD_DEFAULT[16]). 16 < M <= 64:
# the in-loop config of reports/results/h100/tune_mosaic_run3.json (split-K; unchanged). M > 64: RES_LATE
# with the dense GEMM's own fast base loop and tiles (configs/h100.json's w4a4 buckets 256 and
# 4096), the fastest verified fused variant on every LLaMA-3-8B shape at M = 256 and M = 4096 in
# reports/results/h100/tune_mosaic_run4.json (do_bench and CUDA-graph timing agree). M = 1024 is
# unmeasured: it takes the large-M config, as w4a4_gemm does. BLOCK_K divides bk, or (RES_LATE
# only) exceeds it; BLOCK_N divides bn or is a multiple of it. SPLIT_K=0 chooses a split for about
# two programs per SM.
_CONFIGS = {
    16: dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, GROUP_M=1, RES_LATE=True, FAST_SPLIT=True, SPLIT_K=0, RES_PIPE=-1,
             num_warps=4, num_stages=4),
    64: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, UNROLL=2, SPLIT_K=0, num_warps=4, num_stages=3),
    256: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, RES_LATE=True, SPLIT_K=1, num_warps=4,
              num_stages=4),
    None: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=256, GROUP_M=8, RES_LATE=True, SPLIT_K=1, num_warps=8,
               num_stages=3),
}
# The W4A16 variant keeps the run-3 table (it has no RES_LATE form and was timed with these).
_CONFIGS_W4A16 = dict(_CONFIGS)
_CONFIGS_W4A16[16] = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, UNROLL=4, SPLIT_K=1, SEGMENTED=False, num_warps=4,
                          num_stages=3)
_CONFIGS_W4A16[256] = _CONFIGS_W4A16[None] = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, UNROLL=1, num_warps=4,
                                                  num_stages=4)


def _pick_config(m, block, act_group_size, weight_group_size, table=None):
    table = _CONFIGS if table is None else table
    for bound in (16, 64, 256, None):
        if bound is None or m <= bound:
            cfg = dict(table[bound])
            break
    bn, bk = block
    if bn % cfg["BLOCK_N"] and cfg["BLOCK_N"] % bn:  # a tile neither inside one row-block nor whole ones
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], bn)
    # Group sizes must be multiples of BLOCK_K (checked in _check_config, ValueError otherwise):
    # BLOCK_K = 64 is the smallest step whose nibble planes (32 deep) feed a compiled int8 dot,
    # so activation groups of 32 are not supported by these kernels.
    if not cfg.get("RES_LATE", False):
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], bk)
    for g in (act_group_size, weight_group_size):  # one scale per K step: BLOCK_K divides the group
        while g is not None and g % cfg["BLOCK_K"] and cfg["BLOCK_K"] > 64:
            cfg["BLOCK_K"] //= 2
    return cfg


@dataclass(frozen=True)
class MosaicGPUWeights:
    """Device-side MosaicQuant weights (see the module doc for the layout)."""

    shape: tuple  # (N, K)
    block: tuple  # (bn, bk)
    group_size: object  # base weight group size or None
    qb_packed: torch.Tensor  # uint8 [N, K/2]
    scale_base: torch.Tensor  # float32 [N] or [N, G]
    res_packed: torch.Tensor  # uint8 [max(B,1), bn, bk/2] (one zero block when B == 0)
    scale_res: torch.Tensor  # float32 [max(B,1), bn]
    indptr: torch.Tensor  # int32 [NBr + 1]
    kblock: torch.Tensor  # int32 [max(B,1)]
    n_blocks: int  # B
    block_index: np.ndarray  # int64 [B, 2], host copy
    _tile_lists: dict = field(default_factory=dict, repr=False, compare=False)

    def tile_lists(self, list_width):
        """Block-CSR over N-tiles of `list_width` output rows (a multiple of bn), on the device.

        Returns (indptr int32 [T+1], kblock int32 [max(E,1)], bids int32 [max(E,1), R]): entries
        indptr[t]:indptr[t+1] are the column-blocks, ascending, where any of the R = list_width/bn
        row-blocks of tile t keeps a block, and bids[e, j] is the block id of row-block t*R + j
        at that column-block (-1 when that row-block keeps none there). R = 1 is the plain CSR.
        """
        if list_width not in self._tile_lists:
            bn, bk = self.block
            n, k = self.shape
            r = list_width // bn
            nbr, nbc = -(-n // bn), -(-k // bk)
            n_tiles = -(-nbr // r)
            bi = self.block_index
            keys = (bi[:, 0] // r) * nbc + bi[:, 1]
            uniq, inv = np.unique(keys, return_inverse=True)
            bids = np.full((max(len(uniq), 1), r), -1, dtype=np.int32)
            bids[inv.reshape(-1), bi[:, 0] % r] = np.arange(len(bi), dtype=np.int32)
            kblock = np.zeros(max(len(uniq), 1), dtype=np.int32)
            kblock[: len(uniq)] = uniq % nbc
            indptr = np.zeros(n_tiles + 1, dtype=np.int32)
            np.cumsum(np.bincount(uniq // nbc, minlength=n_tiles), out=indptr[1:])
            dev = self.device
            self._tile_lists[list_width] = tuple(torch.from_numpy(a).to(dev) for a in (indptr, kblock, bids))
        return self._tile_lists[list_width]

    @property
    def density(self):
        n, k = self.shape
        bn, bk = self.block
        total = -(-n // bn) * -(-k // bk)
        return self.n_blocks / total if total else 0.0

    @property
    def device(self):
        return self.qb_packed.device


def _int_codes(name, a, lo, hi, shape=None):
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer codes, got dtype {a.dtype}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if a.size and (a.min() < lo or a.max() > hi):
        raise ValueError(f"{name} holds codes outside [{lo}, {hi}]")
    return a.astype(np.int64)


def _pack_int4_np(q):
    nib = (q & 0xF).astype(np.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def prepare_mosaic(codes, device):
    """`reference.MosaicCodes` -> `MosaicGPUWeights` on `device` (packing, CSR, float32 scales).

    Raises ValueError when the residual block list does not match the weight: wrong shapes, a
    block outside the grid, an unsorted or repeated block (density would exceed 1), nonzero codes
    past the matrix edge, odd K or odd bk (int4 packs two codes per byte), non-finite scales.
    """
    qb = np.asarray(codes.q_base)
    if qb.ndim != 2:
        raise ValueError(f"codes.q_base must be [N, K], got shape {qb.shape}")
    n, k = qb.shape
    if k % 2:
        raise ValueError(f"codes.q_base has odd K={k}; int4 packing needs an even K")
    if k > MAX_K:
        raise ValueError(f"codes.q_base has K={k}; the int32 accumulators hold K <= {MAX_K}")
    qb = _int_codes("codes.q_base", qb, -8, 7)
    try:
        bn, bk = (int(b) for b in codes.block)
    except (TypeError, ValueError):
        raise ValueError(f"codes.block must be (bn, bk), got {codes.block!r}") from None
    if bn <= 0 or bk <= 0 or bk % 2:
        raise ValueError(f"codes.block must be positive with an even bk, got {(bn, bk)}")
    group_size = codes.group_size
    sb = np.asarray(codes.scale_base, dtype=np.float64)
    want = (n,) if group_size is None else (n, -(-k // int(group_size)))
    if sb.shape != want:
        raise ValueError(f"codes.scale_base must have shape {want}, got {sb.shape}")
    if not np.all(np.isfinite(sb)):
        raise ValueError("codes.scale_base holds NaN or Inf")

    nbr, nbc = -(-n // bn), -(-k // bk)
    bi = np.asarray(codes.block_index)
    if bi.size == 0:
        bi = bi.reshape(0, 2)
    if bi.ndim != 2 or bi.shape[1] != 2 or not np.issubdtype(bi.dtype, np.integer):
        raise ValueError(f"codes.block_index must be an integer [B, 2] array, got {bi.shape} {bi.dtype}")
    b = bi.shape[0]
    if b > nbr * nbc:
        raise ValueError(f"density must lie in [0, 1]: {b} blocks for a grid of {nbr * nbc}")
    if b and (bi[:, 0].min() < 0 or bi[:, 0].max() >= nbr or bi[:, 1].min() < 0 or bi[:, 1].max() >= nbc):
        raise ValueError(f"codes.block_index holds a block outside the {nbr} x {nbc} grid")
    flat = bi[:, 0].astype(np.int64) * nbc + bi[:, 1]
    if b and np.any(np.diff(flat) <= 0):
        raise ValueError("codes.block_index must be sorted row-major without repeats")
    qr = _int_codes("codes.q_res", codes.q_res, -8, 7, shape=(b, bn, bk))
    sr = np.asarray(codes.scale_res, dtype=np.float64)
    if sr.shape != (b, bn):
        raise ValueError(f"codes.scale_res must have shape {(b, bn)}, got {sr.shape}")
    if not np.all(np.isfinite(sr)):
        raise ValueError("codes.scale_res holds NaN or Inf")
    for i in range(b):  # the kernel reads whole blocks: what lies past the edge must be zero
        rows = n - bi[i, 0] * bn
        cols = k - bi[i, 1] * bk
        if (rows < bn and np.any(qr[i, rows:, :])) or (cols < bk and np.any(qr[i, :, cols:])):
            raise ValueError(f"codes.q_res block {i} holds nonzero codes past the matrix edge")

    indptr = np.zeros(nbr + 1, dtype=np.int32)
    np.cumsum(np.bincount(bi[:, 0], minlength=nbr), out=indptr[1:])
    if b == 0:  # kernels take a pointer; one zero block is never read (every CSR list is empty)
        qr = np.zeros((1, bn, bk), dtype=np.int64)
        sr = np.zeros((1, bn))
        kblock = np.zeros(1, dtype=np.int32)
    else:
        kblock = bi[:, 1].astype(np.int32)

    dev = torch.device(device)
    return MosaicGPUWeights(
        shape=(n, k),
        block=(bn, bk),
        group_size=None if group_size is None else int(group_size),
        qb_packed=torch.from_numpy(_pack_int4_np(qb)).to(dev),
        scale_base=torch.from_numpy(sb.astype(np.float32)).to(dev).contiguous(),
        res_packed=torch.from_numpy(_pack_int4_np(qr)).to(dev).contiguous(),
        scale_res=torch.from_numpy(sr.astype(np.float32)).to(dev).contiguous(),
        indptr=torch.from_numpy(indptr).to(dev),
        kblock=torch.from_numpy(kblock).to(dev),
        n_blocks=b,
        block_index=bi.astype(np.int64).copy(),
    )


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row-tiles share each weight column-tile while it sits in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % size_m)
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _base_step(acc_i, acc_f, x_lo, x_hi, w_lo, w_hi, sx_ptr, sw_ptr, rm, rn, m_ok, n_ok, k0, K,
               stride_sx, stride_sw, ACT_GROUP: tl.constexpr, W_GROUP: tl.constexpr):
    """One K step of the dense base: int32 accumulation, or (group scales) an fp32 rescale of the
    step's int32 partial. Returns (acc_i, acc_f, sxg): sxg, the step's activation group scale,
    is reused by the residual MMA of the same step."""
    INV256: tl.constexpr = 0.00390625
    sxg = tl.zeros((1,), dtype=tl.float32)
    if (ACT_GROUP != 0) or (W_GROUP != 0):
        part = tl.dot(x_lo, w_lo, out_dtype=tl.int32)
        part = tl.dot(x_hi, w_hi, part, out_dtype=tl.int32)
        step = part.to(tl.float32) * INV256
        # A step past K (unrolled or a block's tail) has a zero partial and an out-of-range
        # scale index: mask the scale load so no garbage (possibly NaN) multiplies the zero.
        if ACT_GROUP != 0:
            sxg = tl.load(sx_ptr + rm * stride_sx + k0 // ACT_GROUP, mask=m_ok & ((rm * 0 + k0) < K), other=0.0)
            step = step * sxg[:, None]
        if W_GROUP != 0:
            swg = tl.load(sw_ptr + rn * stride_sw + k0 // W_GROUP, mask=n_ok & ((rn * 0 + k0) < K), other=0.0)
            step = step * swg[None, :]
        acc_f += step
    else:
        acc_i = tl.dot(x_lo, w_lo, acc_i, out_dtype=tl.int32)
        acc_i = tl.dot(x_hi, w_hi, acc_i, out_dtype=tl.int32)
    return acc_i, acc_f, sxg


@triton.jit
def _res_step(res_i, res_f, x_lo, x_hi, rq, srow, sxg, ACT_GROUP: tl.constexpr, INT_DEBUG: tl.constexpr,
              USE_ASM: tl.constexpr):
    """The residual MMA of one K step on the activation planes already in registers."""
    r_lo, r_hi = unpack_lo_hi_x16(rq, USE_ASM)
    rpart = tl.dot(x_lo, r_lo, out_dtype=tl.int32)
    rpart = tl.dot(x_hi, r_hi, rpart, out_dtype=tl.int32)
    if INT_DEBUG:
        res_i += rpart >> 8
    else:
        rstep = rpart.to(tl.float32) * srow[None, :]
        if ACT_GROUP != 0:
            rstep = rstep * sxg[:, None]
        res_f += rstep
    return res_i, res_f


@triton.jit
def _dense_segment(acc_i, acc_f, x_ptrs, w_ptrs, sx_ptr, sw_ptr, rm, rn, rh, m_ok, n_ok, k_begin, k_end, K,
                   stride_sx, stride_sw, ACT_GROUP: tl.constexpr, W_GROUP: tl.constexpr,
                   BLOCK_K: tl.constexpr, UNROLL: tl.constexpr, USE_ASM: tl.constexpr):
    """Base-only steps over [k_begin, k_end): a plain pipelined loop with no residual code in it."""
    for k_outer in range(k_begin, k_end, BLOCK_K * UNROLL):
        for j in tl.static_range(UNROLL):
            k0 = k_outer + j * BLOCK_K
            kh_ok = (k0 // 2 + rh) < (k_end // 2)
            xq = tl.load(x_ptrs + k0 // 2, mask=m_ok[:, None] & kh_ok[None, :], other=0)
            wq = tl.load(w_ptrs + k0 // 2, mask=kh_ok[:, None] & n_ok[None, :], other=0)
            x_lo, x_hi = unpack_lo_hi_x16(xq, USE_ASM)
            w_lo, w_hi = unpack_lo_hi_x16(wq, USE_ASM)
            acc_i, acc_f, sxg = _base_step(acc_i, acc_f, x_lo, x_hi, w_lo, w_hi, sx_ptr, sw_ptr, rm, rn, m_ok, n_ok,
                                           k0, k_end, stride_sx, stride_sw, ACT_GROUP, W_GROUP)
    return acc_i, acc_f


@triton.jit
def _fast_base_loop(acc_i, acc_f, xp_ptr, wp_ptr, sx_ptr, sw_ptr, rm_s, rn_s, K_HALF, stride_sx, stride_sw, t0, t1,
                    ACT_GROUP: tl.constexpr, W_GROUP: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                    USE_ASM: tl.constexpr):
    """The dense base over all of K exactly as `w4a4.w4a4_gemm`'s fast loop walks it: BLOCK_K steps
    independent of the residual block width, rows clamped (rm_s = rm % M) instead of masked, both
    operands K-contiguous [rows, BLOCK_K/2] with the weight transposed in the dot, pointers bumped
    per step, K masked only when BLOCK_K does not divide K. Nothing else lives in this loop.
    Walks K tiles [t0, t1) (all of K unsplit; one split's share with FAST_SPLIT)."""
    BKH: tl.constexpr = BLOCK_K // 2
    INV256: tl.constexpr = 0.00390625
    offs_kh = tl.max_contiguous(tl.multiple_of(tl.arange(0, BKH), BKH), BKH)
    a_ptrs = xp_ptr + rm_s.to(tl.int64)[:, None] * K_HALF + (t0 * BKH + offs_kh)[None, :]
    w_ptrs = wp_ptr + rn_s.to(tl.int64)[:, None] * K_HALF + (t0 * BKH + offs_kh)[None, :]
    for t in range(t0, t1):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            kmask = (t * BKH + offs_kh) < K_HALF
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0)  # byte 0 = codes (0, 0)
            w = tl.load(w_ptrs, mask=kmask[None, :], other=0)
        a_lo, a_hi = unpack_lo_hi_x16(a, USE_ASM)
        w_lo, w_hi = unpack_lo_hi_x16(w, USE_ASM)
        part = tl.dot(a_lo, tl.trans(w_lo), out_dtype=tl.int32)
        part = tl.dot(a_hi, tl.trans(w_hi), part, out_dtype=tl.int32)
        if (ACT_GROUP != 0) or (W_GROUP != 0):
            # BLOCK_K divides the group sizes (checked): the step lies in one group.
            step = part.to(tl.float32) * INV256
            if ACT_GROUP != 0:
                step = step * tl.load(sx_ptr + rm_s * stride_sx + (t * BLOCK_K) // ACT_GROUP)[:, None]
            if W_GROUP != 0:
                step = step * tl.load(sw_ptr + rn_s * stride_sw + (t * BLOCK_K) // W_GROUP)[None, :]
            acc_f += step
        else:
            acc_i += part
        a_ptrs += BKH
        w_ptrs += BKH
    return acc_i, acc_f


@triton.jit
def _res_tail_load(tt, t_end, xr_ptrs, rr_off, kblock_ptr, bids_ptr, rp_ptr, sr_ptr, slot, n_local, rhr, K_HALF,
                   R: tl.constexpr, RSTEPS: tl.constexpr, RES_BK: tl.constexpr, BN_RES: tl.constexpr,
                   BK_RES: tl.constexpr, GUARD: tl.constexpr):
    """Loads of RES_LATE tail step tt (kept block tt // RSTEPS, its RES_BK-deep part tt % RSTEPS):
    the X tile (re-read, clamped rows), the residual tile and its row scales. GUARD (the manual
    prefetch, which runs one step past the last): a step tt >= t_end loads zeros, an absent block."""
    INV256: tl.constexpr = 0.00390625
    e = tt // RSTEPS
    koff = (tt - e * RSTEPS) * RES_BK
    if GUARD:
        e = tl.where(tt < t_end, e, 0)  # entry 0 always exists (tile_lists keeps one dummy when none)
    k0 = tl.load(kblock_ptr + e) * BK_RES + koff
    kh_ok = (k0 // 2 + rhr) < K_HALF
    if GUARD:
        kh_ok = kh_ok & ((rhr * 0 + tt) < t_end)
    xq = tl.load(xr_ptrs + k0 // 2, mask=kh_ok[None, :], other=0)
    bid = tl.load(bids_ptr + e * R + slot)
    if GUARD:
        bid = tl.where((slot * 0 + tt) < t_end, bid, -1)
    have = bid >= 0
    # Blocks are zero past the matrix edge; only absent row-blocks are masked.
    rq = tl.load(rp_ptr + bid[None, :] * (BN_RES * (BK_RES // 2)) + koff // 2 + rr_off, mask=have[None, :], other=0)
    srow = tl.load(sr_ptr + bid * BN_RES + n_local, mask=have, other=0.0) * INV256
    return xq, rq, srow, k0


@triton.jit
def _res_tail_mma(res_i, res_f, xq, rq, srow, k0, sx_ptr, rm, rm_s, stride_sx, K, ACT_GROUP: tl.constexpr,
                  INT_DEBUG: tl.constexpr, USE_ASM: tl.constexpr):
    """The residual MMA of one RES_LATE tail step on tiles loaded by `_res_tail_load`."""
    x_lo, x_hi = unpack_lo_hi_x16(xq, USE_ASM)
    if ACT_GROUP != 0:
        sxg = tl.load(sx_ptr + rm_s * stride_sx + k0 // ACT_GROUP, mask=(rm * 0 + k0) < K, other=0.0)
    else:
        sxg = tl.zeros((1,), dtype=tl.float32)
    return _res_step(res_i, res_f, x_lo, x_hi, rq, srow, sxg, ACT_GROUP, INT_DEBUG, USE_ASM)


@triton.jit
def _mosaic_w4a4_kernel(
    xp_ptr, sx_ptr, wp_ptr, sw_ptr, rp_ptr, sr_ptr, indptr_ptr, kblock_ptr, bids_ptr, out_ptr, out2_ptr,
    ws_ptr, cnt_ptr,
    M, N, K, K_HALF,
    stride_sx, stride_sw,
    ACT_GROUP: tl.constexpr,  # 0: one scale per token; else channels per activation group
    W_GROUP: tl.constexpr,  # 0: one base scale per channel; else channels per weight group
    HAS_RES: tl.constexpr,  # False: the dense base alone (the unfused baseline's first kernel)
    INT_DEBUG: tl.constexpr,  # store int32 base and unscaled int32 residual sums (exact tests)
    SEGMENTED: tl.constexpr,  # K walk: per-step residual test (False) or dense/residual segments
    SPLIT_K: tl.constexpr,  # > 1 (SEGMENTED only): K split over programs, last arrival reduces
    RES_LATE: tl.constexpr,  # alternative (not in-loop): base loop first, residual blocks after it
    FAST_BASE: tl.constexpr,  # unsplit RES_LATE / base-only: w4a4_gemm's loop (`_fast_base_loop`)
    EVEN_K: tl.constexpr,  # BLOCK_K divides K (FAST_BASE loads unmasked)
    RES_BK: tl.constexpr,  # K step of the FAST_BASE residual tail: min(BLOCK_K, bk)
    RES_PIPE: tl.constexpr,  # FAST_BASE tail: 0 plain loop, n > 0 tl.range(num_stages=n), -1 manual prefetch
    USE_ASM: tl.constexpr,
    BN_RES: tl.constexpr, BK_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UNROLL: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    KH = K // 2
    HALF: tl.constexpr = BLOCK_K // 2
    PER_STEP_SCALE: tl.constexpr = (ACT_GROUP != 0) or (W_GROUP != 0)
    INV256: tl.constexpr = 0.00390625  # removes the 16 * 16 of the x16 nibble planes, exactly
    STEPS: tl.constexpr = BK_RES // BLOCK_K

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rh = tl.arange(0, HALF)
    m_ok = rm < M
    n_ok = rn < N
    x_ptrs = xp_ptr + rm[:, None] * KH + rh[None, :]
    w_ptrs = wp_ptr + rn[None, :] * KH + rh[:, None]  # [HALF, BLOCK_N]: the transposed B operand

    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    res_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    res_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)

    # This tile's list (its row-block, or the union over its row-blocks when BLOCK_N > bn) and
    # the cursor into it; each column's slot picks the block id of its own row-block.
    LIST_W: tl.constexpr = BLOCK_N if BLOCK_N > BN_RES else BN_RES
    R: tl.constexpr = LIST_W // BN_RES
    n0 = pid_n * BLOCK_N
    tile = n0 // LIST_W
    slot = ((n0 - tile * LIST_W) + tl.arange(0, BLOCK_N)) // BN_RES
    n_local = rn % BN_RES
    p = tl.load(indptr_ptr + tile)
    p_end = tl.load(indptr_ptr + tile + 1)
    r_off = n_local[None, :] * (BK_RES // 2) + rh[:, None]  # within one packed residual block

    # Split-K (small M: too few output tiles to fill the SMs): program pid_k walks the K range
    # [k_begin, k_end), aligned to whole residual column-blocks so no block is cut in two.
    pid_k = tl.program_id(1)
    if SPLIT_K > 1:
        per_split = tl.cdiv(tl.cdiv(K, BK_RES), SPLIT_K) * BK_RES
        k_begin = tl.minimum(pid_k * per_split, K)
        k_end = tl.minimum(k_begin + per_split, K)
    else:
        k_begin = 0
        k_end = K

    if FAST_BASE:
        # Large M: the base loop alone, as fast as the dense GEMM's (one int32 accumulator live).
        rm_s = rm % M
        rn_s = rn % N
        # Split (FAST_SPLIT, small M): program pid_k takes a contiguous share of the BLOCK_K tiles
        # and every SPLIT_K-th residual step of the tail; the partials are summed in the epilogue.
        k_tiles = tl.cdiv(K_HALF, BLOCK_K // 2)
        if SPLIT_K > 1:
            per_tiles = tl.cdiv(k_tiles, SPLIT_K)
            t0 = tl.minimum(pid_k * per_tiles, k_tiles)
            t1 = tl.minimum(t0 + per_tiles, k_tiles)
        else:
            t0 = 0
            t1 = k_tiles
        acc_i, acc_f = _fast_base_loop(acc_i, acc_f, xp_ptr, wp_ptr, sx_ptr, sw_ptr, rm_s, rn_s, K_HALF,
                                       stride_sx, stride_sw, t0, t1, ACT_GROUP, W_GROUP, BLOCK_K, EVEN_K, USE_ASM)
        if HAS_RES:
            if not INT_DEBUG:
                # Fold the base to fp32 (its int32 accumulator dies here), then add the residual
                # blocks into the same registers: still one [BLOCK_M, BLOCK_N] accumulator.
                if PER_STEP_SCALE:
                    res_f = acc_f
                else:
                    res_f = (acc_i >> 8).to(tl.float32)
                if W_GROUP == 0:
                    res_f = res_f * tl.load(sw_ptr + rn_s)[None, :]
            # Residual tail: the tile's kept column-blocks, RES_BK deep per step; each step
            # re-reads its X tile (from L2: 5 % of X at 5 % density) rather than holding it.
            RHALF: tl.constexpr = RES_BK // 2
            RSTEPS: tl.constexpr = BK_RES // RES_BK
            rhr = tl.arange(0, RHALF)
            xr_ptrs = xp_ptr + rm_s.to(tl.int64)[:, None] * K_HALF + rhr[None, :]
            rr_off = n_local[None, :] * (BK_RES // 2) + rhr[:, None]
            t_begin = p * RSTEPS + pid_k  # pid_k = 0 unsplit
            t_end = p_end * RSTEPS
            if RES_PIPE < 0:
                # Manual prefetch: step tt+1's X and residual tiles (and scales) are loaded into
                # registers before step tt's MMA, so their L2 latency overlaps it.
                xq, rq, srow, k0 = _res_tail_load(t_begin, t_end, xr_ptrs, rr_off, kblock_ptr, bids_ptr,
                                                  rp_ptr, sr_ptr, slot, n_local, rhr, K_HALF, R, RSTEPS, RES_BK,
                                                  BN_RES, BK_RES, True)
                for tt in range(t_begin, t_end, SPLIT_K):
                    xq_n, rq_n, srow_n, k0_n = _res_tail_load(tt + SPLIT_K, t_end, xr_ptrs, rr_off, kblock_ptr,
                                                              bids_ptr, rp_ptr, sr_ptr, slot, n_local, rhr, K_HALF, R,
                                                              RSTEPS, RES_BK, BN_RES, BK_RES, True)
                    res_i, res_f = _res_tail_mma(res_i, res_f, xq, rq, srow, k0, sx_ptr, rm, rm_s, stride_sx, K,
                                                 ACT_GROUP, INT_DEBUG, USE_ASM)
                    xq, rq, srow, k0 = xq_n, rq_n, srow_n, k0_n
            elif RES_PIPE > 0:
                # Software-pipelined by the compiler: RES_PIPE stages of loads in flight.
                for tt in tl.range(t_begin, t_end, SPLIT_K, num_stages=RES_PIPE):
                    xq, rq, srow, k0 = _res_tail_load(tt, t_end, xr_ptrs, rr_off, kblock_ptr, bids_ptr, rp_ptr, sr_ptr,
                                                      slot, n_local, rhr, K_HALF, R, RSTEPS, RES_BK, BN_RES, BK_RES, False)
                    res_i, res_f = _res_tail_mma(res_i, res_f, xq, rq, srow, k0, sx_ptr, rm, rm_s, stride_sx, K,
                                                 ACT_GROUP, INT_DEBUG, USE_ASM)
            else:
                # Run 4's tail: each step's MMA waits on its own loads.
                for tt in range(t_begin, t_end, SPLIT_K):
                    xq, rq, srow, k0 = _res_tail_load(tt, t_end, xr_ptrs, rr_off, kblock_ptr, bids_ptr, rp_ptr, sr_ptr,
                                                      slot, n_local, rhr, K_HALF, R, RSTEPS, RES_BK, BN_RES, BK_RES, False)
                    res_i, res_f = _res_tail_mma(res_i, res_f, xq, rq, srow, k0, sx_ptr, rm, rm_s, stride_sx, K,
                                                 ACT_GROUP, INT_DEBUG, USE_ASM)
    elif not HAS_RES:
        acc_i, acc_f = _dense_segment(acc_i, acc_f, x_ptrs, w_ptrs, sx_ptr, sw_ptr, rm, rn, rh, m_ok, n_ok,
                                      k_begin, k_end, K, stride_sx, stride_sw, ACT_GROUP, W_GROUP, BLOCK_K, UNROLL,
                                      USE_ASM)
    elif RES_LATE:
        # Not ZipperEngine's in-loop reuse: the base loop runs alone (one accumulator, like the
        # dense GEMM), is folded to fp32 (its int32 accumulator dies), then each kept block re-reads
        # its X tile (5 % of the tile's X bytes, from L2) for the residual MMA. One launch.
        acc_i, acc_f = _dense_segment(acc_i, acc_f, x_ptrs, w_ptrs, sx_ptr, sw_ptr, rm, rn, rh, m_ok, n_ok,
                                      k_begin, k_end, K, stride_sx, stride_sw, ACT_GROUP, W_GROUP, BLOCK_K, UNROLL,
                                      USE_ASM)
        if not INT_DEBUG:
            if PER_STEP_SCALE:
                res_f = acc_f
            else:
                res_f = (acc_i >> 8).to(tl.float32)
            if W_GROUP == 0:
                res_f = res_f * tl.load(sw_ptr + rn, mask=n_ok, other=0.0)[None, :]
        for e in range(p, p_end):
            kb0 = tl.load(kblock_ptr + e) * BK_RES
            if (kb0 >= k_begin) & (kb0 < k_end):
                bid = tl.load(bids_ptr + e * R + slot)
                have = bid >= 0
                srow = tl.load(sr_ptr + bid * BN_RES + n_local, mask=have, other=0.0) * INV256
                for j in tl.static_range(STEPS):
                    k0 = kb0 + j * BLOCK_K
                    kh_ok = (k0 // 2 + rh) < KH
                    xq = tl.load(x_ptrs + k0 // 2, mask=m_ok[:, None] & kh_ok[None, :], other=0)
                    rq = tl.load(rp_ptr + bid[None, :] * (BN_RES * (BK_RES // 2)) + (j * HALF) + r_off,
                                 mask=have[None, :], other=0)
                    x_lo, x_hi = unpack_lo_hi_x16(xq, USE_ASM)
                    if ACT_GROUP != 0:
                        sxg = tl.load(sx_ptr + rm * stride_sx + k0 // ACT_GROUP, mask=m_ok & ((rm * 0 + k0) < K),
                                      other=0.0)
                    else:
                        sxg = tl.zeros((1,), dtype=tl.float32)
                    res_i, res_f = _res_step(res_i, res_f, x_lo, x_hi, rq, srow, sxg, ACT_GROUP, INT_DEBUG,
                                             USE_ASM)
    elif SEGMENTED and SPLIT_K > 1:
        k_lo = k_begin
        for e in range(p, p_end):
            kb0 = tl.load(kblock_ptr + e) * BK_RES
            if (kb0 >= k_begin) & (kb0 < k_end):  # this split's blocks only
                acc_i, acc_f = _dense_segment(acc_i, acc_f, x_ptrs, w_ptrs, sx_ptr, sw_ptr, rm, rn, rh, m_ok, n_ok,
                                              k_lo, kb0, K, stride_sx, stride_sw, ACT_GROUP, W_GROUP, BLOCK_K,
                                              UNROLL, USE_ASM)
                bid = tl.load(bids_ptr + e * R + slot)
                have = bid >= 0
                srow = tl.load(sr_ptr + bid * BN_RES + n_local, mask=have, other=0.0) * INV256
                for j in tl.static_range(STEPS):
                    k0 = kb0 + j * BLOCK_K
                    kh_ok = (k0 // 2 + rh) < KH
                    xq = tl.load(x_ptrs + k0 // 2, mask=m_ok[:, None] & kh_ok[None, :], other=0)
                    wq = tl.load(w_ptrs + k0 // 2, mask=kh_ok[:, None] & n_ok[None, :], other=0)
                    rq = tl.load(rp_ptr + bid[None, :] * (BN_RES * (BK_RES // 2)) + (j * HALF) + r_off,
                                 mask=have[None, :], other=0)
                    x_lo, x_hi = unpack_lo_hi_x16(xq, USE_ASM)
                    w_lo, w_hi = unpack_lo_hi_x16(wq, USE_ASM)
                    acc_i, acc_f, sxg = _base_step(acc_i, acc_f, x_lo, x_hi, w_lo, w_hi, sx_ptr, sw_ptr, rm, rn,
                                                   m_ok, n_ok, k0, K, stride_sx, stride_sw, ACT_GROUP, W_GROUP)
                    res_i, res_f = _res_step(res_i, res_f, x_lo, x_hi, rq, srow, sxg, ACT_GROUP, INT_DEBUG,
                                             USE_ASM)
                k_lo = kb0 + BK_RES
        acc_i, acc_f = _dense_segment(acc_i, acc_f, x_ptrs, w_ptrs, sx_ptr, sw_ptr, rm, rn, rh, m_ok, n_ok,
                                      k_lo, k_end, K, stride_sx, stride_sw, ACT_GROUP, W_GROUP, BLOCK_K, UNROLL,
                                      USE_ASM)
    elif SEGMENTED:
        # Dense stretches run the plain base loop (pipelined like the dense GEMM); each kept
        # column-block runs its STEPS steps with both MMAs on the same activation registers.
        k_lo = 0
        for e in range(p, p_end):
            kb0 = tl.load(kblock_ptr + e) * BK_RES
            acc_i, acc_f = _dense_segment(acc_i, acc_f, x_ptrs, w_ptrs, sx_ptr, sw_ptr, rm, rn, rh, m_ok, n_ok,
                                          k_lo, kb0, K, stride_sx, stride_sw, ACT_GROUP, W_GROUP, BLOCK_K, UNROLL,
                                          USE_ASM)
            bid = tl.load(bids_ptr + e * R + slot)
            have = bid >= 0
            srow = tl.load(sr_ptr + bid * BN_RES + n_local, mask=have, other=0.0) * INV256
            for j in tl.static_range(STEPS):
                k0 = kb0 + j * BLOCK_K
                kh_ok = (k0 // 2 + rh) < KH
                xq = tl.load(x_ptrs + k0 // 2, mask=m_ok[:, None] & kh_ok[None, :], other=0)
                wq = tl.load(w_ptrs + k0 // 2, mask=kh_ok[:, None] & n_ok[None, :], other=0)
                # Blocks are zero past the matrix edge; only absent row-blocks are masked.
                rq = tl.load(rp_ptr + bid[None, :] * (BN_RES * (BK_RES // 2)) + (j * HALF) + r_off,
                             mask=have[None, :], other=0)
                x_lo, x_hi = unpack_lo_hi_x16(xq, USE_ASM)
                w_lo, w_hi = unpack_lo_hi_x16(wq, USE_ASM)
                acc_i, acc_f, sxg = _base_step(acc_i, acc_f, x_lo, x_hi, w_lo, w_hi, sx_ptr, sw_ptr, rm, rn, m_ok,
                                               n_ok, k0, K, stride_sx, stride_sw, ACT_GROUP, W_GROUP)
                res_i, res_f = _res_step(res_i, res_f, x_lo, x_hi, rq, srow, sxg, ACT_GROUP, INT_DEBUG, USE_ASM)
            k_lo = kb0 + BK_RES
        acc_i, acc_f = _dense_segment(acc_i, acc_f, x_ptrs, w_ptrs, sx_ptr, sw_ptr, rm, rn, rh, m_ok, n_ok,
                                      k_lo, K, K, stride_sx, stride_sw, ACT_GROUP, W_GROUP, BLOCK_K, UNROLL, USE_ASM)
    else:
        # One loop; each step tests whether its column-block is the next entry of the list.
        NO_BLOCK = 2147483647
        next_cb = tl.load(kblock_ptr + p, mask=p < p_end, other=NO_BLOCK)
        for k_outer in range(0, K, BLOCK_K * UNROLL):
            for j in tl.static_range(UNROLL):  # unrolled: UNROLL steps' loads in flight per iteration
                k0 = k_outer + j * BLOCK_K
                kh_ok = (k0 // 2 + rh) < KH
                xq = tl.load(x_ptrs + k0 // 2, mask=m_ok[:, None] & kh_ok[None, :], other=0)
                wq = tl.load(w_ptrs + k0 // 2, mask=kh_ok[:, None] & n_ok[None, :], other=0)
                x_lo, x_hi = unpack_lo_hi_x16(xq, USE_ASM)
                w_lo, w_hi = unpack_lo_hi_x16(wq, USE_ASM)
                acc_i, acc_f, sxg = _base_step(acc_i, acc_f, x_lo, x_hi, w_lo, w_hi, sx_ptr, sw_ptr, rm, rn, m_ok,
                                               n_ok, k0, K, stride_sx, stride_sw, ACT_GROUP, W_GROUP)
                cb = k0 // BK_RES
                if cb == next_cb:
                    koff = k0 - cb * BK_RES
                    bid = tl.load(bids_ptr + p * R + slot)
                    have = bid >= 0
                    rq = tl.load(rp_ptr + bid[None, :] * (BN_RES * (BK_RES // 2)) + koff // 2 + r_off,
                                 mask=have[None, :], other=0)
                    srow = tl.load(sr_ptr + bid * BN_RES + n_local, mask=have, other=0.0) * INV256
                    res_i, res_f = _res_step(res_i, res_f, x_lo, x_hi, rq, srow, sxg, ACT_GROUP, INT_DEBUG,
                                             USE_ASM)
                    if koff + BLOCK_K == BK_RES:  # last step of this block: advance the cursor
                        p += 1
                        next_cb = tl.load(kblock_ptr + p, mask=p < p_end, other=NO_BLOCK)

    o_off = rm[:, None] * N + rn[None, :]
    o_mask = m_ok[:, None] & n_ok[None, :]
    if INT_DEBUG:
        tl.store(out_ptr + o_off, acc_i >> 8, mask=o_mask)
        tl.store(out2_ptr + o_off, res_i, mask=o_mask)
    else:
        if RES_LATE and HAS_RES:
            y = res_f  # the base was folded in before the residual blocks
        else:
            if PER_STEP_SCALE:
                y = acc_f
            else:
                y = (acc_i >> 8).to(tl.float32)
            if W_GROUP == 0:
                sw = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
                y = y * sw[None, :]
            y = y + res_f
        if ACT_GROUP == 0:
            sx = tl.load(sx_ptr + rm, mask=m_ok, other=0.0)
            y = y * sx[:, None]
        if SPLIT_K > 1:
            # Every partial is the full epilogue of its K range (all of it is linear), so the
            # output is their sum: stored, counted in, and summed in split order by the last one.
            ws_tile = ws_ptr + o_off
            tl.store(ws_tile + pid_k * M * N, y, mask=o_mask)
            tl.debug_barrier()  # every thread's partial is stored before the arrival
            tile_id = tl.program_id(0)
            arrived = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for sp in range(SPLIT_K):
                    total += tl.load(ws_tile + sp * M * N, mask=o_mask, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + o_off, total.to(out_ptr.dtype.element_ty), mask=o_mask)
                tl.atomic_xchg(cnt_ptr + tile_id, 0)  # ready for the next launch
        else:
            tl.store(out_ptr + o_off, y.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _mosaic_residual_kernel(
    xp_ptr, sx_ptr, rp_ptr, sr_ptr, indptr_ptr, kblock_ptr, bids_ptr, out_ptr,
    M, N, K, stride_sx,
    ACT_GROUP: tl.constexpr, USE_ASM: tl.constexpr,
    BN_RES: tl.constexpr, BK_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Unfused baseline, second launch: out += sx * Σ_b Δr_b * (qx_b @ qr_b.T), re-reading X."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    KH = K // 2
    HALF: tl.constexpr = BLOCK_K // 2
    STEPS: tl.constexpr = BK_RES // BLOCK_K
    INV256: tl.constexpr = 0.00390625
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rh = tl.arange(0, HALF)
    m_ok = rm < M
    n_ok = rn < N
    LIST_W: tl.constexpr = BLOCK_N if BLOCK_N > BN_RES else BN_RES
    R: tl.constexpr = LIST_W // BN_RES
    n0 = pid_n * BLOCK_N
    tile = n0 // LIST_W
    slot = ((n0 - tile * LIST_W) + tl.arange(0, BLOCK_N)) // BN_RES
    n_local = rn % BN_RES
    p0 = tl.load(indptr_ptr + tile)
    p1 = tl.load(indptr_ptr + tile + 1)
    if p1 > p0:
        res_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        r_off = n_local[None, :] * (BK_RES // 2) + rh[:, None]
        for t in range(p0 * STEPS, p1 * STEPS):
            p = t // STEPS
            koff = (t - p * STEPS) * BLOCK_K
            k0 = tl.load(kblock_ptr + p) * BK_RES + koff
            kh_ok = (k0 // 2 + rh) < KH
            xq = tl.load(xp_ptr + rm[:, None] * KH + k0 // 2 + rh[None, :],
                         mask=m_ok[:, None] & kh_ok[None, :], other=0)
            bid = tl.load(bids_ptr + p * R + slot)
            have = bid >= 0
            rq = tl.load(rp_ptr + bid[None, :] * (BN_RES * (BK_RES // 2)) + koff // 2 + r_off,
                         mask=have[None, :], other=0)
            x_lo, x_hi = unpack_lo_hi_x16(xq, USE_ASM)
            r_lo, r_hi = unpack_lo_hi_x16(rq, USE_ASM)
            rpart = tl.dot(x_lo, r_lo, out_dtype=tl.int32)
            rpart = tl.dot(x_hi, r_hi, rpart, out_dtype=tl.int32)
            srow = tl.load(sr_ptr + bid * BN_RES + n_local, mask=have, other=0.0) * INV256
            rstep = rpart.to(tl.float32) * srow[None, :]
            if ACT_GROUP != 0:
                sxg = tl.load(sx_ptr + rm * stride_sx + k0 // ACT_GROUP, mask=m_ok & ((rm * 0 + k0) < K), other=0.0)
                rstep = rstep * sxg[:, None]
            res_f += rstep
        if ACT_GROUP == 0:
            sx = tl.load(sx_ptr + rm, mask=m_ok, other=0.0)
            res_f = res_f * sx[:, None]
        o_ptrs = out_ptr + rm[:, None] * N + rn[None, :]
        o_mask = m_ok[:, None] & n_ok[None, :]
        y = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32) + res_f
        tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _dot_operand(v, COMPILED: tl.constexpr):
    # Triton 3.9's interpreter gets int8 -> bfloat16 casts and bfloat16 dots wrong (garbage
    # values); there both operands go through float32, which is exact for these operands
    # (bf16/fp16 activations, int4 codes) and accumulates in fp32 like the compiled dot.
    if COMPILED:
        return v
    else:
        return v.to(tl.float32)


@triton.jit
def _mosaic_w4a16_kernel(
    x_ptr, wp_ptr, sw_ptr, rp_ptr, sr_ptr, indptr_ptr, kblock_ptr, bids_ptr, out_ptr,
    M, N, K, stride_xm, stride_sw,
    W_GROUP: tl.constexpr, COMPILED: tl.constexpr,
    BN_RES: tl.constexpr, BK_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UNROLL: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """W4A16 ZipperEngine: float activations, the same fused base + residual structure.

    X is loaded in natural order; the weight nibbles are rebuilt in natural order
    (`int4.unpack_interleaved`) and converted to X's dtype: codes in [-8, 7] are exact there.
    """
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    KH = K // 2
    HALF: tl.constexpr = BLOCK_K // 2
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rh = tl.arange(0, HALF)
    m_ok = rm < M
    n_ok = rn < N
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    w_ptrs = wp_ptr + rn[:, None] * KH + rh[None, :]  # [BLOCK_N, HALF]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    res = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    LIST_W: tl.constexpr = BLOCK_N if BLOCK_N > BN_RES else BN_RES
    R: tl.constexpr = LIST_W // BN_RES
    n0 = pid_n * BLOCK_N
    tile = n0 // LIST_W
    slot = ((n0 - tile * LIST_W) + tl.arange(0, BLOCK_N)) // BN_RES
    n_local = rn % BN_RES
    p = tl.load(indptr_ptr + tile)
    p_end = tl.load(indptr_ptr + tile + 1)
    NO_BLOCK = 2147483647
    next_cb = tl.load(kblock_ptr + p, mask=p < p_end, other=NO_BLOCK)
    r_off = n_local[:, None] * (BK_RES // 2) + rh[None, :]
    for k_outer in range(0, K, BLOCK_K * UNROLL):
        for j in tl.static_range(UNROLL):
            k0 = k_outer + j * BLOCK_K
            x = _dot_operand(tl.load(x_ptrs + k0, mask=m_ok[:, None] & ((k0 + rk) < K)[None, :], other=0.0), COMPILED)
            kh_ok = (k0 // 2 + rh) < KH
            wq = tl.load(w_ptrs + k0 // 2, mask=n_ok[:, None] & kh_ok[None, :], other=0)
            w = tl.trans(unpack_interleaved(wq, BLOCK_N, BLOCK_K).to(x.dtype))
            if W_GROUP != 0:
                # Unrolled steps may lie past K: their group index has no scale (an unmasked load
                # read past the tensor, and garbage * 0 can be NaN).
                swg = tl.load(sw_ptr + rn * stride_sw + k0 // W_GROUP, mask=n_ok & ((rn * 0 + k0) < K), other=0.0)
                acc += tl.dot(x, w) * swg[None, :]
            else:
                acc = tl.dot(x, w, acc)
            cb = k0 // BK_RES
            if cb == next_cb:
                koff = k0 - cb * BK_RES
                bid = tl.load(bids_ptr + p * R + slot)
                have = bid >= 0
                rq = tl.load(rp_ptr + bid[:, None] * (BN_RES * (BK_RES // 2)) + koff // 2 + r_off,
                             mask=have[:, None], other=0)
                r = tl.trans(unpack_interleaved(rq, BLOCK_N, BLOCK_K).to(x.dtype))
                srow = tl.load(sr_ptr + bid * BN_RES + n_local, mask=have, other=0.0)
                res += tl.dot(x, r) * srow[None, :]
                if koff + BLOCK_K == BK_RES:
                    p += 1
                    next_cb = tl.load(kblock_ptr + p, mask=p < p_end, other=NO_BLOCK)
    if W_GROUP == 0:
        sw = tl.load(sw_ptr + rn, mask=n_ok, other=0.0)
        acc = acc * sw[None, :]
    y = acc + res
    o_mask = m_ok[:, None] & n_ok[None, :]
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=o_mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LAST_COMPILED = {}


def _check_weights(weights):
    if not isinstance(weights, MosaicGPUWeights):
        raise ValueError(f"weights must be MosaicGPUWeights from prepare_mosaic, got {type(weights).__name__}")


def _res_step_k(cfg, weights):
    """K step of the residual MMAs: BLOCK_K, or bk when a RES_LATE tile steps its base loop wider."""
    return min(cfg["BLOCK_K"], weights.block[1])


def _check_config(cfg, weights, act_group_size):
    bn, bk = weights.block
    bm, bnt, bkt = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if bn % bnt and bnt % bn:
        raise ValueError(f"BLOCK_N={bnt} must divide the residual block's bn={bn} or be a multiple of it")
    if bkt > bk and cfg.get("RES_LATE", False):
        # RES_LATE's base loop ignores the blocks; its residual tail steps bk deep (a power of two).
        if bk & (bk - 1) or bk < 2:
            raise ValueError(f"BLOCK_K={bkt} > bk={bk} needs a power-of-two bk (residual steps of bk)")
    elif bk % bkt:
        raise ValueError(f"BLOCK_K={bkt} must divide the residual block's bk={bk}")
    if bkt % 2 or bkt < 2:
        raise ValueError(f"BLOCK_K={bkt} must be even (packed int4)")
    for name, g in (("act_group_size", act_group_size), ("weights.group_size", weights.group_size)):
        if g is not None and g % bkt:
            raise ValueError(f"{name}={g} must be a multiple of BLOCK_K={bkt} (one scale per K step)")
    for name, v in (("BLOCK_M", bm), ("BLOCK_N", bnt), ("BLOCK_K", bkt)):
        if v & (v - 1):
            raise ValueError(f"{name}={v} must be a power of two")


def _check_offsets(m, weights, x_elems_per_row):
    """The kernels index with int32: every buffer they address must stay below 2**31 elements."""
    n, k = weights.shape
    bn, bk = weights.block
    for name, size in (("M * N (output)", m * n), ("M * K (activations)", m * x_elems_per_row),
                       ("residual blocks", weights.res_packed.numel())):
        if size >= 2**31:
            raise ValueError(f"{name} = {size} elements exceeds the kernels' int32 offsets; split M")


def _check_packed_acts(qx_packed, weights):
    n, k = weights.shape
    # Not w4a4's _check_packed: zero tokens (M = 0) are valid here and give an empty output.
    if not isinstance(qx_packed, torch.Tensor):
        raise ValueError("qx_packed must be a torch.Tensor")
    if qx_packed.dtype != torch.uint8:
        raise ValueError(f"qx_packed must be uint8 packed int4, got {qx_packed.dtype}")
    if qx_packed.dim() != 2 or qx_packed.shape[1] != k // 2:
        raise ValueError(f"qx_packed must be [M, {k // 2}] for K={k}, got {tuple(qx_packed.shape)}")
    if not qx_packed.is_contiguous():
        raise ValueError("qx_packed must be contiguous")
    if qx_packed.device != weights.device:
        raise ValueError(f"qx_packed is on {qx_packed.device} but weights are on {weights.device}")
    _check_offsets(qx_packed.shape[0], weights, k // 2)


def _out_tensor(out, m, n, dtype, device):
    """The caller's output buffer (validated) or a fresh one; tests pass poisoned buffers."""
    return check_out(out, (m, n), dtype, device)


def _check_act_scale(act_scale, m, k, act_group_size, device):
    if act_group_size is not None and (not isinstance(act_group_size, int) or act_group_size <= 0):
        raise ValueError(f"act_group_size must be None or a positive int, got {act_group_size!r}")
    want = (m,) if act_group_size is None else (m, -(-k // act_group_size))
    if not isinstance(act_scale, torch.Tensor) or act_scale.dtype != torch.float32:
        raise ValueError(f"act_scale must be a float32 tensor, got {getattr(act_scale, 'dtype', type(act_scale))}")
    if tuple(act_scale.shape) != want:
        raise ValueError(f"act_scale must have shape {want}, got {tuple(act_scale.shape)}")
    if act_scale.device != device:
        raise ValueError(f"act_scale is on {act_scale.device} but weights are on {device}")
    if not act_scale.is_contiguous():
        raise ValueError("act_scale must be contiguous")


_SPLIT_BUFFERS = {}


def _split_buffers(device, n_partial, n_tiles):
    """(fp32 partials >= n_partial, int32 arrival counters >= n_tiles, all zero), cached per
    device; the kernel resets each counter it used. One stream at a time (as inference runs)."""
    key = (device.type, device.index)
    ws, cnt = _SPLIT_BUFFERS.get(key, (None, None))
    if ws is None or ws.numel() < n_partial:
        ws = torch.empty(max(n_partial, 1 << 16), dtype=torch.float32, device=device)
    if cnt is None or cnt.numel() < n_tiles:
        cnt = torch.zeros(max(n_tiles, 1 << 12), dtype=torch.int32, device=device)
    _SPLIT_BUFFERS[key] = (ws, cnt)
    return ws, cnt


_SM_COUNTS = {}


def _sm_count(device):
    if device.type != "cuda":
        return 4  # interpreter: a few "SMs", so small test shapes take the split path too
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNTS:  # a property query per launch would add host time to small-M calls
        _SM_COUNTS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNTS[key]


def _choose_split(cfg, m, n, k, bk, device):
    split = int(cfg.get("SPLIT_K", 1))
    k_blocks = -(-k // bk)
    if split == 0:  # auto: about two programs per SM
        tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
        split = 1
        while tiles * split * 2 <= 2 * _sm_count(device) and split * 2 <= k_blocks and split < 16:
            split *= 2
    return max(1, min(split, k_blocks))


def _launch_fused(qx_packed, act_scale, weights, act_group_size, out, out2, has_res, int_debug, config):
    n, k = weights.shape
    m = qx_packed.shape[0]
    bn, bk = weights.block
    cfg = dict(config) if config is not None else _pick_config(m, weights.block, act_group_size, weights.group_size)
    if int_debug and config is None:
        cfg["SPLIT_K"] = 1  # the debug entry point checks one unsplit walk of K
    _check_config(cfg, weights, act_group_size)
    fast_split = bool(cfg.get("FAST_SPLIT", False)) and bool(cfg.get("RES_LATE", False))
    split = _choose_split(cfg, m, n, k, max(bk, cfg["BLOCK_K"]) if fast_split else bk, weights.device)
    if split > 1 and int_debug:
        raise ValueError("mosaic_w4a4_gemm_int32 takes no SPLIT_K > 1 config (it checks one walk of K)")
    if split > 1 and not cfg.get("SEGMENTED", True) and not cfg.get("RES_LATE", False):
        raise ValueError("SPLIT_K > 1 needs the SEGMENTED K walk")
    if split > 1 and cfg["BLOCK_K"] > bk and not fast_split:
        raise ValueError(f"BLOCK_K={cfg['BLOCK_K']} > bk={bk} (RES_LATE) needs SPLIT_K=1 or FAST_SPLIT")
    if split * m * n >= 2**31:
        raise ValueError(f"SPLIT_K={split} partials of [{m}, {n}] exceed int32 offsets; use SPLIT_K=1")
    res_late = bool(cfg.get("RES_LATE", False))
    fast_base = (split == 1 and (res_late or not has_res)) or fast_split
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    ws, cnt = _split_buffers(weights.device, split * m * n, tiles) if split > 1 else (out, out)
    grid = (tiles, split)
    sw = weights.scale_base
    handle = _mosaic_w4a4_kernel[grid](
        qx_packed, act_scale, weights.qb_packed, sw, weights.res_packed, weights.scale_res,
        *weights.tile_lists(max(cfg["BLOCK_N"], bn)), out, out2, ws, cnt,
        m, n, k, k // 2,
        act_scale.stride(0), sw.stride(0),
        ACT_GROUP=act_group_size or 0, W_GROUP=weights.group_size or 0,
        HAS_RES=has_res, INT_DEBUG=int_debug, SEGMENTED=cfg.get("SEGMENTED", True), SPLIT_K=split,
        RES_LATE=res_late, FAST_BASE=fast_base, EVEN_K=(k % cfg["BLOCK_K"] == 0),
        RES_BK=_res_step_k(cfg, weights), RES_PIPE=int(cfg.get("RES_PIPE", 0)),
        USE_ASM=_USE_ASM,
        BN_RES=bn, BK_RES=bk,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], UNROLL=cfg.get("UNROLL", 1),
        GROUP_M=cfg.get("GROUP_M", 8), num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
    )
    _LAST_COMPILED["fused"] = handle  # the compiled kernel, for perf/tune_mosaic.py's resource report
    return cfg


def mosaic_w4a4_gemm(qx_packed, act_scale, weights, act_group_size=None, out_dtype=torch.float16, *, out=None,
                     config=None):
    """ZipperEngine: `Y = sx * (Δb * (qx @ qb.T) + Σ_b Δr_b * (qx_b @ qr_b.T))` in ONE launch.

    qx_packed uint8 [M, K/2], act_scale float32 [M] (or [M, ceil(K/g)] with act_group_size g),
    weights from `prepare_mosaic`; returns out_dtype [M, N] (written into `out` when given).
    `config` (a dict of BLOCK_M, BLOCK_N, BLOCK_K, UNROLL, num_warps, num_stages) overrides the
    tuned table, for tuning and tests.
    """
    _check_weights(weights)
    _check_packed_acts(qx_packed, weights)
    m = qx_packed.shape[0]
    _check_act_scale(act_scale, m, weights.shape[1], act_group_size, weights.device)
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    out = _out_tensor(out, m, weights.shape[0], out_dtype, weights.device)
    if m == 0:
        return out
    _launch_fused(qx_packed, act_scale, weights, act_group_size, out, out, True, False, config)
    return out


def mosaic_w4a4_gemm_int32(qx_packed, weights, *, out=None, config=None):
    """Debug entry point of the same fused kernel: `(qx @ qb.T, Σ_b qx_b @ qr_b.T)` as two int32
    [M, N] tensors, no scales, so a test can check the accumulators (and the CSR walk) exactly."""
    _check_weights(weights)
    _check_packed_acts(qx_packed, weights)
    if weights.group_size is not None:
        raise ValueError("mosaic_w4a4_gemm_int32 needs per-channel base scales (weights.group_size None)")
    m, n = qx_packed.shape[0], weights.shape[0]
    if out is not None and (not isinstance(out, (tuple, list)) or len(out) != 2):
        raise ValueError("out must be a pair (base, res) of int32 [M, N] tensors")
    base = _out_tensor(None if out is None else out[0], m, n, torch.int32, weights.device)
    res = _out_tensor(None if out is None else out[1], m, n, torch.int32, weights.device)
    if m == 0:
        return base, res
    dummy = torch.zeros(max(m, 1), dtype=torch.float32, device=weights.device)
    _launch_fused(qx_packed, dummy, weights, None, base, res, True, True, config)
    return base, res


def mosaic_w4a4_gemm_unfused(qx_packed, act_scale, weights, act_group_size=None, out_dtype=torch.float16, *,
                             out=None, config=None):
    """The baseline ZipperEngine replaces: the dense base GEMM (same kernel, residual off), then
    a second launch that re-reads X for every kept block and adds the residual into Y."""
    _check_weights(weights)
    _check_packed_acts(qx_packed, weights)
    m = qx_packed.shape[0]
    n, k = weights.shape
    _check_act_scale(act_scale, m, k, act_group_size, weights.device)
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    out = _out_tensor(out, m, n, out_dtype, weights.device)
    if m == 0:
        return out
    cfg = _launch_fused(qx_packed, act_scale, weights, act_group_size, out, out, False, False, config)
    if weights.n_blocks:
        bn, bk = weights.block
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _mosaic_residual_kernel[grid](
            qx_packed, act_scale, weights.res_packed, weights.scale_res, *weights.tile_lists(max(cfg["BLOCK_N"], bn)), out,
            m, n, k, act_scale.stride(0),
            ACT_GROUP=act_group_size or 0, USE_ASM=_USE_ASM, BN_RES=bn, BK_RES=bk,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=_res_step_k(cfg, weights),
            GROUP_M=cfg.get("GROUP_M", 8), num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
        )
    return out


def mosaic_w4a16_gemm(x, weights, out_dtype=None, *, out=None, config=None):
    """W4A16 ZipperEngine: `Y = X @ (Δb * qb + Σ_b Δr_b * qr_b).T` with fp16/bf16 activations
    [M, K]; output dtype defaults to x's."""
    _check_weights(weights)
    n, k = weights.shape
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"x must be a float16 or bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    if x.device != weights.device:
        raise ValueError(f"x is on {x.device} but weights are on {weights.device}")
    if x.stride(1) != 1:
        raise ValueError("x must be contiguous along K")
    _check_offsets(x.shape[0], weights, x.stride(0))
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    m = x.shape[0]
    out = _out_tensor(out, m, n, out_dtype, weights.device)
    if m == 0:
        return out
    bn, bk = weights.block
    cfg = dict(config) if config is not None else _pick_config(m, weights.block, None, weights.group_size,
                                                                 _CONFIGS_W4A16)
    if cfg["BLOCK_K"] > bk:  # RES_LATE's wide base step does not exist here (the key is ignored)
        raise ValueError(f"mosaic_w4a16_gemm: BLOCK_K={cfg['BLOCK_K']} must divide the residual block's bk={bk}")
    _check_config(cfg, weights, None)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    sw = weights.scale_base
    _mosaic_w4a16_kernel[grid](
        x, weights.qb_packed, sw, weights.res_packed, weights.scale_res, *weights.tile_lists(max(cfg["BLOCK_N"], bn)), out,
        m, n, k, x.stride(0), sw.stride(0),
        W_GROUP=weights.group_size or 0, COMPILED=_USE_ASM, BN_RES=bn, BK_RES=bk,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], UNROLL=cfg.get("UNROLL", 1),
        GROUP_M=cfg.get("GROUP_M", 8), num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
    )
    return out
