"""What bounds the W4A16 GEMM at large M: Triton's own fp16 GEMM (both operands fp16 in memory,
loaded through TMA descriptors, no unpack) beside cuBLAS FP16 and our `w4a16_gemm` as the launch
table runs it, per LLaMA-3-8B shape, per-channel scales and groups of 128.

    PYTHONUNBUFFERED=1 python perf/probe_w4a16.py --out $OUT/probe_w4a16.json [--m 1024,4096]

The Triton GEMM is the ceiling of a kernel written in Triton 3.6 on this tiling: ours adds the
nibble unpack (and the group scales) on top of it, never removes work. Every product is checked
against cuBLAS's within fp16 output rounding before it is timed. Timer: `timing.graph_median_ms`
over N back-to-back calls on N copies of the operands (N from `timing.calls_per_replay`), L2
flushed per replay, µs per call.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

PERF_DIR = Path(__file__).resolve().parent
ROOT = PERF_DIR.parent
for p in (str(ROOT), str(PERF_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

from timing import calls_per_replay, graph_median_ms, l2_cache_bytes  # noqa: E402

from zqkernels.gpu.tiling import tile_ids  # noqa: E402

SHAPES = {"o": (4096, 4096), "qkv": (6144, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
TILES = [(128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4)]


@triton.jit
def _fp16_tma_kernel(x_desc, w_desc, out_ptr, M, N, K, stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = x @ w.T, x [M, K] and w [N, K] 16-bit through TMA descriptors, fp32 accumulation."""
    pid, pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, tl.cdiv(K, BLOCK_K)):
        acc = tl.dot(x_desc.load([pid_m * BLOCK_M, t * BLOCK_K]), tl.trans(w_desc.load([pid_n * BLOCK_N, t * BLOCK_K])),
                     acc)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def fp16_tma_gemm(x, w, out, tile):
    bm, bn, bk, warps, stages = tile
    M, K = x.shape
    N = w.shape[0]
    _fp16_tma_kernel[(triton.cdiv(M, bm) * triton.cdiv(N, bn),)](
        TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]), out, M, N, K,
        out.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", default="1024,4096")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    from zqkernels.gpu.w4a16 import w4a16_gemm

    l2 = l2_cache_bytes()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "timer": "timing.graph_median_ms over N back-to-back calls on N operand copies, L2 flushed per replay, "
                    "us per call", "rows": []}

    def row(**kw):
        res["rows"].append(kw)
        print(json.dumps(kw), flush=True)

    gen = torch.Generator(device="cuda").manual_seed(0)
    for sname in args.shapes.split(","):
        N, K = SHAPES[sname]
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, K, device="cuda", generator=gen).half()
            w = torch.randn(N, K, device="cuda", generator=gen).half()
            n = calls_per_replay(2 * (m * K + N * K + m * N), l2)
            xs = [x] + [x.clone() for _ in range(n - 1)]
            ws = [w] + [w.clone() for _ in range(n - 1)]
            outs = [torch.empty(m, N, device="cuda", dtype=torch.float16) for _ in range(n)]
            ref = (x @ w.T).float()
            qw = torch.randint(0, 256, (N, K // 2), device="cuda", dtype=torch.uint8, generator=gen)
            qws = [qw] + [qw.clone() for _ in range(n - 1)]
            scales = {None: (torch.rand(N, device="cuda", generator=gen) * 0.01 + 1e-3)}
            scales[128] = torch.rand(N, K // 128, device="cuda", generator=gen) * 0.01 + 1e-3

            def ours(rep):  # per-channel and groups of 128, as the launch table runs them
                for group, sw in scales.items():
                    us = 1e3 * graph_median_ms([lambda a=a, q=q, o=o: w4a16_gemm(a, q, sw, group, out=o,
                                                                                  check_finite=False)
                                                for a, q, o in zip(xs, qws, outs)])
                    row(shape=sname, M=m, variant="zq_w4a16", group=group, rep=rep, us=us)

            def cublas(rep):
                row(shape=sname, M=m, variant="cublas_fp16", copies=n, rep=rep,
                    us=1e3 * graph_median_ms([lambda a=a, b=b: a @ b.T for a, b in zip(xs, ws)]))

            # each measured again after the Triton tiles: a drift of the clocks between them shows
            cublas(0)
            ours(0)
            for tile in TILES:
                try:
                    got = fp16_tma_gemm(x, w, outs[0], tile).float()
                    err = float((got - ref).norm() / ref.norm())
                    us = 1e3 * graph_median_ms([lambda a=a, b=b, o=o: fp16_tma_gemm(a, b, o, tile)
                                                for a, b, o in zip(xs, ws, outs)])
                    row(shape=sname, M=m, variant="triton_fp16_tma", tile=tile, rel_err=err, ok=err < 1e-3, us=us)
                except Exception as e:  # noqa: BLE001 - a tile that does not fit is recorded
                    row(shape=sname, M=m, variant="triton_fp16_tma", tile=tile, us=None, error=repr(e)[:200])
            cublas(1)
            ours(1)
            del ws, qws, xs, outs
            torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
