"""RMSNorm in one launch: `out = w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`, row by row.

transformers' LLaMA / Qwen RMSNorm runs this as six to eight elementwise and reduction kernels
(a float32 copy of x, its square, the mean, the reciprocal square root, the product, the cast
back, the weight's product), each a pass over the row in memory: on the H200 the norm, rotary and
other elementwise kernels of a 4-layer, 2,048-token LLaMA-3-8B fp16 prefill took 2,058 of its
7,228 us of kernel time, beside 4,839 us of cuBLAS GEMMs
(reports/results/h200/profile_decode_llama3-8b_gemv.json). Here one program reads a row once and
writes it once, with the same arithmetic: the sum of squares in float32, the normalized row
rounded to x's dtype, then multiplied by the weight in float32 (a product of two fp16 or bf16
values is exact in float32) and rounded once to the output dtype, which is what torch's
`weight * hidden.to(dtype)` does. The float32 sum is taken in another order than torch's
reduction and the reciprocal square root may differ from torch's by a float32 ulp, so the
normalized row can differ from transformers' by two ulps of x's dtype and the output by one more
of its own (`rounding_bound`).
"""
import math

import torch
import triton
import triton.language as tl

from zqkernels.gpu.fpmath import round_rne
from zqkernels.gpu.operands import check_kernel_device, check_same_device

MAX_HIDDEN = 32768  # one program holds its row in registers
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, N, stride_x, stride_o, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    normed = round_rne(xf * tl.math.rsqrt(var + eps), x.dtype)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = w * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, round_rne(y, out_ptr.dtype.element_ty), mask=ok)


def rounding_bound(x, weight, want):
    """float64, want's shape: how far each output may lie from transformers' (`want`, the module's
    output for x): the normalized row within two ulps of x's dtype (one from the float32
    reciprocal square root, one from its rounding to x's dtype) plus the float32 sum's own error
    (a relative (log2 N + 1) 2^-23 for a tree or blocked sum of N squares), times |weight|, plus one
    ulp of the output's dtype from the product. The bound `verify/test_rmsnorm.py` holds the kernel
    to and `pipeline.norms.fuse_norms` checks each module against."""
    x64 = x.double()
    normed = (x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-30)).to(x.dtype)
    sum_err = normed.double().abs() * (math.log2(x.shape[-1]) + 1) * 2.0**-23
    return weight.double().abs() * (2 * ulp(normed) + sum_err) + ulp(want)


def ulp(t):
    """One ulp of each element of t in its dtype (float64; at least the smallest normal's)."""
    info = torch.finfo(t.dtype)
    return torch.exp2(torch.floor(torch.log2(t.abs().double().clamp_min(info.tiny)))) * info.eps


def _warps(block):
    return 1 if block <= 256 else 4 if block <= 2048 else 8 if block <= 8192 else 16


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x (module docstring): x fp16 / bf16 / fp32 [..., N] with
    its last dimension contiguous, weight [N] of one of those dtypes on x's device, eps >= 0. Returns
    a new tensor of x's shape in `torch.promote_types(weight.dtype, x.dtype)`."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} must be one of {DTYPES}, got {t.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n:
        raise ValueError(f"weight must be [{n}] (x's last dimension), got {tuple(weight.shape)}")
    if n > MAX_HIDDEN:
        raise ValueError(f"rows of {n} exceed the one-program row of {MAX_HIDDEN}")
    if x.stride(-1) != 1 and x.numel() > n:
        raise ValueError("x's last dimension must be contiguous")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    check_kernel_device("x", x)
    check_same_device("weight", weight, x.device, "x")
    rows = x.reshape(-1, n)
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(n)
        _rmsnorm_kernel[(rows.shape[0],)](rows, weight.contiguous(), out, n, rows.stride(0), out.stride(0),
                                          float(eps), BLOCK=block, num_warps=_warps(block))
    return out.view(x.shape)
