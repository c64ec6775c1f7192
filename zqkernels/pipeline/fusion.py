"""The decoder linears that read one input fused into one: q/k/v into `self_attn.qkv_proj`, gate/up
into `mlp.gate_up_proj`, as inference engines run them.

`fuse_linears(lm, stats)` works on the float model, before quantization: each group's weights (and
biases) are concatenated along N into one `nn.Linear`, so every method quantizes and runs it as one
layer: one activation quantization and one GEMM where there were three (two), the small k / v
GEMMs no longer launched alone. For per-output-channel formats (fp16, FP8 rowwise, torch's int4,
RTN, SmoothQuant and ZipperQuant, whose group shares one smoothing vector) the fused layer's codes
are the separate layers' codes stacked; MosaicQuant keeps its `density` of residual blocks over the
fused layer, chosen among all its blocks, instead of per part. The speed harness applies it to
every method alike, fp16 included (`Settings.linears = "fused"`); accuracy runs keep the parts.

- attention: `qkv_proj` lives on the attention module; `q_proj` / `k_proj` / `v_proj` become
  `OutputSlice`s, which transformers' attention calls as before: the first call on an input runs
  the fused linear once and each slice returns its columns of that one output (a view); a call on
  another input (or the same tensor modified in place, or a slice asked twice) runs it again.
- MLP: the module becomes `GatedMLP(gate_up_proj, down_proj)`: `down(silu(gate) * up)`; where the
  down projection forms silu(gate) * up in its activation quantizer (`W4A4Linear.takes_gated_input`:
  the triton backend, 4-bit activations, fp16 / bf16) the product never goes to memory, else it is
  computed as transformers computes it.
Each replaced module is first run side by side with its replacement on a random input (FUSABLE_*
classes only, SiLU MLPs only) and must agree within a float tolerance (the fused GEMM may sum in
another order), else ValueError: a class whose forward has changed is refused, not fused silently.
"""
from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from .model import GATE_UP, QKV, SHARED_INPUT_GROUPS

# The parts and the fused names are the model module's (its shared-input groups and fused linears)
ATTN_PARTS, ATTN_FUSED = SHARED_INPUT_GROUPS[0], QKV
MLP_PARTS, MLP_FUSED = SHARED_INPUT_GROUPS[2], GATE_UP
FUSABLE_ATTENTION = ("LlamaAttention", "Qwen2Attention", "Qwen3Attention", "MistralAttention")
FUSABLE_MLP = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")
LINEARS = ("model", "fused")  # Settings.linears: transformers' separate linears, or fuse_linears'
# The side-by-side check: |fused - module| <= RTOL * max|module| per output tensor. A fused GEMM sums
# each output in another order than the separate ones (a few ulps of the dtype); a structural
# mismatch (another activation, a missing bias, a permuted slice) is off by the outputs' own size.
RTOL = 2.0**-6


def concat_linears(linears):
    """One nn.Linear whose output is the parts' outputs side by side (weights and biases stacked)."""
    k = {m.in_features for m in linears}
    if len(k) != 1:
        raise ValueError(f"linears reading one input must share in_features, got {sorted(k)}")
    has_bias = {m.bias is not None for m in linears}
    if len(has_bias) != 1:
        raise ValueError("either every linear of a fused group has a bias or none has")
    w = linears[0].weight
    fused = nn.Linear(k.pop(), sum(m.out_features for m in linears), bias=has_bias.pop(), device=w.device,
                      dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in linears], dim=0))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([m.bias for m in linears], dim=0))
    fused.weight.requires_grad_(False)
    return fused


class _SharedCall:
    """One run of the owner's fused linear per input, handed out to its slices. The owner is held
    by a weak reference: the owner holds the slices and they hold this, so a strong one would be a
    reference cycle, and a deleted model's attention modules (their weights on the GPU) would stay
    until Python's cycle collector happened to run."""

    def __init__(self, owner, attr, n_slices):
        self._owner, self.attr, self.n_slices = weakref.ref(owner), attr, n_slices
        self._clear()

    def __deepcopy__(self, memo):  # a copied model's slices serve the copied owner (a weakref copies as itself)
        return _SharedCall(copy.deepcopy(self.owner, memo), self.attr, self.n_slices)

    @property
    def owner(self):
        owner = self._owner()
        if owner is None:
            raise RuntimeError(f"the module that held {self.attr} is gone")
        return owner

    def _clear(self):
        self.x, self.version, self.y, self.served = None, None, None, set()

    def output(self, x, index):
        if self.x is not x or self.version != x._version or index in self.served:
            self._clear()
            self.y = getattr(self.owner, self.attr)(x)
            self.x, self.version = x, x._version
        self.served.add(index)
        y = self.y
        if len(self.served) == self.n_slices:  # every slice has its part: drop the references
            self._clear()
        return y


class OutputSlice(nn.Module):
    """Stands for one part of a fused linear: columns [start, stop) of its output (module docstring)."""

    def __init__(self, shared, index, start, stop, in_features):
        super().__init__()
        object.__setattr__(self, "_shared", shared)  # not a submodule: the owner holds the fused linear
        self.index, self.start, self.stop = index, start, stop
        self.in_features, self.out_features = in_features, stop - start

    def forward(self, x):
        return self._shared.output(x, self.index)[..., self.start:self.stop]

    def extra_repr(self):
        return f"{self._shared.attr}[{self.start}:{self.stop}]"


def _is_silu(act):
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")


class GatedMLP(nn.Module):
    """down_proj(silu(gate) * up) with gate and up from one `gate_up_proj` (module docstring)."""

    def __init__(self, gate_up_proj, down_proj, act_fn):
        super().__init__()
        if not _is_silu(act_fn):
            raise ValueError(f"GatedMLP takes a SiLU MLP, got the activation {type(act_fn).__name__}")
        self.gate_up_proj, self.down_proj, self.act_fn = gate_up_proj, down_proj, act_fn

    def forward(self, x):
        h = self.gate_up_proj(x)
        down = self.down_proj
        takes = getattr(down, "takes_gated_input", None)
        if takes is not None and takes(h.dtype):
            return down.forward_silu_mul(h)
        i = h.shape[-1] // 2
        return down(self.act_fn(h[..., :i]) * h[..., i:])


def _check_close(name, wants, gots):
    for want, got in zip(wants, gots):
        bound = RTOL * float(want.double().abs().max()) + 1e-30
        if want.shape != got.shape or want.dtype != got.dtype or float((got.double() - want.double()).abs().max()) > bound:
            raise ValueError(f"{name}: the fused module does not reproduce this module's output (within {RTOL:g} of "
                             "its largest value); not fused")


def _probe(block, hidden):
    w = next(block.parameters())
    gen = torch.Generator(device=w.device).manual_seed(0)
    return torch.randn(2, 4, hidden, generator=gen, device=w.device).to(w.dtype)


def _fuse_attention(name, attn):
    parts = [getattr(attn, a) for a in ATTN_PARTS]
    if not all(isinstance(m, nn.Linear) for m in parts):
        raise ValueError(f"{name}: {', '.join(ATTN_PARTS)} must be nn.Linear to fuse, got "
                         f"{', '.join(type(m).__name__ for m in parts)}")
    fused = concat_linears(parts)
    shared = _SharedCall(attn, ATTN_FUSED, len(parts))
    slices, start = [], 0
    for i, m in enumerate(parts):
        slices.append(OutputSlice(shared, i, start, start + m.out_features, m.in_features))
        start += m.out_features
    x = _probe(attn, fused.in_features)
    with torch.no_grad():
        wants = [m(x) for m in parts]
        attn.qkv_proj = fused
        gots = [s(x) for s in slices]
    try:
        _check_close(name, wants, gots)
    except ValueError:
        del attn.qkv_proj
        raise
    for a, s in zip(ATTN_PARTS, slices):
        setattr(attn, a, s)


def _fuse_mlp(name, mlp):
    parts = [getattr(mlp, a) for a in MLP_PARTS]
    if not all(isinstance(m, nn.Linear) for m in parts) or not isinstance(mlp.down_proj, nn.Linear):
        raise ValueError(f"{name}: gate_proj, up_proj and down_proj must be nn.Linear to fuse")
    if not _is_silu(getattr(mlp, "act_fn", None)):
        raise ValueError(f"{name}: only SiLU MLPs are fused, got {type(getattr(mlp, 'act_fn', None)).__name__}")
    fused = GatedMLP(concat_linears(parts), mlp.down_proj, mlp.act_fn)
    x = _probe(mlp, parts[0].in_features)
    with torch.no_grad():
        _check_close(name, [mlp(x)], [fused(x)])
    return fused


def fuse_linears(lm, stats=None):
    """Fuse every decoder layer's q/k/v and gate/up in place (module docstring); a layer fused
    before is left as it is. Returns (how many groups the model then has fused, stats with each
    fused linear's name added, mapped to its group's shared input statistics)."""
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(lm).__name__} has no model.layers; only LLaMA/Qwen decoders are fused")
    stats = dict(stats) if stats is not None else None
    count = 0
    for i, layer in enumerate(layers):
        prefix = f"layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        if not hasattr(attn, ATTN_FUSED):
            if type(attn).__name__ not in FUSABLE_ATTENTION:
                raise ValueError(f"{prefix}.self_attn is {type(attn).__name__}; fused: {', '.join(FUSABLE_ATTENTION)}")
            _fuse_attention(f"{prefix}.self_attn", attn)
        if not isinstance(mlp, GatedMLP):
            if type(mlp).__name__ not in FUSABLE_MLP:
                raise ValueError(f"{prefix}.mlp is {type(mlp).__name__}; fused: {', '.join(FUSABLE_MLP)}")
            layer.mlp = _fuse_mlp(f"{prefix}.mlp", mlp)
        count += 2
        if stats is not None:
            for block, parts, fused in (("self_attn", ATTN_PARTS, ATTN_FUSED), ("mlp", MLP_PARTS, MLP_FUSED)):
                first = f"{prefix}.{block}.{parts[0]}"
                if first not in stats:
                    raise ValueError(f"stats hold no {first}: calibrate the model before fusing")
                stats[f"{prefix}.{block}.{fused}"] = stats[first]
    return count, stats
