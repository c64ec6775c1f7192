"""Named random-weight configurations (zqkernels.pipeline.synthetic): the 8B models are built on
the meta device (no weight allocated) and checked against perf/shapes.py's dimensions, layer by
layer; `layers` cuts them and is refused outside [1, all]; a seeded build is reproducible."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from zqkernels.pipeline import synthetic  # noqa: E402
from zqkernels.pipeline.checkout import perf_module  # noqa: E402
from zqkernels.pipeline.model import decoder_linears  # noqa: E402

SHAPES = perf_module("shapes", "tests")
# The published totals (embeddings and head included): LLaMA-3-8B 8.03 B, Qwen3-8B 8.19 B.
PARAMS = {"llama3-8b": 8_030_261_248, "qwen3-8b": 8_190_735_360}


@pytest.mark.parametrize("name", ["llama3-8b", "qwen3-8b"])
def test_the_named_model_has_every_shape_of_perf_shapes(name):
    d = SHAPES.MODELS[name]
    lm = synthetic.build(name, device="meta")
    assert type(lm).__name__ == ("LlamaForCausalLM" if name == "llama3-8b" else "Qwen3ForCausalLM")
    assert len(lm.model.layers) == d.layers and lm.dtype == torch.float16
    assert lm.get_input_embeddings().weight.shape == (d.vocab, d.hidden)
    assert lm.lm_head.weight.shape == (d.vocab, d.hidden) and not lm.config.tie_word_embeddings
    q, kv = d.q_heads * d.head_dim, d.kv_heads * d.head_dim
    want = {"q_proj": (q, d.hidden), "k_proj": (kv, d.hidden), "v_proj": (kv, d.hidden), "o_proj": (d.hidden, q),
            "gate_proj": (d.mlp, d.hidden), "up_proj": (d.mlp, d.hidden), "down_proj": (d.hidden, d.mlp)}
    linears = decoder_linears(lm)
    assert len(linears) == 7 * d.layers
    for name_, mod, *_ in linears:
        assert tuple(mod.weight.shape) == want[name_.rsplit(".", 1)[1]], name_
        assert mod.bias is None
    # the layer shapes the GEMM benchmarks time are the ones of this model
    by_layer = {s.layer: (s.n, s.k) for s in d.layer_shapes()}
    assert by_layer["q"] == want["q_proj"] and by_layer["kv"] == want["k_proj"] and by_layer["down"] == want["down_proj"]
    assert sum(p.numel() for p in lm.parameters()) == PARAMS[name]
    attn = lm.model.layers[0].self_attn
    assert hasattr(attn, "q_norm") == (name == "qwen3-8b")  # Qwen3's per-head q/k RMSNorm


def test_the_non_shape_fields_are_the_published_ones():
    llama, qwen = synthetic.config("llama3-8b"), synthetic.config("qwen3-8b")
    assert (llama.max_position_embeddings, llama.rms_norm_eps) == (8192, 1e-5)
    assert (qwen.max_position_embeddings, qwen.rms_norm_eps) == (40960, 1e-6)
    assert llama.rope_parameters["rope_theta"] == 500000.0 and qwen.rope_parameters["rope_theta"] == 1000000.0


def test_layers_cuts_the_model_and_is_refused_outside_its_range():
    lm = synthetic.build("qwen3-8b", layers=3, device="meta")
    assert len(lm.model.layers) == 3 == lm.config.num_hidden_layers
    assert synthetic.check_layers("llama3-8b", None) == 32
    for bad in (0, 33, -1, True, 2.0, "4"):
        with pytest.raises(ValueError, match=r"layers must be an integer in \[1, 32\]"):
            synthetic.config("llama3-8b", bad)


def test_unknown_names_and_dtypes_are_refused():
    with pytest.raises(ValueError, match="llama3-8b"):
        synthetic.config("llama3-70b")
    with pytest.raises(ValueError, match="dtype"):
        synthetic.build("llama3-8b", layers=1, dtype=torch.int8, device="meta")
    for bad in ((0, 4), (4, 0), (True, 4)):
        with pytest.raises(ValueError, match="count|length"):
            synthetic.random_windows(100, *bad)


def test_a_seeded_build_is_reproducible(tiny_named):
    a = synthetic.build(tiny_named, dtype=torch.float32)
    b = synthetic.build(tiny_named, dtype=torch.float32)
    c = synthetic.build(tiny_named, dtype=torch.float32, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    w = "model.layers.0.mlp.gate_proj.weight"
    assert not torch.equal(sa[w], sc[w])
    assert sa[w].std().item() == pytest.approx(a.config.initializer_range, rel=0.05)  # transformers' own init
    assert torch.equal(synthetic.random_windows(49152, 2, 8, seed=3), synthetic.random_windows(49152, 2, 8, seed=3))


def test_a_device_map_spreads_the_built_model_with_accelerate(tiny_named):
    pytest.importorskip("accelerate")
    lm = synthetic.build(tiny_named, dtype=torch.float32, device_map="sequential")
    ref = synthetic.build(tiny_named, dtype=torch.float32)
    ids = synthetic.random_windows(lm.config.vocab_size, 1, 5)
    with torch.no_grad():
        assert torch.equal(lm(ids).logits, ref(ids).logits)
    with pytest.raises(ValueError, match="device_map"):
        synthetic.dispatch(ref, "everywhere")
