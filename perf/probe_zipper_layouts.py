"""ZipperQuant's GPU layer (`zipper_high.zipper_gpu_linear`: the W4A4 low part, then the high part
added in place) with each layout of the high part, beside the W4A4 layer alone (`w4a4_linear`),
per LLaMA-3-8B shape and M, on three kinds of high part:

- row5 / row1: the per-row grid (`quantizers.zipper_quantize`, outlier_ratio 0.05 as `zq run`
  reports, and 0.01) of Student-t(3) weights: outliers in every row, so in nearly every column;
- cols64: the same codes kept only in the K/64 columns holding the most of them (a high part in a
  few input channels, what the channel-structured grid gives).

    PYTHONUNBUFFERED=1 python perf/probe_zipper_layouts.py --out $OUT/probe_zipper_layouts.json [--budget-s 200]
        [--act-group 32] [--ms 1,2,16]

At an M where the launch table names the fused GEMV for the dense layout (`zipper_high.fused_at`)
the layer runs it (`zipper_high.zipper_gemv`); there the probe also times the dense layout's two-pass form
(`w4a4_linear`, then the bf16 X' and the W4A16 GEMM accumulating), as "dense_two_pass".

Before timing, each layout's high part (the layer's output minus the W4A4 layer's) is checked
against the float64 product 16 Δ (X' @ q_high.T): relative error (Frobenius) below 2^-8 for dense
(X' in bf16), 1e-5 for columns and ell (fp32). Timer: `timing.graph_median_ms` over N back-to-back
calls, call i on copy i of the layer (N from `timing.calls_per_replay`: one replay streams three
L2s), L2 flushed per replay. A layout more than SKIP_RATIO times slower than the fastest at one M
is not timed at the larger M of that shape and kind (a row says so).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

PERF_DIR = Path(__file__).resolve().parent
ROOT = PERF_DIR.parent
for p in (str(ROOT), str(PERF_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

from timing import calls_per_replay, graph_median_ms, l2_cache_bytes  # noqa: E402

from zqkernels import quantizers  # noqa: E402
from zqkernels.gpu.w4a4 import w4a4_linear  # noqa: E402
from zqkernels.gpu.zipper_high import _dense_acts, fused_at, zipper_gpu_linear, zipper_high_gpu  # noqa: E402
from zqkernels.layouts import ZIPPER_HIGH_METHODS, DenseInt4, ZipperHighGPU  # noqa: E402

SHAPES = {"o": (4096, 4096), "qkv": (6144, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
MS = (1, 16, 64, 256, 1024, 4096)
KINDS = ("row5", "row1", "cols64")
SKIP_RATIO = 20.0
TOL = {"dense": 2.0**-8, "columns": 1e-5, "ell": 1e-5}


def layer_codes(n, k, kind, seed=0):
    torch.manual_seed(seed)  # the Student-t draw uses the global generator
    dist = torch.distributions.StudentT(torch.tensor(3.0, device="cuda"))
    w = (dist.sample((n, k)) * 0.02).to(torch.float64)
    codes = quantizers.zipper_quantize(w, outlier_ratio=0.01 if kind == "row1" else 0.05)
    q_high = codes.q_high
    if kind == "cols64":
        keep = torch.argsort(-(q_high != 0).sum(dim=0), stable=True)[: max(1, k // 64)]
        cols = torch.zeros_like(q_high)
        cols[:, keep] = q_high[:, keep]
        q_high = cols
    return codes.q_low, q_high, codes.scale


def dense_two_pass(x, low, high, inv, act_group):
    """The dense layout's product as two passes: the W4A4 layer, then the high part accumulated."""
    y = w4a4_linear(x, inv, low.packed, low.scale, act_group, torch.float32)
    return zipper_high_gpu(_dense_acts(x, inv), high, y, check_finite=False)


def copies(low, high, n):
    """n layers with their own device tensors (the first is the original)."""
    out = [(low, high)]
    for _ in range(n - 1):
        out.append((dataclasses.replace(low, packed=low.packed.clone(), scale=low.scale.clone()),
                    dataclasses.replace(high, index=high.index.clone(), values=high.values.clone(),
                                        row_scale=high.row_scale.clone())))
    return out


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--act-group", type=int, default=0, help="activation group size (0: per token)")
    ap.add_argument("--ms", default=",".join(str(m) for m in MS))
    args = ap.parse_args()
    g = args.act_group or None
    t_end = time.time() + args.budget_s
    l2 = l2_cache_bytes()
    rows = []
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
              "command": " ".join(sys.argv), "act_group": g}
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        inv = (torch.rand(k, device="cuda", generator=torch.Generator("cuda").manual_seed(1)) + 0.5).float()
        for kind in args.kinds.split(","):
            if time.time() > t_end:
                rows.append({"shape": name, "kind": kind, "skipped": "budget"})
                continue
            q_low, q_high, scale = layer_codes(n, k, kind)
            low = DenseInt4.from_codes(q_low, scale, None, "cuda")
            qh, sc = q_high.cpu().numpy(), scale.cpu().numpy()
            highs = {}
            for method in ZIPPER_HIGH_METHODS:
                try:
                    highs[method] = ZipperHighGPU.from_codes(qh, sc, "cuda", method=method)
                except ValueError as exc:
                    rows.append({"shape": name, "kind": kind, "method": method, "skipped": str(exc)})
            auto = ZipperHighGPU.from_codes(qh, sc, "cuda").method
            stats = {"nnz": int((q_high != 0).sum()), "columns": int((q_high != 0).any(dim=0).sum()),
                     "e_max": int((q_high != 0).sum(dim=1).max()), "auto": auto}
            print(name, kind, stats, flush=True)
            alive = set(highs)
            for m in (int(v) for v in args.ms.split(",")):
                if time.time() > t_end:
                    rows.append({"shape": name, "kind": kind, "m": m, "skipped": "budget"})
                    break
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                y_low = w4a4_linear(x, inv, low.packed, low.scale, g, torch.float32)
                xs = x.double() * inv.double()
                ref = 16.0 * scale[None, :] * (xs @ q_high.double().T)
                row = {"shape": name, "kind": kind, "m": m, **stats, "us": {}, "rel_err": {}}
                per_call = nbytes(low.packed, low.scale, x) + 4 * m * n
                reps = calls_per_replay(per_call, l2)
                xs_c = [x] + [x.clone() for _ in range(reps - 1)]
                lows = copies(low, highs[auto], reps)
                row["us"]["w4a4_linear"] = 1e3 * graph_median_ms(
                    [lambda x=x_i, lw=lw: w4a4_linear(x, inv, lw.packed, lw.scale, g, torch.float32)
                     for x_i, (lw, _) in zip(xs_c, lows)])
                row["fused"] = "dense" in highs and fused_at(m, g, x.device)
                runs = {method: (highs[method], zipper_gpu_linear) for method in sorted(alive)}
                if row["fused"]:
                    runs["dense_two_pass"] = (highs["dense"], dense_two_pass)
                for method, (high, layer) in runs.items():
                    y = layer(x, low, high, inv, g)
                    err = float((y.double() - y_low.double() - ref).norm() / ref.norm().clamp_min(1e-30))
                    row["rel_err"][method] = err
                    if not err < TOL.get(method, TOL["dense"]):
                        row.setdefault("wrong", []).append(method)
                        continue
                    reps_m = calls_per_replay(per_call + nbytes(high.index, high.values, high.row_scale), l2)
                    layers = copies(low, high, reps_m)
                    xs_m = [x] + [x.clone() for _ in range(reps_m - 1)]
                    row["us"][method] = 1e3 * graph_median_ms(
                        [lambda x=x_i, lw=lw, hg=hg, layer=layer: layer(x, lw, hg, inv, g)
                         for x_i, (lw, hg) in zip(xs_m, layers)])
                    del layers
                best = min(v for key, v in row["us"].items() if key != "w4a4_linear")
                for method in list(alive):
                    if method in row["us"] and row["us"][method] > SKIP_RATIO * best:
                        alive.discard(method)
                        row.setdefault("dropped_after", []).append(method)
                row["ratio_to_w4a4"] = {key: v / row["us"]["w4a4_linear"] for key, v in row["us"].items()}
                rows.append(row)
                print(m, {key: round(v, 1) for key, v in row["us"].items()}, row.get("wrong", ""), flush=True)
                Path(args.out).write_text(json.dumps(result, indent=1))
            del highs, low
            torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
