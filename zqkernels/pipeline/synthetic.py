"""Named model configurations with seeded random weights: timing only, nothing downloaded.

`zq bench --model llama3-8b` (or `qwen3-8b`, `smollm2-135m`) builds the named model's real
configuration -- the dimensions from perf/shapes.py's `MODELS` (the one place they are defined),
then the fields that are not shapes (positions, norm epsilon, RoPE base, tied embeddings) as the
published config.json has them -- with weights drawn by transformers' own initialisation from a
fixed seed. Every GEMM has the real model's shape, so tokens/s and memory are the real model's;
the weights mean nothing, so perplexity is not measured for these models. Calibration statistics
come from random token windows (`random_windows`) through the same hooks as for a real model.

`build(name, layers=N)` keeps the first N decoder layers (the full model by default); on the
"meta" device it allocates nothing, which is how the shapes of the 8B configurations are checked
on a CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .checkout import perf_module


@dataclass(frozen=True)
class NamedConfig:
    """A transformers architecture, the row of perf/shapes.py's MODELS, and the other config fields."""

    architecture: str  # "llama" or "qwen3"
    dims_name: str  # key of perf/shapes.py's MODELS
    fields: dict = field(default_factory=dict)
    dims: object = None  # a perf/shapes.py ModelDims; None: MODELS[dims_name]


NAMED = {
    # meta-llama/Meta-Llama-3-8B config.json
    "llama3-8b": NamedConfig("llama", "llama3-8b", dict(max_position_embeddings=8192, rms_norm_eps=1e-5,
                                                        rope_theta=500000.0, tie_word_embeddings=False)),
    # Qwen/Qwen3-8B config.json (q/k RMSNorm per head: Qwen3ForCausalLM)
    "qwen3-8b": NamedConfig("qwen3", "qwen3-8b", dict(max_position_embeddings=40960, rms_norm_eps=1e-6,
                                                      rope_theta=1000000.0, tie_word_embeddings=False)),
    # HuggingFaceTB/SmolLM2-135M config.json
    "smollm2-135m": NamedConfig("llama", "smollm2-135m", dict(max_position_embeddings=8192, rms_norm_eps=1e-5,
                                                              rope_theta=100000.0, tie_word_embeddings=True)),
}
NOTE = "seeded random weights (timing only): perplexity is not measured"


def is_named(model):
    return isinstance(model, str) and model in NAMED


def _spec(name):
    if not is_named(name):
        raise ValueError(f"unknown named configuration {name!r}; known: {', '.join(NAMED)}")
    return NAMED[name]


def dims(name):
    """The perf/shapes.py ModelDims of a named configuration."""
    spec = _spec(name)
    if spec.dims is not None:
        return spec.dims
    return perf_module("shapes", f"--model {name}").MODELS[spec.dims_name]


def full_layers(name):
    return dims(name).layers


def check_layers(name, layers):
    """`layers` as an int in [1, the model's layers], None for all; ValueError naming `layers`."""
    total = full_layers(name)
    if layers is None:
        return total
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= total:
        raise ValueError(f"layers must be an integer in [1, {total}] ({name} has {total} decoder layers), "
                         f"got {layers!r}")
    return layers


def config_fields(name, layers=None):
    """The keyword arguments of the transformers config: shapes from perf/shapes.py, then the rest."""
    d = dims(name)
    return dict(vocab_size=d.vocab, hidden_size=d.hidden, intermediate_size=d.mlp,
                num_hidden_layers=check_layers(name, layers), num_attention_heads=d.q_heads,
                num_key_value_heads=d.kv_heads, head_dim=d.head_dim, **_spec(name).fields)


def _classes(architecture):
    import transformers

    if architecture == "llama":
        return transformers.LlamaConfig, transformers.LlamaForCausalLM
    try:
        from transformers import Qwen3Config, Qwen3ForCausalLM
    except ImportError as exc:
        raise ValueError(f"the qwen3 configuration needs transformers' Qwen3ForCausalLM, which transformers "
                         f"{transformers.__version__} does not have (it came with 4.51)") from exc
    return Qwen3Config, Qwen3ForCausalLM


def config(name, layers=None):
    """The transformers config object of a named configuration (first `layers` decoder layers)."""
    config_cls, _ = _classes(_spec(name).architecture)
    return config_cls(**config_fields(name, layers))


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def dispatch(lm, device_map):
    """Spread `lm` over the visible devices with accelerate, as `from_pretrained(device_map=...)`
    does: "auto" and "balanced" even out the GPUs' memory, "balanced_low_0" leaves GPU 0 the
    least, "sequential" fills them in order."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if device_map not in DEVICE_MAPS:
        raise ValueError(f"device_map must be one of {', '.join(DEVICE_MAPS)}, got {device_map!r}")
    no_split = sorted(getattr(lm, "_no_split_modules", None) or [])
    dtype = lm.get_input_embeddings().weight.dtype
    max_memory = None
    if device_map != "sequential":
        max_memory = get_balanced_memory(lm, dtype=dtype, low_zero=device_map == "balanced_low_0",
                                         no_split_module_classes=no_split)
    placement = infer_auto_device_map(lm, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    return dispatch_model(lm, device_map=placement)


def build(name, *, layers=None, dtype=torch.float16, device="cpu", seed=0, device_map=None):
    """The named model with transformers' random initialisation from `seed`, in `dtype`, made
    directly on `device` (an 8B model is drawn on the GPU in about a second; on the "meta" device
    nothing is allocated). The same (name, layers, dtype, device, seed) gives the same weights.
    With `device_map` the model is drawn on the CPU and spread by accelerate (`dispatch`)."""
    cfg = config(name, layers)
    if device_map is not None:
        return dispatch(build(name, layers=layers, dtype=dtype, device="cpu", seed=seed), device_map)
    _, model_cls = _classes(_spec(name).architecture)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    torch.manual_seed(seed)  # seeds the CPU and every CUDA device
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            lm = model_cls(cfg)
    finally:
        torch.set_default_dtype(previous)
    return lm.eval()


def random_windows(vocab, count, length, seed=0):
    """[count, length] token ids drawn uniformly from the vocabulary with a fixed seed (CPU)."""
    for arg, value in (("count", count), ("length", length), ("vocab", vocab)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=g)
