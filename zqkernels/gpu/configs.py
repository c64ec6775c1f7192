"""Launch configurations as data: one JSON table per GPU model in `configs/`.

A table is `{family: {scales: {M bucket: config}}}`; the bucket used for a launch is the
smallest key >= M (else the largest), and its config names the kernel variant that runs
(`"variant": "splitk"`, `"gemm"`, ...) with that variant's tile parameters: which variant wins at
which M is a measured, per-GPU decision, so it is data too. A bucket may also hold, under
`"shapes"`, whole configs for given weight shapes (`"NxK"`), written by a tune where another
candidate beat the bucket's winner on that shape (`launch_config(..., n, k)`; the W4A4 and W4A16
launchers read them). `scales` names the scale layout the config was tuned for (`per_token` / `group` activation scales for the W4A4 families,
`per_channel` / `group` weight scales for W4A16). Every `w4a4` bucket also names the activation
layout its layers quantize into, `"act_layout": "int4"` (packed, two codes per byte) or `"int8"`
(one code per byte, no unpack in the GEMM; `w4a4.act_layout`), or, in a `gemv` bucket, `"fused"`
(the layers run `w4a4.w4a4_gemv_quant`, which quantizes inside the GEMV); the key is required.
In h100.json, h200.json and default.json every bucket names int4 (int8 codes were slower with
the configs tuned for packed ones, DESIGN.md "Leads"; the fused GEMV lost to quantizer + gemv on
the H200's M = 1 tiles), except h200.json's per-token M > 256 buckets, whose `tma` variant takes
int8 codes; a tma entry (of `w4a4` or `w4a16`) also names, under `"no_tma"`, the config for the
operands a TMA descriptor cannot take (packed codes, K not a multiple of 32, unaligned rows;
`tma_or_fallback`).
`perf/tune_w4a4.py`'s candidates carry both code layouts. A table names the GPUs it
is for in `"match"` (substrings of `torch.cuda.get_device_name()`); a GPU no table matches runs
`default.json`, the untuned starting point, and a warning says so once. Under Triton's interpreter `interpreter.json` applies:
small tiles that keep the numpy emulation fast and still reach every code path (its act_layout
alternates between buckets, so the layers' table-driven path runs both layouts).
The activation quantizer's limits are the `actquant` family, sectioned the same way (`per_token`
/ `group`, by M). Each table's `"_about"` names the results JSON and the command its numbers came from.
"""
import json
import os
import warnings
from functools import lru_cache
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).with_name("configs")


def interpreting():
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_asm(device):
    """Inline PTX (the x16 nibble unpack) needs a compiled NVIDIA target, not the interpreter."""
    return device.type == "cuda" and not interpreting()


@lru_cache(maxsize=None)
def _capability(index):
    return torch.cuda.get_device_capability(index)


def use_pdl(device):
    """Programmatic dependent launch (Hopper and later, compiled): a kernel launched so may start
    while the kernel before it in the stream drains, and waits for it (`gdc_wait`) before it
    touches memory. Not under the interpreter, nor before sm_90."""
    if device.type != "cuda" or interpreting():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (9, 0)


@lru_cache(maxsize=None)
def _load(name):
    return json.loads((CONFIG_DIR / name).read_text())


@lru_cache(maxsize=None)
def table_name(device_name):
    """The JSON file whose "match" list names this GPU, else "default.json"."""
    lowered = device_name.lower()
    for path in sorted(CONFIG_DIR.glob("*.json")):
        if path.name in ("default.json", "interpreter.json"):
            continue
        if any(m.lower() in lowered for m in _load(path.name).get("match", ())):
            return path.name
    warnings.warn(f"no tuned launch table for {device_name!r} in {CONFIG_DIR}: using default.json "
                  "(untuned); perf/tune_<family>.py writes one", RuntimeWarning, stacklevel=3)
    return "default.json"


@lru_cache(maxsize=None)
def _device_name(index):
    return torch.cuda.get_device_name(index)


def table_for(device):
    if interpreting() or device.type != "cuda":
        return _load("interpreter.json")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _load(table_name(_device_name(index)))


def shape_key(n, k):
    """The key of a bucket's per-shape entry: the weight's N x K."""
    return f"{n}x{k}"


def launch_config(family, scales, m, device, n=None, k=None):
    """A copy of the tuned config (with its "variant") of (family, scales) for M tokens on `device`.
    A bucket may hold under "shapes" whole configs for given weight shapes (`shape_key(n, k)`), the
    tune's per-shape winners where one beat the bucket's own on that shape; given n and k, such an
    entry replaces the bucket's config (it keeps the bucket's act_layout: the layers choose the
    quantizer's layout per bucket)."""
    table = table_for(device)
    try:
        buckets = table[family][scales]
    except KeyError:
        raise KeyError(f"launch table has no config for {family}/{scales}") from None
    keys = sorted(int(k) for k in buckets)
    pick = next((b for b in keys if b >= m), keys[-1])
    cfg = dict(buckets[str(pick)])
    shapes = cfg.pop("shapes", {})
    if n is not None and shape_key(n, k) in shapes:
        cfg = dict(shapes[shape_key(n, k)])
    return cfg


def tma_or_fallback(cfg, tma_ok, tma_variants=("tma",)):
    """(variant, tile parameters) of a launch config: a bucket naming a variant that loads through
    TMA descriptors (`tma_variants`) runs its `"no_tma"` config instead where a descriptor cannot
    take the operands (`tma_ok` False), so the family takes every operand it accepts at every M;
    an explicit such config without one is left to refuse them. Pops "variant" and "no_tma"."""
    variant = cfg.pop("variant")
    no_tma = cfg.pop("no_tma", None)
    if variant in tma_variants and no_tma is not None and not tma_ok:
        cfg = dict(no_tma)
        variant = cfg.pop("variant")
    return variant, cfg


def describe(name):
    """One screen: which variant runs for each (family, scales, M bucket) in table `name`."""
    table = _load(name)
    lines = [f"{name}: {', '.join(table.get('match', [])) or '(no GPU match)'}"]
    for family in ("w4a4", "w4a16", "mosaic", "zipper_high", "actquant"):
        for scales, buckets in table.get(family, {}).items():
            row = []
            ordered = sorted(buckets.items(), key=lambda kv: int(kv[0]))
            for i, (m, cfg) in enumerate(ordered):
                tiles = "x".join(str(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in cfg)
                if family == "actquant":  # the quantizer's limits: no tiles
                    tiles = ", ".join(f"{k} {v}" for k, v in cfg.items())
                span = f"M<={m}" if i < len(ordered) - 1 else (f"M>{ordered[i - 1][0]}" if i else "any M")
                act = f" act {cfg['act_layout']}" if "act_layout" in cfg else ""
                if "no_tma" in cfg:
                    pk = cfg["no_tma"]
                    pk_tiles = "x".join(str(pk[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                    act += f" (else {pk['variant']} {pk_tiles})"
                if "shapes" in cfg:
                    act += f" (+{len(cfg['shapes'])} per-shape)"
                row.append(f"{span}: {cfg.get('variant', family)} {tiles}{act}")
            lines.append(f"  {family}/{scales}: " + "; ".join(row))
    return "\n".join(lines)


if __name__ == "__main__":  # python -m zqkernels.gpu.configs [h200.json ...]
    import sys

    for arg in sys.argv[1:] or sorted(p.name for p in CONFIG_DIR.glob("*.json")):
        print(describe(arg if arg.endswith(".json") else arg + ".json"))
