"""Where a decode step's and a prefill's GPU time goes: the kernels of one greedy token and of one
prompt forward of a named configuration (seeded random weights), per method, grouped by what they
do, beside the CUDA-graph replay time of the same step.

    PYTHONUNBUFFERED=1 python perf/profile_decode.py --model llama3-8b --layers 4 --methods fp16,rtn-w4a4 --out $OUT

For each method: the model of --layers decoder layers is built and quantized as
`perf/models_device.py` does it (the same METHODS), a --prefill-token prompt is run into a static
KV cache (`zqkernels.pipeline.decode.StaticDecoder`), then --steps eager steps run under
torch.profiler; every CUDA kernel's duration is read from the profiler's trace and summed per
kernel name and per group (`GROUPS`: the first pattern a kernel's name matches). The step is then
captured in a CUDA graph and replayed --steps times between CUDA events: `graph_step_us` is the
whole step as decode runs it, `kernel_us_per_step` the sum of its kernels' durations, so the
difference is the gaps between kernels. `prefill`: the kernels of one eager forward of the
[--batch, --prefill] prompt (last position's logits), summed the same way, and its time between
CUDA events.

Writes --out/profile_decode_<model>.json. `--dry` runs the plumbing on a CPU (1 layer, torch
backend, no kernels or graphs: the CPU ops are listed instead).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))

import torch  # noqa: E402

# (group, name pattern): the first match names a kernel's group. The project's Triton kernels carry
# their Python function's name (`_w4a4_splitk_kernel`, matched case-sensitively, so that cuBLAS's
# "..._splitK_TNT" templates stay cuBLAS); cuBLAS / CUTLASS / cuDNN kernels their template's.
GROUPS = [
    ("zq mosaic", r"^_mosaic_"),
    ("zq zipper high", r"^_high_|^_zipper_"),
    ("zq w4a16", r"^_w4a16_"),
    ("zq w4a4 gemm", r"^_w4a4_"),
    ("zq act quant", r"^_quantize_activations"),
    ("zq rms norm", r"^_rmsnorm_"),
    ("fp8 cast", r"^_fp8_"),
    ("int4 tinygemm", r"(?i)tinygemm"),
    ("cublas gemm / gemv", r"(?i)gemm|gemv|cutlass|xmma|nvjet|splitKreduce"),
    ("attention", r"(?i)flash|fmha|attention|sdpa|softmax"),
    ("norm / rotary / elementwise", r"(?i)elementwise|vectorized|reduce|pow|rsqrt|mean|mul|add|cat|copy|index|fill|"
                                    r"unrolled|neg|silu|where|compare|arange|argmax"),
]


def group_of(name):
    for group, pattern in GROUPS:
        if re.search(pattern, name):
            return group
    return "other"


def kernels_from_trace(path):
    """[(name, µs)] of every CUDA kernel in a chrome trace torch.profiler exported."""
    events = json.loads(Path(path).read_text())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    return [(e["name"], float(e.get("dur", 0.0))) for e in events
            if isinstance(e, dict) and e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_op")]


def cpu_ops_from_trace(path):
    events = json.loads(Path(path).read_text())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    return [(e["name"], float(e.get("dur", 0.0))) for e in events
            if isinstance(e, dict) and e.get("ph") == "X" and e.get("cat") == "cpu_op"]


def profile_steps(decoder, steps, cuda):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            decoder.step()
        if cuda:
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        return kernels_from_trace(trace) if cuda else cpu_ops_from_trace(trace)


def summarize(kernels, steps):
    per_name = defaultdict(lambda: [0, 0.0])
    per_group = defaultdict(float)
    for name, us in kernels:
        per_name[name][0] += 1
        per_name[name][1] += us
        per_group[group_of(name)] += us
    total = sum(us for _, us in kernels) / steps
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:25]
    return {
        "kernel_us_per_step": total,
        "kernels_per_step": len(kernels) / steps,
        "groups_us_per_step": {g: us / steps for g, us in sorted(per_group.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:200], "group": group_of(n), "calls_per_step": c / steps, "us_per_step": us / steps}
                        for n, (c, us) in top],
    }


def profile_prefill(lm, prompt, cuda):
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        lm(input_ids=prompt, use_cache=False, logits_to_keep=1)  # compiles this M's kernels outside the profile
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            lm(input_ids=prompt, use_cache=False, logits_to_keep=1)
            end.record()
            torch.cuda.synchronize()
            elapsed_us = start.elapsed_time(end) * 1000.0
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            lm(input_ids=prompt, use_cache=False, logits_to_keep=1)
            if cuda:
                torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        kernels = kernels_from_trace(trace) if cuda else cpu_ops_from_trace(trace)
    out = summarize(kernels, 1)
    out["tokens"] = int(prompt.numel())
    if cuda:
        out["forward_us"] = elapsed_us
        out["tokens_per_s"] = prompt.numel() * 1e6 / elapsed_us
    return out


def graph_step_us(decoder, prompt, steps):
    from zqkernels.pipeline.decode import GraphDecoder

    g = GraphDecoder(decoder)
    decoder.prefill(prompt)  # the capture's warm-up steps advanced the cache
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()  # first replay uploads the graph
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000.0 / steps


def main():
    from models_device import METHODS, _config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--methods", default="fp16,rtn-w4a4")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8, help="decode steps profiled, and replayed for the graph time")
    ap.add_argument("--norms", default="model", choices=("model", "fused"),
                    help="RMSNorm modules of every method's model, as perf/models_device.py's option")
    ap.add_argument("--linears", default="model", choices=("model", "fused"),
                    help="decoder linears of every method's model, as perf/models_device.py's option")
    ap.add_argument("--out", default=".")
    ap.add_argument("--dry", action="store_true", help="CPU plumbing check: 1 layer, torch backend")
    args = ap.parse_args()
    labels = {m[0]: m for m in METHODS}
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(labels))
    if unknown:
        ap.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(labels)}")
    cuda = not args.dry
    if cuda and not torch.cuda.is_available():
        ap.error("no CUDA GPU here (--dry checks the plumbing on a CPU)")
    from zqkernels.pipeline import Experiment, Settings
    from zqkernels.pipeline.decode import StaticDecoder

    layers = 1 if args.dry else args.layers
    prefill = 16 if args.dry else args.prefill
    settings = Settings(model=args.model, layers=layers, backend="torch" if args.dry else "triton",
                        device="cpu" if args.dry else "cuda", dtype="float32" if args.dry else "float16",
                        calib_tokens=512, calib_context=512, prefill_tokens=prefill, batches=(args.batch,),
                        measure_ppl=False, measure_speed=False, progress=False, norms=args.norms,
                        linears=args.linears)
    exp = Experiment(settings).prepare()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"profile_decode_{args.model}.json"
    meta = {"model": args.model, "layers": layers, "batch": args.batch, "prefill": prefill, "steps": args.steps,
            "norms": args.norms, "linears": args.linears,
            "device": torch.cuda.get_device_name() if cuda else "cpu (--dry)", "torch": torch.__version__,
            "command": "python perf/profile_decode.py " + " ".join(sys.argv[1:]), "groups": GROUPS}
    records = []
    for label in chosen:
        _, method, params = labels[label]
        t0 = time.monotonic()
        rec = {"label": label}
        try:
            run = exp.run(_config(method, params), keep_model=True)
            lm = run.pop("_model")
            prompt = exp.prompts[: args.batch].to(lm.get_input_embeddings().weight.device)
            rec["prefill"] = profile_prefill(lm, prompt, cuda)
            decoder = StaticDecoder(lm, args.batch, prefill + 3 * args.steps + 8)
            decoder.prefill(prompt)
            decoder.step()  # compiles / settles outside the profile
            kernels = profile_steps(decoder, args.steps, cuda)
            rec.update(summarize(kernels, args.steps))
            if cuda:
                rec["graph_step_us"] = graph_step_us(decoder, prompt, args.steps)
                rec["graph_tokens_per_s"] = args.batch * 1e6 / rec["graph_step_us"]
            del lm, decoder
            if cuda:
                torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - recorded; the next method runs
            import traceback

            rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            rec["traceback"] = traceback.format_exc()[-3000:]
        rec["wall_s"] = time.monotonic() - t0
        records.append(rec)
        out_path.write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
        pre = rec.get("prefill", {})
        print(f"== {rec['label']}: {rec.get('error', '')}  prefill {pre.get('forward_us', float('nan')):.0f} us "
              f"({pre.get('tokens_per_s', float('nan')):.0f} tok/s), kernels {pre.get('kernel_us_per_step', float('nan')):.0f} us:"
              f" {', '.join(f'{g} {us:.0f}' for g, us in list(pre.get('groups_us_per_step', {}).items())[:6])}")
        print(f"   decode:   graph step {rec.get('graph_step_us', float('nan')):.1f} us, "
              f"kernels {rec.get('kernel_us_per_step', float('nan')):.1f} us in {rec.get('kernels_per_step', 0):.0f}")
        for g, us in rec.get("groups_us_per_step", {}).items():
            print(f"   {g:30s} {us:9.1f} us")
        for k in rec.get("top_kernels", [])[:12]:
            print(f"   {k['us_per_step']:9.1f} us  x{k['calls_per_step']:5.1f}  {k['group']:24s} {k['name'][:90]}")
    print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
