"""The `zq` custom ops (`zqkernels.ops`) are well-formed torch ops equal to the launchers.

- `torch.library.opcheck`: the schema matches the implementation, the fake (meta) implementation
  gives the real outputs' shapes, dtypes and devices, and the op survives AOT dispatch (what
  `torch.compile` needs).
- each op's output equals the launcher's it wraps, exactly (the same kernel on the same inputs),
  in both activation layouts (packed int4, int8 codes).
- the triton W4A4 layers' product (`nn.w4a4_triton_product`) quantizes in the layout the launch
  table names for its M, its output does not depend on that layout, and it traces whole under
  `torch.compile`.
Small shapes: under the interpreter on the CPU, compiled on a GPU.
"""
import numpy as np
import pytest
import torch

import reference as R
from zqkernels import nn as zqnn
from zqkernels import ops
from zqkernels.gpu import configs
from zqkernels.gpu.actquant import quantize_activations, quantize_silu_mul
from zqkernels.gpu.mosaic import mosaic_w4a4_gemm
from zqkernels.gpu.w4a4 import act_layouts, w4a4_gemm, w4a4_gemv_quant
from zqkernels.gpu.w4a16 import w4a16_gemm
from zqkernels.gpu.zipper_high import zipper_gpu_linear
from zqkernels.layouts import DenseInt4, MosaicBlocks, ZipperHighGPU

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# opcheck's AOT-dispatch test needs no autograd here (no input requires grad); the rest all run.
CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _rng():
    return np.random.default_rng(11)


def _dense(n, k, group=None):
    rng = _rng()
    q = rng.integers(-8, 8, (n, k)).astype(np.int8)
    s = rng.uniform(0.01, 0.1, n if group is None else (n, -(-k // group)))
    return DenseInt4.from_codes(q, s, group, DEVICE)


def _x(m, k, dtype=torch.float16):
    return torch.from_numpy(_rng().standard_normal((m, k))).to(dtype).to(DEVICE)


@pytest.mark.parametrize("group, layout", [(0, "int4"), (32, "int4"), (0, "int8"), (32, "int8")])
def test_quantize_activations_op(group, layout):
    x = _x(3, 96)
    inv = torch.rand(96, device=DEVICE) + 0.5
    torch.library.opcheck(torch.ops.zq.quantize_activations, (x, inv, group, layout), test_utils=CHECKS)
    q, s = torch.ops.zq.quantize_activations(x, inv, group, layout)
    q2, s2 = quantize_activations(x, inv, group or None, layout=layout)
    assert q.dtype == (torch.int8 if layout == "int8" else torch.uint8)
    assert torch.equal(q, q2) and torch.equal(s, s2)  # exact: the same kernel


@pytest.mark.parametrize("group, layout", [(0, "int4"), (32, "int8")])
def test_quantize_silu_mul_op(group, layout):
    h = _x(3, 192)
    inv = torch.rand(96, device=DEVICE) + 0.5
    torch.library.opcheck(torch.ops.zq.quantize_silu_mul, (h, inv, group, layout), test_utils=CHECKS)
    q, s = torch.ops.zq.quantize_silu_mul(h, inv, group, layout)
    q2, s2 = quantize_silu_mul(h, inv, group or None, layout=layout)
    assert q.shape[1] == (96 if layout == "int8" else 48)
    assert torch.equal(q, q2) and torch.equal(s, s2)  # exact: the same kernel


def test_quantize_activations_op_refuses_a_bad_layout():
    with pytest.raises(ValueError, match="layout"):
        torch.ops.zq.quantize_activations(_x(3, 96), None, 0, "int2")


@pytest.mark.parametrize("group, out_dtype, layout", [(0, torch.float16, "int4"), (32, torch.float32, "int4"),
                                                      (0, torch.float32, "int8"), (32, torch.float16, "int8")])
def test_w4a4_gemm_op(group, out_dtype, layout):
    w = _dense(40, 96)
    qx, sx = quantize_activations(_x(5, 96), None, group or None, layout=layout)
    args = (qx, sx, w.packed, w.scale, group, out_dtype)
    torch.library.opcheck(torch.ops.zq.w4a4_gemm, args, test_utils=CHECKS)
    assert torch.equal(torch.ops.zq.w4a4_gemm(*args), w4a4_gemm(qx, sx, w.packed, w.scale, group or None, out_dtype))


@pytest.mark.parametrize("group, out_dtype", [(0, torch.float16), (32, torch.float32)])
def test_w4a4_gemv_quant_op(group, out_dtype):
    w = _dense(40, 96)
    x, inv = _x(1, 96), torch.rand(96, device=DEVICE) + 0.5
    args = (x, inv, w.packed, w.scale, group, out_dtype)
    torch.library.opcheck(torch.ops.zq.w4a4_gemv_quant, args, test_utils=CHECKS)
    assert torch.equal(torch.ops.zq.w4a4_gemv_quant(*args),
                       w4a4_gemv_quant(x, inv, w.packed, w.scale, group or None, out_dtype, config=_gemv_config(group)))


def _gemv_config(group):
    """The table's gemv bucket of this scale section (the interpreter's has one, the GPU tables
    name gemv at M = 1)."""
    scales = "per_token" if not group else "group"
    buckets = configs.table_for(torch.device(DEVICE))["w4a4"][scales]
    return next(dict(c) for c in buckets.values() if c["variant"] == "gemv")


@pytest.mark.parametrize("group", [None, 32])
def test_w4a4_layer_product_takes_the_tables_layout_per_m(group, monkeypatch):
    """For an M in each bucket of this device's launch table the layer quantizes in that bucket's
    act_layout, or for a "fused" bucket runs the GEMV that quantizes inside itself, and the output
    equals the launcher's on packed codes, exactly. The same walk with the buckets' layouts
    alternating int4 / int8 runs both layouts on every device, whichever one its table names."""
    w = _dense(40, 96)
    inv = torch.rand(96, device=DEVICE) + 0.5
    scales = "per_token" if group is None else "group"
    buckets = configs.table_for(torch.device(DEVICE))["w4a4"][scales]
    seen = []
    real_q, real_f = ops._IMPLS["quantize_activations"], ops._IMPLS["w4a4_gemv_quant"]  # what ops.call runs eagerly

    def spy_q(x, inv_smooth, group_size, layout="int4"):
        seen.append(layout)
        return real_q(x, inv_smooth, group_size, layout)

    def spy_f(*args):
        seen.append("fused")
        return real_f(*args)

    monkeypatch.setitem(ops._IMPLS, "quantize_activations", spy_q)
    monkeypatch.setitem(ops._IMPLS, "w4a4_gemv_quant", spy_f)
    keys = sorted(int(k) for k in buckets)
    assert len(keys) >= 2, "the walk needs two buckets to alternate layouts"
    ms = [keys[0]] + [k + 1 for k in keys[:-1]]  # ms[j] falls in bucket j
    table_steps = act_layouts(group, torch.device(DEVICE))
    # a tma bucket takes int8 codes only: it keeps them in the alternating walk too
    tma = {key for key in keys if buckets[str(key)]["variant"] == "tma"}
    alternating = tuple((key, "int8" if key in tma else ("int4", "int8")[j % 2]) for j, key in enumerate(keys))
    for steps in (table_steps, alternating):
        for j, m in enumerate(ms):
            x = _x(m, 96)
            y = zqnn.w4a4_triton_product(x, inv, w, group, torch.float32, steps)
            want = (configs.launch_config("w4a4", scales, m, x.device)["act_layout"] if steps is table_steps
                    else alternating[j][1])
            assert seen[-1] == want, (m, seen)
            qx, sx = quantize_activations(x, inv, group, layout="int8" if keys[j] in tma else "int4")
            two_step = w4a4_gemm(qx, sx, w.packed, w.scale, group, torch.float32)
            if want == "fused" and group:  # the same codes; the fp32 order of the group sums is the compiler's
                torch.testing.assert_close(y, two_step, rtol=2.0**-18, atol=2.0**-18 * float(two_step.abs().max()))
            else:
                assert torch.equal(y, two_step)  # exact
    assert seen[:len(ms)] == [configs.launch_config("w4a4", scales, m, torch.device(DEVICE))["act_layout"]
                              for m in ms]
    assert set(seen[len(ms):]) == {"int4", "int8"}


@pytest.mark.parametrize("group", [None, 32])
def test_gated_product_is_the_product_on_torchs_silu_mul_in_every_bucket(group):
    """`w4a4_triton_product(..., gated=True)` on [gate | up] quantizes silu(gate) * up in the
    bucket's layout ("fused" buckets: packed codes) and equals the two launches on the gated
    quantizer's codes exactly, for an M in every bucket of this device's table (the layer's
    `forward_silu_mul` is this call)."""
    w = _dense(40, 96)
    inv = torch.rand(96, device=DEVICE) + 0.5
    scales = "per_token" if group is None else "group"
    keys = sorted(int(k) for k in configs.table_for(torch.device(DEVICE))["w4a4"][scales])
    steps = act_layouts(group, torch.device(DEVICE))
    for m in [keys[0]] + [k + 1 for k in keys[:-1]]:
        h = _x(m, 192)
        y = zqnn.w4a4_triton_product(h, inv, w, group, torch.float16, steps, gated=True)
        layout = configs.launch_config("w4a4", scales, m, h.device)["act_layout"]
        qx, sx = quantize_silu_mul(h, inv, group, layout="int4" if layout == "fused" else layout)
        assert torch.equal(y, w4a4_gemm(qx, sx, w.packed, w.scale, group, torch.float16)), m  # exact


def test_ops_call_runs_the_implementation_eagerly_and_the_op_under_compile(monkeypatch):
    """Eagerly, `ops.call` runs the op's implementation without the custom-op dispatcher (a spy
    on `torch.ops.zq` sees no call) and gives the op's output exactly; under torch.compile the
    traced graph holds the op itself (a graph break at the Triton launch would fail fullgraph)."""
    w = _dense(40, 96)
    x = _x(5, 96)
    via_op = torch.ops.zq.w4a4_gemm(*torch.ops.zq.quantize_activations(x, None, 0, "int4"), w.packed, w.scale, 0,
                                    torch.float32)
    dispatched = []
    for name in ("quantize_activations", "w4a4_gemm"):
        op = getattr(torch.ops.zq, name)
        monkeypatch.setattr(torch.ops.zq, name, lambda *a, _op=op, _n=name: dispatched.append(_n) or _op(*a))
    eager = zqnn.w4a4_triton_product(x, None, w, None, torch.float32, act_layouts(None, torch.device(DEVICE)))
    assert dispatched == [] and torch.equal(eager, via_op)
    monkeypatch.undo()
    nodes = []

    def backend(gm, _inputs):
        nodes.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    steps = act_layouts(None, torch.device(DEVICE))
    compiled = torch.compile(lambda t: zqnn.w4a4_triton_product(t, None, w, None, torch.float32, steps),
                             backend=backend, fullgraph=True)
    assert torch.equal(compiled(x), via_op)
    assert any("quantize_activations" in n for n in nodes) and any("w4a4_gemm" in n for n in nodes), nodes


def test_w4a4_layer_product_traces_as_one_graph():
    """The layout pick is plain Python over the constants read at build time: `torch.compile`
    traces the layer's product whole (fullgraph) as M changes bucket."""
    w = _dense(40, 96)
    steps = act_layouts(None, torch.device(DEVICE))
    traced = torch.compile(lambda x: zqnn.w4a4_triton_product(x, None, w, None, torch.float32, steps),
                           backend="eager", fullgraph=True)
    for m in (steps[0][0], steps[0][0] + 1):
        x = _x(m, 96)
        qx, sx = quantize_activations(x, None, None)
        assert torch.equal(traced(x), w4a4_gemm(qx, sx, w.packed, w.scale, None, torch.float32))  # exact


@pytest.mark.parametrize("group", [0, 32])
def test_w4a16_gemm_op(group):
    w = _dense(40, 96, group or None)
    x = _x(5, 96)
    torch.library.opcheck(torch.ops.zq.w4a16_gemm, (x, w.packed, w.scale, group), test_utils=CHECKS)
    assert torch.equal(torch.ops.zq.w4a16_gemm(x, w.packed, w.scale, group), w4a16_gemm(x, w.packed, w.scale, group or None))


def test_mosaic_w4a4_gemm_op():
    rng = _rng()
    codes = R.mosaic_quantize(rng.standard_normal((70, 130)), rng.uniform(0.1, 1.0, 130), density=0.3)
    w = MosaicBlocks.from_codes(codes, DEVICE)
    qx, sx = quantize_activations(_x(4, 130), None, None)
    args = (qx, sx, *ops.mosaic_args(w), 0, torch.float32)
    torch.library.opcheck(torch.ops.zq.mosaic_w4a4_gemm, args, test_utils=CHECKS)
    assert torch.equal(torch.ops.zq.mosaic_w4a4_gemm(*args), mosaic_w4a4_gemm(qx, sx, w, out_dtype=torch.float32))


def test_zipper_gpu_linear_op():
    rng = _rng()
    codes = R.zipper_quantize(rng.standard_t(2, size=(40, 96)), outlier_ratio=0.05)
    low = DenseInt4.from_codes(codes.q_low, codes.scale, None, DEVICE)
    high = ZipperHighGPU.from_codes(codes.q_high, codes.scale, DEVICE)
    x = _x(3, 96)
    inv = torch.rand(96, device=DEVICE) + 0.5
    args = (x, low.packed, low.scale, inv, *ops.zipper_high_args(high), 0)
    torch.library.opcheck(torch.ops.zq.zipper_gpu_linear, args, test_utils=CHECKS)
    assert torch.equal(torch.ops.zq.zipper_gpu_linear(*args), zipper_gpu_linear(x, low, high, inv, None))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the triton layers need a CUDA GPU")
@pytest.mark.parametrize("m", [1, 16, 300, 2048])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("smooth", [False, True])
def test_forward_silu_mul_is_the_layer_on_torchs_product(m, group, smooth):
    """A W4A4 down projection fed [gate | up] gives, bit for bit, what it gives on torch's
    F.silu(gate) * up, at the table's M buckets (gemv, split-K, the tiled and tma GEMMs)."""
    torch.manual_seed(m)
    lin = torch.nn.Linear(1024, 384, bias=True).to("cuda", torch.float16)
    s = np.random.default_rng(m).uniform(0.5, 2.0, 1024) if smooth else None
    layer = zqnn.W4A4Linear(lin, smooth=s, act_group_size=group, backend="triton")
    h = (torch.randn(m, 2048, device="cuda") * 3).to(torch.float16)
    assert layer.takes_gated_input(h.dtype)
    want = layer(torch.nn.functional.silu(h[:, :1024]) * h[:, 1024:])
    assert torch.equal(layer.forward_silu_mul(h), want)  # exact: the same codes, the same GEMM
    assert torch.equal(layer.forward_silu_mul(h.reshape(1, m, 2048)), want.reshape(1, m, 384))
