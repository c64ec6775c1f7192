"""Wall time of quantizing weights on a device, oracle vs torch: the quantizers alone, or whole layers.

    PYTHONUNBUFFERED=1 python perf/time_quantizers.py --out $OUT/time_quantizers.json [--device cuda] [--oracle]
    PYTHONUNBUFFERED=1 python perf/time_quantizers.py --what layers --device cpu --shapes 1024x1024,4096x4096 \
        --out reports/results/cpu-2core/quantize_time/layers_cpu.json

`--what quantizers` (the default): the seven linears of one decoder layer (q, k, v, o, gate, up,
down; seeded random fp16 weights, Student-t tails so Zipper has outliers), each quantized by `zqkernels.quantizers` (RTN, ZipperQuant
grid + split, MosaicQuant scoring at 5 % density) in float64 on the device, synchronized wall
clock per method; with --oracle the numpy `reference` functions on the host too. A whole model
is 32 such layers: the JSON states the measured per-layer time only.

`--what layers`: one `zqkernels.nn` layer per method and shape (`pipeline.quantize.build_layer`,
the layer `quantize_model` builds: RTN, w4a16, SmoothQuant, ZipperQuant, MosaicQuant at the
accuracy table's parameters) built from a seeded random fp16 linear on --device with
--backend, timed twice: as the layers build now (`zqkernels.quantizers` on the device) and through
`zqkernels.quantizers.host_oracle()` (the numpy oracle on the host, the layers' previous path);
the two layers are checked equal (buffers with `torch.equal`, statistics with `==`). Median of
--repeats builds per path, the two paths alternating; the 1-minute load average is recorded with
each row (a shared CPU's other work slows both paths).

`--what packing`: `layouts.DenseInt4.from_codes` for the seven linears of one LLaMA-3-8B decoder
layer, the int8 codes and float64 scales on --device: copied to the host as numpy and packed by
the oracle (`reference.pack_int4`, then uploaded), against given as tensors and packed where they
are (`layouts.pack_tensor`); the two layouts are checked equal byte for byte. Synchronized wall
clock, median of --repeats per path, the paths alternating.

`--what model`: `pipeline.quantize_model` over a whole named configuration (--model, default
smollm2-135m, the shape of `zq run`'s model) once per method, with the code of the checkout the
script sits in; run from a checkout of an earlier commit, it times that commit's layers (the
summaries, which depend on every code, must then be equal).
"""
import argparse
import json
import os
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


# (label, MethodConfig arguments): the accuracy table's configurations (README)
LAYER_METHODS = [
    ("w4a16", dict(method="w4a16")),
    ("rtn-w4a4", dict(method="rtn-w4a4", act_group_size=32)),
    ("smoothquant-w4a4", dict(method="smoothquant-w4a4", group_size=32, act_group_size=32)),
    ("zipper", dict(method="zipper", alpha=0.75, outlier_ratio=0.05, act_group_size=32)),
    ("mosaic", dict(method="mosaic", alpha=0.75, density=0.3, group_size=32, act_group_size=32)),
]  # Hadamard RTN is left out: its layers quantize through the oracle on both paths (zqkernels/nn.py)


def _shape(text):
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NxK, got {text!r}") from None
    if n < 1 or k < 2 or k % 2:
        raise argparse.ArgumentTypeError(f"expected N >= 1 and an even K >= 2, got {text!r}")
    return n, k


def time_layers(args, dev, sync):
    """Seconds to build each method's layer, device path against the host-oracle path."""
    from zqkernels import nn as zqnn
    from zqkernels.pipeline.calibrate import InputStats
    from zqkernels.pipeline.quantize import MethodConfig, build_layer

    shapes = [_shape(t) for t in args.shapes.split(",")]
    out = {"what": "layers", "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "backend": args.backend,
           "timer": f"wall clock, synchronized, median of {args.repeats} builds per path, the paths alternating",
           "command": "python perf/time_quantizers.py " + " ".join(sys.argv[1:]), "layers": []}
    for n, k in shapes:
        gen = torch.Generator().manual_seed(n * 131 + k)
        lin = torch.nn.Linear(k, n, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.distributions.StudentT(3.0).sample((n, k)) * 0.02)
        lin = lin.to(torch.float16).to(dev)
        absmax = (torch.rand(k, generator=gen, dtype=torch.float64) * 4 + 0.1).numpy()
        absmax[torch.randint(0, k, (max(1, k // 100),), generator=gen).numpy()] *= 50.0  # outlier channels
        stats = InputStats(absmax=absmax, sumsq=absmax**2 / 9.0, count=1)
        w_absmax = lin.weight.detach().abs().amax(dim=0).double().cpu().numpy()
        for label, kw in LAYER_METHODS:
            cfg = MethodConfig(**kw)
            smooth = None if cfg.alpha is None or cfg.method == "w4a16" else \
                reference.smooth_scales(absmax, w_absmax, alpha=cfg.alpha)
            runs, layers = {"device": [], "host_oracle": []}, {}
            for _ in range(args.repeats):  # the paths alternate, so a change of load hits both
                for path in runs:
                    if path == "host_oracle":
                        zqnn.quantizers = Q.host_oracle()
                    try:
                        sync()
                        t0 = time.perf_counter()
                        layers[path] = build_layer(cfg, lin, stats, smooth, args.backend)
                        sync()
                        runs[path].append(time.perf_counter() - t0)
                    finally:
                        zqnn.quantizers = Q
            times = {path: float(np.median(r)) for path, r in runs.items()}
            a, b = (dict(layers[p].named_buffers()) for p in ("device", "host_oracle"))
            equal = a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a) and \
                layers["device"].stats == layers["host_oracle"].stats
            row = {"shape": [n, k], "method": label, "params": cfg.params(), "device_s": times["device"],
                   "host_oracle_s": times["host_oracle"], "speedup": times["host_oracle"] / times["device"],
                   "runs_s": runs, "load_average_1min": os.getloadavg()[0],
                   "codes_equal": bool(equal)}
            out["layers"].append(row)
            print(f"{n}x{k} {label:18s} device {times['device']:7.3f} s  host oracle {times['host_oracle']:7.3f} s"
                  f"  ({row['speedup']:.2f}x)  equal={equal}", flush=True)
            if not equal:
                raise SystemExit(f"{label} {n}x{k}: the two paths built different layers")
    return out


def time_model(args, dev, sync):
    """Seconds of `quantize_model` per method over a whole named model (seeded random weights)."""
    import copy

    from zqkernels.pipeline import calibrate, quantize_model, summarize_layers, synthetic
    from zqkernels.pipeline.quantize import MethodConfig

    lm = synthetic.build(args.model, dtype=torch.float32 if dev.type == "cpu" else torch.float16, device=dev)
    stats = calibrate(lm, synthetic.random_windows(lm.config.vocab_size, 2, 128), progress=False)
    out = {"what": "model", "model": args.model, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "backend": args.backend,
           "code": str(Path(__file__).resolve().parents[1]),
           "timer": "wall clock, synchronized, one quantize_model per method (calibration: 2 random windows of 128)",
           "command": "python perf/time_quantizers.py " + " ".join(sys.argv[1:]), "methods": []}
    for label, kw in LAYER_METHODS:
        cfg = MethodConfig(**kw)
        m = copy.deepcopy(lm)
        sync()
        t0 = time.perf_counter()
        recs = quantize_model(m, stats, cfg, backend=args.backend, progress=True)
        sync()
        dt = time.perf_counter() - t0
        del m
        # the summary (bits, table totals, output errors) is equal before and after when the codes are
        out["methods"].append({"method": label, "params": cfg.params(), "quantize_s": dt,
                               "load_average_1min": os.getloadavg()[0], "summary": summarize_layers(recs)})
        print(f"{args.model} {label:18s} {dt:7.1f} s", flush=True)
    return out


def time_packing(args, dev, sync):
    """Seconds to build the dense 4-bit layouts of one decoder layer: host (numpy) vs tensor packing."""
    import statistics

    from zqkernels.layouts import DenseInt4

    gen = torch.Generator(device="cpu").manual_seed(0)
    codes = []
    for name in LAYERS:
        s = SHAPES_BY_NAME[f"llama3-8b.{name}"]
        q = torch.randint(-8, 8, (s.n, s.k), generator=gen, dtype=torch.int8)
        codes.append((q.to(dev), (torch.rand(s.n, generator=gen, dtype=torch.float64) + 0.01).to(dev)))

    def host():
        return [DenseInt4.from_codes(q.cpu().numpy(), sc.cpu().numpy(), None, dev) for q, sc in codes]

    def tensor():
        return [DenseInt4.from_codes(q, sc, None, dev) for q, sc in codes]

    for a, b in zip(host(), tensor()):  # warm-up, and the check
        if not (torch.equal(a.packed, b.packed) and torch.equal(a.scale, b.scale)):
            raise AssertionError("tensor packing differs from the oracle's")
    times = {"host_numpy_s": [], "tensor_s": []}
    for _ in range(args.repeats):
        for key, fn in (("host_numpy_s", host), ("tensor_s", tensor)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - t0)
    out = {"what": "packing", "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "layers": [f"llama3-8b.{n}" for n in LAYERS], "timer": "wall clock, synchronized, per decoder layer",
           "command": "python perf/time_quantizers.py " + " ".join(sys.argv[1:]),
           "per_layer_s": {k: statistics.median(v) for k, v in times.items()}, "all_s": times,
           "load_average_1min": os.getloadavg()[0]}
    print(json.dumps(out["per_layer_s"]), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--what", choices=("quantizers", "layers", "model", "packing"),
                    default="quantizers")
    ap.add_argument("--model", default="smollm2-135m", help="model: a named configuration")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--oracle", action="store_true", help="quantizers: time the numpy oracle too")
    ap.add_argument("--shapes", default="1024x1024,4096x4096", help="layers: comma-separated NxK")
    ap.add_argument("--backend", default="torch", choices=("torch", "reference", "triton"), help="layers")
    ap.add_argument("--repeats", type=int, default=3, help="layers, packing: builds per path (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if args.what in ("layers", "model", "packing"):
        out = {"layers": time_layers, "model": time_model, "packing": time_packing}[args.what](args, dev, sync)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        return
    gen = torch.Generator(device="cpu").manual_seed(0)
    weights = []
    for name in LAYERS:
        s = SHAPES_BY_NAME[f"llama3-8b.{name}"]
        w = torch.distributions.StudentT(3.0).sample((s.n, s.k)) * 0.02
        weights.append(w.to(torch.float16).to(dev))
    hdiags = [torch.rand(w.shape[1], generator=gen).double().to(dev) + 0.1 for w in weights]


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
