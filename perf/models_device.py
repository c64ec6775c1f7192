"""Whole-model prefill / decode tokens/s and peak memory of every method on a named configuration
(LLaMA-3-8B or Qwen3-8B shapes, seeded random weights), on a GPU host: the measurement of
`zq bench --model llama3-8b --backend triton`, with a time budget, every method's record written
as soon as it finishes, and a method that fails recorded with its error while the run goes on.

    PYTHONUNBUFFERED=1 python perf/models_device.py --model llama3-8b --out $OUT
    PYTHONUNBUFFERED=1 python perf/models_device.py --model llama3-8b --layers 8 --methods fp16,rtn-w4a4 --out $OUT

What is timed, for every method alike (`zqkernels.pipeline.speed`): the prefill (one forward of a
[batch, --prefill] prompt, last position's logits), the greedy decode of --decode tokens replayed
from a CUDA graph of the one-token step on a static KV cache (`decode_tokens_per_s`), and beside
it the eager decode on transformers' dynamic cache (`decode_tokens_per_s_eager`); the peak GPU
memory of the call. A CUDA-graph decode that fails is recorded (`speed.graph_error`, with the
traceback: where the step synchronized with the host) and the eager figures stand. The graph's
tokens are checked against the same step run eagerly (`graph_tokens_equal_static_eager`).
Perplexity is not measured: the weights are random. Quantization runs through the pipeline's
layers, whose build time (`quantize_s`) grows with the layer count: --layers cuts the model,
--methods picks the methods (default: all of METHODS, the slow-to-quantize ones last).

Writes --out/models_<model>.json after every method: {"meta": {...}, "records": [...]},
records as `zq bench` writes them (`zq report --accuracy` reads the file); a method not started
because the budget ran out is listed under meta.skipped_for_time. Ends with the speed table.
`--dry` checks this script's plumbing on a CPU (a 1-layer model, the torch backend, no graphs).

`--time-quantize` times quantization alone: every quantized method of METHODS (default; the peers
are skipped) quantizes the model (all layers unless --layers), the weights on the GPU
(`zqkernels.quantizers` inside the layers), with a progress bar per method, and no speed is
measured; writes --out/quantize_time_<model>.json with the seconds per method (`quantize_s`: a
fresh model built from the seed, then every decoder linear quantized and packed for --backend)
after every method:

    PYTHONUNBUFFERED=1 python perf/models_device.py --model llama3-8b --time-quantize --out $OUT
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# (label, method, params): the configurations the accuracy table reports, and the peers.
METHODS = [
    ("fp16", "fp16", {}),
    ("fp8-rowwise", "fp8-rowwise", {}),
    ("torch-int4", "torch-int4", {}),
    ("w4a16", "w4a16", {}),
    ("rtn-w4a4", "rtn-w4a4", {}),
    # MosaicQuant in groups of 32, the accuracy runs' (and the launch table's w4a4_group tuning)
    ("mosaic-5pct", "mosaic", {"alpha": 0.75, "group_size": 32, "density": 0.05}),
    ("mosaic", "mosaic", {"alpha": 0.75, "group_size": 32, "density": 0.3}),
    # ZipperQuant as measured for accuracy: alpha 0.75, outlier_ratio 0.05, activations in groups
    # of 32, GPU high part
    ("zipper", "zipper", {"alpha": 0.75, "outlier_ratio": 0.05, "high_bits": 4, "act_group_size": 32}),
]


def _config(method, params):
    from zqkernels.pipeline.peers import PEER_METHODS, PeerConfig
    from zqkernels.pipeline.quantize import MethodConfig

    return PeerConfig(method) if method in PEER_METHODS else MethodConfig(method, **params)


def _batches(text):
    values = tuple(int(v) for v in text.split(","))
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-8b", help="named configuration (zqkernels.pipeline.synthetic.NAMED)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers kept (default: all)")
    ap.add_argument("--methods", default=None, help="comma-separated labels of METHODS (default: all)")
    ap.add_argument("--batch", type=_batches, default=(1, 16), help="batch sizes timed (default 1,16)")
    ap.add_argument("--prefill", type=int, default=2048, help="prompt tokens")
    ap.add_argument("--decode", type=int, default=32, help="greedy decode steps timed")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    ap.add_argument("--calib-tokens", type=int, default=4096, help="random calibration tokens, windows of 512")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="start no new method after this many seconds (a 10-minute command must end in time)")
    ap.add_argument("--out", default=".", help="output folder")
    ap.add_argument("--norms", default="model", choices=("model", "fused"),
                    help="RMSNorm modules of every method's model: model (transformers' own; default, as the "
                         "runs before the option) or fused (one Triton launch each)")
    ap.add_argument("--linears", default="model", choices=("model", "fused"),
                    help="decoder linears of every method's model: model (transformers' q/k/v, gate/up; default) or "
                         "fused (pipeline.fusion: one qkv_proj and one gate_up_proj a layer, every method alike)")
    ap.add_argument("--dry", action="store_true", help="CPU check of the plumbing: 1 layer, torch backend, eager")
    ap.add_argument("--time-quantize", action="store_true",
                    help="time quantization only (seconds per method, progress bars), no speed measurement")
    args = ap.parse_args()

    from zqkernels.pipeline import Experiment, Settings
    from zqkernels.pipeline.results import speed_table

    from zqkernels.pipeline.peers import PEER_METHODS

    labels = [m[0] for m in METHODS]
    default = [m[0] for m in METHODS if not (args.time_quantize and m[1] in PEER_METHODS + ("fp16",))]
    chosen = default if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(labels))
    if unknown:
        ap.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(labels)}")
    if args.dry and args.norms == "fused":
        ap.error("--norms fused needs a CUDA GPU; --dry runs on the CPU")
    if not args.dry and not torch.cuda.is_available():
        ap.error("no CUDA GPU here: the measurement needs one (--dry checks the plumbing on a CPU)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / (f"quantize_time_{args.model}.json" if args.time_quantize else f"models_{args.model}.json")
    t_start = time.monotonic()
    settings = Settings(model=args.model, layers=1 if args.dry else args.layers,
                        backend="torch" if args.dry else "triton", device="cpu" if args.dry else "cuda",
                        dtype="float32" if args.dry else "float16", context=512, calib_context=512,
                        calib_tokens=512 if args.dry else args.calib_tokens,
                        prefill_tokens=16 if args.dry else args.prefill, decode_tokens=4 if args.dry else args.decode,
                        speed_repeats=1 if args.dry else args.repeats, batches=args.batch, measure_ppl=False,
                        measure_speed=not args.time_quantize, progress=args.time_quantize, graph_errors="record",
                        norms=args.norms, linears=args.linears)
    import transformers
    import triton

    exp = Experiment(settings).prepare()
    meta = {"model": args.model, "model_source": exp.meta["model_source"], "config": exp.meta["config"],
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry else "cpu (--dry)",
            "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "command": "python perf/models_device.py " + " ".join(sys.argv[1:]),
            "prepare_s": time.monotonic() - t_start, "skipped_for_time": [], "norms": settings.norms,
            "linears": settings.linears}
    records = []
    for label, method, params in METHODS:
        if label not in chosen:
            continue
        if time.monotonic() - t_start > args.budget_s:
            meta["skipped_for_time"].append(label)
            continue
        t0 = time.monotonic()
        try:
            rec = exp.run(_config(method, params))
        except Exception as exc:  # noqa: BLE001 - recorded; the next method runs
            rec = {"model": args.model, "method": method, "error": f"{type(exc).__name__}: {exc}"[:2000],
                   "traceback": traceback.format_exc()[-4000:]}
        rec["label"], rec["command"] = label, meta["command"]
        rec["wall_s"] = time.monotonic() - t0
        records.append(rec)
        out_path.write_text(json.dumps({"meta": meta, "records": records}, indent=1, default=float) + "\n")
        if args.time_quantize:
            print(f"{label:12s} quantize {rec.get('quantize_s', float('nan')):7.1f} s  {rec.get('error', '')}", flush=True)
            continue
        sp = rec.get("speed", {})
        print(f"{label:12s} prefill {sp.get('prefill_tokens_per_s', float('nan')):10.1f} tok/s "
              f"({sp.get('prefill_mode', '-')}), eager {sp.get('prefill_tokens_per_s_eager', float('nan')):.1f}  decode "
              f"{sp.get('decode_tokens_per_s', float('nan')):8.1f} tok/s ({sp.get('decode_mode', '-')}), eager "
              f"{sp.get('decode_tokens_per_s_eager', float('nan')):8.1f}  "
              f"{rec.get('error', sp.get('graph_error', sp.get('prefill_graph_error', '')))}"
              f"  ({rec['wall_s']:.0f} s)", flush=True)
    meta["wall_s"] = time.monotonic() - t_start
    out_path.write_text(json.dumps({"meta": meta, "records": records}, indent=1, default=float) + "\n")
    if args.time_quantize:
        for r in records:
            print(f"{r['label']:12s} {r.get('quantize_s', float('nan')):7.1f} s  {r.get('error', '')}")
    else:
        print(speed_table([r for r in records if "error" not in r]))
    print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
