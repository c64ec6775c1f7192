"""zqkernels.nn: every layer's torch backend equals the oracle's product (reference backend and the
reference functions directly) up to float32 rounding; activation codes equal the oracle's bit for
bit; unsupported method/backend pairs are refused."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reference
from zqkernels import nn as zqnn

# torch backend vs oracle: same codes, float32 matmul instead of float64 -> relative Frobenius error.
TORCH_VS_REF_RTOL = 2e-5


def _rel(a, b):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()


def _layer(n=48, k=64, seed=0, bias=True, outlier=True):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    if outlier:
        with torch.no_grad():
            lin.weight[3, 5] = 4.0  # one large weight: zipper's high part must carry it
    return lin


def _inputs(m=9, k=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 7] *= 30.0  # an outlier channel, as real activations have
    x[2] = 0.0  # a zero token
    return x


def _stats(x):
    xd = x.double().numpy()
    return np.abs(xd).max(axis=0), (xd**2).mean(axis=0)


@st.composite
def act_matrices(draw):
    m = draw(st.integers(1, 6))
    k = draw(st.integers(1, 70))
    base = draw(st.sampled_from(["normal", "ties", "outlier", "zeros"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    x = rng.standard_normal((m, k)).astype(np.float32)
    if base == "ties":  # values on the rounding boundaries: half-integers of the scale
        x = (rng.integers(-15, 16, (m, k)) / 2.0).astype(np.float32)
        x[:, 0] = 7.0
    elif base == "outlier":
        x[:, rng.integers(k)] = 1e4
    elif base == "zeros":
        x[rng.integers(m)] = 0.0
    return x


@settings(max_examples=150)
@given(x=act_matrices(), bits=st.sampled_from([4, 8]), group=st.sampled_from([None, 1, 4, 32]))
def test_activation_codes_and_scales_equal_oracle_bit_for_bit(x, bits, group):
    codes, scale = zqnn.quantize_activations_torch(torch.from_numpy(x), bits, group)
    q_ref, s_ref = reference.quantize_activations(x.astype(np.float64), bits=bits, group_size=group)
    assert np.array_equal(codes.numpy().astype(np.int64), q_ref.astype(np.int64))
    s = scale.numpy().astype(np.float64)
    assert np.array_equal(s if group else s[:, 0], s_ref)


def _build_pair(cls, kw, lin):
    return cls(lin, backend="torch", **kw), cls(lin, backend="reference", **kw)


K = 64
SMOOTH = np.linspace(0.5, 2.0, K)
HDIAG = np.linspace(0.1, 3.0, K)
CASES = [
    (zqnn.W4A16Linear, {}),
    (zqnn.W4A16Linear, {"group_size": 16}),
    (zqnn.W4A4Linear, {}),
    (zqnn.W4A4Linear, {"act_group_size": 32, "group_size": 32}),
    (zqnn.W4A4Linear, {"smooth": SMOOTH, "act_group_size": 16}),
    (zqnn.W4A4Linear, {"smooth": SMOOTH, "act_bits": 8}),
    (zqnn.ZipperLinear, {"smooth": SMOOTH, "outlier_ratio": 0.05}),
    (zqnn.ZipperLinear, {"smooth": SMOOTH, "outlier_ratio": 0.01, "act_group_size": 32, "high_bits": 8}),
    (zqnn.ZipperLinear, {"outlier_ratio": 0.05, "act_bits": None}),
    (zqnn.MosaicLinear, {"hdiag": HDIAG, "density": 0.25, "block": (16, 16)}),
    (zqnn.MosaicLinear, {"hdiag": HDIAG, "smooth": SMOOTH, "density": 0.5, "block": (16, 32), "group_size": 32,
                         "act_group_size": 32}),
    (zqnn.MosaicLinear, {"hdiag": HDIAG, "density": 0.1, "act_bits": None}),
]


@pytest.mark.parametrize("cls,kw", CASES, ids=lambda v: v.__name__ if isinstance(v, type) else str(sorted(v)))
def test_torch_backend_equals_reference_backend(cls, kw):
    lin = _layer(k=K)
    a, b = _build_pair(cls, kw, lin)
    x = _inputs(k=K).reshape(3, 3, K)  # leading dims are flattened and restored
    ya, yb = a(x), b(x)
    assert ya.shape == yb.shape == (3, 3, lin.out_features)
    assert _rel(ya, yb) <= TORCH_VS_REF_RTOL


def test_reference_backend_is_the_oracle_product():
    lin = _layer(k=K, bias=False)
    x = _inputs(k=K)
    s = SMOOTH
    layer = zqnn.ZipperLinear(lin, smooth=s, outlier_ratio=0.05, act_group_size=32, backend="reference")
    xs = (x.float() * torch.from_numpy((1.0 / s).astype(np.float32))).double().numpy()
    codes = reference.zipper_quantize(lin.weight.detach().double().numpy() * s, outlier_ratio=0.05)
    expect = reference.zipper_matmul(xs, codes, act_bits=4, act_group_size=32)
    # the layer returns float32: the oracle's float64 rounded once
    assert np.allclose(layer(x).double().numpy(), expect, rtol=1e-6, atol=1e-6 * np.abs(expect).max())

    mos = zqnn.MosaicLinear(lin, hdiag=HDIAG, density=0.25, block=(16, 16), backend="reference")
    mcodes = reference.mosaic_quantize(lin.weight.detach().double().numpy(), HDIAG, density=0.25, block=(16, 16))
    expect = reference.mosaic_matmul(x.double().numpy(), mcodes, act_bits=4)
    assert np.allclose(mos(x).double().numpy(), expect, rtol=1e-6, atol=1e-6 * np.abs(expect).max())


def test_quantized_layers_track_the_float_layer():
    """Sanity bounds (relative output error on outlier-carrying inputs) that separate the methods."""
    lin = _layer(k=K, bias=False)
    x = _inputs(m=64, k=K)
    a, _ = _stats(x)
    w_absmax = lin.weight.detach().abs().amax(0).double().numpy()
    s = reference.smooth_scales(a, w_absmax, alpha=0.5)
    y = lin(x)
    err = {
        "w4a16": _rel(zqnn.W4A16Linear(lin)(x), y),
        "rtn": _rel(zqnn.W4A4Linear(lin)(x), y),
        "zipper": _rel(zqnn.ZipperLinear(lin, smooth=s, outlier_ratio=0.05, act_group_size=16)(x), y),
        "zipper_a16": _rel(zqnn.ZipperLinear(lin, smooth=s, outlier_ratio=0.05, act_bits=None)(x), y),
    }
    assert err["w4a16"] < 0.15
    assert err["zipper_a16"] < err["w4a16"]  # finer inlier grid, outliers kept exactly in the high part
    assert err["zipper"] < err["rtn"]


def test_zipper_stats_report_the_table():
    lin = _layer(k=K)
    layer = zqnn.ZipperLinear(lin, outlier_ratio=0.05)
    st_ = layer.stats
    assert st_["lut_E"] >= st_["lut_U"] > 0  # the planted outlier forces at least one pattern
    assert st_["lut_reuse"] == pytest.approx(st_["lut_E"] / st_["lut_U"])
    bits = st_["effective_bits"]
    assert bits["total"] == pytest.approx(bits["low"] + bits["high"] + bits["index"] + bits["scale"])


def test_rtn_effective_bits_are_four_plus_scales():
    lin = _layer(n=48, k=K)
    assert zqnn.W4A4Linear(lin).stats["effective_bits"]["total"] == pytest.approx(4 + 16 / K)
    assert zqnn.W4A16Linear(lin, group_size=16).stats["effective_bits"]["total"] == pytest.approx(4 + 1)


def test_mosaic_density_used_is_reported():
    lin = _layer(n=48, k=K)
    layer = zqnn.MosaicLinear(lin, hdiag=HDIAG, density=0.25, block=(16, 16))
    assert layer.stats["blocks_total"] == 3 * 4
    assert layer.stats["blocks_kept"] == 3  # ceil(0.25 * 12)
    assert layer.stats["density_used"] == pytest.approx(0.25)


@pytest.mark.parametrize("make,match", [
    (lambda lin: zqnn.W4A16Linear(lin, backend="hybrid"), "no 'hybrid' backend"),
    (lambda lin: zqnn.MosaicLinear(lin, hdiag=HDIAG, backend="hybrid"), "no 'hybrid' backend"),
    (lambda lin: zqnn.W4A4Linear(lin, act_bits=8, backend="triton"), "act_bits=8"),
    (lambda lin: zqnn.ZipperLinear(lin, act_bits=None, backend="hybrid"), "act_bits=None"),
    (lambda lin: zqnn.W4A4Linear(lin, backend="cuda"), "unknown backend"),
    (lambda lin: zqnn.W4A4Linear(lin, act_bits=3), "act_bits"),
    (lambda lin: zqnn.W4A4Linear(lin, smooth=np.ones(3)), "smooth"),
    (lambda lin: zqnn.MosaicLinear(lin, hdiag=np.ones(3)), "hdiag"),
    (lambda lin: zqnn.W4A4Linear(nn.Conv1d(2, 2, 1)), "nn.Linear"),
])
def test_unsupported_combinations_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make(_layer(k=K))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error; a GPU is present")
@pytest.mark.parametrize("backend", ["triton", "hybrid"])
def test_gpu_backends_without_gpu_raise_clearly(backend):
    with pytest.raises(ValueError, match="CUDA"):
        zqnn.ZipperLinear(_layer(k=K), backend=backend)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="mosaic", backend="triton", act_group_size=48, group_size=64), "act_group_size=48.*multiple of 32"),
    (dict(method="mosaic", backend="triton", act_group_size=32, group_size=16), "group_size=16.*multiple of 32"),
    (dict(method="mosaic", backend="triton", act_group_size=64, group_size=64, block=(48, 64)), "bn=48"),
    (dict(method="rtn-w4a4", backend="triton", act_group_size=48), "act_group_size must be None or one of"),
    (dict(method="smoothquant-w4a4", backend="triton", group_size=128), "per-channel weight scales"),
    (dict(method="w4a16", backend="triton", act_bits=None, group_size=48), "group_size must be None or one of"),
    (dict(method="zipper", backend="hybrid", act_group_size=100), "act_group_size must be None or one of"),
])
def test_kernel_limits_are_refused_before_any_work(kwargs, match):
    """What the Triton kernels cannot run is refused by name before a model is loaded or a layer built."""
    from zqkernels.nn import check_method_backend

    with pytest.raises(ValueError, match=match):
        check_method_backend(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(method="mosaic", backend="triton", act_group_size=64, group_size=64),
    dict(method="mosaic", backend="triton", act_group_size=32, group_size=32),
    dict(method="rtn-w4a4", backend="triton", act_group_size=32),
    dict(method="zipper", backend="triton", act_group_size=None),
    dict(method="mosaic", backend="torch", act_group_size=32, group_size=32),  # the torch backend takes any group
])
def test_supported_kernel_options_pass(kwargs):
    from zqkernels.nn import check_method_backend

    check_method_backend(**kwargs)


def test_integer_input_is_refused_as_torch_linear_does():
    from zqkernels.nn import W4A4Linear

    torch.manual_seed(0)
    layer = W4A4Linear(torch.nn.Linear(64, 5))
    with pytest.raises(ValueError, match="floating-point"):
        layer(torch.randint(-3, 4, (2, 64)))
    with pytest.raises(ValueError, match="64 features"):
        layer(torch.zeros(2, 63))


def test_channel_structured_zipper_keeps_its_high_part_in_c_channels():
    rng = np.random.default_rng(2)
    lin = nn.Linear(64, 12)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(rng.standard_normal((12, 64))))
        lin.weight[:, 7] *= 50.0
    layer = zqnn.ZipperLinear(lin, channel_fraction=1 / 64, act_bits=None, backend="reference")
    assert layer.stats["outlier_channels"] == 1
    assert np.flatnonzero(np.any(layer.codes.q_high, axis=0)).tolist() == [7]
    x = torch.from_numpy(rng.standard_normal((3, 64))).float()
    torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=0.5 * float(np.abs(x.numpy()).sum(1).max())
                               * float(layer.codes.scale.max()))  # half a step per weight


def test_layer_inputs_and_options_refused_by_name():
    lin = nn.Linear(64, 5)
    layer = zqnn.W4A4Linear(lin)
    with pytest.raises(ValueError, match="64 features"):
        layer(torch.tensor(1.0))  # a 0-d input
    with pytest.raises(ValueError, match="float32 inverse"):
        zqnn.W4A4Linear(lin, smooth=np.full(64, 1e300))  # 1/s is 0 in float32: the input would vanish
    with pytest.raises(ValueError, match="hdiag"):
        zqnn.MosaicLinear(lin, hdiag="not a vector")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the triton backend needs a CUDA GPU")
def test_w4a16_group_scales_beyond_the_fp16_fold_are_refused_for_fp16_input():
    """A triton W4A16 layer in groups whose scales exceed `w4a16.FP16_FOLDED_SCALE_MAX` (the tma
    variant folds them into fp16 weights) refuses fp16 input by name, and runs bf16 input."""
    lin = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight[0, 0] = 6.0e4  # its group's scale: 6e4 / 7 > 8188
    layer = zqnn.W4A4Linear(lin, act_bits=None, group_size=32, backend="triton")
    x = torch.randn(4, 64, device="cuda")
    with pytest.raises(ValueError, match="bfloat16"):
        layer(x.half())
    assert torch.isfinite(layer(x.bfloat16())).all()
