"""Drop-in `torch.nn.Module`s for `nn.Linear`: RTN / SmoothQuant W4A4, W4A16, ZipperQuant, MosaicQuant.

Every layer is built from a float `nn.Linear` plus calibration statistics (the smoothing vector
`s` shared by layers that read the same input, and for Mosaic the Hessian diagonal of the input),
and quantizes its weight ONCE; every backend executes the same codes, and the codes are the
oracle's (`reference`), bit for bit.

Where a weight is quantized: on the layer's device (the weight's own device; for the triton and
hybrid backends the GPU they run on), in float64, through `zqkernels.quantizers`, whose codes,
scales and block lists equal the oracle's on the same float64 input (verify/test_quantizers.py,
tests/test_device_quantize.py). `W' = W * s` is one correctly rounded multiply on both sides, and
`s` itself comes from `reference.smooth_scales` on the host (K numbers), so no code can differ.

| step                                       | through                                      | where      |
| ------------------------------------------ | -------------------------------------------- | ---------- |
| RTN, w4a16, SmoothQuant codes              | `quantizers.quantize_weights`                | device     |
| ZipperQuant per-row grid and split         | `quantizers.zipper_quantize`                 | device     |
| ZipperQuant table statistics (E, U, bytes) | `quantizers.pattern_lut_stats`               | device     |
| MosaicQuant base, residual, block scores   | `quantizers.mosaic_quantize`                 | device (1) |
| torch backend's dequantized weights        | `quantizers.dequantize`, `mosaic_dequantize` | device     |
| ZipperQuant pattern table (hybrid backend) | `reference.build_pattern_lut`                | host (2)   |
| ZipperQuant channel-structured grid        | `reference.zipper_quantize_channels`         | host       |
| Hadamard RTN, wide RTN, activation floor   | `reference` (`zqkernels.rotation`)           | host       |
| packing the dense 4-bit weights            | `layouts.pack_tensor` in `DenseInt4`         | device     |
| packing Mosaic's blocks, Zipper's high part | `reference.pack_int4` in `from_codes`       | host (3)   |

(1) the B block scores (a few thousand numbers) are ranked on the host by the oracle's
`np.lexsort`, so equal scores keep the lower block index exactly as there. (2) the CPU kernel's
table, host-side by design. (3) the int8 codes are copied down, never the float weight.

The host rows read the smoothed weight as float64 numpy (`QuantLinear.w_smoothed`); the others
never copy the float weight to the host.

Backends (`backend=`):
- "reference": the oracle's product (`reference.w4a4_matmul`, `zipper_matmul`, `mosaic_matmul`,
  ...) in float64 on the CPU. Slow; the ground truth the other backends are tested against.
- "torch": plain torch on any device, for CI and small models. The weights are dequantized once
  (float32); activations are fake-quantized with exactly the oracle's float32 contract
  (`absmax` in float32, `scale = absmax / float32(qmax)`, `rint(x32 / scale)` with IEEE division,
  round half to even, zero group -> scale 0), so the codes equal the oracle's bit for bit and the
  outputs differ from it only by float32 rounding of the matmul.
- "triton": the Triton kernels of `zqkernels.gpu` (fused smooth + quantize, W4A4 / W4A16 GEMM, the
  fused Mosaic GEMM, ZipperQuant's low part plus its GPU high part). CUDA only. The weights are
  packed once into a `zqkernels.layouts` object holding only what those kernels read, and every
  option the kernels cannot run (`zqkernels.gpu.limits`) is refused when the layer is built.
  The W4A4 layers quantize their activations per call in the layout the launch table names for
  that M (`act_layout`: packed int4 or one int8 code per byte; read once when the layer is built,
  `w4a4_triton_product`).
- "hybrid": ZipperQuant only: GPU low part overlapped with the CPU pattern-LUT high part
  (`zqkernels.hybrid.zipper_linear(mode="hybrid")`).
An unsupported (method, backend, act_bits) combination raises ValueError when the layer is built,
never a silent fallback. `_SUPPORT` is the one backend table: each layer has a `_pack_<backend>`
that stores what that backend needs and a `_forward_<backend>` that runs it, chosen once at build.

Smoothing is applied to the activations as `X' = float32(x) * inv_s32` (`inv_s32 = float32(1/s)`),
the same IEEE float32 multiply as the GPU quantizer, and the weights become `W' = W * s`.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn

import reference
from reference.validation import as_float_matrix
from zqkernels import ops, quantizers
from zqkernels.gpu import limits
from zqkernels.layouts import DenseInt4, MosaicBlocks, ZipperHighGPU

BACKENDS = ("reference", "torch", "triton", "hybrid")
ACT_BITS = (None, 4, 8)  # None: 16-bit (unquantized) activations, the W4A16 variants

# Which backends exist for which method, and which activation widths each backend can run.
_SUPPORT = {
    "w4a16": {"reference": ACT_BITS, "torch": ACT_BITS, "triton": (None,)},
    "rtn-w4a4": {"reference": ACT_BITS, "torch": ACT_BITS, "triton": (4, None)},
    "smoothquant-w4a4": {"reference": ACT_BITS, "torch": ACT_BITS, "triton": (4, None)},
    "zipper": {"reference": ACT_BITS, "torch": ACT_BITS, "triton": (4,), "hybrid": (4,)},
    "mosaic": {"reference": ACT_BITS, "torch": ACT_BITS, "triton": (4, None)},
    # the references of the accuracy table (zqkernels.rotation)
    "hadamard-w4a4": {"reference": ACT_BITS, "torch": ACT_BITS},
    "act-floor": {"reference": ACT_BITS, "torch": ACT_BITS},
}


def check_method_backend(method, backend, act_bits=4, *, act_group_size=None, group_size=None, block=None):
    """Raise ValueError naming the combination when (method, backend, act_bits) has no
    implementation, or (backend triton / hybrid) when an option is one the kernels cannot run
    (`zqkernels.gpu.limits`): the check a command runs before it loads a model."""
    if method not in _SUPPORT:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(_SUPPORT)} (or fp16)")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if act_bits not in ACT_BITS:
        raise ValueError(f"act_bits must be one of {ACT_BITS} (None = 16-bit activations), got {act_bits!r}")
    widths = _SUPPORT[method].get(backend)
    if widths is None:
        have = sorted(_SUPPORT[method])
        raise ValueError(f"method {method!r} has no {backend!r} backend (available: {', '.join(have)})")
    if act_bits not in widths:
        shown = ["16" if b is None else str(b) for b in widths]
        raise ValueError(
            f"method {method!r} with backend {backend!r} runs activations of {'/'.join(shown)} bits only, "
            f"not act_bits={act_bits!r}"
        )
    if backend not in ("triton", "hybrid"):
        return
    if act_bits is None or method == "w4a16":
        if method == "mosaic":
            limits.check_mosaic_groups(None, group_size)
            limits.check_mosaic_block(block if block is not None else (64, 64))
        else:
            limits.check_w4a16_group(group_size)
    elif method == "mosaic":
        limits.check_mosaic_groups(act_group_size, group_size)
        limits.check_mosaic_block(block if block is not None else (64, 64))
    else:
        limits.check_act_group(act_group_size)
        if method in ("rtn-w4a4", "smoothquant-w4a4") and group_size is not None:
            raise ValueError(f"group_size={group_size!r}: backend={backend!r} W4A4 GEMM takes per-channel weight "
                             "scales only (group_size None)")


def _check_group(name, g):
    if g is not None and (not isinstance(g, (int, np.integer)) or isinstance(g, bool) or g <= 0):
        raise ValueError(f"{name} must be None or a positive integer, got {g!r}")
    return None if g is None else int(g)


def quantize_activations_torch(x, bits=4, group_size=None):
    """The oracle's activation quantization in torch: (codes float32 [M, K], scale float32 [M, G]).

    IEEE float32 throughout: `absmax = max|x32|`, `scale = absmax / float32(qmax)`,
    `codes = clip(rint(x32 / scale), -qmax - 1, qmax)` (torch.round is half-to-even, like np.rint);
    a group of zeros gets scale 0 and codes 0. G = ceil(K / group_size) (1 for per-token).
    """
    x = x.to(torch.float32)
    m, k = x.shape
    qmax = 2 ** (bits - 1) - 1
    g = k if group_size is None else group_size
    ng = -(-k // g) if k else 0
    pad = ng * g - k
    xp = nn.functional.pad(x, (0, pad)) if pad else x
    xg = xp.reshape(m, ng, g)
    scale = xg.abs().amax(dim=2, keepdim=True) / torch.tensor(float(qmax), dtype=torch.float32)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(xg / safe), -qmax - 1, qmax)
    codes = torch.where(scale > 0, codes, torch.zeros_like(codes))
    return codes.reshape(m, ng * g)[:, :k], scale.reshape(m, ng)


def fake_quantize_activations(x, bits=4, group_size=None):
    """`dequantize(quantize_activations(x))` in float32: the A4/A8 input of the torch backend."""
    m, k = x.shape
    codes, scale = quantize_activations_torch(x, bits, group_size)
    g = k if group_size is None else group_size
    per_elem = scale.repeat_interleave(g, dim=1)[:, :k]
    return codes * per_elem


def w4a4_triton_product(x2, inv_smooth, weights, act_group_size, out_dtype, act_layouts, gated=False):
    """The triton W4A4 layers' product of x2 [M, K] with a `DenseInt4` (per-channel scales): fused
    smooth + quantize in the activation layout of this M's launch-table bucket (`act_layouts`, from
    `zqkernels.gpu.w4a4.act_layouts` at build time), then the GEMM, which reads the layout from the
    codes' dtype; or, where the bucket names "fused", `w4a4_gemv_quant` alone (the same codes).
    gated: x2 is [gate | up] [M, 2K] and the quantizer forms silu(gate) * up (`quantize_silu_mul`);
    a "fused" bucket then takes packed codes, since its GEMV would read the product itself."""
    from zqkernels.gpu.w4a4 import pick_act_layout

    layout = pick_act_layout(x2.shape[0], act_layouts)
    if layout == "fused" and not gated:  # a gemv bucket that quantizes inside the GEMV: one launch
        return ops.call("w4a4_gemv_quant", x2, inv_smooth, weights.packed, weights.scale, act_group_size or 0,
                        out_dtype)
    layout = "int4" if layout == "fused" else layout
    quantizer = "quantize_silu_mul" if gated else "quantize_activations"
    qx, sx = ops.call(quantizer, x2, inv_smooth, act_group_size or 0, layout)
    return ops.call("w4a4_gemm", qx, sx, weights.packed, weights.scale, act_group_size or 0, out_dtype)


class QuantLinear(nn.Module):
    """Common machinery: smoothing, flattening, bias, backend dispatch, statistics.

    Subclasses set `method`, quantize once, and provide `_pack_<backend>` (store what that backend
    runs) and `_forward_<backend>` (2-D input) for each backend `_SUPPORT` lists; the reference
    backend's forward is shared and calls the subclass's `_reference_product`.
    """

    method = "quantized"

    def __init__(self, linear, *, smooth=None, act_bits=4, act_group_size=None, backend="torch"):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        check_method_backend(self.method, backend, act_bits)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.backend = backend
        self.act_bits = act_bits
        self.act_group_size = _check_group("act_group_size", act_group_size)
        device = linear.weight.device
        if backend in ("triton", "hybrid"):
            if not torch.cuda.is_available():
                raise ValueError(f"backend={backend!r} needs a CUDA GPU and none is available; use backend='torch'")
            device = torch.device("cuda") if device.type != "cuda" else device
        self._device = device
        k = self.in_features
        if smooth is not None:
            s = as_float_matrix("smooth", smooth, rank=1)
            with np.errstate(over="ignore", divide="ignore"):
                inv32 = (1.0 / s).astype(np.float32)
            if s.shape != (k,) or np.any(s <= 0) or not np.all(np.isfinite(inv32) & (inv32 > 0)):
                raise ValueError(f"smooth must be a positive vector of {k} entries whose float32 inverse is finite and "
                                 f"nonzero, got shape {s.shape}")
            self.smooth = s
            self.register_buffer("inv_smooth", torch.from_numpy(inv32).to(device))
        else:
            self.smooth = None
            self.inv_smooth = None
        # W' in float64 on the layer's device; `W * s` rounds once, as the oracle's numpy multiply
        w = linear.weight.detach().to(device, torch.float64)
        self._w_dev = w * torch.as_tensor(self.smooth, device=device)[None, :] if self.smooth is not None else w
        if linear.bias is not None:
            self.register_buffer("bias", linear.bias.detach().to(device, torch.float32).clone())
        else:
            self.bias = None
        self.stats = {}
        self._forward = getattr(self, f"_forward_{backend}")

    @property
    def w_smoothed(self):
        """The smoothed weight `W'` as float64 numpy on the host: the input of the layers that
        quantize through the oracle (the host rows of the module docstring's table)."""
        return self._w_dev.cpu().numpy()

    # -- shared helpers ---------------------------------------------------------------------
    def _smoothed(self, x2):
        x32 = x2.to(torch.float32)
        return x32 * self.inv_smooth if self.inv_smooth is not None else x32

    def _act(self, xs):
        if self.act_bits is None:
            return xs
        return fake_quantize_activations(xs, self.act_bits, self.act_group_size)

    def _finish_build(self, effective_bits):
        self.stats["effective_bits"] = effective_bits
        self.stats["smooth_bits"] = 0.0 if self.smooth is None else 16.0 / self.out_features
        self._w_dev = None  # only needed while building

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}, "
                f"backend={self.backend}, act_bits={self.act_bits}, act_group_size={self.act_group_size}")

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"input must be a floating-point tensor (as for torch.nn.Linear), got "
                             f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input must have {self.in_features} features in its last dimension, got shape "
                             f"{tuple(x.shape)}")
        return self._output(self._forward(x.reshape(-1, self.in_features)), x)

    def _output(self, y, x):
        """y [M, out_features] of the flattened input x: plus the bias, in x's dtype and lead shape."""
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _forward_reference(self, x2):
        xs = self._smoothed(x2).detach().cpu().numpy().astype(np.float64)
        return torch.from_numpy(self._reference_product(xs)).to(x2.device, torch.float32)

    def _cuda_input(self, x2):
        if x2.device.type != "cuda" or (self._device.index is not None and x2.device != self._device):
            raise ValueError(f"backend={self.backend!r}: the input must be on the layer's device {self._device}, "
                             f"got {x2.device}")
        if x2.dtype == torch.float32:
            x2 = x2.to(torch.float16)
        return x2.contiguous()


def _one_cpu_thread(init):
    """Run a layer's constructor (its quantization and packing) on one torch thread when the
    weight is quantized on the CPU. The quantizers are a chain of short element-wise passes; on a
    loaded 2-core CPU each pass's hand-off to a second thread cost more than the pass itself, and
    a small model's quantization ran slower than through the single-threaded numpy oracle it
    replaced (one thread: reports/results/cpu-2core/quantize_time/). The codes do not depend on
    the thread count: every reduction is exact or in a fixed order."""

    @functools.wraps(init)
    def wrapped(self, linear, *args, **kwargs):
        on_cpu = isinstance(linear, nn.Linear) and linear.weight.device.type == "cpu" and \
            kwargs.get("backend", "torch") in ("torch", "reference")
        threads = torch.get_num_threads()
        if not on_cpu or threads == 1:
            return init(self, linear, *args, **kwargs)
        torch.set_num_threads(1)
        try:
            return init(self, linear, *args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapped


def _scale_bits(scale):
    """fp16 storage of the scales, per weight."""
    return 16.0 * (scale.numel() if isinstance(scale, torch.Tensor) else np.asarray(scale).size)


def _host(t):
    return t.cpu().numpy()


def _upload32_t(w64):
    """float64 [N, K] on the device -> the float32 [K, N] a torch-backend matmul reads."""
    out = torch.empty((w64.shape[1], w64.shape[0]), dtype=torch.float32, device=w64.device)
    return out.copy_(w64.T)  # one pass: the cast (round to nearest even) and the transpose together


class W4A4Linear(QuantLinear):
    """Symmetric RTN 4-bit weights (per output channel or `group_size`) with `act_bits` activations.

    `smooth=None` is the RTN baseline, a smoothing vector makes it SmoothQuant. `act_bits=None`
    gives the weight-only W4A16 variant of the same weights (the ablation's first column).
    """

    method = "rtn-w4a4"

    @_one_cpu_thread
    def __init__(self, linear, *, smooth=None, group_size=None, act_bits=4, act_group_size=None, backend="torch"):
        if smooth is not None and type(self) is W4A4Linear:
            self.method = "smoothquant-w4a4"
        super().__init__(linear, smooth=smooth, act_bits=act_bits, act_group_size=act_group_size, backend=backend)
        self.group_size = _check_group("group_size", group_size)
        q, s = quantizers.quantize_weights(self._w_dev, bits=4, group_size=self.group_size)
        n, k = q.shape
        getattr(self, f"_pack_{backend}")(q, s)
        self._finish_build({"low": 4.0, "high": 0.0, "index": 0.0, "scale": _scale_bits(s) / (n * k),
                            "total": 4.0 + _scale_bits(s) / (n * k)})

    def _pack_reference(self, q, s):
        self.codes = (_host(q), _host(s))

    def _pack_torch(self, q, s):
        self.register_buffer("w_deq_t", _upload32_t(quantizers.dequantize(q, s, self.group_size)))

    def _pack_triton(self, q, s):
        limits.check_k(self.in_features, "in_features")
        if self.act_bits is None:
            limits.check_w4a16_group(self.group_size)
        else:
            if self.group_size is not None:
                raise ValueError("backend='triton' W4A4 GEMM takes per-channel weight scales only; use group_size=None")
            limits.check_act_group(self.act_group_size)
            from zqkernels.gpu.w4a4 import act_layouts

            self._act_layouts = act_layouts(self.act_group_size, self._device)
        self.weight_layout = DenseInt4.from_codes(q, s, self.group_size, self._device)
        if self.act_bits is None and self.group_size is not None:
            # The W4A16 kernel's tma variant folds group scales into 16-bit weights: with fp16
            # activations they must stay within fp16's range over 8 (checked once, here).
            from zqkernels.gpu.w4a16 import FP16_FOLDED_SCALE_MAX

            self._fp16_scales_fold = float(self.weight_layout.scale.abs().max()) <= FP16_FOLDED_SCALE_MAX

    def _forward_torch(self, x2):
        return self._act(self._smoothed(x2)) @ self.w_deq_t

    def _reference_product(self, xs):
        q, s = self.codes
        if self.act_bits is None:
            return reference.w4a16_matmul(xs, q, s, self.group_size)
        qx, sx = reference.quantize_activations(xs, bits=self.act_bits, group_size=self.act_group_size)
        return reference.w4a4_matmul(qx, sx, q, s, act_group_size=self.act_group_size,
                                     weight_group_size=self.group_size)

    def _forward_triton(self, x2):
        x2 = self._cuda_input(x2)
        w = self.weight_layout
        if self.act_bits is None:
            if x2.dtype == torch.float16 and not getattr(self, "_fp16_scales_fold", True):
                from zqkernels.gpu.w4a16 import FP16_FOLDED_SCALE_MAX

                raise ValueError(f"this layer's group scales exceed {FP16_FOLDED_SCALE_MAX}, beyond what the W4A16 "
                                 "kernel folds into fp16 weights; run it with bfloat16 activations")
            xs = (x2.float() * self.inv_smooth).to(x2.dtype) if self.inv_smooth is not None else x2
            return ops.call("w4a16_gemm", xs, w.packed, w.scale, self.group_size or 0)
        return w4a4_triton_product(x2, self.inv_smooth, w, self.act_group_size, x2.dtype, self._act_layouts)

    def takes_gated_input(self, dtype):
        """True when `forward_silu_mul` forms silu(gate) * up inside the activation quantizer for
        input of `dtype`: the triton backend with 4-bit activations, fp16 / bf16 input (the
        quantizer's roundings are the model's in that dtype). The gated MLP (`pipeline.fusion`)
        asks before calling it."""
        return self.backend == "triton" and self.act_bits == 4 and dtype in (torch.float16, torch.bfloat16)

    def forward_silu_mul(self, h):
        """self(silu(gate) * up) for h = [gate | up] [..., 2 * in_features], the product formed in
        the activation quantizer (`gpu.actquant.quantize_silu_mul`), never stored: on the GPU the
        codes, and so the output, are those of `self(F.silu(gate) * up)` bit for bit."""
        if not isinstance(h, torch.Tensor) or not self.takes_gated_input(h.dtype):
            raise ValueError(f"forward_silu_mul needs the triton backend with 4-bit activations and an fp16 / bf16 "
                             f"input; this layer: backend={self.backend!r}, act_bits={self.act_bits}, input "
                             f"{getattr(h, 'dtype', type(h).__name__)}")
        if h.dim() == 0 or h.shape[-1] != 2 * self.in_features:
            raise ValueError(f"input must hold [gate | up], 2 x {self.in_features} features in its last dimension, "
                             f"got shape {tuple(h.shape)}")
        h2 = self._cuda_input(h.reshape(-1, 2 * self.in_features))
        y = w4a4_triton_product(h2, self.inv_smooth, self.weight_layout, self.act_group_size, h2.dtype,
                                self._act_layouts, gated=True)
        return self._output(y, h)


class W4A16Linear(W4A4Linear):
    """Weight-only RTN 4-bit (per channel or `group_size`), 16-bit activations: our W4A16 baseline."""

    method = "w4a16"

    def __init__(self, linear, *, group_size=None, backend="torch"):
        super().__init__(linear, smooth=None, group_size=group_size, act_bits=None, backend=backend)


class ZipperLinear(QuantLinear):
    """ZipperQuant (DESIGN §2): `W' = W * s` on a grid `Δ_n` sized for the inliers, `q = q_low + 16 q_high`.

    Low part: `act_bits` activations times `Δ_n * q_low` (dense 4-bit); high part: the
    high-precision `X'` times `16 Δ_n q_high` (sparse: through the pattern LUT on the CPU in the
    hybrid backend, `layouts.ZipperHighGPU` on the GPU in the triton backend). `stats` holds the
    table statistics (E, U, E/U, bytes) and the effective bits.
    """

    method = "zipper"

    @_one_cpu_thread
    def __init__(self, linear, *, smooth=None, outlier_ratio=0.01, high_bits=4, act_bits=4, act_group_size=None,
                 backend="torch", lut_group_size=4, channel_fraction=None, channel_score="absmax", hdiag=None):
        super().__init__(linear, smooth=smooth, act_bits=act_bits, act_group_size=act_group_size, backend=backend)
        if channel_fraction is None:  # per-row outliers (DESIGN.md §2.2), on the layer's device
            codes = quantizers.zipper_quantize(self._w_dev, outlier_ratio=outlier_ratio, high_bits=high_bits)
        else:  # channel-structured: the high part only in the chosen input channels (§2.7), on the host
            h = None
            if hdiag is not None:
                h = np.asarray(hdiag, dtype=np.float64)
                h = h / self.smooth**2 if self.smooth is not None else h
            channels = reference.select_outlier_channels(self.w_smoothed, channel_fraction=channel_fraction,
                                                         score=channel_score, hdiag=h)
            host = reference.zipper_quantize_channels(self.w_smoothed, channels, high_bits=high_bits)
            codes = quantizers.ZipperCodesTorch(*(torch.from_numpy(a).to(self._device)
                                                  for a in (host.q_low, host.q_high, host.scale)))
            self.stats["outlier_channels"] = int(len(channels))
        self._lut = None
        if backend == "hybrid":  # the CPU kernel's table, built on the host (DESIGN §2.5)
            self._lut = reference.build_pattern_lut(_host(codes.q_high), group_size=lut_group_size)
            table = reference.lut_stats(self._lut)
        else:  # the same statistics without the table, on the device
            table = quantizers.pattern_lut_stats(codes.q_high, group_size=lut_group_size)
        n, k = codes.q_low.shape
        nnz = int(torch.count_nonzero(codes.q_high))
        self.stats.update({f"lut_{key}": val for key, val in table.items()})
        self.stats["high_nonzeros"] = nnz
        self.stats["high_density"] = nnz / max(1, n * k)
        self.stats["outlier_ratio"] = None if channel_fraction is not None else float(outlier_ratio)
        self.stats["channel_fraction"] = channel_fraction
        self.stats["high_bits"] = int(high_bits)
        getattr(self, f"_pack_{backend}")(codes)
        self._lut = None  # host-side table: only the hybrid backend keeps it (inside its ZipperWeights)
        index = 8.0 * table["index_bytes"] / (n * k)
        high = 8.0 * table["pattern_bytes"] / (n * k)
        scale_b = 16.0 * n / (n * k)
        self._finish_build({"low": 4.0, "high": high, "index": index, "scale": scale_b,
                            "total": 4.0 + high + index + scale_b})

    def _pack_reference(self, codes):
        self.codes = codes.to_reference()

    def _pack_torch(self, codes):
        scale = codes.scale[:, None]
        self.register_buffer("w_low_t", _upload32_t(codes.q_low.to(torch.float64) * scale))
        # (16 * q_high) * Δ: the oracle's order; 16 * q_high is exact
        self.register_buffer("w_high_t", _upload32_t((16.0 * codes.q_high.to(torch.float64)) * scale))

    def _pack_triton(self, codes):
        limits.check_k(self.in_features, "in_features")
        limits.check_act_group(self.act_group_size)
        self.low_layout = DenseInt4.from_codes(codes.q_low, codes.scale, None, self._device)
        self.high_layout = ZipperHighGPU.from_codes(_host(codes.q_high), _host(codes.scale), self._device)

    def _pack_hybrid(self, codes):
        from zqkernels.hybrid import ZipperWeights

        limits.check_k(self.in_features, "in_features")
        limits.check_act_group(self.act_group_size)
        self.zipper_weights = ZipperWeights.prepare(codes.to_reference(), smooth=self.smooth, device=self._device,
                                                    act_group_size=self.act_group_size, lut=self._lut)

    def _forward_torch(self, x2):
        xs = self._smoothed(x2)
        return self._act(xs) @ self.w_low_t + xs @ self.w_high_t

    def _reference_product(self, xs):
        if self.act_bits is None:
            c = self.codes
            return xs @ (c.scale[:, None] * (c.q_low.astype(np.float64) + 16.0 * c.q_high)).T
        return reference.zipper_matmul(xs, self.codes, act_bits=self.act_bits, act_group_size=self.act_group_size)

    def _forward_triton(self, x2):
        low = self.low_layout
        return ops.call("zipper_gpu_linear", self._cuda_input(x2), low.packed, low.scale, self.inv_smooth,
                        *ops.zipper_high_args(self.high_layout), self.act_group_size or 0)

    def _forward_hybrid(self, x2):
        from zqkernels.hybrid import zipper_linear

        return zipper_linear(self._cuda_input(x2), self.zipper_weights, mode="hybrid", out_dtype=torch.float32)


class MosaicLinear(QuantLinear):
    """MosaicQuant (DESIGN §3): dense 4-bit base of `W' = W * s` plus 4-bit residual blocks.

    `hdiag` is the Hessian diagonal of the UNSMOOTHED input, `mean_m x[m,k]**2`; the blocks are
    scored with that of `X' = X / s`, i.e. `hdiag / s**2`. `density` of the `block` tiles keep a
    residual. `stats` holds the density actually used and the effective bits.
    """

    method = "mosaic"

    @_one_cpu_thread
    def __init__(self, linear, *, hdiag, smooth=None, density=0.05, block=(64, 64), group_size=None, act_bits=4,
                 act_group_size=None, backend="torch"):
        super().__init__(linear, smooth=smooth, act_bits=act_bits, act_group_size=act_group_size, backend=backend)
        h = as_float_matrix("hdiag", hdiag, rank=1)
        if h.shape != (self.in_features,):
            raise ValueError(f"hdiag must have {self.in_features} entries, got shape {h.shape}")
        if self.smooth is not None:
            h = h / self.smooth**2
        self.group_size = _check_group("group_size", group_size)
        if backend == "triton":  # refuse what the kernels cannot run before the (slow) quantization
            limits.check_k(self.in_features, "in_features")
            limits.check_mosaic_groups(self.act_group_size, self.group_size)
            limits.check_mosaic_block(block)
        codes = quantizers.mosaic_quantize(self._w_dev, h, density=density, block=tuple(block),
                                           group_size=self.group_size)
        n, k = codes.q_base.shape
        bn, bk = codes.block
        n_blocks = math.ceil(n / bn) * math.ceil(k / bk)
        b = int(codes.block_index.shape[0])
        self.stats.update({"blocks_kept": b, "blocks_total": n_blocks, "density_used": b / n_blocks,
                           "block": [bn, bk]})
        getattr(self, f"_pack_{backend}")(codes)
        base_scale = _scale_bits(codes.scale_base) / (n * k)
        res = 4.0 * b * bn * bk / (n * k)
        res_scale = 16.0 * b * bn / (n * k)
        # (row-block, col-block) of each kept block, each in the smallest unsigned width that holds it
        coord = reference.lut.uint_bytes(max(-(-n // bn) - 1, 0)) + reference.lut.uint_bytes(max(-(-k // bk) - 1, 0))
        index = 8.0 * coord * b / (n * k)
        self._finish_build({"low": 4.0, "high": res, "index": index, "scale": base_scale + res_scale,
                            "total": 4.0 + res + index + base_scale + res_scale})

    def _pack_reference(self, codes):
        self.codes = codes.to_reference()

    def _pack_torch(self, codes):
        self.register_buffer("w_deq_t", _upload32_t(quantizers.mosaic_dequantize(codes)))

    def _pack_triton(self, codes):
        self.weight_layout = MosaicBlocks.from_codes(codes.to_reference(), self._device)
        self._mosaic_args = ops.mosaic_args(self.weight_layout)

    def _forward_torch(self, x2):
        return self._act(self._smoothed(x2)) @ self.w_deq_t

    def _reference_product(self, xs):
        return reference.mosaic_matmul(xs, self.codes, act_bits=self.act_bits, act_group_size=self.act_group_size)

    def _forward_triton(self, x2):
        x2 = self._cuda_input(x2)
        if self.act_bits is None:
            from zqkernels.gpu.mosaic import mosaic_w4a16_gemm

            xs = (x2.float() * self.inv_smooth).to(x2.dtype) if self.inv_smooth is not None else x2
            return mosaic_w4a16_gemm(xs.contiguous(), self.weight_layout, check_finite=False)
        qx, sx = ops.call("quantize_activations", x2, self.inv_smooth, self.act_group_size or 0)
        return ops.call("mosaic_w4a4_gemm", qx, sx, *self._mosaic_args, self.act_group_size or 0, x2.dtype)
