"""The pipeline on tiny seeded random LLaMA and Qwen3 models (built in-test with transformers, CPU):
the fp16 path leaves the model bit-identical, every quantized layer equals the oracle's product
within float32 rounding, calibration statistics are what the hooks saw, shared inputs share one
smoothing vector, perplexity is exp(mean NLL)."""
import copy
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import reference  # noqa: E402
from zqkernels import nn as zqnn  # noqa: E402
from zqkernels.pipeline import (  # noqa: E402
    MethodConfig,
    calibrate,
    decoder_linears,
    perplexity,
    quantize_model,
    shared_input_groups,
    speed,
    summarize_layers,
)
from zqkernels.pipeline.model import check_architecture, resolve_source  # noqa: E402

VOCAB = 96
# torch backend (float32 matmul on the oracle's codes) vs the oracle's float64 product, relative
# Frobenius error of one layer's output.
LAYER_RTOL = 2e-5
# whole model, torch backend vs reference backend: the per-layer float32 rounding compounds over
# 2 decoder layers; relative error of the logits.
MODEL_RTOL = 1e-3


def tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_qwen3(seed=0):
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=128)
    torch.manual_seed(seed)
    return transformers.Qwen3ForCausalLM(cfg).eval()


MODELS = {"llama": tiny_llama, "qwen3": tiny_qwen3}


def windows(n=4, t=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, t), generator=g)


@pytest.fixture(params=sorted(MODELS), scope="module")
def calibrated(request):
    lm = MODELS[request.param]()
    stats = calibrate(lm, windows(), progress=False)
    return lm, stats


def test_decoder_linears_are_all_seven_per_layer(calibrated):
    lm, stats = calibrated
    names = [n for n, *_ in decoder_linears(lm)]
    assert len(names) == 2 * 7
    assert set(stats) == set(names)


def test_calibration_stats_are_what_the_layer_saw(calibrated):
    lm, stats = calibrated
    seen = []
    mod = lm.model.layers[1].mlp.down_proj
    h = mod.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().reshape(-1, mod.in_features)))
    with torch.no_grad():
        for w in windows():
            lm(w[None], use_cache=False)
    h.remove()
    x = torch.cat(seen).double()
    st = stats["layers.1.mlp.down_proj"]
    assert np.allclose(st.absmax, x.abs().amax(0).numpy(), rtol=1e-6)
    assert np.allclose(st.hdiag, (x * x).mean(0).numpy(), rtol=1e-5)
    assert st.count == x.shape[0]


def test_shared_inputs_share_statistics_and_smoothing(calibrated):
    lm, stats = calibrated
    assert stats["layers.0.self_attn.q_proj"] is stats["layers.0.self_attn.v_proj"]
    assert stats["layers.0.mlp.gate_proj"] is stats["layers.0.mlp.up_proj"]
    assert stats["layers.0.mlp.up_proj"] is not stats["layers.0.mlp.down_proj"]
    q = copy.deepcopy(lm)
    quantize_model(q, stats, MethodConfig("zipper", alpha=0.5), progress=False)
    attn, mlp = q.model.layers[0].self_attn, q.model.layers[0].mlp
    assert np.array_equal(attn.q_proj.smooth, attn.k_proj.smooth)
    assert np.array_equal(attn.q_proj.smooth, attn.v_proj.smooth)
    assert np.array_equal(mlp.gate_proj.smooth, mlp.up_proj.smooth)
    assert not np.array_equal(mlp.gate_proj.smooth[: mlp.down_proj.smooth.size], mlp.down_proj.smooth[:64])
    # the shared s uses the column absmax over q, k and v together
    group = shared_input_groups(lm)[0]
    lin = {n: m for n, m, *_ in decoder_linears(lm)}
    w_absmax = np.max([lin[n].weight.detach().abs().amax(0).double().numpy() for n in group], axis=0)
    expect = reference.smooth_scales(stats[group[0]].absmax, w_absmax, alpha=0.5)
    assert np.array_equal(attn.q_proj.smooth, expect)


def test_fp16_path_is_forward_identical(calibrated):
    lm, stats = calibrated
    x = windows(2, 24, seed=5)
    with torch.no_grad():
        before = lm(x).logits.clone()
    q = copy.deepcopy(lm)
    recs = quantize_model(q, stats, MethodConfig("fp16"), progress=False)
    with torch.no_grad():
        after = q(x).logits
    assert torch.equal(before, after)
    assert all(r["effective_bits"]["total"] == 16.0 for r in recs)


ORACLE_CASES = [
    MethodConfig("w4a16"),
    MethodConfig("rtn-w4a4"),
    MethodConfig("smoothquant-w4a4", act_group_size=32),
    MethodConfig("zipper", outlier_ratio=0.05, act_group_size=32),
    MethodConfig("zipper", act_bits=8),
    MethodConfig("mosaic", density=0.25, block=(32, 32), alpha=0.5),
]


@pytest.mark.parametrize("cfg", ORACLE_CASES, ids=lambda c: c.label)
def test_every_quantized_layer_equals_the_oracle_product(calibrated, cfg):
    lm, stats = calibrated
    q = copy.deepcopy(lm)
    recs = quantize_model(q, stats, cfg, backend="torch", progress=False)
    ref = copy.deepcopy(lm)
    quantize_model(ref, stats, cfg, backend="reference", progress=False)
    qmods = {n: m for n, m, *_ in _all_linears(q)}
    rmods = {n: m for n, m, *_ in _all_linears(ref)}
    for name, mod in qmods.items():
        assert isinstance(mod, zqnn.QuantLinear) and mod.method == cfg.method, name
        x = stats[name].sample_rows()
        assert _rel(mod(x), rmods[name](x)) <= LAYER_RTOL, name
    assert {r["name"] for r in recs} == set(qmods)
    assert all(0.0 <= r["rel_error"] < 1.0 for r in recs)
    x = windows(1, 24, seed=7)
    with torch.no_grad():
        assert _rel(q(x).logits, ref(x).logits) <= MODEL_RTOL


def _all_linears(lm):
    out = []
    for i, layer in enumerate(lm.model.layers):
        for blk, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                           ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for a in names:
                out.append((f"layers.{i}.{blk}.{a}", getattr(getattr(layer, blk), a)))
    return out


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def test_summary_weights_bits_by_layer_size(calibrated):
    lm, stats = calibrated
    recs = quantize_model(copy.deepcopy(lm), stats, MethodConfig("zipper", outlier_ratio=0.05), progress=False)
    s = summarize_layers(recs)
    nk = np.array([r["N"] * r["K"] for r in recs])
    bits = np.array([r["effective_bits"]["total"] for r in recs])
    assert s["effective_bits"] == pytest.approx((nk * bits).sum() / nk.sum())
    assert s["lut_E"] == sum(r["lut_E"] for r in recs) and s["lut_U"] == sum(r["lut_U"] for r in recs)
    assert 4.0 < s["effective_bits"] < 16.0


def test_perplexity_is_exp_mean_nll(calibrated):
    lm, _ = calibrated
    w = windows(3, 20, seed=3)
    ppl, n = perplexity(lm, w, progress=False)
    with torch.no_grad():
        losses = [lm(x[None], labels=x[None]).loss.item() for x in w]  # each window: 19 predictions
    assert n == 3 * 19
    assert ppl == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)


def test_speed_reports_positive_rates(calibrated):
    lm, _ = calibrated
    s = speed(lm, windows(1, 16)[0], decode_tokens=4, repeats=1)
    assert s["prefill_tokens"] == 16 and s["decode_tokens"] == 4
    assert s["prefill_tokens_per_s"] > 0 and s["decode_tokens_per_s"] > 0


def test_unsupported_architecture_is_refused(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        check_architecture(resolve_source(str(tmp_path)))


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a config.json"):
        resolve_source(str(tmp_path / "empty"))


def test_method_backend_pair_refused_before_work():
    with pytest.raises(ValueError, match="no 'hybrid' backend"):
        MethodConfig("mosaic").check_backend("hybrid")
    with pytest.raises(ValueError, match="unknown method"):
        MethodConfig("gptq")
