"""Real layer shapes of the models perf/ stands for, kept as data: the one place they are defined.

Each shape is one linear layer `Y[M, N] = X[M, K] @ W[N, K].T` of a decoder block, named
`<model>.<layer>`. Fused layers (qkv, gate_up) are the concatenation along N that an inference
engine runs as one GEMM. Select with `--shapes` (see `select_shapes`) and `--m`.

LLaMA-3-8B:    hidden 4096, 32 query heads and 8 key/value heads of 128, MLP 14336.
Qwen3-8B:      hidden 4096, 32 query heads and 8 key/value heads of 128, MLP 12288.
SmolLM2-135M:  hidden 576, 9 query heads and 3 key/value heads of 64, MLP 1536, 30 layers: the
               model of the end-to-end pipeline (perf/pipeline_device.py builds it from MODELS);
               its layers are too small to be kernel benchmarks, so they are not in SHAPES.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerShape:
    model: str
    layer: str
    n: int  # output features (rows of W)
    k: int  # input features (the reduction dimension)

    @property
    def name(self) -> str:
        return f"{self.model}.{self.layer}"

    def __str__(self) -> str:  # used in pytest ids: `test_x[llama3-8b.o-M16]`
        return self.name


@dataclass(frozen=True)
class ModelDims:
    """A decoder's dimensions: where its layer shapes come from."""

    name: str
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    layers: int
    vocab: int

    def layer_shapes(self) -> tuple[LayerShape, ...]:
        q, kv = self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        return (
            LayerShape(self.name, "q", q, self.hidden),
            LayerShape(self.name, "kv", kv, self.hidden),  # k and v have the same shape
            LayerShape(self.name, "o", self.hidden, q),
            LayerShape(self.name, "qkv", q + 2 * kv, self.hidden),
            LayerShape(self.name, "gate", self.mlp, self.hidden),
            LayerShape(self.name, "up", self.mlp, self.hidden),
            LayerShape(self.name, "gate_up", 2 * self.mlp, self.hidden),
            LayerShape(self.name, "down", self.hidden, self.mlp),
        )


MODELS: dict[str, ModelDims] = {m.name: m for m in (
    ModelDims("llama3-8b", hidden=4096, q_heads=32, kv_heads=8, head_dim=128, mlp=14336, layers=32, vocab=128256),
    ModelDims("qwen3-8b", hidden=4096, q_heads=32, kv_heads=8, head_dim=128, mlp=12288, layers=36, vocab=151936),
    ModelDims("smollm2-135m", hidden=576, q_heads=9, kv_heads=3, head_dim=64, mlp=1536, layers=30, vocab=49152),
)}

# The models whose layers are benchmarked (`--shapes all`).
BENCH_MODELS: tuple[str, ...] = ("llama3-8b", "qwen3-8b")

SHAPES: tuple[LayerShape, ...] = tuple(s for name in BENCH_MODELS for s in MODELS[name].layer_shapes())
SHAPES_BY_NAME = {s.name: s for s in SHAPES}

# Token counts: decode (1), small batches (16, 64), prefill chunks (256 .. 4096).
M_VALUES: tuple[int, ...] = (1, 16, 64, 256, 1024, 4096)

# The default set is the four distinct GEMMs of a LLaMA-3-8B decoder block (o, qkv, gate_up,
# down): the shapes the kernels' speed targets are stated on; it keeps the GPU suite to a few
# minutes on one Hopper GPU. `--shapes all` runs every shape of both models (q and o, gate and up
# share dimensions, so they mostly repeat).
DEFAULT_SHAPES: tuple[str, ...] = ("llama3-8b.o", "llama3-8b.qkv", "llama3-8b.gate_up", "llama3-8b.down")


def select_shapes(spec: str | None) -> list[LayerShape]:
    """Shapes named by a comma-separated `spec`.

    Each item is `default`, `all`, a model name (`qwen3-8b`), an exact shape name
    (`llama3-8b.down`) or a glob (`*.down`, `qwen3-8b.*`). Order follows SHAPES; duplicates drop.
    Raises ValueError naming an item that matches nothing.
    """
    if spec is None or spec.strip() == "":
        spec = "default"
    chosen: set[str] = set()
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item == "default":
            names = list(DEFAULT_SHAPES)
        elif item == "all":
            names = [s.name for s in SHAPES]
        elif any(s.model == item for s in SHAPES):
            names = [s.name for s in SHAPES if s.model == item]
        else:
            names = [s.name for s in SHAPES if fnmatch.fnmatchcase(s.name, item)]
        if not names:
            known = ", ".join(s.name for s in SHAPES)
            raise ValueError(f"--shapes: {item!r} matches no shape; known shapes: {known}")
        chosen.update(names)
    return [s for s in SHAPES if s.name in chosen]


def select_m(spec: str | None) -> list[int]:
    """Token counts from a comma-separated `spec` (`1,16,4096`); None or `all` gives M_VALUES."""
    if spec is None or spec.strip() in ("", "all", "default"):
        return list(M_VALUES)
    values = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        try:
            m = int(item)
        except ValueError:
            raise ValueError(f"--m: {item!r} is not an integer") from None
        if m < 1:
            raise ValueError(f"--m: {m} must be >= 1")
        if m not in values:
            values.append(m)
    if not values:
        raise ValueError(f"--m: {spec!r} names no token count")
    return values
