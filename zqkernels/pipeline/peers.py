"""The peers a whole model is timed against, as drop-in layers for every decoder linear:

- fp8-rowwise: W8A8 FP8 (e4m3) -- weights with one float32 scale per output channel, activations
  cast per token at run time (absmax / 448), `torch._scaled_mm` with bf16 out and fast
  accumulation: what inference engines serve on Hopper. The operands are made by
  perf/bench_baselines.py's functions, the ones the GEMM benchmarks time and
  tests/test_perf_fp8.py checks: `fp8_rowwise_weight`, and for activations the fused Triton cast
  `fp8_rowwise_cast` on a GPU or its torch definition `fp8_rowwise_quantize` on a CPU (the same
  codes and scales, bit for bit); the product is `fp8_rowwise_mm`.
- torch-int4: torch's int4 weight-only kernel (tinygemm): bf16 activations, 4-bit weights with a
  bf16 scale and zero per group of 128 (`_weight_int4pack_mm`, layout by perf/bench_baselines.py's
  `convert_weight_to_int4pack`, inner_k_tiles 8); on a CPU torch's CPU form of the same format
  (`_weight_int4pack_mm_for_cpu`). The codes are the oracle's symmetric RTN of the weight per
  group of 128 (`zqkernels.quantizers.quantize_weights`), stored unsigned as `q + 8` with zero 0.

Both run in bfloat16 (their kernels' activation and output type): a model gets them after it is
cast to bfloat16 (`PeerConfig.dtype`). A layer refuses, when it is built, a shape or device its
kernel cannot run, naming it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .checkout import perf_module

PEER_METHODS = ("fp8-rowwise", "torch-int4")
INT4_GROUP = 128
INT4_INNER_K_TILES = 8
# tinygemm's bf16 scales (8 mantissa bits) and bf16 accumulation: a product of the packed layout
# against the dequantized weight agrees to a few 1e-3; a misread layout gives ~1.
INT4_LAYOUT_TOL = 2e-2


def _baselines(method):
    return perf_module("bench_baselines", f"--method {method}")


@dataclass
class PeerConfig:
    """A peer method in the place of a `MethodConfig` (the experiment runs either)."""

    method: str

    def __post_init__(self):
        if self.method not in PEER_METHODS:
            raise ValueError(f"unknown peer {self.method!r}; choose one of {', '.join(PEER_METHODS)}")

    dtype = torch.bfloat16

    @property
    def label(self):
        return "fp8-rowwise" if self.method == "fp8-rowwise" else f"torch-int4-g{INT4_GROUP}"

    def params(self):
        if self.method == "fp8-rowwise":
            return {"method": self.method, "weight_bits": 8, "act_bits": 8, "format": "e4m3"}
        return {"method": self.method, "weight_bits": 4, "act_bits": 16, "group_size": INT4_GROUP}

    def check_backend(self, backend):
        """The peers run torch's own kernels whatever the backend of the quantized methods."""


def _check_linear(linear, method):
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
    if linear.weight.dtype != torch.bfloat16:
        raise ValueError(f"{method}: the linear's weight must be bfloat16 (cast the model first), got "
                         f"{linear.weight.dtype}")


def _input(layer, x):
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16:
        raise ValueError(f"{layer.method}: input must be a bfloat16 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.shape[-1] != layer.in_features:
        raise ValueError(f"{layer.method}: input must have {layer.in_features} features in its last dimension, "
                         f"got shape {tuple(x.shape)}")
    return x.reshape(-1, layer.in_features)


class Fp8RowwiseLinear(nn.Module):
    """W8A8 FP8 rowwise in place of an `nn.Linear` (module docstring)."""

    method = "fp8-rowwise"

    def __init__(self, linear):
        super().__init__()
        _check_linear(linear, self.method)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        if w.device.type == "cuda" and torch.cuda.get_device_capability(w.device) < (8, 9):
            major, minor = torch.cuda.get_device_capability(w.device)
            raise ValueError(f"{self.method}: FP8 tensor cores need compute capability 8.9 or newer; "
                             f"{w.device} is {major}.{minor}")
        if self.in_features % 16 or self.out_features % 16:
            raise ValueError(f"{self.method}: torch._scaled_mm needs in_features and out_features that are "
                             f"multiples of 16, got {self.out_features}x{self.in_features}")
        codes_t, scale = _baselines(self.method).fp8_rowwise_weight(w)
        self.register_buffer("w_codes", codes_t.t())  # row-major [N, K]; its .t() is _scaled_mm's operand
        self.register_buffer("w_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        k = self.in_features
        self.stats = {"effective_bits": {"low": 8.0, "high": 0.0, "index": 0.0, "scale": 32.0 / k,
                                         "total": 8.0 + 32.0 / k}}

    def forward(self, x):
        x2 = _input(self, x)
        b = _baselines(self.method)
        cast = b.fp8_rowwise_cast if x2.is_cuda else b.fp8_rowwise_quantize
        x_codes, x_scale = cast(x2.contiguous())
        y = b.fp8_rowwise_mm(x_codes, x_scale, self.w_codes.t(), self.w_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


class TorchInt4Linear(nn.Module):
    """torch's int4 weight-only kernel in place of an `nn.Linear` (module docstring). The layout
    is checked once when the layer is built: the packed product of a probe against the product
    with the dequantized weight (`stats["check_rel_err"]`), refused above `INT4_LAYOUT_TOL`."""

    method = "torch-int4"

    def __init__(self, linear):
        super().__init__()
        from zqkernels import quantizers

        _check_linear(linear, self.method)
        n, k = linear.out_features, linear.in_features
        self.in_features, self.out_features = k, n
        w = linear.weight.detach()
        cuda = w.device.type == "cuda"
        if cuda and torch.cuda.get_device_capability(w.device) < (8, 0):
            raise ValueError(f"{self.method}: the int4 kernel needs compute capability 8.0 or newer")
        if not cuda and w.device.type != "cpu":
            raise ValueError(f"{self.method}: runs on CUDA or the CPU, not {w.device}")
        if k % (INT4_INNER_K_TILES * 16) or n % 8:
            raise ValueError(f"{self.method}: the int4 kernel needs in_features a multiple of "
                             f"{INT4_INNER_K_TILES * 16} and out_features a multiple of 8, got {n}x{k}")
        q, scale = quantizers.quantize_weights(w.double(), bits=4, group_size=INT4_GROUP)
        q_u = (q.to(torch.int32) + 8).contiguous()  # 1..15: w = (q_u - 8) * scale + 0
        scale_t = scale.t().to(torch.bfloat16)  # [K / 128, N]
        self.register_buffer("scales_and_zeros", torch.stack([scale_t, torch.zeros_like(scale_t)], dim=2).contiguous())
        try:
            if cuda:
                packed = _baselines(self.method).convert_weight_to_int4pack(q_u, INT4_INNER_K_TILES)
                self._mm = torch.ops.aten._weight_int4pack_mm
            else:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_u, INT4_INNER_K_TILES)
                self._mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        except (AttributeError, NotImplementedError) as exc:
            raise ValueError(f"{self.method}: torch {torch.__version__} has no int4 weight-only kernel for "
                             f"{w.device.type}: {exc}") from exc
        self.register_buffer("packed", packed)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        g = torch.Generator(device=w.device).manual_seed(1)
        probe = torch.randn(8, k, device=w.device, generator=g).to(torch.bfloat16)
        w_deq = (q.double() * self.scales_and_zeros[..., 0].double().t().repeat_interleave(INT4_GROUP, dim=1))
        ref = probe.double() @ w_deq.t()
        got = self._mm(probe, packed, INT4_GROUP, self.scales_and_zeros).double()
        err = ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()
        if not err <= INT4_LAYOUT_TOL:
            raise ValueError(f"{self.method}: the packed layout does not reproduce the weight (relative error "
                             f"{err:.3g} > {INT4_LAYOUT_TOL}): this torch packs int4 weights differently")
        self.stats = {"check_rel_err": err,
                      "effective_bits": {"low": 4.0, "high": 0.0, "index": 0.0, "scale": 32.0 / INT4_GROUP,
                                         "total": 4.0 + 32.0 / INT4_GROUP}}

    def forward(self, x):
        x2 = _input(self, x)
        y = self._mm(x2.contiguous(), self.packed, INT4_GROUP, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


LAYERS = {"fp8-rowwise": Fp8RowwiseLinear, "torch-int4": TorchInt4Linear}


def quantize_peer(lm, stats, cfg, progress=True):
    """Replace every decoder linear of the bfloat16 model `lm` with `cfg`'s peer layer, in place;
    one record per layer as `quantize_model` gives (name, shape, bits, output error on the
    calibration rows)."""
    from tqdm.auto import tqdm

    from .model import decoder_linears
    from .quantize import relative_output_error

    records = []
    for name, mod, parent, attr in tqdm(decoder_linears(lm), desc=f"quantize {cfg.label}", unit="linear",
                                        disable=not progress):
        q = LAYERS[cfg.method](mod)
        rec = {"name": name, "N": mod.out_features, "K": mod.in_features, **q.stats}
        rec["rel_error"] = relative_output_error(mod, q, stats[name].sample_rows())
        records.append(rec)
        setattr(parent, attr, q)
    return records
