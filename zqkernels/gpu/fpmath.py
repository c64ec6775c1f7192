"""IEEE float32 pieces the kernels share, each the same bits compiled and under Triton's interpreter.

- `div_rn(x, y)`: round-to-nearest float32 division. Triton's plain `/` on fp32 compiles to an
  approximate divide on NVIDIA GPUs; the quantizers' contract is written with IEEE division.
- `round_rne(v, dtype)`: float32 v to fp16 / bf16 / fp32, rounded to nearest even. For bfloat16 the
  rounding is done on the bits first (the cast then only drops zero bits): the interpreter truncates
  a float32 -> bfloat16 cast where the GPU rounds.
- `expf(x)`: float32 exp as CUDA's `expf` computes it (libdevice's `__nv_expf`, which torch's CUDA
  elementwise kernels call, e.g. `F.silu`), not Triton's `tl.exp` (`ex2.approx` on a scaled input,
  a few ulps off). The interpreter has no libdevice: there it is numpy's float32 `exp`.
- `silu(x)`: `x / (1 + expf(-x))` in float32 with IEEE division, torch's CUDA SiLU formula.
Each is wrapped in a jit function (not aliased): the interpreter patches `tl.math` at call time.
"""
import triton
import triton.language as tl

from zqkernels.gpu.configs import interpreting

if hasattr(tl.math, "div_rn"):  # Triton 3.x, interpreter included

    @triton.jit
    def div_rn(x, y):
        return tl.math.div_rn(x, y)

else:  # pragma: no cover - depends on the installed Triton
    from triton.language.extra import libdevice as _libdevice

    @triton.jit
    def div_rn(x, y):
        return _libdevice.div_rn(x, y)


if interpreting():

    @triton.jit
    def expf(x):
        return tl.exp(x)

else:
    from triton.language.extra import libdevice as _libdevice_exp

    @triton.jit
    def expf(x):
        return _libdevice_exp.exp(x)


@triton.jit
def silu(x):
    """float32 SiLU, torch's CUDA formula: x / (1 + exp(-x))."""
    return div_rn(x, 1.0 + expf(-x))


@triton.jit
def round_rne(v, dtype: tl.constexpr):
    """float32 v to `dtype`, rounded to nearest even (module docstring)."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)
