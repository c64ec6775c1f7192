"""The pipeline on tiny seeded random LLaMA and Qwen3 models (built in-test with transformers, CPU):
the fp16 path leaves the model bit-identical, every quantized layer equals the oracle's product
within float32 rounding, calibration statistics are what the hooks saw, shared inputs share one
smoothing vector, perplexity is exp(mean NLL)."""
import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

import reference  # noqa: E402
from zqkernels import nn as zqnn  # noqa: E402
from zqkernels import rotation  # noqa: E402
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
    MethodConfig("hadamard-w4a4", act_group_size=32),
    MethodConfig("hadamard-w4a4", weight_bits=5, group_size=32, act_bits=8),
    MethodConfig("rtn-w4a4", weight_bits=6, group_size=64, act_group_size=32),
    MethodConfig("smoothquant-w4a4", weight_bits=5, act_group_size=32),
    MethodConfig("act-floor", act_group_size=32),
    MethodConfig("act-floor", alpha=None, rotate=True),
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
        assert getattr(mod, "weight_bits", 4) == (None if cfg.method == "act-floor" else cfg.weight_bits), name
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


def test_rotation_leaves_the_float_layer_unchanged(calibrated):
    """act-floor with rotation and 16-bit activations is the float layer up to float32 rounding."""
    lm, stats = calibrated
    lin = {n: m for n, m, *_ in decoder_linears(lm)}
    for name in ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"):
        x = stats[name].sample_rows()
        k = lin[name].in_features
        rot = rotation.FloatWeightLinear(lin[name], rotation_block=reference.hadamard_block_size(k), act_bits=None)
        assert rot.rotation_block == reference.hadamard_block_size(k) > 1
        with torch.no_grad():
            # float32 weights and matmul against the float64-rotated input: a few float32 ulps.
            assert _rel(rot(x), lin[name](x)) <= 1e-5, name


def test_rotation_flattens_an_outlier_channel():
    """One input channel 50x the rest (its weight column 50x smaller, so every channel matters):
    per-token 4-bit RTN rounds the other channels to zero, the rotated layer spreads the outlier
    over 512 channels and keeps them (the reason the rotation baseline exists)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 32, bias=False)
    x = torch.randn(16, 512)
    x[:, 3] *= 50.0
    with torch.no_grad():
        lin.weight[:, 3] /= 50.0
        ref = lin(x)
        plain = rotation.RTNLinear(lin, act_group_size=None)(x)
        rot = rotation.HadamardW4A4Linear(lin, act_group_size=None)(x)
    assert _rel(rot, ref) < 0.5 * _rel(plain, ref)


def test_bits_per_weight_of_the_equal_bits_baselines(calibrated):
    lm, stats = calibrated
    lin = lm.model.layers[0].mlp.down_proj  # K = 128
    n, k = lin.out_features, lin.in_features
    assert rotation.RTNLinear(lin, weight_bits=6, group_size=32).stats["effective_bits"]["total"] == 6 + 16 / 32
    assert rotation.HadamardW4A4Linear(lin).stats["effective_bits"]["total"] == 4 + 16 / k
    assert rotation.FloatWeightLinear(lin).stats["effective_bits"]["total"] == 16.0
    assert n * k > 0


def test_new_methods_refuse_what_they_cannot_run():
    with pytest.raises(ValueError, match="no 'triton' backend"):
        MethodConfig("hadamard-w4a4").check_backend("triton")
    with pytest.raises(ValueError, match="weight_bits=6 runs on the torch and reference backends only"):
        MethodConfig("rtn-w4a4", weight_bits=6).check_backend("triton")
    with pytest.raises(ValueError, match="weight_bits applies to"):
        MethodConfig("zipper", weight_bits=5)
    with pytest.raises(ValueError, match="weight_bits must be an integer in \\[2, 8\\]"):
        MethodConfig("rtn-w4a4", weight_bits=9)
    with pytest.raises(ValueError, match="rotate applies to act-floor only"):
        MethodConfig("rtn-w4a4", rotate=True)
    lin = torch.nn.Linear(12, 4)
    with pytest.raises(ValueError, match="rotation_block must be a power of two dividing in_features=12"):
        rotation.FloatWeightLinear(lin, rotation_block=8)


def test_labels_name_every_format():
    assert MethodConfig("rtn-w4a4", weight_bits=6, group_size=32, act_group_size=32).label == "rtn-w6a4-wg32-g32"
    assert MethodConfig("hadamard-w4a4", act_group_size=64).label == "hadamard-w4a4-g64"
    assert MethodConfig("act-floor", act_group_size=32).label == "floor-alpha0.75-w16a4-g32"
    assert MethodConfig("act-floor", alpha=None, rotate=True).label == "floor-nosmooth-had-w16a4"
    assert MethodConfig("zipper", act_group_size=32).label == "zipper-w4a4-g32"
    p = MethodConfig("smoothquant-w4a4", weight_bits=5).params()
    assert p["weight_bits"] == 5 and p["alpha"] == 0.5


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), k=st.integers(1, 70), g=st.sampled_from([1, 3, 4, 8]),
       density=st.sampled_from([0.0, 0.02, 0.3, 1.0]), wide=st.booleans())
def test_compact_lut_bytes_are_a_layout_that_rebuilds_the_table(seed, n, k, g, density, wide):
    """lut_stats counts each index in the smallest unsigned width: a layout in exactly those
    widths (row lengths, entry ids, packed patterns, pattern groups) holds every value and
    rebuilds the CSR, and its byte count is what lut_stats reports."""
    rng = np.random.default_rng(seed)
    hi = 100 if wide else 7
    q = np.where(rng.random((n, k)) < density, rng.integers(-hi, hi + 1, size=(n, k)), 0)
    lut = reference.build_pattern_lut(q, group_size=g)
    st_ = reference.lut_stats(lut)
    u, e = lut.patterns.shape[0], lut.entry_ids.size
    dt = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
    row_len = np.diff(lut.indptr).astype(dt[reference.lut.uint_bytes(np.diff(lut.indptr).max(initial=0))])
    ids = lut.entry_ids.astype(dt[st_["id_bytes"]])
    n_grp = -(-k // g)
    groups = lut.pattern_groups.astype(dt[reference.lut.uint_bytes(max(n_grp - 1, 0))])
    assert np.array_equal(np.concatenate([[0], np.cumsum(row_len, dtype=np.int64)]), lut.indptr)
    assert np.array_equal(ids.astype(np.int64), lut.entry_ids) and np.array_equal(groups, lut.pattern_groups)
    assert np.array_equal(groups[ids.astype(np.int64)], lut.entry_groups)  # entry groups need no storage
    if st_["pattern_bits"] == 4:
        packed = reference.pack_int4(np.pad(lut.patterns.reshape(1, -1), ((0, 0), (0, (u * g) % 2))))
        assert np.array_equal(reference.unpack_int4(packed)[0, : u * g], lut.patterns.reshape(-1))
        pattern_bytes = packed.nbytes
    else:
        pattern_bytes = lut.patterns.nbytes
    assert st_["index_bytes"] == row_len.nbytes + ids.nbytes
    assert st_["pattern_bytes"] == pattern_bytes + groups.nbytes
    assert st_["index_bytes"] <= st_["oracle_index_bytes"]
    assert st_["id_bytes"] == (1 if u <= 256 else 2) and e == int(lut.indptr[-1])


def test_the_three_texts_share_no_passage():
    """Calibration, validation and test are different licence families: at most 1 % of one text's
    12-word runs appear in another (licence boilerplate such as the warranty disclaimer is shared;
    texts of one family, GPL-2 against GPL-3, share whole sections)."""
    from zqkernels.pipeline import text

    def runs(t):
        words = t.split()
        return {" ".join(words[i:i + 12]) for i in range(len(words) - 11)}

    roles = {"calibration": text.calibration_text()[0], "validation": text.evaluation_text(split="validation")[0],
             "test": text.evaluation_text(split="test")[0]}
    sets = {k: runs(v) for k, v in roles.items()}
    names = sorted(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sets[a] & sets[b]
            assert len(shared) <= 0.01 * min(len(sets[a]), len(sets[b])), (a, b, sorted(shared)[:5])
    gpl2 = runs(text._package_text(("gpl2",)))
    assert len(gpl2 & sets["validation"]) > 0.01 * len(gpl2)  # the check sees a shared family
    assert text.text_names()["test"] == text.evaluation_text()[1] == "lice: cc_by_sa"
    assert text.text_names()["validation"] == "lice: gpl3"
    with pytest.raises(ValueError, match="split must be one of validation, test"):
        text.evaluation_text(split="train")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A tiny LLaMA directory with a byte-level BPE tokenizer trained on the calibration text."""
    tokenizers = pytest.importorskip("tokenizers")
    from zqkernels.pipeline import text

    path = tmp_path_factory.mktemp("tiny-llama-grid")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text.calibration_text()[0][:20000]], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(path)
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_grid_runs_every_config_on_the_named_split(tiny_llama_dir, tmp_path):
    import json

    from zqkernels.pipeline import experiment

    grid = {"settings": {"model": str(tiny_llama_dir), "eval_split": "validation", "eval_tokens": 64, "context": 32,
                         "calib_tokens": 64, "calib_context": 32, "progress": False},
            "configs": [{"method": "fp16"}, {"method": "hadamard-w4a4", "act_group_size": 32},
                        {"method": "rtn-w4a4", "weight_bits": 6, "group_size": 32, "act_group_size": 32}]}
    (tmp_path / "g.json").write_text(json.dumps(grid))
    assert experiment.main([str(tmp_path / "g.json"), "--out", str(tmp_path / "r.json"), "--no-progress"]) == 0
    recs = json.loads((tmp_path / "r.json").read_text())
    assert [r["label"] for r in recs] == ["fp16", "hadamard-w4a4-g32", "rtn-w6a4-wg32-g32"]
    for r in recs:
        assert r["eval_split"] == "validation" and r["eval_text"] == "lice: gpl3"
        assert r["texts"] == {"calibration": "lice: apache, mpl, epl, cddl, afl3", "validation": "lice: gpl3",
                              "test": "lice: cc_by_sa"}
        assert r["ppl"] > 1.0 and r["command"].startswith("python -m zqkernels.pipeline.experiment")
    assert recs[2]["effective_bits"] == pytest.approx(6 + 16 / 32)
    (tmp_path / "bad.json").write_text(json.dumps({"settings": {"eval_splitt": "test"}, "configs": [{"method": "fp16"}]}))
    assert experiment.main([str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.json")]) == 2


def test_token_windows_refuse_counts_that_are_not_positive_and_name_the_option():
    """0 or a negative count is an error naming the option, never "the whole text"; None is the
    whole text; a text shorter than one window names the option that chose it."""
    from zqkernels.pipeline import text

    class Tok:
        def __call__(self, s, return_tensors=None, add_special_tokens=False):
            import types

            return types.SimpleNamespace(input_ids=torch.arange(len(s.split()))[None, :])

    words = " ".join(["w"] * 100)
    assert text.token_windows(Tok(), words, 10, None).shape == (10, 10)
    assert text.token_windows(Tok(), words, 10, 35).shape == (3, 10)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="--eval-tokens.*positive integer"):
            text.token_windows(Tok(), words, 10, bad, what="--eval-text / --eval-tokens")
    with pytest.raises(ValueError, match="--calib-text.*fewer than one window of --context 512"):
        text.token_windows(Tok(), words, 512, None, what="--calib-text / --calib-tokens")


def test_channel_structured_zipper_config_is_validated_and_labelled():
    from zqkernels.pipeline.quantize import MethodConfig

    c = MethodConfig("zipper", act_group_size=32, channel_fraction=0.03, channel_score="hessian")
    assert c.label == "zipper-w4a4-ch0.03-hess-g32"
    assert c.params()["channel_fraction"] == 0.03 and "outlier_ratio" not in c.params()
    for bad, match in [(dict(method="mosaic", channel_fraction=0.1), "zipper only"),
                       (dict(method="zipper", channel_fraction=1.5), r"\[0, 1\]"),
                       (dict(method="zipper", channel_fraction=0.1, channel_score="l1"), "channel_score")]:
        with pytest.raises(ValueError, match=match):
            MethodConfig(**bad)
