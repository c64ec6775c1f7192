"""Where the M = 1 W4A4 GEMV loses bandwidth: the shipped `gemv` kernel over a wide tile / split
grid, the same product with the next K tile's loads issued before this tile's dp4a (register
double buffering), and a read-only kernel on the same tiling (the Triton streaming ceiling of
these weights), side by side with cuBLAS FP16 and torch's int4 kernel, per LLaMA-3-8B shape.

    PYTHONUNBUFFERED=1 python perf/probe_gemv.py --out $OUT/probe_gemv.json [--budget-s 200]

Every product is checked exact against the int32 product of the codes (the int32 entry point's
form: out_int32 with unit scales) before it is timed. Timer: `timing.graph_median_ms` over N
back-to-back calls, call i on copy i of the weights (N from `timing.calls_per_replay`: one replay
streams three L2s), L2 flushed per replay, time per call.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

PERF_DIR = Path(__file__).resolve().parent
ROOT = PERF_DIR.parent
for p in (str(ROOT), str(PERF_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

from timing import calls_per_replay, graph_median_ms, l2_cache_bytes  # noqa: E402

from zqkernels.gpu.configs import use_asm  # noqa: E402
from zqkernels.gpu.int4 import dp4a, unpack_words_x16  # noqa: E402
from zqkernels.gpu.tiling import splitk_reduce, splitk_workspace  # noqa: E402

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: the PDL rows record the error
    gdc_launch_dependents = gdc_wait = None

SHAPES = {"down": (4096, 14336), "gate_up": (28672, 4096), "qkv": (6144, 4096), "o": (4096, 4096)}
# (BLOCK_N, BLOCK_K, num_warps): weight words per thread and tile = BN * BK / 8 / (32 * warps)
TILES = [(16, 1024, 8), (16, 2048, 8), (16, 4096, 8), (16, 2048, 4), (8, 2048, 4), (8, 4096, 8), (32, 1024, 8),
         (4, 4096, 4)]
# (name, PREFETCH, READ_ONLY, PDL). The first run's `_stream` rows (weight loads `.cg` and
# evict-first) did not compile: ptxas refuses the two modifiers together (probe_gemv_m1.json).
PROBES = [("gemv", False, False, False), ("gemv_prefetch", True, False, False), ("read_prefetch", True, True, False),
          ("gemv_prefetch_pdl", True, False, True), ("read_prefetch_pdl", True, True, True)]
MAX_PROGRAMS = 8192  # tiles x split beyond this are not timed (60 programs an SM)
SPLITS = (1, 2, 4, 8)


@triton.jit
def _probe_step(acc, w, qx_ptr, word, lim, BLOCK_N: tl.constexpr, BW: tl.constexpr, READ_ONLY: tl.constexpr,
                USE_ASM: tl.constexpr):
    """acc [BLOCK_N, BW] after one tile of weight words w: XOR-folded (READ_ONLY), else the dp4a
    products with the activation words `word` (those < lim; the rest are codes 0)."""
    if READ_ONLY:
        return acc ^ w
    a_lo, a_hi = unpack_words_x16(tl.load(qx_ptr + word, mask=word < lim, other=0)[None, :])
    w_lo, w_hi = unpack_words_x16(w)
    acc = dp4a(w_lo, tl.broadcast_to(a_lo, (BLOCK_N, BW)), acc, USE_ASM)
    return dp4a(w_hi, tl.broadcast_to(a_hi, (BLOCK_N, BW)), acc, USE_ASM)


@triton.jit
def _probe_gemv_kernel(qx_ptr, qw_ptr, out_ptr, ws_ptr, cnt_ptr, N, NW, stride_wn, SPLIT_K,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
                       READ_ONLY: tl.constexpr, USE_SPLIT: tl.constexpr, USE_ASM: tl.constexpr,
                       PDL: tl.constexpr):
    """M = 1, packed int4 activations and weights as int32 words (NW words a row), int32 out.
    PREFETCH: tile t + 1's weight words are loaded before tile t's products. READ_ONLY: the weight
    words are only XOR-folded (no activations, no dp4a): the streaming ceiling of the tiling. PDL
    (with PREFETCH; launched as a programmatic dependent launch): the first weight tile is loaded
    before waiting on the kernel before (the probe's weights are never written by it), the
    activations after; the next kernel may launch at once (it waits on this one the same way)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    BW: tl.constexpr = BLOCK_K // 8
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = (offs_n % N).to(tl.int64)
    k_tiles = tl.cdiv(NW, BW)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)
    offs_w = tl.max_contiguous(tl.multiple_of(tl.arange(0, BW), BW), BW)
    w_row = (rn * stride_wn)[:, None]
    lim = tl.minimum(NW, t1 * BW)  # words of this split's tiles: a load past the last is masked off
    acc = tl.zeros((BLOCK_N, BW), dtype=tl.int32)
    if PREFETCH:
        word = t0 * BW + offs_w
        w_nx = tl.load(qw_ptr + w_row + word[None, :], mask=(word < lim)[None, :], other=0)
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        for t in range(t0, t1):
            w = w_nx
            nxt = (t + 1) * BW + offs_w
            w_nx = tl.load(qw_ptr + w_row + nxt[None, :], mask=(nxt < lim)[None, :], other=0)
            acc = _probe_step(acc, w, qx_ptr, t * BW + offs_w, lim, BLOCK_N, BW, READ_ONLY, USE_ASM)
    else:
        for t in range(t0, t1):
            word = t * BW + offs_w
            w = tl.load(qw_ptr + w_row + word[None, :], mask=(word < lim)[None, :], other=0)
            acc = _probe_step(acc, w, qx_ptr, word, lim, BLOCK_N, BW, READ_ONLY, USE_ASM)
    if READ_ONLY:
        total = tl.xor_sum(acc, axis=1)
        tl.store(out_ptr + pid_k * N + offs_n, total, mask=offs_n < N)
    else:
        total = tl.sum(acc, axis=1) // 256  # each code x16 on both sides
        offs_m = tl.arange(0, 1)
        if USE_SPLIT:
            is_last, tot = splitk_reduce(total[None, :], ws_ptr, cnt_ptr, pid, pid_k, offs_m, offs_n, 1, N, SPLIT_K)
            if is_last:
                tl.store(out_ptr + offs_n[None, :], tot, mask=offs_n[None, :] < N)
        else:
            tl.store(out_ptr + offs_n, total, mask=offs_n < N)


def probe_launch(qx, qw, out, bn, bk, warps, split, prefetch, read_only, pdl=False):
    N, KH = qw.shape
    nw = KH // 4
    k_tiles = triton.cdiv(nw, bk // 8)
    split = max(1, min(split, k_tiles))
    tiles = triton.cdiv(N, bn)
    ws, cnt = splitk_workspace(qx.device, torch.int32, split * N if split > 1 and not read_only else 0,
                               tiles if split > 1 else 0)
    _probe_gemv_kernel[(tiles, split)](
        qx.view(torch.int32), qw.view(torch.int32), out, ws, cnt, N, nw, nw, split,
        BLOCK_N=bn, BLOCK_K=bk, PREFETCH=prefetch, READ_ONLY=read_only,
        USE_SPLIT=split > 1 and not read_only, USE_ASM=use_asm(qx.device), PDL=pdl, num_warps=warps, num_stages=1,
        **({"launch_pdl": True} if pdl else {}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--variants", default=",".join(["shipped"] + [p[0] for p in PROBES]),
                    help="which rows to time besides the peers (comma-separated)")
    args = ap.parse_args()
    t_stop = time.time() + args.budget_s
    from bench_baselines import convert_weight_to_int4pack

    from zqkernels.gpu.w4a4 import w4a4_gemm_int32

    torch.manual_seed(0)
    l2 = l2_cache_bytes()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "M": 1, "timer": "timing.graph_median_ms over N back-to-back calls on N weight copies, L2 flushed "
                            "per replay, us per call", "rows": []}
    names = args.shapes.split(",")
    for i_shape, sname in enumerate(names):
        t_end = time.time() + (t_stop - time.time()) / (len(names) - i_shape)  # an equal share of what is left
        N, K = SHAPES[sname]
        wbytes = N * K // 2
        n_copies = calls_per_replay(wbytes, l2)
        ca = torch.randint(-8, 8, (1, K), device="cuda", dtype=torch.int8)
        cw = torch.randint(-8, 8, (N, K), device="cuda", dtype=torch.int8)
        exact = (ca.double() @ cw.double().T).to(torch.int32)
        pa = ((ca[:, 0::2] & 15) | ((ca[:, 1::2] & 15) << 4)).to(torch.uint8).contiguous()
        pws = [((cw[:, 0::2] & 15) | ((cw[:, 1::2] & 15) << 4)).to(torch.uint8).contiguous()]
        pws += [pws[0].clone() for _ in range(n_copies - 1)]
        del cw

        def row(**kw):
            kw.setdefault("GBps", wbytes / (kw["us"] * 1e-6) / 1e9 if kw.get("us") else None)
            res["rows"].append(dict(shape=sname, N=N, K=K, copies=n_copies, **kw))
            print(json.dumps(res["rows"][-1]), flush=True)

        # peers: cuBLAS FP16 (its own copies) and torch's int4 kernel (tinygemm, bf16, groups of 128)
        x16 = torch.randn(1, K, device="cuda", dtype=torch.float16)
        n16 = calls_per_replay(N * K * 2, l2)
        w16 = [torch.randn(N, K, device="cuda", dtype=torch.float16) for _ in range(n16)]
        us16 = 1e3 * graph_median_ms([lambda w=w: x16 @ w.T for w in w16])
        row(variant="cublas_fp16", us=us16, GBps=N * K * 2 / (us16 * 1e-6) / 1e9)
        del w16
        try:
            xb = x16.to(torch.bfloat16)
            q = torch.randint(0, 16, (N, K), device="cuda", dtype=torch.int32)
            packed = convert_weight_to_int4pack(q)
            sz = torch.ones(K // 128, N, 2, device="cuda", dtype=torch.bfloat16)
            pk = [packed] + [packed.clone() for _ in range(n_copies - 1)]
            row(variant="torch_int4", us=1e3 * graph_median_ms(
                [lambda p=p: torch.ops.aten._weight_int4pack_mm(xb, p, 128, sz) for p in pk]))
            del pk, packed, q
        except Exception as e:  # noqa: BLE001 - a torch without the op on this GPU: recorded, not fatal
            row(variant="torch_int4", us=None, error=repr(e)[:200])
        # the shipped gemv through the int32 entry point, at each tile and split
        for bn, bk, w in TILES if "shipped" in args.variants.split(",") else ():
            for s in SPLITS:
                if time.time() > t_end or triton.cdiv(N, bn) * s > MAX_PROGRAMS:
                    continue
                cfg = dict(variant="gemv", BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=1, SPLIT_K=s)
                try:
                    out = w4a4_gemm_int32(pa, pws[0], config=cfg)
                    torch.cuda.synchronize()
                    ok = bool(torch.equal(out, exact))
                    outs = [torch.empty_like(out) for _ in pws]
                    us = 1e3 * graph_median_ms([lambda p=p, o=o: w4a4_gemm_int32(pa, p, out=o, config=cfg)
                                                for p, o in zip(pws, outs)])
                    row(variant="shipped", BLOCK_N=bn, BLOCK_K=bk, num_warps=w, split=s, exact=ok, us=us)
                except Exception as e:  # noqa: BLE001
                    row(variant="shipped", BLOCK_N=bn, BLOCK_K=bk, num_warps=w, split=s, us=None, error=repr(e)[:200])
        # the probe kernel: product without / with prefetch, and the read-only ceiling
        for name, prefetch, read_only, pdl in [p for p in PROBES if p[0] in args.variants.split(",")]:
            for bn, bk, w in TILES:
                for s in SPLITS:
                    if time.time() > t_end or triton.cdiv(N, bn) * s > MAX_PROGRAMS:
                        continue
                    try:
                        o = torch.zeros(s * N if read_only else N, device="cuda", dtype=torch.int32)
                        probe_launch(pa, pws[0], o, bn, bk, w, s, prefetch, read_only, pdl)
                        torch.cuda.synchronize()
                        ok = True if read_only else bool(torch.equal(o[None, :], exact))
                        outs = [torch.zeros_like(o) for _ in pws]
                        us = 1e3 * graph_median_ms(
                            [lambda p=p, oo=oo: probe_launch(pa, p, oo, bn, bk, w, s, prefetch, read_only, pdl)
                             for p, oo in zip(pws, outs)])
                        row(variant=name, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, split=s, exact=ok, us=us)
                    except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                        row(variant=name, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, split=s, us=None, error=repr(e)[:200])
        del pws
        torch.cuda.empty_cache()
    # per shape and variant, the best
    best = {}
    for r in res["rows"]:
        if r.get("us") and r.get("exact", True):
            k = (r["shape"], r["variant"])
            if k not in best or r["us"] < best[k]["us"]:
                best[k] = r
    res["best"] = [best[k] for k in sorted(best)]
    for b in res["best"]:
        print("BEST", b["shape"], b["variant"], round(b["us"], 2), {k: b.get(k) for k in
                                                                    ("BLOCK_N", "BLOCK_K", "num_warps", "split")})
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
