"""Fused decoder linears (zqkernels.pipeline.fusion): q/k/v as one qkv_proj and gate/up as one
gate_up_proj give the model's logits (LLaMA, Qwen2 with its q/k/v biases, Qwen3 with its q/k
norms), run each fused linear once per input, are what quantization and calibration see, quantize
to the parts' codes stacked, and are refused where a module is not what the fusion assumes."""
import copy
import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from zqkernels.pipeline import calibrate, cli, decoder_linears, shared_input_groups  # noqa: E402
from zqkernels.pipeline.fusion import GatedMLP, OutputSlice, fuse_linears  # noqa: E402
from zqkernels.pipeline.quantize import MethodConfig, quantize_model  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)


def _model(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "llama":
        cfg, cls = transformers.LlamaConfig(**COMMON), transformers.LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = transformers.Qwen2Config(**COMMON), transformers.Qwen2ForCausalLM
    else:
        cfg, cls = transformers.Qwen3Config(head_dim=16, **COMMON), transformers.Qwen3ForCausalLM
    lm = cls(cfg).eval()
    with torch.no_grad():  # biases are zero at init: make them count
        for m in lm.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_()
    return lm


def _ids(t=12):
    return torch.randint(0, COMMON["vocab_size"], (2, t), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_the_fused_model_gives_the_models_logits(kind):
    lm = _model(kind)
    if kind == "qwen2":
        assert lm.model.layers[0].self_attn.q_proj.bias is not None
    ids = _ids()
    with torch.no_grad():
        want = lm(ids).logits
        want_step = lm(ids[:, :1], use_cache=True).logits
    count, _ = fuse_linears(lm)
    assert count == 4
    layer = lm.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, OutputSlice) and isinstance(layer.mlp, GatedMLP)
    with torch.no_grad():
        got = lm(ids).logits
        got_step = lm(ids[:, :1], use_cache=True).logits
    # float32: the fused GEMM may sum each output in another order (a few ulps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_step, want_step, rtol=1e-5, atol=1e-5)


def test_quantization_and_calibration_see_the_fused_linears():
    lm = _model("llama")
    stats = calibrate(lm, _ids(16), progress=False)
    count, fstats = fuse_linears(lm, stats)
    names = [n for n, *_ in decoder_linears(lm)]
    assert names == [f"layers.{i}.{b}.{a}" for i in range(2)
                     for b, a in (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"),
                                  ("mlp", "down_proj"))]
    assert shared_input_groups(lm)[:4] == [("layers.0.self_attn.qkv_proj",), ("layers.0.self_attn.o_proj",),
                                          ("layers.0.mlp.gate_up_proj",), ("layers.0.mlp.down_proj",)]
    assert fstats["layers.1.mlp.gate_up_proj"] is stats["layers.1.mlp.gate_proj"]
    assert "layers.1.mlp.gate_up_proj" not in stats  # the caller's mapping is left as it was
    assert fuse_linears(lm, stats)[0] == count  # a fused model is left as it is
    assert [n for n, *_ in decoder_linears(lm)] == names
    again = calibrate(lm, _ids(16), progress=False)  # the fused model calibrates on the same inputs
    assert (again["layers.0.self_attn.qkv_proj"].absmax == stats["layers.0.self_attn.q_proj"].absmax).all()
    with pytest.raises(ValueError, match="calibrate the model before fusing"):
        fuse_linears(_model("llama"), {})


@pytest.mark.parametrize("method", ["rtn-w4a4", "smoothquant-w4a4", "w4a16"])
def test_a_fused_layer_quantizes_to_the_parts_codes_stacked(method):
    lm = _model("llama")
    stats = calibrate(lm, _ids(16), progress=False)
    fused = copy.deepcopy(lm)
    _, fstats = fuse_linears(fused, stats)
    cfg = MethodConfig(method)
    quantize_model(lm, stats, cfg, progress=False)
    quantize_model(fused, fstats, cfg, progress=False)
    for i in range(2):
        a, f = lm.model.layers[i], fused.model.layers[i]
        parts = torch.cat([getattr(a.self_attn, p).w_deq_t for p in ("q_proj", "k_proj", "v_proj")], dim=1)
        assert torch.equal(f.self_attn.qkv_proj.w_deq_t, parts)  # exact: per-channel codes, one smoothing vector
        parts = torch.cat([a.mlp.gate_proj.w_deq_t, a.mlp.up_proj.w_deq_t], dim=1)
        assert torch.equal(f.mlp.gate_up_proj.w_deq_t, parts)  # exact
    with torch.no_grad():
        torch.testing.assert_close(fused(_ids()).logits, lm(_ids()).logits, rtol=1e-4, atol=1e-4)  # float32 sums


def test_each_input_runs_the_fused_linear_once():
    lm = _model("llama")
    fuse_linears(lm)
    attn = lm.model.layers[0].self_attn
    calls = []
    attn.qkv_proj.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        lm(_ids())
        assert len(calls) == 1
        x = torch.randn(3, 64)
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        assert len(calls) == 2 and q.shape == (3, 64) and k.shape == v.shape == (3, 32)
        torch.testing.assert_close(torch.cat([q, k, v], dim=1), attn.qkv_proj(x))
        calls.clear()
        attn.q_proj(x)
        x.add_(1.0)  # the same tensor changed in place: run again
        k2 = attn.k_proj(x)
        attn.k_proj(x)  # a slice asked twice: run again
        y = torch.randn(3, 64)
        attn.q_proj(y)  # another input
        assert len(calls) == 4
        torch.testing.assert_close(k2, attn.qkv_proj(x)[:, 64:96])


def test_a_fused_model_is_freed_when_dropped_and_its_copy_runs_its_own_weights():
    import gc
    import weakref

    lm = _model("llama")
    fuse_linears(lm)
    ids = _ids()
    twin = copy.deepcopy(lm)
    with torch.no_grad():
        want = lm(ids).logits
        torch.testing.assert_close(twin(ids).logits, want, rtol=0, atol=0)
        twin.model.layers[0].self_attn.qkv_proj.weight.mul_(2.0)  # the copy's slices read the copy's fused weight
        assert not torch.equal(twin(ids).logits, want)
        torch.testing.assert_close(lm(ids).logits, want, rtol=0, atol=0)
    # no reference cycle through the slices: with the cycle collector off, dropping the model frees its
    # attention modules (on a GPU, their weights), as it does an unfused model's
    attn = weakref.ref(lm.model.layers[0].self_attn)
    weight = weakref.ref(lm.model.layers[0].self_attn.qkv_proj.weight)
    gc.disable()
    try:
        del lm
        assert attn() is None and weight() is None
    finally:
        gc.enable()


def test_modules_the_fusion_does_not_know_are_refused():
    lm = _model("llama")
    lm.model.layers[1].mlp.act_fn = nn.GELU()
    with pytest.raises(ValueError, match="only SiLU MLPs"):
        fuse_linears(lm)

    class LlamaMLP(nn.Module):  # the class name of a fusable MLP, another forward
        def __init__(self, mlp):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))  # gate and up swapped

    lm = _model("llama")
    lm.model.layers[0].mlp = LlamaMLP(lm.model.layers[0].mlp)
    with pytest.raises(ValueError, match="does not reproduce"):
        fuse_linears(lm)
    lm = _model("llama")
    lm.model.layers[0].self_attn.k_proj = nn.Identity()
    with pytest.raises(ValueError, match="must be nn.Linear"):
        fuse_linears(lm)
    with pytest.raises(ValueError, match="no model.layers"):
        fuse_linears(nn.Linear(2, 2))


def test_bench_with_fused_linears_records_them(tiny_named, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--model", tiny_named, "--layers", "1", "--method", "fp16", "--method", "rtn-w4a4",
                   "--method", "fp8-rowwise", "--linears", "fused", "--out", str(out), "--prefill-tokens", "8",
                   "--decode-tokens", "2", "--context", "32", "--calib-tokens", "64", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    recs = json.loads(out.read_text())
    assert [r["linears"] for r in recs] == ["fused"] * 3 and [r["fused_linears"] for r in recs] == [2] * 3
    assert [len(r["layer_stats"]) for r in recs] == [4] * 3
    assert recs[1]["layer_stats"][0]["name"].endswith("qkv_proj") and recs[1]["layer_stats"][0]["N"] == 128 + 2 * 64


def test_only_a_w4a4_layer_on_the_gpu_takes_the_gated_input():
    from zqkernels import nn as zqnn

    layer = zqnn.W4A4Linear(nn.Linear(64, 32), backend="torch")
    assert not layer.takes_gated_input(torch.float16)
    with pytest.raises(ValueError, match="forward_silu_mul needs the triton backend"):
        layer.forward_silu_mul(torch.randn(2, 128))
    mlp = GatedMLP(nn.Linear(64, 128), layer, nn.SiLU())  # the torch product then
    h = torch.randn(3, 64)
    g, u = mlp.gate_up_proj(h).split(64, dim=-1)
    assert torch.equal(mlp(h), layer(nn.functional.silu(g) * u))  # exact: the same ops
    with pytest.raises(ValueError, match="SiLU MLP"):
        GatedMLP(nn.Linear(64, 256), layer, nn.GELU())
