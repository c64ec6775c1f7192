"""Verify the compiled dense 4-bit kernels on LLaMA-3-8B shapes, then time launch-config variants
and the peers (cuBLAS FP16, cuBLAS INT8 `_int_mm`, torch int4 weight-only), on one GPU, one run.

    PYTHONUNBUFFERED=1 python perf/tune_dense.py --out $OUT [--budget-s 380] [--skip-sweep]

Writes $OUT/tune_dense.json (environment, verification, every timing, the best config per
M bucket in the format of zqkernels/gpu/configs/<gpu>.json) and prints a short table last.
Timing: `triton.testing.do_bench` median (L2 flushed) eagerly, and a CUDA graph of R calls over
R different weight/activation sets (R * bytes > 2x L2, so the graph figure is not an L2 figure),
replayed 20 times, median / R: the graph figure is the kernel speed. Every config is checked
against an exact fp64 product before it is timed. `--dry` runs tiny shapes under the interpreter.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ap = argparse.ArgumentParser()
ap.add_argument("--out", default=os.environ.get("OUT", "."))
ap.add_argument("--budget-s", type=float, default=380.0)
ap.add_argument("--skip-sweep", action="store_true", help="time only the configs of the JSON table")
ap.add_argument("--dry", action="store_true", help="tiny shapes under TRITON_INTERPRET=1 (CPU)")
args = ap.parse_args()
if args.dry:
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

from zqkernels.gpu import w4a4 as w4a4_mod  # noqa: E402
from zqkernels.gpu.actquant import quantize_activations  # noqa: E402
from zqkernels.gpu.w4a4 import launch_config, splitk_buffers, w4a4_gemm, w4a4_gemm_int32  # noqa: E402
from zqkernels.gpu.w4a16 import w4a16_gemm  # noqa: E402

T0 = time.time()
DEV = torch.device("cpu" if args.dry else "cuda")
OUT = Path(args.out)
OUT.mkdir(parents=True, exist_ok=True)
RESULT = {"command": " ".join(sys.argv), "env": {}, "verify": [], "sweep": [], "table": [], "best": {}}

# LLaMA-3-8B linear layers (N, K)
SHAPES = {"o": (4096, 4096), "qkv": (6144, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
MS = [1, 16, 64, 256, 1024, 4096]
if args.dry:
    SHAPES = {"tiny": (40, 96), "odd": (33, 130)}
    MS = [1, 16]


# Most important first, so that a run cut short by its time budget still covers the targets.
PRIORITY_MS = [m for m in [1, 4096, 16, 256, 64, 1024] if m in MS] + [m for m in MS if m not in [1, 4096, 16, 256, 64, 1024]]


def elapsed():
    return time.time() - T0


def save():
    (OUT / "tune_dense.json").write_text(json.dumps(RESULT, indent=1, default=str))


def log(*a):
    print(f"[{elapsed():6.1f}s]", *a, flush=True)


def env():
    e = {"torch": torch.__version__, "triton": triton.__version__, "dry": args.dry}
    if not args.dry:
        p = torch.cuda.get_device_properties(DEV)
        e.update(device=torch.cuda.get_device_name(DEV), sms=p.multi_processor_count,
                 l2_bytes=getattr(p, "L2_cache_size", None), mem_bytes=p.total_memory)
    if not args.dry:
        a = torch.empty(1 << 28, dtype=torch.uint8, device=DEV)
        b = torch.empty_like(a)
        ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=5, rep=50, return_mode="median")
        e["copy_TBps_read_plus_write"] = 2 * a.numel() / (ms * 1e-3) / 1e12
        del a, b
    RESULT["env"] = e
    log(e)


# ----------------------------------------------------------------- data
def pack(q):
    """int8 codes [R, K] (torch) -> packed uint8 [R, K/2], element 2i low nibble."""
    q = q.to(torch.int16)
    return ((q[:, 0::2] & 15) | ((q[:, 1::2] & 15) << 4)).to(torch.uint8)


def rand_codes(r, k, gen):
    return torch.randint(-8, 8, (r, k), generator=gen, device=DEV, dtype=torch.int8)


def actquant_model(x, group=None):
    """numpy float32 model of the contract (brief): codes int8 [M, K], scales float32."""
    x32 = x.float().cpu().numpy().astype(np.float32)
    M, K = x32.shape
    g = group or K
    G = -(-K // g)
    sc = np.zeros((M, G), np.float32)
    q = np.zeros((M, K), np.int8)
    for gi in range(G):
        xs = x32[:, gi * g:(gi + 1) * g]
        s = (np.abs(xs).max(1).astype(np.float32) / np.float32(7)).astype(np.float32)
        with np.errstate(all="ignore"):
            c = np.clip(np.rint(xs / s[:, None]), -8, 7)
        c[s == 0] = 0
        sc[:, gi] = s
        q[:, gi * g:(gi + 1) * g] = c.astype(np.int8)
    return q, (sc[:, 0] if group is None else sc)


def unpack(p):
    p = p.to(torch.int16)
    lo = ((p & 15) ^ 8) - 8
    hi = (((p >> 4) & 15) ^ 8) - 8
    return torch.stack([lo, hi], -1).reshape(p.shape[0], -1).to(torch.int8)


# ----------------------------------------------------------------- timing
def bench_eager(fn):
    if args.dry:
        t = time.perf_counter(); fn(); return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def bench_graph(fns):
    """fns: R closures over R different input sets. Median ms per call over 20 replays."""
    if args.dry:
        return bench_eager(fns[0])
    for f in fns:
        f()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        times.append(a.elapsed_time(b) / len(fns))
    del g
    return float(np.median(times))


def n_rot(bytes_per_call):
    if args.dry:
        return 1
    l2 = RESULT["env"].get("l2_bytes") or 50e6
    return int(min(16, max(1, math.ceil(2.5 * l2 / max(bytes_per_call, 1)))))


# ----------------------------------------------------------------- verification
def rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


def verify_shape(name, N, K, M, gen):
    rec = {"shape": name, "N": N, "K": K, "M": M}
    x = torch.randn(M, K, generator=gen, device=DEV).to(torch.float16)
    x[0, 5] = 60.0  # one outlier
    if M > 2:
        x[1] = 0  # a zero row
    for group in (None, 128):
        qx, sx = quantize_activations(x, None, group)
        if M <= 256:
            qm, sm = actquant_model(x, group)
            rec[f"actquant_codes_exact_g{group}"] = bool(np.array_equal(unpack(qx).cpu().numpy(), qm))
            rec[f"actquant_scales_exact_g{group}"] = bool(np.array_equal(sx.cpu().numpy(), sm))
    qx, sx = quantize_activations(x)
    qxg, sxg = quantize_activations(x, None, 128)
    cw = rand_codes(N, K, gen)
    qw = pack(cw)
    sw = torch.rand(N, generator=gen, device=DEV) * 0.01 + 1e-3
    exact = unpack(qx).double() @ cw.double().T  # |sum| <= 64 K < 2**53: exact in fp64
    i32 = w4a4_gemm_int32(qx, qw)
    rec["int32_exact"] = bool(torch.equal(i32.double(), exact))
    y = w4a4_gemm(qx, sx, qw, sw)
    ref = exact * sx.double()[:, None] * sw.double()[None, :]
    rec["w4a4_rel_err_fp16"] = rel(y, ref)
    cxg = unpack(qxg).double()
    refg = torch.zeros(M, N, dtype=torch.float64, device=DEV)
    for gi in range(sxg.shape[1]):
        sl = slice(gi * 128, (gi + 1) * 128)
        refg += (cxg[:, sl] @ cw[:, sl].double().T) * sxg[:, gi].double()[:, None]
    refg *= sw.double()[None, :]
    rec["w4a4_g128_rel_err_fp16"] = rel(w4a4_gemm(qxg, sxg, qw, sw, act_group_size=128), refg)
    y16 = w4a16_gemm(x, qw, sw)
    ref16 = (x.double() @ cw.double().T) * sw.double()[None, :]
    rec["w4a16_rel_err"] = rel(y16, ref16)
    swg = torch.rand(N, triton.cdiv(K, 128), generator=gen, device=DEV) * 0.01 + 1e-3
    ref16g = torch.zeros(M, N, dtype=torch.float64, device=DEV)
    for gi in range(triton.cdiv(K, 128)):
        sl = slice(gi * 128, (gi + 1) * 128)
        ref16g += (x[:, sl].double() @ cw[:, sl].double().T) * swg[:, gi].double()[None, :]
    rec["w4a16_g128_rel_err"] = rel(w4a16_gemm(x, qw, swg, group_size=128), ref16g)
    ok = all(v for k, v in rec.items() if k.endswith("exact") or "exact_" in k)
    ok = ok and all(v < 2e-3 for k, v in rec.items() if "rel_err" in k)
    rec["ok"] = ok
    RESULT["verify"].append(rec)
    log("verify", name, M, "OK" if ok else f"FAIL {rec}")
    return ok


# ----------------------------------------------------------------- candidates
def C(BM, BN, BK, SPLIT=0, W=4, S=4, GM=8, PLANES=False, TGT=None, SWAP=False, **extra):
    c = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, SPLIT_K=SPLIT, GROUP_M=GM, PLANES=PLANES, SWAP_AB=SWAP,
             num_warps=W, num_stages=S, **extra)
    if TGT:
        c["SPLIT_TARGET_CTAS"] = TGT
    return c


def SW(BN, BK, **kw):
    """Swap-AB small-M config: weights on the MMA's M side (BLOCK_N >= 64), 16 tokens a tile."""
    return C(16, BN, BK, SWAP=True, GM=1, **kw)


# Run 1 (planes vs interleaved, no swap, full unpack) picked interleaved 16x64x256 for M <= 16 and
# interleaved 128x256x128 for M >= 1024; run 2 (x16 unpack, swap-AB) picked planes + swap-AB
# 16x64x256 for M <= 16, planes 64x64x256 for M = 64/256, interleaved 128x256x128 for M >= 1024.
# Run 3 searches around those winners.
P = dict(PLANES=True)
W4A4_SMALL = [SW(64, 256, **P), SW(64, 256, S=3, **P), SW(64, 256, S=5, **P), SW(128, 256, S=3, **P),
              SW(128, 128, **P), SW(64, 512, S=3, **P), SW(64, 256, TGT=132, **P), SW(64, 256, TGT=396, **P),
              SW(64, 128, S=6, **P), C(16, 64, 256), SW(64, 256)]
W4A4_MID = [C(64, 64, 256, **P), C(64, 64, 256, S=3, **P), C(64, 128, 256, S=3, **P), C(64, 64, 128, S=6, **P),
            C(64, 128, 128, SWAP=True, GM=1, **P), C(128, 128, 128, SPLIT=1, W=8, S=3), C(64, 128, 128)]
W4A4_LARGE = [C(128, 256, 128, SPLIT=1, W=8, S=3), C(128, 256, 128, SPLIT=1, W=8, S=4), C(128, 256, 128, SPLIT=1, W=8, S=3, GM=16),
              C(128, 128, 128, SPLIT=1, W=8, S=4), C(128, 128, 128, SPLIT=1, W=4, S=4), C(128, 128, 256, SPLIT=1, W=8, S=3, **P),
              C(128, 256, 128, SPLIT=1, W=8, S=3, GM=4), C(64, 256, 128, SPLIT=1, W=4, S=4)]
W4A4G_SMALL = [SW(64, 128, **P), SW(64, 128, S=6, **P), SW(128, 128, **P), C(16, 64, 128), SW(64, 128, TGT=396, **P)]
W4A4G_MID = [C(64, 64, 128), C(64, 64, 128, **P), C(64, 128, 128, **P), C(128, 128, 128, SPLIT=1, W=8, S=3)]
W4A4G_LARGE = [C(128, 128, 128, SPLIT=1, W=8, S=3), C(128, 128, 128, SPLIT=1, W=8, S=4), C(128, 128, 128, SPLIT=1, W=4, S=4),
               C(128, 128, 128, SPLIT=1, W=8, S=3, **P), C(128, 256, 128, SPLIT=1, W=8, S=3, **P), C(64, 256, 128, SPLIT=1, W=4, S=4)]
W4A16_SMALL = [C(16, 64, 128), SW(64, 128), SW(64, 128, **P), SW(64, 256, **P), SW(128, 128, **P), C(16, 64, 128, **P),
               SW(64, 256, S=3, **P)]
W4A16_MID = [C(64, 64, 128), C(64, 64, 128, **P), C(64, 128, 64, SPLIT=1), C(128, 128, 64, SPLIT=1, W=8, S=4)]
W4A16_LARGE = [C(128, 128, 64, SPLIT=1, W=8, S=4), C(128, 256, 128, SPLIT=1, W=8, S=3), C(128, 256, 64, SPLIT=1, W=8, S=4),
               C(128, 128, 128, SPLIT=1, W=8, S=4), C(128, 128, 64, SPLIT=1, W=4, S=4)]
# Run 2: all within a few % of each other (1-D loads, 1024-channel group blocks kept as default).
AQ_VARIANTS = {"1d": dict(LOAD_1D=True), "3d": dict(LOAD_1D=False), "1d_nw4": dict(LOAD_1D=True, num_warps=4),
               "1d_nw16": dict(LOAD_1D=True, num_warps=16), "1d_chunk8192": dict(LOAD_1D=True, ROW_CHUNK=8192),
               "1d_gb2048": dict(LOAD_1D=True, GROUP_BLOCK=2048)}


def cands(family, mode, M):
    small, mid, large = {
        ("w4a4", "per_token"): (W4A4_SMALL, W4A4_MID, W4A4_LARGE),
        ("w4a4", "group"): (W4A4G_SMALL, W4A4G_MID, W4A4G_LARGE),
        ("w4a16", "per_channel"): (W4A16_SMALL, W4A16_MID, W4A16_LARGE),
        ("w4a16", "group"): (W4A16_SMALL, W4A16_MID, W4A16_LARGE),
    }[(family, mode)]
    if M <= 16:
        return small
    if M <= 64:
        return small[:3] + mid
    if M <= 256:
        return mid + large[:3]
    return large + mid[-2:]


# ----------------------------------------------------------------- inputs per (shape, M)
class Inputs:
    """R rotating sets of operands for one (N, K, M)."""

    def __init__(self, N, K, M, gen, R):
        self.sets = []
        for _ in range(R):
            x = torch.randn(M, K, generator=gen, device=DEV).to(torch.float16)
            qx, sx = quantize_activations(x)
            qxg, sxg = quantize_activations(x, None, 128)
            cw = rand_codes(N, K, gen)
            qw = pack(cw)
            sw = torch.rand(N, generator=gen, device=DEV) * 0.01 + 1e-3
            swg = torch.rand(N, triton.cdiv(K, 128), generator=gen, device=DEV) * 0.01 + 1e-3
            self.sets.append(dict(x=x, qx=qx, sx=sx, qxg=qxg, sxg=sxg, qw=qw, sw=sw, swg=swg))
        s0 = self.sets[0]
        self.exact = unpack(s0["qx"]).double() @ unpack(s0["qw"]).double().T


def variant_fns(family, mode, cfg, inp):
    fns = []
    for s in inp.sets:
        if family == "w4a4" and mode == "per_token":
            fns.append(lambda s=s: w4a4_gemm(s["qx"], s["sx"], s["qw"], s["sw"], config=cfg))
        elif family == "w4a4":
            fns.append(lambda s=s: w4a4_gemm(s["qxg"], s["sxg"], s["qw"], s["sw"], act_group_size=128, config=cfg))
        elif mode == "per_channel":
            fns.append(lambda s=s: w4a16_gemm(s["x"], s["qw"], s["sw"], config=cfg))
        else:
            fns.append(lambda s=s: w4a16_gemm(s["x"], s["qw"], s["swg"], group_size=128, config=cfg))
    return fns


def check_cfg(family, mode, cfg, inp):
    """The timed call itself, checked against an fp64 product of the same codes before timing
    (the int32 path is checked exactly in `verify_shape`; here one compile per config suffices)."""
    s = inp.sets[0]
    y = variant_fns(family, mode, cfg, inp)[0]()
    cw = unpack(s["qw"]).double()
    if family == "w4a4" and mode == "per_token":
        ref = inp.exact * s["sx"].double()[:, None]
        sw = s["sw"]
    elif family == "w4a4":
        cx = unpack(s["qxg"]).double()
        ref = torch.zeros_like(inp.exact)
        for gi in range(s["sxg"].shape[1]):
            sl = slice(gi * 128, (gi + 1) * 128)
            ref += (cx[:, sl] @ cw[:, sl].T) * s["sxg"][:, gi].double()[:, None]
        sw = s["sw"]
    elif mode == "per_channel":
        ref, sw = s["x"].double() @ cw.T, s["sw"]
    else:
        ref = torch.zeros_like(inp.exact)
        for gi in range(s["swg"].shape[1]):
            sl = slice(gi * 128, (gi + 1) * 128)
            ref += (s["x"][:, sl].double() @ cw[:, sl].T) * s["swg"][:, gi].double()[None, :]
        return rel(y, ref) < 2e-3
    return rel(y, ref * sw.double()[None, :]) < 2e-3


def bytes_w4a4(N, K, M):
    return N * K // 2 + M * K // 2 + M * N * 2 + 4 * (M + N)


# ----------------------------------------------------------------- sweep
def sweep(gen):
    # w4a16 per-group reuses the per-channel winner (BLOCK_K clamped to the group by the launcher).
    fams = [("w4a4", "per_token"), ("w4a4", "group"), ("w4a16", "per_channel")]
    for M in PRIORITY_MS:
        for sname, (N, K) in SHAPES.items():
            if elapsed() > args.budget_s * 0.62:
                log("sweep: time budget reached, stopping")
                return
            inp = Inputs(N, K, M, gen, n_rot(bytes_w4a4(N, K, M)))
            for fam, mode in fams:
                for ci, cfg in enumerate(cands(fam, mode, M)):
                    rec = dict(family=fam, mode=mode, shape=sname, N=N, K=K, M=M, cfg=cfg)
                    try:
                        rec["ok"] = check_cfg(fam, mode, cfg, inp)
                        rec["graph_ms"] = bench_graph(variant_fns(fam, mode, cfg, inp)) if rec["ok"] else None
                    except Exception as e:  # a config that does not compile is a result, not a crash
                        rec["ok"], rec["error"] = False, repr(e)[:300]
                    RESULT["sweep"].append(rec)
            del inp
            torch.cuda.empty_cache() if not args.dry else None
            save()
        log("sweep M", M, "done")


def pick_best():
    """Per family/mode/M: the config with the lowest geometric mean of time / best time over shapes."""
    best = {}
    groups = {}
    for r in RESULT["sweep"]:
        if r.get("ok") and r.get("graph_ms"):
            groups.setdefault((r["family"], r["mode"], r["M"]), []).append(r)
    for (fam, mode, M), rs in groups.items():
        fastest = {}
        for r in rs:
            fastest[r["shape"]] = min(fastest.get(r["shape"], 1e9), r["graph_ms"])
        by_cfg = {}
        for r in rs:
            by_cfg.setdefault(json.dumps(r["cfg"], sort_keys=True), {})[r["shape"]] = r["graph_ms"] / fastest[r["shape"]]
        scored = [(math.exp(np.mean(np.log(list(v.values())))), k) for k, v in by_cfg.items() if len(v) == len(fastest)]
        if scored:
            score, k = min(scored)
            best.setdefault(fam, {}).setdefault(mode, {})[str(M)] = dict(json.loads(k), _geo_vs_best=round(score, 3))
    RESULT["best"] = best
    return best


# ----------------------------------------------------------------- final table
def peers(N, K, M, gen, R):
    out = {}
    ws = [torch.randn(N, K, generator=gen, device=DEV).to(torch.float16) for _ in range(max(1, R // 4))]
    xs = [torch.randn(M, K, generator=gen, device=DEV).to(torch.float16) for _ in ws]
    fp16 = [lambda x=x, w=w: torch.nn.functional.linear(x, w) for x, w in zip(xs, ws)]
    out["cublas_fp16"] = fp16
    w8 = [torch.randint(-127, 127, (N, K), device=DEV, dtype=torch.int8) for _ in range(max(1, R // 2))]
    x8 = [torch.randint(-127, 127, (M, K), device=DEV, dtype=torch.int8) for _ in w8]
    out["cublas_int8_int_mm"] = [lambda x=x, w=w: torch._int_mm(x, w.t()) for x, w in zip(x8, w8)]
    try:
        w4 = []
        for _ in range(R):
            wu = torch.randint(0, 256, (N, K // 2), device=DEV, dtype=torch.uint8)
            w4.append(torch.ops.aten._convert_weight_to_int4pack(wu, 8))
        sz = torch.rand(K // 128, N, 2, device=DEV).to(torch.bfloat16)
        xb = [torch.randn(M, K, generator=gen, device=DEV).to(torch.bfloat16) for _ in w4]
        out["torch_int4_wo_bf16_g128"] = [lambda x=x, w=w: torch.ops.aten._weight_int4pack_mm(x, w, 128, sz)
                                          for x, w in zip(xb, w4)]
    except Exception as e:
        out["torch_int4_wo_bf16_g128"] = repr(e)[:200]
    return out


def table(gen, best):
    for M in PRIORITY_MS:
        for sname, (N, K) in SHAPES.items():
            if elapsed() > args.budget_s:
                log("table: time budget reached, stopping")
                return
            R = n_rot(bytes_w4a4(N, K, M))
            inp = Inputs(N, K, M, gen, R)
            variants = {}
            for fam, mode in [("w4a4", "per_token"), ("w4a4", "group"), ("w4a16", "per_channel"), ("w4a16", "group")]:
                cfg = best.get(fam, {}).get(mode, {}).get(str(M))
                if cfg is None and fam == "w4a16":
                    cfg = best.get(fam, {}).get("per_channel", {}).get(str(M))
                if cfg is None:
                    cfg = launch_config(fam, mode, M, DEV)
                cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
                variants[f"{fam}_{mode}"] = variant_fns(fam, mode, cfg, inp)
            variants["actquant_per_token"] = [lambda s=s: quantize_activations(s["x"]) for s in inp.sets]
            variants["actquant_g128"] = [lambda s=s: quantize_activations(s["x"], None, 128) for s in inp.sets]
            if M >= 1024:
                for an, acfg in AQ_VARIANTS.items():
                    variants[f"aq_pt_{an}"] = [lambda s=s, c=acfg: quantize_activations(s["x"], config=c) for s in inp.sets]
                    variants[f"aq_g128_{an}"] = [lambda s=s, c=acfg: quantize_activations(s["x"], None, 128, config=c)
                                                 for s in inp.sets]
            pt_cfg = {k: v for k, v in (best.get("w4a4", {}).get("per_token", {}).get(str(M))
                                        or launch_config("w4a4", "per_token", M, DEV)).items() if not k.startswith("_")}

            def e2e(s, cfg=pt_cfg):
                q, sc = quantize_activations(s["x"])
                return w4a4_gemm(q, sc, s["qw"], s["sw"], config=cfg)

            variants["w4a4_e2e_quant_plus_gemm"] = [lambda s=s: e2e(s) for s in inp.sets]
            if not args.dry:
                variants.update(peers(N, K, M, gen, R))
            row = dict(shape=sname, N=N, K=K, M=M)
            for vname, fns in variants.items():
                if isinstance(fns, str):
                    row[vname] = {"error": fns}
                    continue
                try:
                    row[vname] = {"eager_us": 1e3 * bench_eager(fns[0]), "graph_us": 1e3 * bench_graph(fns)}
                except Exception as e:
                    row[vname] = {"error": repr(e)[:200]}
            RESULT["table"].append(row)
            del inp, variants
            save()
            log("table", sname, M, {k: round(v.get("graph_us", -1), 1) for k, v in row.items() if isinstance(v, dict)})


def print_table():
    cols = ["cublas_fp16", "cublas_int8_int_mm", "torch_int4_wo_bf16_g128", "w4a4_per_token", "w4a4_group",
            "w4a16_per_channel", "w4a16_group", "actquant_per_token", "w4a4_e2e_quant_plus_gemm"]
    short = ["fp16", "i8mm", "tint4", "w4a4", "w4a4g", "w4a16", "w4a16g", "aq", "e2e"]
    print("graph us (median/call)  | " + " ".join(f"{s:>7}" for s in short) + " | w4a4 vs fp16, vs tint4")
    for r in RESULT["table"]:
        vals = [r.get(c, {}).get("graph_us") for c in cols]
        f = lambda v: f"{v:7.1f}" if isinstance(v, float) else "      -"
        sp = ""
        if vals[0] and vals[3]:
            sp = f"{vals[0] / vals[3]:.2f}x"
        if vals[2] and vals[3]:
            sp += f" {vals[2] / vals[3]:.2f}x"
        aq = r.get("actquant_per_token", {}).get("graph_us")
        cp = RESULT["env"].get("copy_TBps_read_plus_write")
        if aq and cp:
            sp += f" aq {100 * (r['M'] * r['K'] * 2.5 + 4 * r['M']) / (aq * 1e-6) / (cp * 1e12):.0f}%copy"
        print(f"{r['shape']:>8} M={r['M']:<5}       | " + " ".join(f(v) for v in vals) + " | " + sp)


def ptx_summary():
    """MMA instructions and register/spill counts of every compiled kernel (Triton's cache)."""
    out = []
    root = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    for ptx in root.rglob("*.ptx"):
        txt = ptx.read_text(errors="ignore")
        meta = {}
        js = ptx.with_suffix(".json")
        if js.exists():
            try:
                m = json.loads(js.read_text())
                meta = {k: m.get(k) for k in ("name", "num_warps", "num_stages", "shared", "n_regs", "n_spills")}
            except Exception:
                pass
        out.append(dict(file=ptx.name, wgmma=txt.count("wgmma.mma_async"), mma_sync=txt.count("mma.sync"),
                        lop_f0f0=txt.count("0xF0F0F0F0") + txt.count("-252645136"), **meta))
    return out


def main():
    env()
    gen = torch.Generator(device=DEV)
    gen.manual_seed(0)
    if not args.dry:
        splitk_buffers(DEV, 1 << 26, 1 << 16)  # grown once, before any graph capture
    all_ok = True
    for sname, (N, K) in SHAPES.items():
        for M in ([1, 16, 256] if not args.dry else [1, 5]) + ([4096] if sname == "o" else []):
            try:
                all_ok &= verify_shape(sname, N, K, M, gen)
            except Exception as e:
                all_ok = False
                RESULT["verify"].append({"shape": sname, "M": M, "error": repr(e)[:500]})
                log("verify error", sname, M, repr(e)[:500])
    RESULT["verify_all_ok"] = all_ok
    save()
    if not args.skip_sweep:
        sweep(gen)
    best = pick_best()
    save()
    (OUT / "configs_suggested.json").write_text(json.dumps(best, indent=1))
    table(gen, best)
    try:
        RESULT["ptx"] = ptx_summary()
    except Exception as e:
        RESULT["ptx"] = repr(e)
    save()
    log("verify_all_ok", all_ok)
    print_table()


if __name__ == "__main__":
    main()
