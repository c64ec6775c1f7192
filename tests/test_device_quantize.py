"""The layers quantize on the weight's device through `zqkernels.quantizers`; the oracle path they
replaced (numpy `reference` on the host) gives the same layer, bit for bit.

`zqkernels.quantizers.host_oracle()` is that previous path written out: every quantizer,
dequantizer and the table statistics computed by `reference` on a host float64 copy of the weight. Each test builds the same
layer (or quantizes the same tiny model) once through each and compares everything the layer
keeps: the codes, scales and kept blocks (reference backend), the float32 weights the torch
backend multiplies, the statistics (bits per weight, E, U, table bytes, density), and for a whole
model the per-layer records and the perplexity, with `==`. The weights are the adversaries of
verify/strategies.py: ties at rounding boundaries, zero rows, one huge outlier, heavy tails, all
zero, K not a multiple of the group or block, N = 1.
"""
import contextlib
import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "verify"))

import reference  # noqa: E402
from strategies import matrices  # noqa: E402
from zqkernels import nn as zqnn  # noqa: E402
from zqkernels import quantizers as Q  # noqa: E402

# The layers quantize on the linear's device: the CPU always, a CUDA GPU too where there is one
# (there the triton backend's packed layouts are compared as well).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the triton backend needs one")


@contextlib.contextmanager
def through_the_oracle():
    """The layers built inside quantize through `quantizers.host_oracle()` instead."""
    zqnn.quantizers = Q.host_oracle()
    try:
        yield
    finally:
        zqnn.quantizers = Q


def _linear(w, bias, device="cpu"):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w.astype(np.float32)))
    return lin.to(device)


def _layout_codes(layer):
    """The codes a triton layer's packed layouts hold, as numpy (`to_codes` of each layout)."""
    out = []
    for name in ("weight_layout", "low_layout", "high_layout"):
        lay = getattr(layer, name, None)
        if lay is None:
            continue
        codes = lay.to_codes()
        if isinstance(codes, tuple):
            out.extend(codes)
        else:
            out.extend(getattr(codes, f) for f in ("q_base", "scale_base", "block_index", "q_res", "scale_res"))
    return out


def _assert_same_layer(a, b):
    """Everything two built layers keep, compared exactly."""
    assert a.stats == b.stats
    bufs_a, bufs_b = dict(a.named_buffers()), dict(b.named_buffers())
    assert bufs_a.keys() == bufs_b.keys()
    for name in bufs_a:
        assert bufs_a[name].dtype == bufs_b[name].dtype and torch.equal(bufs_a[name], bufs_b[name]), name
    ca, cb = getattr(a, "codes", None), getattr(b, "codes", None)
    assert (ca is None) == (cb is None)
    if ca is None:
        return
    if isinstance(ca, tuple):
        pairs = list(zip(ca, cb))
    else:
        fields = [f for f in ("q_low", "q_high", "scale", "q_base", "scale_base", "block_index", "q_res", "scale_res")
                  if hasattr(ca, f)]
        pairs = [(getattr(ca, f), getattr(cb, f)) for f in fields]
        assert getattr(ca, "block", None) == getattr(cb, "block", None)
    for x, y in pairs:
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)  # exact: codes, float64 scales, block lists


def _smooth(rng, k, kind):
    if kind == "none":
        return None
    s = np.exp(rng.uniform(-3, 3, size=k))
    if kind == "ones":
        s[:] = 1.0
    return s


def _hdiag(rng, k):
    h = np.mean(rng.standard_normal((4, k)) ** 2, axis=0)
    h[rng.random(k) < 0.3] = 0.0
    return h


LAYER_KINDS = ("w4a16", "rtn", "smoothquant", "zipper", "zipper-channels", "mosaic")


def _build(kind, lin, smooth, hdiag, backend, p):
    if kind == "w4a16":
        return zqnn.W4A16Linear(lin, group_size=p["group_size"], backend=backend)
    if kind == "rtn":
        return zqnn.W4A4Linear(lin, group_size=p["group_size"], act_group_size=p["act_group"], backend=backend)
    if kind == "smoothquant":
        return zqnn.W4A4Linear(lin, smooth=smooth, group_size=p["group_size"], backend=backend)
    if kind == "zipper":
        return zqnn.ZipperLinear(lin, smooth=smooth, outlier_ratio=p["outlier_ratio"], high_bits=p["high_bits"],
                                 lut_group_size=p["lut_group"], backend=backend)
    if kind == "zipper-channels":
        return zqnn.ZipperLinear(lin, smooth=smooth, channel_fraction=p["channel_fraction"], channel_score="hessian",
                                 hdiag=hdiag, high_bits=p["high_bits"], backend=backend)
    return zqnn.MosaicLinear(lin, hdiag=hdiag, smooth=smooth, density=p["density"], block=p["block"],
                             group_size=p["group_size"], backend=backend)


params = st.fixed_dictionaries({
    "group_size": st.sampled_from([None, 1, 3, 8, 32]),
    "act_group": st.sampled_from([None, 8]),
    "outlier_ratio": st.sampled_from([0.0, 0.01, 0.05, 0.3, 1.0]),
    "high_bits": st.sampled_from([1, 4, 8]),
    "lut_group": st.sampled_from([1, 3, 4, 8]),
    "channel_fraction": st.sampled_from([0.0, 0.1, 0.5]),
    "density": st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    "block": st.sampled_from([(1, 3), (4, 8), (8, 16), (64, 64)]),
})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
@settings(max_examples=25)
@given(w=matrices(max_rows=24, max_cols=70), p=params, seed=st.integers(0, 2**32 - 1),
       smooth_kind=st.sampled_from(["none", "ones", "random"]), bias=st.booleans())
@example(w=np.array([[0.5, 1.5, 2.5, -3.5, 7.0, 0.0]]), p={"group_size": None, "act_group": None,
         "outlier_ratio": 0.2, "high_bits": 4, "lut_group": 4, "channel_fraction": 0.5, "density": 1.0,
         "block": (1, 3)}, seed=0, smooth_kind="none", bias=False)  # every RTN code a tie
def test_a_layer_quantized_on_its_device_is_the_oracle_paths_layer(device, backend, kind, w, p, seed,
                                                                    smooth_kind, bias):
    rng = np.random.default_rng(seed)
    k = w.shape[1]
    smooth = _smooth(rng, k, "random" if kind in ("smoothquant",) and smooth_kind == "none" else smooth_kind)
    hdiag = _hdiag(rng, k)
    lin = _linear(w, bias, device)
    ours = _build(kind, lin, smooth, hdiag, backend, p)
    with through_the_oracle():
        oracle = _build(kind, lin, smooth, hdiag, backend, p)
    _assert_same_layer(ours, oracle)
    x = torch.from_numpy(rng.standard_normal((3, k)).astype(np.float32)).to(device)
    assert torch.equal(ours(x), oracle(x))


TRITON_KINDS = {"w4a16": dict(group_size=None), "rtn": dict(group_size=None, act_group=32),
                "zipper": dict(outlier_ratio=0.05, high_bits=4, lut_group=4),
                "mosaic": dict(density=0.3, block=(64, 64), group_size=64)}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kind", sorted(TRITON_KINDS))
@settings(max_examples=10)
@given(w=matrices(shape=(128, 256)), seed=st.integers(0, 2**32 - 1))
def test_a_triton_layer_packs_the_oracle_paths_codes(kind, w, seed):
    rng = np.random.default_rng(seed)
    p = {"act_group": None, **TRITON_KINDS[kind]}
    lin = _linear(w, False, "cuda")
    smooth = None if kind in ("w4a16", "rtn") else _smooth(rng, 256, "random")
    hdiag = _hdiag(rng, 256)
    ours = _build(kind, lin, smooth, hdiag, "triton", p)
    with through_the_oracle():
        oracle = _build(kind, lin, smooth, hdiag, "triton", p)
    assert ours.stats == oracle.stats
    for a, b in zip(_layout_codes(ours), _layout_codes(oracle), strict=True):
        np.testing.assert_array_equal(a, b)  # exact: packed codes, float32 scales, block lists


def test_the_layer_codes_are_the_oracles_on_the_smoothed_weight():
    # Not through the shim: the codes a layer keeps against the oracle called here directly.
    rng = np.random.default_rng(3)
    w = (rng.standard_t(2.0, size=(40, 96)) * 0.1).astype(np.float32)
    w[5] = 0.0
    s = np.exp(rng.uniform(-2, 2, size=96))
    h = _hdiag(rng, 96)
    ws = w.astype(np.float64) * s
    lin = _linear(w, bias=False)
    rtn = zqnn.W4A4Linear(lin, smooth=s, group_size=32, backend="reference")
    for a, b in zip(rtn.codes, reference.quantize_weights(ws, 4, 32)):
        np.testing.assert_array_equal(a, b)
    zl = zqnn.ZipperLinear(lin, smooth=s, outlier_ratio=0.05, backend="reference")
    zr = reference.zipper_quantize(ws, outlier_ratio=0.05)
    for f in ("q_low", "q_high", "scale"):
        np.testing.assert_array_equal(getattr(zl.codes, f), getattr(zr, f))
    table = reference.lut_stats(reference.build_pattern_lut(zr.q_high))
    assert {key: zl.stats[f"lut_{key}"] for key in table} == table
    ml = zqnn.MosaicLinear(lin, hdiag=h, smooth=s, density=0.3, block=(8, 32), backend="reference")
    mr = reference.mosaic_quantize(ws, h / s**2, density=0.3, block=(8, 32))
    for f in ("q_base", "scale_base", "block_index", "q_res", "scale_res"):
        np.testing.assert_array_equal(getattr(ml.codes, f), getattr(mr, f))


# ------------------------------------------------------------------ a tiny model, end to end

transformers = pytest.importorskip("transformers")

from zqkernels.pipeline import MethodConfig, calibrate, perplexity, quantize_model  # noqa: E402

VOCAB = 96
MODEL_CASES = [
    MethodConfig("w4a16"),
    MethodConfig("rtn-w4a4", act_group_size=32),
    MethodConfig("smoothquant-w4a4", group_size=32, act_group_size=32),
    MethodConfig("zipper", outlier_ratio=0.05, act_group_size=32),
    MethodConfig("zipper", channel_fraction=0.1),
    MethodConfig("mosaic", density=0.3, block=(32, 32), group_size=32, act_group_size=32),
    MethodConfig("hadamard-w4a4", act_group_size=32),
]


@pytest.fixture(scope="module")
def tiny_calibrated():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    stats = calibrate(lm, torch.randint(0, VOCAB, (4, 32), generator=g), progress=False)
    return lm, stats


@pytest.mark.parametrize("cfg", MODEL_CASES, ids=lambda c: c.label)
def test_a_tiny_model_quantizes_to_the_same_records_and_perplexity(tiny_calibrated, cfg):
    lm, stats = tiny_calibrated
    ours, oracle = copy.deepcopy(lm), copy.deepcopy(lm)
    recs = quantize_model(ours, stats, cfg, backend="torch", progress=False)
    with through_the_oracle():
        oracle_recs = quantize_model(oracle, stats, cfg, backend="torch", progress=False)
    assert recs == oracle_recs  # bits, table statistics, per-layer output error: all equal
    text = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    assert perplexity(ours, text, progress=False) == perplexity(oracle, text, progress=False)
