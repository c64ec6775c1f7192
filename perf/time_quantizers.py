"""Wall time of quantizing one LLaMA-3-8B decoder layer's weights on a device, oracle vs torch.

    PYTHONUNBUFFERED=1 python perf/time_quantizers.py --out $OUT/time_quantizers.json [--device cuda] [--oracle]

The seven linears of one decoder layer (q, k, v, o, gate, up, down; seeded random fp16 weights,
Student-t tails so Zipper has outliers), each quantized by `zqkernels.quantizers` (RTN, ZipperQuant
grid + split, MosaicQuant scoring at 5 % density) in float64 on the device, synchronized wall
clock per method; with --oracle the numpy `reference` functions on the host too. A whole model
is 32 such layers: the JSON states the measured per-layer time only.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import reference  # noqa: E402
from shapes import SHAPES_BY_NAME  # noqa: E402

from zqkernels import quantizers as Q  # noqa: E402

LAYERS = ("q", "kv", "kv", "o", "gate", "up", "down")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--oracle", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    weights = []
    for name in LAYERS:
        s = SHAPES_BY_NAME[f"llama3-8b.{name}"]
        w = torch.distributions.StudentT(3.0).sample((s.n, s.k)) * 0.02
        weights.append(w.to(torch.float16).to(dev))
    hdiags = [torch.rand(w.shape[1], generator=gen).double().to(dev) + 0.1 for w in weights]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    methods = {
        "rtn": lambda w, h: Q.quantize_weights(w.double()),
        "zipper": lambda w, h: Q.zipper_quantize(w.double(), outlier_ratio=0.05),
        "mosaic": lambda w, h: Q.mosaic_quantize(w.double(), h, density=0.05),
    }
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "layers": [f"llama3-8b.{n}" for n in LAYERS], "timer": "wall clock, synchronized", "per_layer_s": {}}
    for name, fn in methods.items():
        fn(weights[3], hdiags[3])  # warm-up: kernels, allocator
        sync()
        t0 = time.perf_counter()
        for w, h in zip(weights, hdiags):
            fn(w, h)
        sync()
        out["per_layer_s"][name] = time.perf_counter() - t0
        print(name, f"{out['per_layer_s'][name]:.2f} s per decoder layer ({dev})", flush=True)
    if args.oracle:
        out["oracle_per_layer_s"] = {}
        ref = {"rtn": lambda w, h: reference.quantize_weights(w),
               "zipper": lambda w, h: reference.zipper_quantize(w, outlier_ratio=0.05),
               "mosaic": lambda w, h: reference.mosaic_quantize(w, h, density=0.05)}
        host = [w.double().cpu().numpy() for w in weights]
        hh = [h.cpu().numpy() for h in hdiags]
        for name, fn in ref.items():
            t0 = time.perf_counter()
            for w, h in zip(host, hh):
                fn(w, h)
            out["oracle_per_layer_s"][name] = time.perf_counter() - t0
            print("oracle", name, f"{out['oracle_per_layer_s'][name]:.2f} s per decoder layer (host)", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
