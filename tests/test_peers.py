"""The whole-model peers (zqkernels.pipeline.peers) on the CPU: FP8 rowwise through
perf/bench_baselines.py's operand makers and `torch._scaled_mm`, torch's int4 weight-only format
through its CPU kernel; each layer against float64 arithmetic on its own operands, the shapes and
dtypes their kernels cannot run refused by name, and a whole model swapped and decoded."""
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

transformers = pytest.importorskip("transformers")

import reference  # noqa: E402
from zqkernels.pipeline import calibrate, synthetic  # noqa: E402
from zqkernels.pipeline.checkout import perf_module  # noqa: E402
from zqkernels.pipeline.decode import StaticDecoder  # noqa: E402
from zqkernels.pipeline.peers import INT4_GROUP, Fp8RowwiseLinear, PeerConfig, TorchInt4Linear, quantize_peer  # noqa: E402

B = perf_module("bench_baselines", "tests")
# bf16 output (2^-9 relative) and bf16 / fast accumulation over K, with margin: relative
# Frobenius error against float64 arithmetic on the layer's own operands.
FP8_RTOL = 1e-2
INT4_RTOL = 1e-2
BF16_LOGITS_RTOL = 3e-2
LAYER_ERR = {"fp8-rowwise": 0.06, "torch-int4": 0.15}


def linear(n, k, seed=0, bias=False):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).to(torch.bfloat16)
    return lin


@st.composite
def activations(draw, k):
    m = draw(st.integers(1, 5))
    x = torch.from_numpy(np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal((m, k))).float()
    kind = draw(st.sampled_from(["plain", "zero-row", "outlier"]))
    if kind == "zero-row":
        x[draw(st.integers(0, m - 1))] = 0.0
    elif kind == "outlier":
        x[draw(st.integers(0, m - 1)), draw(st.integers(0, k - 1))] = 1e4
    return x.to(torch.bfloat16)


def rel_err(got, want):
    d = (got.double() - want).norm()
    return (d / want.norm()).item() if want.norm() > 0 else d.item()


FP8_LAYER = Fp8RowwiseLinear(linear(48, 64, bias=True))


@settings(max_examples=30, deadline=None)
@given(x=activations(64))
@example(x=torch.zeros(1, 64, dtype=torch.bfloat16))
def test_fp8_layer_is_the_product_of_its_e4m3_operands(x):
    layer = FP8_LAYER
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (x.shape[0], 48)
    x_codes, x_scale = B.fp8_rowwise_quantize(x)
    want = (x_codes.double() * x_scale.double()) @ (layer.w_codes.double() * layer.w_scale.double().t()).t()
    want = want + layer.bias.double()
    assert rel_err(y, want) <= FP8_RTOL
    assert torch.all(y[x.abs().amax(dim=1) == 0] == layer.bias)  # an all-zero row: the bias alone


INT4_LAYER = TorchInt4Linear(linear(32, 256, seed=1))


@settings(max_examples=30, deadline=None)
@given(x=activations(256))
def test_int4_layer_is_the_oracles_rtn_codes_times_its_bf16_scales(x):
    w = linear(32, 256, seed=1).weight.detach().double().numpy()
    q, scale = reference.quantize_weights(w, bits=4, group_size=INT4_GROUP)
    stored = INT4_LAYER.scales_and_zeros
    assert torch.equal(stored[..., 0], torch.from_numpy(scale.T).to(torch.bfloat16)) and not stored[..., 1].any()
    w_deq = torch.from_numpy(q).double() * stored[..., 0].double().t().repeat_interleave(INT4_GROUP, dim=1)
    y = INT4_LAYER(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, x.double() @ w_deq.t()) <= INT4_RTOL
    assert INT4_LAYER.stats["check_rel_err"] <= INT4_RTOL


def test_peer_layers_refuse_what_their_kernels_cannot_run():
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8RowwiseLinear(linear(48, 40))
    with pytest.raises(ValueError, match="multiple of 128"):
        TorchInt4Linear(linear(32, 192))
    with pytest.raises(ValueError, match="bfloat16"):
        Fp8RowwiseLinear(nn.Linear(64, 48))
    with pytest.raises(ValueError, match="bfloat16"):
        TorchInt4Linear(nn.Linear(256, 32))
    with pytest.raises(ValueError, match="bfloat16 tensor"):
        FP8_LAYER(torch.zeros(2, 64))
    with pytest.raises(ValueError, match="256 features"):
        INT4_LAYER(torch.zeros(2, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="unknown peer"):
        PeerConfig("int8")
    assert PeerConfig("torch-int4").label == "torch-int4-g128" and PeerConfig("fp8-rowwise").dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["fp8-rowwise", "torch-int4"])
def test_a_whole_model_runs_on_the_peer_and_decodes_alike_on_both_caches(tiny_named, method):
    lm = synthetic.build(tiny_named, dtype=torch.bfloat16)
    stats = calibrate(lm, synthetic.random_windows(lm.config.vocab_size, 2, 16), progress=False)
    recs = quantize_peer(lm, stats, PeerConfig(method), progress=False)
    # output error against the float layer on calibration rows: e4m3 (3 mantissa bits) both sides
    # ~4 %; 4-bit RTN of Gaussian weights per group of 128 ~12 %
    assert len(recs) == 14 and all(r["rel_error"] < LAYER_ERR[method] for r in recs)
    assert all(type(m).__name__ in ("Fp8RowwiseLinear", "TorchInt4Linear") for _, m, *_ in _linears(lm))
    ids = synthetic.random_windows(lm.config.vocab_size, 2, 6, seed=4)
    with torch.no_grad():
        want = lm(ids).logits[:, -1].double()
    dec = StaticDecoder(lm, 2, 10)
    got = dec.prefill(ids).double()
    # bf16 activations: the static cache's masked attention and the plain causal one round apart
    # by a few bf16 steps (2^-8 relative), so logits are compared, not argmax tokens
    assert ((got - want).abs().max() / want.abs().max()).item() <= BF16_LOGITS_RTOL
    tokens, _ = dec.greedy(ids, 4)
    assert tokens.shape == (2, 5) and int(dec.pos[0]) == 10


def _linears(lm):
    out = []
    for layer in lm.model.layers:
        for block, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                             (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            out += [(n, getattr(block, n)) for n in names]
    return out
