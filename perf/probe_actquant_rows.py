"""Probe: the activation quantizer on long rows (K = 14336, LLaMA-3-8B down) by launch config.

For each M in {1, 16, 4096} and each config (ONE_PASS_MAX_K, ROW_CHUNK), times
`quantize_activations(x, inv_s, check_finite=False, config=...)` as 16 back-to-back calls over
16 input copies in one CUDA graph (do_bench median of the replay / 16), and checks that its codes
and scales equal the table's own config's bit for bit. Writes --out JSON.
    python perf/probe_actquant_rows.py --out $OUT/probe_actquant_rows.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
from timing import graph_median_ms  # noqa: E402

from zqkernels.gpu.actquant import quantize_activations  # noqa: E402

CONFIGS = [dict(ONE_PASS_MAX_K=8192, ROW_CHUNK=4096), dict(ONE_PASS_MAX_K=8192, ROW_CHUNK=8192),
           dict(ONE_PASS_MAX_K=16384, ROW_CHUNK=4096)]
COPIES = 16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--k", type=int, default=14336)
    args = ap.parse_args()
    K = args.k
    rows = []
    for m in (1, 16, 4096):
        xs = [torch.randn(m, K, device="cuda", dtype=torch.float16) for _ in range(COPIES)]
        inv = torch.rand(K, device="cuda") + 0.5
        ref = quantize_activations(xs[0], inv, check_finite=False)
        for cfg in CONFIGS:
            q, s = quantize_activations(xs[0], inv, check_finite=False, config=cfg)
            same = bool(torch.equal(q, ref[0]) and torch.equal(s, ref[1]))
            fns = [lambda x=x: quantize_activations(x, inv, check_finite=False, config=cfg) for x in xs]
            us = 1000.0 * graph_median_ms(fns)
            rows.append(dict(M=m, K=K, config=cfg, us=us, equal_to_table=same,
                             gbps=(2 * m * K + m * K // 2 + 4 * m) / (us * 1e-6) / 1e9))
            print(rows[-1], flush=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__,
                   "timer": f"{COPIES} back-to-back calls over input copies in one CUDA graph, do_bench median / {COPIES}",
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
