"""Host time of one W4A4 layer product on its Python path, the kernels made no-ops: what a layer
costs the CPU per call before any GPU work, the part that bounds eager decode and small-batch
prefill when the GPU finishes a linear faster than the host can issue it.

    PYTHONPATH=$PWD python perf/host_path.py --out reports/results/cpu-2core/host_path/host_path.json

Runs on a CPU under Triton's interpreter with every `@triton.jit` kernel of the W4A4 path
replaced by a launch that does nothing, so the figure is validation, config lookup, allocation,
op dispatch and the launchers' argument handling. Timed: the layer product as the layers call it
(`zqkernels.nn.w4a4_triton_product`), the product through `torch.ops.zq.*` (the custom-op
dispatcher, what torch.compile records) and each launcher alone. Median of --repeats rounds of
--calls calls, one torch thread.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _silence_kernels():
    from zqkernels.gpu import actquant, w4a4

    names = []
    for mod in (w4a4, actquant):
        for name in dir(mod):
            if name.startswith("_") and name.endswith("_kernel"):
                setattr(mod, name, _NoLaunch())
                names.append(f"{mod.__name__}.{name}")
    return names


def _time(fn, calls, repeats):
    for _ in range(3):
        fn()
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) * 1e6 / calls)
    return statistics.median(rounds)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", default="1,2048")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    silenced = _silence_kernels()
    from zqkernels import nn as zqnn
    from zqkernels import ops  # noqa: F401 - registers torch.ops.zq
    from zqkernels.gpu.actquant import quantize_activations
    from zqkernels.gpu.w4a4 import act_layouts, w4a4_gemm
    from zqkernels.layouts import DenseInt4

    rng = np.random.default_rng(0)
    w = DenseInt4.from_codes(rng.integers(-8, 8, (args.n, args.k)).astype(np.int8),
                             rng.uniform(0.01, 0.1, args.n), None, "cpu")
    steps = act_layouts(None, torch.device("cpu"))
    rows = []
    for m in (int(v) for v in args.m.split(",")):
        x = torch.randn(m, args.k).half()
        qx = torch.empty(m, args.k // 2, dtype=torch.uint8)
        sx = torch.empty(m)

        def via_ops():
            a, b = torch.ops.zq.quantize_activations(x, None, 0, "int4")
            return torch.ops.zq.w4a4_gemm(a, b, w.packed, w.scale, 0, torch.float16)

        row = {
            "M": m, "N": args.n, "K": args.k,
            "layer_product_us": _time(lambda: zqnn.w4a4_triton_product(x, None, w, None, torch.float16, steps),
                                      args.calls, args.repeats),
            "through_torch_ops_us": _time(via_ops, args.calls, args.repeats),
            "quantize_launcher_us": _time(lambda: quantize_activations(x, None, None, check_finite=False),
                                          args.calls, args.repeats),
            "gemm_launcher_us": _time(lambda: w4a4_gemm(qx, sx, w.packed, w.scale, None, torch.float16,
                                                        check_finite=False), args.calls, args.repeats),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import triton

    out.write_text(json.dumps({"meta": {"command": "python perf/host_path.py " + " ".join(sys.argv[1:]),
                                        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                                        "triton": triton.__version__, "silenced_kernels": silenced},
                               "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
