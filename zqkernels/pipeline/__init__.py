"""End-to-end pipeline (DESIGN §6): load a LLaMA / Qwen2 / Qwen3 model offline (local Hugging Face
directory, GGUF file, or the embedded SmolLM2-135M) or build a named configuration with random
weights (`synthetic`), calibrate on real text with forward hooks, quantize every decoder linear
with one method (or a peer, `peers`), measure perplexity and speed (the decode from a CUDA graph
on a GPU, `decode`), write results JSON.

    from zqkernels.pipeline import Experiment, Settings, MethodConfig
    exp = Experiment(Settings(eval_tokens=2048)).prepare()
    record = exp.run(MethodConfig("zipper", act_group_size=32))
"""
from .calibrate import InputStats, calibrate
from .evaluate import perplexity, speed
from .experiment import Experiment, Settings
from .model import SUPPORTED_ARCHITECTURES, decoder_linears, load_model, resolve_source, shared_input_groups
from .quantize import DEFAULT_ALPHA, METHODS, MethodConfig, quantize_model, summarize_layers
from .results import format_table, load_records, write_records, write_report

__all__ = [
    "DEFAULT_ALPHA",
    "Experiment",
    "InputStats",
    "METHODS",
    "MethodConfig",
    "SUPPORTED_ARCHITECTURES",
    "Settings",
    "calibrate",
    "decoder_linears",
    "format_table",
    "load_model",
    "load_records",
    "perplexity",
    "quantize_model",
    "resolve_source",
    "shared_input_groups",
    "speed",
    "summarize_layers",
    "write_records",
    "write_report",
]
