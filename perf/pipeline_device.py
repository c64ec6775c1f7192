"""End-to-end prefill / decode tokens/s on a GPU host, Triton backend.

    PYTHONUNBUFFERED=1 python perf/pipeline_device.py --out $OUT        (< 4 minutes)

The GPU host cannot reach a package index and the embedded GGUF (93 MB) is too large to ship
with the working tree, so the model here is the named configuration "smollm2-135m" of
`zqkernels.pipeline.synthetic` (perf/shapes.py's `MODELS["smollm2-135m"]`: 30 layers, hidden 576,
MLP 1536, 9 query / 3 KV heads, vocab 49152; the other fields as the published config) with seeded
random weights: every GEMM has the real model's shape, so tokens/s are the real model's;
perplexity is not measured here (the CPU results in reports/results/cpu-2core/ carry it).
Calibration statistics come from random token windows through the same hooks as `zq run`.

For each variant: fp16 (cuBLAS nn.Linear), w4a16, rtn-w4a4, smoothquant-w4a4, zipper (triton
backend = `zipper_linear(mode="gpu")`; and backend hybrid), mosaic, each with per-token and
per-group-32 activations where the kernels have them:
1. correctness: every quantized layer's output on calibration rows against the same layer on the
   torch backend (the oracle's codes, float32) -- max relative Frobenius error over layers;
2. speed: prefill of --prefill tokens and --decode greedy steps (`zqkernels.pipeline.speed`, the
   timer `zq bench` uses: CUDA-synchronized wall clock, median of 3): the decode replayed from a
   CUDA graph of the one-token step on a static KV cache, the eager decode on the dynamic cache
   beside it (`decode_tokens_per_s_eager`).
Writes --out/pipeline_device.json after every variant (a timeout keeps what finished); a variant
that raises is recorded with its error and the run goes on.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

import torch  # noqa: E402

MODEL = "smollm2-135m"  # zqkernels.pipeline.synthetic.NAMED

# Layers whose triton output is checked against the torch backend: every shape of the model.
CHECK_LAYERS = ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.mlp.gate_proj",
                "layers.1.mlp.down_proj")

VARIANTS = [
    # (label, method, backend, params)
    ("fp16", "fp16", "torch", {}),
    ("w4a16", "w4a16", "triton", {}),
    ("rtn-w4a4", "rtn-w4a4", "triton", {}),
    ("smoothquant-w4a4", "smoothquant-w4a4", "triton", {}),
    ("smoothquant-w4a4-g32", "smoothquant-w4a4", "triton", {"act_group_size": 32}),
    # ZipperQuant as measured for accuracy (zq run): alpha 0.75, outlier_ratio 0.05, high_bits 4
    ("zipper", "zipper", "triton", {"alpha": 0.75, "outlier_ratio": 0.05}),
    ("zipper-g32", "zipper", "triton", {"alpha": 0.75, "outlier_ratio": 0.05, "act_group_size": 32}),
    ("zipper-hybrid-g32", "zipper", "hybrid", {"alpha": 0.75, "outlier_ratio": 0.05, "act_group_size": 32}),
    # MosaicQuant as measured for accuracy (zq run): alpha 0.75, base groups of 32, density 0.3
    # The Triton Mosaic kernels take weight and activation groups of any multiple of 32; groups of
    # 32 are the configuration the CPU accuracy table reports.
    ("mosaic-g32", "mosaic", "triton", {"alpha": 0.75, "group_size": 32, "density": 0.3, "act_group_size": 32}),
    ("mosaic", "mosaic", "triton", {"alpha": 0.75, "group_size": 64, "density": 0.3}),
    ("mosaic-g64", "mosaic", "triton", {"alpha": 0.75, "group_size": 64, "density": 0.3, "act_group_size": 64}),
    ("mosaic-w4a16", "mosaic", "triton", {"alpha": 0.75, "group_size": 64, "density": 0.3, "act_bits": None}),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".", help="output folder")
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--only", default=None, help="comma-separated labels to run")
    ap.add_argument("--budget-s", type=float, default=210.0,
                    help="start no new variant after this many seconds (the run must end < 4 min)")
    ap.add_argument("--dry", action="store_true",
                    help="CPU check of this script's plumbing: 2 layers, torch backend instead of triton/hybrid")
    args = ap.parse_args()
    from zqkernels.pipeline import MethodConfig, calibrate, quantize_model, speed, summarize_layers, synthetic
    from zqkernels.pipeline.quantize import build_layer

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / "pipeline_device.json"
    dev = torch.device("cpu" if args.dry else "cuda")
    dtype = torch.float32 if args.dry else torch.float16
    layers = 2 if args.dry else None
    base = synthetic.build(MODEL, layers=layers, dtype=dtype, device=dev, seed=0)
    cfg = base.config
    calib = synthetic.random_windows(cfg.vocab_size, 4, 512, seed=0)
    prompt = synthetic.random_windows(cfg.vocab_size, 1, args.prefill, seed=1)[0]
    stats = calibrate(base, calib, progress=False)
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (--dry)",
              "torch": torch.__version__,
              "model": "LlamaForCausalLM, SmolLM2-135M configuration, seeded random weights (timing only)",
              "config": synthetic.config_fields(MODEL, layers), "prefill_tokens": args.prefill,
              "decode_tokens": args.decode,
              "command": "python perf/pipeline_device.py " + " ".join(sys.argv[1:]), "variants": []}
    import triton

    result["triton"] = triton.__version__
    only = set(args.only.split(",")) if args.only else None
    t_start = time.monotonic()
    for label, method, backend, params in VARIANTS:
        if only and label not in only:
            continue
        if time.monotonic() - t_start > args.budget_s:
            result.setdefault("skipped_for_time", []).append(label)
            continue
        if args.dry and backend != "torch":
            backend = "torch"
        rec = {"label": label, "method": method, "backend": backend, "params": params}
        t0 = time.monotonic()
        try:
            mcfg = MethodConfig(method, **params)
            lm = copy.deepcopy(base) if method != "fp16" else base
            layers = quantize_model(lm, stats, mcfg, backend=backend, progress=False)
            rec["quantize_s"] = time.monotonic() - t0
            rec["effective_bits"] = summarize_layers(layers)["effective_bits"]
            if method != "fp16":
                # kernel check on real shapes: the triton layer against the torch backend built from
                # the same float layer, statistics and smoothing vector (same oracle codes)
                worst = 0.0
                base_mods = dict(decoder_linears_any(base))
                qmods = dict(decoder_linears_any(lm))
                with torch.no_grad():
                    for name in CHECK_LAYERS:
                        mod = qmods[name]
                        ref = build_layer(mcfg, base_mods[name], stats[name], mod.smooth, "torch")
                        x = stats[name].sample_rows().to(dev, dtype)
                        a, b = mod(x).double(), ref(x).double()
                        worst = max(worst, ((a - b).norm() / b.norm()).item())
                rec["max_layer_rel_err_vs_torch_backend"] = worst
                rec["checked_layers"] = list(CHECK_LAYERS)
            rec["speed"] = speed(lm, prompt, decode_tokens=args.decode, repeats=3)
            if lm is not base:
                del lm
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - record and go on to the next variant
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["traceback"] = traceback.format_exc()[-2000:]
        rec["wall_s"] = time.monotonic() - t0
        result["variants"].append(rec)
        sp = rec.get("speed", {})
        print(f"{label:22s} prefill {sp.get('prefill_tokens_per_s', float('nan')):10.1f} tok/s  "
              f"decode {sp.get('decode_tokens_per_s', float('nan')):8.1f} tok/s ({sp.get('decode_mode', '-')}, eager "
              f"{sp.get('decode_tokens_per_s_eager', float('nan')):.1f})  "
              f"err {rec.get('max_layer_rel_err_vs_torch_backend', float('nan')):.2e}  "
              f"{rec.get('error', '')}  ({rec['wall_s']:.0f} s)", flush=True)
        out_path.write_text(json.dumps(result, indent=1, default=float))
    return 0


def decoder_linears_any(lm):
    """(name, module) of every decoder projection, quantized or not."""
    out = []
    for i, layer in enumerate(lm.model.layers):
        for blk, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                           ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for a in names:
                out.append((f"layers.{i}.{blk}.{a}", getattr(getattr(layer, blk), a)))
    return out


if __name__ == "__main__":
    sys.exit(main())
