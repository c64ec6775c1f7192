"""Hadamard rotation of a linear layer's input and weight (the rotation baseline, QuaRot's core idea
applied per layer, without fusing the rotation into the residual stream).

`H_b` is the Sylvester Hadamard matrix of order b (a power of two) scaled by `1/sqrt(b)`: orthogonal
and symmetric, so `H_b @ H_b = I`. The rotation of K channels is block-diagonal, `R = diag(H_b, ...,
H_b)` with `K / b` blocks, b the largest power of two dividing K (capped by `max_block`). Because R
is orthogonal, `(X R) @ (W R).T = X @ W.T` exactly in real arithmetic: the rotation moves nothing
but the quantization error. Spreading an outlier channel over b channels flattens both the
activations' and the weights' rows, which is why RTN on both sides then loses less.

`hadamard_quantize` rotates W offline (float64) and rounds it with `quantize_weights`;
`hadamard_matmul` rotates X online (float64), quantizes it with the float32 activation contract of
`quantize_activations`, and multiplies.
"""
import numpy as np

from .quant import dequantize, quantize_activations, quantize_weights
from .validation import as_float_matrix, check_group_size


def hadamard_matrix(b):
    """Orthonormal Sylvester Hadamard matrix of order `b` (a power of two), float64 [b, b]."""
    if not isinstance(b, (int, np.integer)) or isinstance(b, bool) or b < 1 or (int(b) & (int(b) - 1)):
        raise ValueError(f"b must be a positive power of two, got {b!r}")
    h = np.ones((1, 1))
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(float(b))


def hadamard_block_size(k, max_block=None):
    """The largest power of two dividing `k`, at most `max_block` (None: no cap)."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if max_block is not None and (not isinstance(max_block, (int, np.integer)) or isinstance(max_block, bool)
                                  or max_block < 1 or (int(max_block) & (int(max_block) - 1))):
        raise ValueError(f"max_block must be None or a positive power of two, got {max_block!r}")
    b = int(k) & -int(k)
    return b if max_block is None else min(b, int(max_block))


def _check_block(k, block):
    if not isinstance(block, (int, np.integer)) or isinstance(block, bool) or block < 1 or (int(block) & (int(block) - 1)):
        raise ValueError(f"block must be a positive power of two, got {block!r}")
    if k % int(block):
        raise ValueError(f"block {block} does not divide K={k}")
    return int(block)


def block_hadamard(x, block):
    """`x @ diag(H_block, ..., H_block)` over the last axis of a matrix [R, K], float64."""
    x = as_float_matrix("x", x)
    r, k = x.shape
    b = _check_block(k, block)
    return (x.reshape(r, k // b, b) @ hadamard_matrix(b)).reshape(r, k)


def hadamard_quantize(w, block, bits=4, group_size=None):
    """RTN of the rotated weight `W R`: (q int8 [N, K], scale float64 [N] or [N, ceil(K/g)])."""
    return quantize_weights(block_hadamard(w, block), bits=bits, group_size=group_size)


def hadamard_matmul(x, q, scale, block, act_bits=4, act_group_size=None, weight_group_size=None):
    """`Q(X R) @ dequantize(q, scale).T` in float64, `Q` the activation quantizer with `act_bits`
    (None: the rotated float activations, a weight-only product)."""
    xr = block_hadamard(x, block)
    act_group_size = check_group_size("act_group_size", act_group_size)
    q = np.asarray(q)
    if q.ndim != 2 or q.shape[1] != xr.shape[1]:
        raise ValueError(f"x {xr.shape} and q {q.shape} must be [M, K] and [N, K]")
    if act_bits is not None:
        qx, sx = quantize_activations(xr, bits=act_bits, group_size=act_group_size)
        xr = dequantize(qx, sx, act_group_size)
    return xr @ dequantize(q, scale, weight_group_size).T
