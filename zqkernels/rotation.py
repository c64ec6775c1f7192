"""Layers of the rotation baseline and of the accuracy references it is read against.

- `HadamardW4A4Linear` (method "hadamard-w4a4"): QuaRot's core idea per layer, without fusing the
  rotation into the residual stream. The input of the linear is multiplied online by the
  block-Hadamard matrix R (`reference.block_hadamard`, orthogonal, so `(X R)(W R)^T = X W^T`) and
  the weight offline; RTN on both (`weight_bits`, per channel or `group_size`).
- `RTNLinear`: RTN (or SmoothQuant, with `smooth`) at any weight width 2-8, the equal-bits
  neighbours of the 4-bit methods (W5A4, W6A4).
- `FloatWeightLinear` (method "act-floor"): float weights with the same smoothing (and rotation,
  when asked) and the same quantized activations as a method: what the activations alone cost.

Backends: "reference" (the oracle in float64) and "torch" (dequantized float32 weights,
activations fake-quantized with the oracle's float32 contract). The rotation of the input runs in
float64 on both backends, so the activations that reach the float32 quantizer are the oracle's up to
one float64 ulp, and the codes match it except where that ulp straddles a float32 rounding boundary.
"""
from __future__ import annotations

import numpy as np
import torch

import reference
from zqkernels import nn as zqnn

_BACKENDS = ("reference", "torch")


def _check_weight_bits(bits):
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or not 2 <= int(bits) <= 8:
        raise ValueError(f"weight_bits must be an integer in [2, 8], got {bits!r}")
    return int(bits)


def rotate_torch(x, h):
    """`x @ diag(H, H, ...)` for x [M, K] in float64, H the [b, b] block (`reference.block_hadamard` in torch)."""
    m, k = x.shape
    b = h.shape[0]
    return (x.to(torch.float64).reshape(m, k // b, b) @ h).reshape(m, k)


class RotatedLinear(zqnn.QuantLinear):
    """Common part: input `X' = X / s`, rotated by R (block-Hadamard of `rotation_block`, or the
    identity when it is None), weight `W' R` rounded to `weight_bits` (None: kept in float)."""

    def __init__(self, linear, *, smooth=None, rotation_block=None, weight_bits=4, group_size=None, act_bits=4,
                 act_group_size=None, backend="torch"):
        if backend not in _BACKENDS:
            raise ValueError(f"method {self.method!r} has no {backend!r} backend (available: {', '.join(_BACKENDS)})")
        super().__init__(linear, smooth=smooth, act_bits=act_bits, act_group_size=act_group_size, backend=backend)
        k, n = self.in_features, self.out_features
        if rotation_block is not None:
            b = int(rotation_block)
            if b < 1 or b & (b - 1) or k % b:
                raise ValueError(f"rotation_block must be a power of two dividing in_features={k}, got {rotation_block!r}")
            rotation_block = b
        self.rotation_block = rotation_block
        if rotation_block is not None:  # built once: the forward multiplies by it on the device
            self.register_buffer("hadamard", torch.from_numpy(reference.hadamard_matrix(rotation_block)).to(self._device))
        else:
            self.hadamard = None
        self.weight_bits = None if weight_bits is None else _check_weight_bits(weight_bits)
        self.group_size = zqnn._check_group("group_size", group_size)
        w = self.w_smoothed
        if rotation_block is not None:
            w = reference.block_hadamard(w, rotation_block)
        if self.weight_bits is None:
            w_used = w
            bits = {"low": 16.0, "high": 0.0, "index": 0.0, "scale": 0.0, "total": 16.0}
        else:
            q, s = reference.quantize_weights(w, bits=self.weight_bits, group_size=self.group_size)
            self.codes = (q, s)
            w_used = reference.dequantize(q, s, self.group_size)
            scale = 16.0 * np.asarray(s).size / (n * k)
            bits = {"low": float(self.weight_bits), "high": 0.0, "index": 0.0, "scale": scale,
                    "total": self.weight_bits + scale}
        if backend == "reference":
            self.w_used = w_used
        else:
            self.register_buffer("w_t", torch.from_numpy(w_used.T.astype(np.float32)).contiguous().to(self._device))
        self.stats["rotation_block"] = rotation_block
        self.stats["weight_bits"] = self.weight_bits
        self._finish_build(bits)

    def _forward_torch(self, x2):
        xs = self._smoothed(x2)
        if self.rotation_block is not None:
            xs = rotate_torch(xs, self.hadamard).to(torch.float32)
        return self._act(xs) @ self.w_t

    def _reference_product(self, xs):
        if self.rotation_block is not None:
            xs = reference.block_hadamard(xs, self.rotation_block)
        if self.act_bits is not None:
            qx, sx = reference.quantize_activations(xs, bits=self.act_bits, group_size=self.act_group_size)
            xs = reference.dequantize(qx, sx, self.act_group_size)
        return xs @ self.w_used.T

    def extra_repr(self):
        return super().extra_repr() + f", rotation_block={self.rotation_block}, weight_bits={self.weight_bits}"


class HadamardW4A4Linear(RotatedLinear):
    """Block-Hadamard rotated RTN: `rotation_block` defaults to the largest power of two dividing
    in_features (`reference.hadamard_block_size`, capped by `max_block`)."""

    method = "hadamard-w4a4"

    def __init__(self, linear, *, smooth=None, rotation_block=None, max_block=None, weight_bits=4, group_size=None,
                 act_bits=4, act_group_size=None, backend="torch"):
        if rotation_block is None:
            rotation_block = reference.hadamard_block_size(linear.in_features, max_block)
        super().__init__(linear, smooth=smooth, rotation_block=rotation_block, weight_bits=weight_bits,
                         group_size=group_size, act_bits=act_bits, act_group_size=act_group_size, backend=backend)


class RTNLinear(RotatedLinear):
    """Symmetric RTN at `weight_bits` (2-8), no rotation; SmoothQuant when `smooth` is given."""

    method = "rtn-w4a4"

    def __init__(self, linear, *, smooth=None, weight_bits=4, group_size=None, act_bits=4, act_group_size=None,
                 backend="torch"):
        if smooth is not None:
            self.method = "smoothquant-w4a4"
        super().__init__(linear, smooth=smooth, rotation_block=None, weight_bits=weight_bits, group_size=group_size,
                         act_bits=act_bits, act_group_size=act_group_size, backend=backend)


class FloatWeightLinear(RotatedLinear):
    """The activation floor: float weights `W' R`, quantized activations `Q(X' R)` (R the identity
    unless `rotation_block` is given)."""

    method = "act-floor"

    def __init__(self, linear, *, smooth=None, rotation_block=None, act_bits=4, act_group_size=None, backend="torch"):
        super().__init__(linear, smooth=smooth, rotation_block=rotation_block, weight_bits=None, group_size=None,
                         act_bits=act_bits, act_group_size=act_group_size, backend=backend)
