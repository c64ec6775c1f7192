"""Real layer shapes of the models the benchmarks stand for, kept as data.

Each shape is one linear layer `Y[M, N] = X[M, K] @ W[N, K].T` of a decoder block, named
`<model>.<layer>`. Fused layers (qkv, gate_up) are the concatenation along N that an inference
engine runs as one GEMM. Select with `--shapes` (see `select_shapes`) and `--m`.

LLaMA-3-8B: hidden 4096, 32 query heads and 8 key/value heads of 128, MLP 14336.
Qwen3-8B:   hidden 4096, 32 query heads and 8 key/value heads of 128, MLP 12288.
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


def _model(model: str, hidden: int, q_heads: int, kv_heads: int, head_dim: int, mlp: int):
    q, kv = q_heads * head_dim, kv_heads * head_dim
    return (
        LayerShape(model, "q", q, hidden),
        LayerShape(model, "kv", kv, hidden),  # k and v have the same shape
        LayerShape(model, "o", hidden, q),
        LayerShape(model, "qkv", q + 2 * kv, hidden),
        LayerShape(model, "gate", mlp, hidden),
        LayerShape(model, "up", mlp, hidden),
        LayerShape(model, "gate_up", 2 * mlp, hidden),
        LayerShape(model, "down", hidden, mlp),
    )


SHAPES: tuple[LayerShape, ...] = _model("llama3-8b", 4096, 32, 8, 128, 14336) + _model(
    "qwen3-8b", 4096, 32, 8, 128, 12288
)
SHAPES_BY_NAME = {s.name: s for s in SHAPES}

# Token counts: decode (1), small batches (16, 64), prefill chunks (256 .. 4096).
M_VALUES: tuple[int, ...] = (1, 16, 64, 256, 1024, 4096)

# The default set is the four distinct LLaMA-3-8B GEMMs of a decoder block that the kernel issues
# set their targets on; it keeps the GPU suite within ~8 minutes on an H100. `--shapes all` runs
# every shape of both models (q and o, gate and up share dimensions, so they mostly repeat).
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
