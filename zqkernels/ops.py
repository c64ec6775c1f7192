"""The kernel entry points as `torch.library` custom ops (namespace `zq`), each with a fake (meta)
implementation that gives its outputs' shapes and dtypes without running anything.

A layer that calls `torch.ops.zq.*` traces under `torch.compile` as single graph nodes (a Triton
launch from Python with its config dicts would break the graph) and replays inside CUDA graphs.
The ops take tensors, ints, strings and dtypes only: group sizes are ints with 0 meaning "none"
(per token, per channel), the activation layout is the quantizer's `layout` string ("int4" packed
uint8 [M, K/2], "int8" one code per byte [M, K]; `zq::w4a4_gemm` reads it from its operand's
dtype), and a `layouts.MosaicBlocks` / `ZipperHighGPU` is passed as its tensors (the
`*_args` helpers below unpack a layout). The real implementations call the launchers of
`zqkernels.gpu`, which validate their operands (values unchecked: `check_finite=False`, the
per-token path has no host sync); the fakes only compute the outputs' shapes and dtypes.

The layers call the ops through `call(name, *args)`: while torch.compile traces, that is
`torch.ops.zq.<name>` (one graph node); otherwise it is the op's implementation itself, the same
launcher call without the custom-op dispatcher's Python layers, which on a CPU cost about as much
host time as the two launchers of a W4A4 product (reports/results/cpu-2core/host_path/). A CUDA
graph records the same kernels either way.
"""
from __future__ import annotations

import torch
from torch.library import custom_op

from zqkernels.layouts import MosaicBlocks, ZipperHighGPU


def _group(g):
    return None if g == 0 else g


_IMPLS = {}


def _op(name):
    """`custom_op("zq::<name>")` over the decorated function, which `call` also runs directly."""
    def register(fn):
        _IMPLS[name] = fn
        return custom_op(f"zq::{name}", mutates_args=())(fn)

    return register


def call(name, *args):
    """Op `name` on `args`: `torch.ops.zq.<name>` under torch.compile, its implementation otherwise
    (module docstring)."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.zq, name)(*args)
    return _IMPLS[name](*args)


@_op("quantize_activations")
def quantize_activations(x: torch.Tensor, inv_smooth: torch.Tensor | None, group_size: int,
                         layout: str = "int4") -> tuple[torch.Tensor, torch.Tensor]:
    from zqkernels.gpu.actquant import quantize_activations as launch

    return launch(x, inv_smooth, _group(group_size), layout=layout, check_finite=False)


def _fake_codes(x, m, k, group_size, layout):
    """The quantizers' outputs for M rows of K channels: codes in `layout` and their scales."""
    from zqkernels.gpu.actquant import LAYOUTS

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    scales = (m,) if group_size == 0 else (m, -(-k // group_size))
    codes = x.new_empty((m, k), dtype=torch.int8) if layout == "int8" else x.new_empty((m, k // 2), dtype=torch.uint8)
    return codes, x.new_empty(scales, dtype=torch.float32)


@quantize_activations.register_fake
def _(x, inv_smooth, group_size, layout="int4"):
    return _fake_codes(x, x.shape[0], x.shape[1], group_size, layout)


@_op("quantize_silu_mul")
def quantize_silu_mul(h: torch.Tensor, inv_smooth: torch.Tensor | None, group_size: int,
                      layout: str = "int4") -> tuple[torch.Tensor, torch.Tensor]:
    from zqkernels.gpu.actquant import quantize_silu_mul as launch

    return launch(h, inv_smooth, _group(group_size), layout=layout, check_finite=False)


@quantize_silu_mul.register_fake
def _(h, inv_smooth, group_size, layout="int4"):
    return _fake_codes(h, h.shape[0], h.shape[1] // 2, group_size, layout)  # h = [gate | up]


# qx is either activation layout: packed uint8 [M, K/2] or int8 codes [M, K] (its dtype says which).
@_op("w4a4_gemm")
def w4a4_gemm(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, act_group_size: int,
              out_dtype: torch.dtype) -> torch.Tensor:
    from zqkernels.gpu.w4a4 import w4a4_gemm as launch

    return launch(qx, sx, qw, sw, act_group_size=_group(act_group_size), out_dtype=out_dtype, check_finite=False)


@w4a4_gemm.register_fake
def _(qx, sx, qw, sw, act_group_size, out_dtype):
    return qx.new_empty((qx.shape[0], qw.shape[0]), dtype=out_dtype)


@_op("w4a4_gemv_quant")
def w4a4_gemv_quant(x: torch.Tensor, inv_smooth: torch.Tensor | None, qw: torch.Tensor, sw: torch.Tensor,
                    act_group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    from zqkernels.gpu.w4a4 import w4a4_gemv_quant as launch

    return launch(x, inv_smooth, qw, sw, act_group_size=_group(act_group_size), out_dtype=out_dtype,
                  check_finite=False)


@w4a4_gemv_quant.register_fake
def _(x, inv_smooth, qw, sw, act_group_size, out_dtype):
    return x.new_empty((x.shape[0], qw.shape[0]), dtype=out_dtype)


@_op("w4a16_gemm")
def w4a16_gemm(x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, group_size: int) -> torch.Tensor:
    from zqkernels.gpu.w4a16 import w4a16_gemm as launch

    return launch(x, qw, sw, group_size=_group(group_size), check_finite=False)


@w4a16_gemm.register_fake
def _(x, qw, sw, group_size):
    return x.new_empty((x.shape[0], qw.shape[0]))


def _mosaic_layout(qb, sb, res, sres, indptr, kblock, block_index, n, k, bn, bk, group_size):
    """A MosaicBlocks view over the op's tensors (no copy of them)."""
    return MosaicBlocks(shape=(n, k), block=(bn, bk), group_size=_group(group_size), qb_packed=qb, scale_base=sb,
                        res_packed=res, scale_res=sres, indptr=indptr, kblock=kblock,
                        n_blocks=int(block_index.shape[0]), block_index=block_index.cpu().numpy())


@_op("mosaic_w4a4_gemm")
def mosaic_w4a4_gemm(qx: torch.Tensor, sx: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor, res: torch.Tensor,
                     sres: torch.Tensor, indptr: torch.Tensor, kblock: torch.Tensor, block_index: torch.Tensor,
                     n: int, k: int, bn: int, bk: int, group_size: int, act_group_size: int,
                     out_dtype: torch.dtype) -> torch.Tensor:
    from zqkernels.gpu.mosaic import mosaic_w4a4_gemm as launch

    # The view (and the tile lists it builds once) lives on the base tensor itself, so it goes away
    # with the layer that owns the tensors.
    w = getattr(qb, "_zq_mosaic_view", None)
    if w is None or w.res_packed is not res or w.block != (bn, bk):
        w = _mosaic_layout(qb, sb, res, sres, indptr, kblock, block_index, n, k, bn, bk, group_size)
        qb._zq_mosaic_view = w
    return launch(qx, sx, w, act_group_size=_group(act_group_size), out_dtype=out_dtype, check_finite=False)


@mosaic_w4a4_gemm.register_fake
def _(qx, sx, qb, sb, res, sres, indptr, kblock, block_index, n, k, bn, bk, group_size, act_group_size, out_dtype):
    return qx.new_empty((qx.shape[0], n), dtype=out_dtype)


def mosaic_args(w: MosaicBlocks):
    """The tensors and ints `zq::mosaic_w4a4_gemm` takes for layout `w` (block_index on the host)."""
    n, k = w.shape
    bn, bk = w.block
    return (w.qb_packed, w.scale_base, w.res_packed, w.scale_res, w.indptr, w.kblock,
            torch.from_numpy(w.block_index), n, k, bn, bk, w.group_size or 0)


@_op("zipper_gpu_linear")
def zipper_gpu_linear(x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, inv_smooth: torch.Tensor | None,
                      high_index: torch.Tensor, high_values: torch.Tensor, high_row_scale: torch.Tensor,
                      n: int, k: int, method: str, width: int, nnz: int, act_group_size: int) -> torch.Tensor:
    from zqkernels.gpu.zipper_high import zipper_gpu_linear as launch
    from zqkernels.layouts import DenseInt4

    low = DenseInt4(packed=qw, scale=sw, group_size=None, shape=(n, k))
    high = ZipperHighGPU(shape=(n, k), method=method, row_scale=high_row_scale, index=high_index, values=high_values,
                         width=width, nnz=nnz)
    return launch(x, low, high, inv_smooth, _group(act_group_size))


@zipper_gpu_linear.register_fake
def _(x, qw, sw, inv_smooth, high_index, high_values, high_row_scale, n, k, method, width, nnz, act_group_size):
    return x.new_empty((x.shape[0], n), dtype=torch.float32)


def zipper_high_args(high: ZipperHighGPU):
    """The high part's tensors and ints `zq::zipper_gpu_linear` takes after x, qw, sw, inv_smooth."""
    n, k = high.shape
    return (high.index, high.values, high.row_scale, n, k, high.method, high.width, high.nnz)
