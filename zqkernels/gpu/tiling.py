"""Program ids, split-K and its workspaces: the tiling pieces every GEMM family shares.

- `tile_ids`: grouped tile order. GROUP_M consecutive row-tiles walk the same weight column-tile
  while it is still in L2, so at large M each weight tile is fetched from HBM about once per group.
- Split-K (small M, decode): a layer at M <= 64 has too few output tiles to fill 132 SMs, so the
  K loop is cut into SPLIT_K contiguous shares, one program each. Every program stores its partial
  tile to a workspace and arrives on a per-tile counter; the last to arrive sums the partials in
  split order (`splitk_reduce`): one launch, a deterministic result, exact in int32 where the
  partials are integers. The counters are reset by that last program, so a workspace is ready for
  the next launch without a memset.
- Workspaces are cached per device and grown, never shrunk. Launches that run concurrently on
  different streams of one device must not share them: serialize on one stream, as inference does.
"""
import torch
import triton
import triton.language as tl

from zqkernels.gpu.configs import interpreting

# Split-K stops doubling once the grid holds about this many programs per SM.
PROGRAMS_PER_SM = 2
MAX_SPLIT_K = 32


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid, pid_m, pid_n) of this program in grouped order over a [M, N] output."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % size_m)
    pid_n = (pid % in_group) // size_m
    return pid, pid_m, pid_n


@triton.jit
def tile_origin(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(off_m, off_n, offs_m, offs_n) of this program's output tile in grouped order: the first
    row and column (a TMA box's coordinates) and the tile's rows and columns."""
    _, pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    return off_m, off_n, off_m + tl.arange(0, BLOCK_M), off_n + tl.arange(0, BLOCK_N)


@triton.jit
def gemv_tile(M, N, KH, SPLIT_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BW: tl.constexpr):
    """A CUDA-core GEMV program's share: (pid, pid_k, offs_m, offs_n, rm, rn, nw_w, t0, t1, offs_w). Its
    output tile (one program per tile, no grouping), the rows and columns wrapped into range as
    int64, the words per weight row (KH bytes, the last word partial unless whole), its K tiles
    [t0, t1) of BW words under the split `program_id(1)` of SPLIT_K, and the tile's word offsets."""
    pid, pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, 1)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    nw_w = tl.cdiv(KH, 4)
    k_tiles = tl.cdiv(nw_w, BW)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)
    offs_w = tl.max_contiguous(tl.multiple_of(tl.arange(0, BW), BW), BW)
    return pid, pid_k, offs_m, offs_n, rm, rn, nw_w, t0, t1, offs_w


@triton.jit
def splitk_reduce(acc, ws_ptr, cnt_ptr, tile_id, pid_k, offs_m, offs_n, M, N, SPLIT_K):
    """Store this split's partial `acc` [BLOCK_M, BLOCK_N], arrive on the tile's counter, and
    return (is_last, total): the last program to arrive gets the sum of every split's partial in
    split order (the others get zeros and must store nothing). Resets the counter."""
    valid = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ws_tile = ws_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(ws_tile + pid_k.to(tl.int64) * M * N, acc, mask=valid)
    # Every thread's partial is stored before the (single, acq_rel) arrival.
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel")
    is_last = arrived == SPLIT_K - 1
    total = tl.zeros(acc.shape, dtype=acc.dtype)
    if is_last:
        for s in range(SPLIT_K):  # fixed order: the result does not depend on arrival order
            total += tl.load(ws_tile + s * M * N, mask=valid, other=0, cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr + tile_id, 0)  # ready for the next launch
    return is_last, total


_SM_COUNTS = {}


def sm_count(device):
    """Multiprocessors of `device` (cached: a property query per launch would cost host time at
    small M). Under the interpreter a few pretend SMs, so small test shapes take the split path."""
    if device.type != "cuda" or interpreting():
        return 4
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNTS:
        _SM_COUNTS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNTS[key]


def choose_split_k(cfg, tiles_mn, k_steps, device):
    """SPLIT_K for a launch: cfg["SPLIT_K"] as configured, 0 = choose (double while the grid stays
    within cfg.get("SPLIT_TARGET_CTAS", PROGRAMS_PER_SM x SMs) programs and each share keeps at
    least one K step)."""
    split = int(cfg.get("SPLIT_K", 1))
    if split == 0:
        target = int(cfg.get("SPLIT_TARGET_CTAS", PROGRAMS_PER_SM * sm_count(device)))
        split = 1
        while tiles_mn * split * 2 <= target and split * 2 <= k_steps and split < MAX_SPLIT_K:
            split *= 2
    return max(1, min(split, k_steps))


_WORKSPACES = {}
# Workspaces replaced by larger ones stay alive: a CUDA graph captured before the replacement
# still launches kernels that point at them.
_RETIRED = []


def splitk_workspace(device, dtype, n_partial, n_tiles):
    """(partials buffer of `dtype` with >= n_partial elements, int32 counters >= n_tiles, all zero).

    One 32-bit buffer per device serves int32 and float32 partials (a view), so the families share
    it; the counters start at zero and every launch leaves them at zero. Growing it while a CUDA
    graph is being captured is refused (RuntimeError): the counters' zeroing would be recorded in
    the graph, not run, and calls outside the graph would find them unset. Run each shape once
    before capture, as `torch.cuda.graph` asks anyway."""
    key = (device.type, device.index)
    ws, cnt = _WORKSPACES.get(key, (None, None))
    grow_ws = ws is None or ws.numel() < n_partial
    grow_cnt = cnt is None or cnt.numel() < n_tiles
    if not (grow_ws or grow_cnt):
        return (ws if dtype == torch.int32 else ws.view(dtype)), cnt
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"the split-K workspace on {device} must grow to {n_partial} partials / {n_tiles} "
                           "counters while a CUDA graph is being captured; run this layer once at this shape "
                           "before capturing")
    if grow_ws:
        if ws is not None:
            _RETIRED.append(ws)
        # at least double, so the retired buffers add up to less than the live one
        ws = torch.empty(max(n_partial, 1 << 16, 2 * (ws.numel() if ws is not None else 0)), dtype=torch.int32,
                         device=device)
    if grow_cnt:
        if cnt is not None:
            _RETIRED.append(cnt)
        cnt = torch.zeros(max(n_tiles, 1 << 12, 2 * (cnt.numel() if cnt is not None else 0)), dtype=torch.int32,
                          device=device)
    _WORKSPACES[key] = (ws, cnt)
    return (ws if dtype == torch.int32 else ws.view(dtype)), cnt
