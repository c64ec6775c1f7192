"""The static-cache decode step (zqkernels.pipeline.decode), run eagerly on a CPU: its greedy
tokens equal transformers' dynamic-cache decode for any prompt, batch and length, on LLaMA and
Qwen3 and with quantized layers; the cache's own write position moves in step with the decoder's;
a full cache, a missing prefill and a CPU graph capture are refused; and `speed()` reports the
eager decode on a CPU, and runs its CUDA-graph branch's bookkeeping when the capture is stood in
for by the eager step (the capture itself needs a GPU)."""
import copy

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from zqkernels.pipeline import MethodConfig, calibrate, evaluate, quantize_model, speed  # noqa: E402
from zqkernels.pipeline import decode  # noqa: E402
from zqkernels.pipeline.decode import GraphDecoder, StaticDecoder, dynamic_greedy  # noqa: E402

VOCAB = 96
# float64 throughout: the static path's padded, masked keys and the dynamic path's exact-length
# keys sum the same terms in another order, so logits agree to float64 rounding (and the eager
# attention's float32 softmax); a greedy token could only differ at an exact tie.
LOGITS_ATOL = {"sdpa": 1e-12, "eager": 1e-6}


def tiny(kind="llama", attn="sdpa", layers=2, seed=0):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    cfg = (transformers.LlamaConfig if kind == "llama" else transformers.Qwen3Config)(**common)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.Qwen3ForCausalLM
    return cls(cfg).eval().double()


MODELS = {(k, a): tiny(k, a) for k in ("llama", "qwen3") for a in ("sdpa", "eager")}


def prompts(batch, t, seed=0):
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


@st.composite
def decode_cases(draw):
    batch = draw(st.integers(1, 3))
    t = draw(st.integers(1, 9))
    kind = draw(st.sampled_from(["repeat-one-token", "distinct", "identical-rows"]))
    if kind == "repeat-one-token":  # every position the same token: ties in the attention scores
        ids = torch.full((batch, t), draw(st.integers(0, VOCAB - 1)), dtype=torch.long)
    elif kind == "identical-rows":
        ids = prompts(1, t, draw(st.integers(0, 99))).expand(batch, t).contiguous()
    else:
        ids = prompts(batch, t, draw(st.integers(0, 99)))
    return ids, draw(st.integers(1, 6)), draw(st.sampled_from(sorted(MODELS)))


@settings(max_examples=25, deadline=None)
@given(case=decode_cases())
@example(case=(torch.tensor([[5]]), 3, ("llama", "sdpa")))  # a one-token prompt (M = 1 prefill)
@example(case=(torch.zeros(2, 4, dtype=torch.long), 6, ("qwen3", "eager")))
def test_static_step_tokens_equal_the_dynamic_cache_decode(case):
    ids, steps, key = case
    lm = MODELS[key]
    want, want_first = dynamic_greedy(lm, ids, steps)
    dec = StaticDecoder(lm, ids.shape[0], ids.shape[1] + steps + 2)  # two spare slots: masked, never read
    got, got_first = dec.greedy(ids, steps)
    assert torch.equal(got, want)
    assert torch.allclose(got_first, want_first, rtol=0, atol=LOGITS_ATOL[key[1]])


def test_the_cache_write_position_moves_with_the_decoders():
    lm = MODELS[("llama", "sdpa")]
    dec = StaticDecoder(lm, 2, 12)
    dec.prefill(prompts(2, 5))
    for i in range(4):
        dec.step()
        assert int(dec.pos[0]) == 5 + i + 1
        assert all(int(layer.cumulative_length) == 5 + i + 1 for layer in dec.cache.layers)
    # a second prefill resets both, in place (a captured graph keeps pointing at the same tensors)
    keys = dec.cache.layers[0].keys
    dec.prefill(prompts(2, 3, seed=1))
    assert dec.cache.layers[0].keys is keys and int(dec.cache.layers[0].cumulative_length) == 3 == int(dec.pos[1])


def test_quantized_layers_decode_the_same_on_both_caches():
    lm = tiny("llama", layers=1).float()
    stats = calibrate(lm, prompts(2, 16), progress=False)
    q = copy.deepcopy(lm)
    quantize_model(q, stats, MethodConfig("zipper", outlier_ratio=0.05, act_group_size=32), progress=False)
    ids = prompts(2, 6, seed=3)
    want, _ = dynamic_greedy(q, ids, 5)
    got, _ = StaticDecoder(q, 2, 11).greedy(ids, 5)
    assert torch.equal(got, want)


def test_a_full_cache_and_a_missing_prefill_are_refused():
    lm = MODELS[("llama", "sdpa")]
    dec = StaticDecoder(lm, 1, 6)
    with pytest.raises(ValueError, match="prefill"):
        dec.step()
    dec.prefill(prompts(1, 4))
    dec.step()
    dec.step()
    with pytest.raises(ValueError, match="full"):
        dec.step()
    with pytest.raises(ValueError, match="no room"):
        dec.prefill(prompts(1, 6))
    with pytest.raises(ValueError, match=r"\[1, T >= 1\]"):
        dec.prefill(prompts(2, 3))
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="batch"):
            StaticDecoder(lm, bad, 8)


def test_capture_needs_a_cuda_device():
    dec = StaticDecoder(MODELS[("llama", "sdpa")], 1, 8)
    dec.prefill(prompts(1, 3))
    with pytest.raises(ValueError, match="CUDA"):
        GraphDecoder(dec)


def test_a_cache_without_an_on_device_write_position_is_refused(monkeypatch):
    from transformers import StaticCache

    real = StaticCache.__init__

    def old_style(self, *args, **kwargs):
        real(self, *args, **kwargs)
        for layer in self.layers:
            layer.cumulative_length = 0  # a host integer, as a cache that cannot be replayed keeps it

    monkeypatch.setattr(StaticCache, "__init__", old_style)
    with pytest.raises(ValueError, match="cumulative_length"):
        StaticDecoder(MODELS[("llama", "sdpa")], 1, 8)


def test_speed_on_a_cpu_times_the_eager_decode_and_says_so():
    lm = MODELS[("qwen3", "sdpa")]
    s = speed(lm, prompts(1, 8)[0], decode_tokens=3, repeats=1, batch=2)
    assert s["decode_mode"] == "eager" and "CUDA" in s["decode_mode_reason"]
    assert s["batch"] == 2 and s["prefill_tokens"] == 8 and s["decode_tokens"] == 3
    assert s["decode_tokens_per_s"] == s["decode_tokens_per_s_eager"] > 0
    assert s["prefill_tokens_per_s"] == s["prefill_tokens_per_s_eager"] > 0 and "prefill_tokens_per_s_graph" not in s
    assert s["prefill_mode"] == "eager" and "CUDA" in s["prefill_mode_reason"]
    assert "peak_memory_bytes" not in s  # measured on GPUs only
    with pytest.raises(ValueError, match="batch=3"):
        speed(lm, prompts(2, 8), decode_tokens=1, repeats=1, batch=3)
    with pytest.raises(ValueError, match="cuda-graph"):
        speed(lm, prompts(1, 8)[0], decode_tokens=1, repeats=1, decode_mode="cuda-graph")
    with pytest.raises(ValueError, match="decode_mode"):
        speed(lm, prompts(1, 8)[0], decode_tokens=1, repeats=1, decode_mode="graph")
    with pytest.raises(ValueError, match="graph_errors"):
        speed(lm, prompts(1, 8)[0], decode_tokens=1, repeats=1, graph_errors="ignore")


class EagerStandIn:
    """The interface of GraphDecoder with the step run eagerly: lets the CPU reach speed()'s
    CUDA-graph branch (everything but the capture and the replay's kernels)."""

    def __init__(self, decoder, warmup=2):
        if decoder.steps_left < warmup:  # what GraphDecoder refuses
            raise ValueError("fewer free positions than warm-up steps")
        self.decoder = decoder
        for _ in range(warmup):
            decoder.step()

    def replay(self):
        self.logits = self.decoder.step()

    def greedy(self, ids, steps):
        return self.decoder.greedy(ids, steps)


class EagerPrefillStandIn:
    """The interface of GraphPrefill with the forward run eagerly at each replay."""

    def __init__(self, lm, ids, warmup=2):
        self.lm, self.ids, self.calls = lm, ids, 0
        self.eager_logits = self._forward()
        self.released = False

    def _forward(self):
        with torch.no_grad():
            return self.lm(input_ids=self.ids, use_cache=True, logits_to_keep=1).logits[:, -1, :]

    def replay(self):
        self.calls += 1
        self.logits = self._forward()

    def release(self):
        self.released = True


def test_speeds_graph_branch_records_the_token_checks(monkeypatch):
    monkeypatch.setattr(evaluate, "_decode_mode", lambda requested, devices: ("cuda-graph", None))
    monkeypatch.setattr(decode, "GraphDecoder", EagerStandIn)
    made = []
    monkeypatch.setattr(decode, "GraphPrefill", lambda *a, **k: made.append(EagerPrefillStandIn(*a, **k)) or made[-1])
    lm = MODELS[("llama", "sdpa")]
    s = speed(lm, prompts(2, 6), decode_tokens=4, repeats=2, batch=2)
    assert s["prefill_tokens_per_s_graph"] > 0 and s["prefill_tokens_per_s_eager"] > 0
    assert s["prefill_tokens_per_s_graph"] != s["prefill_tokens_per_s_eager"]  # timed separately, not copied
    faster = max(s["prefill_tokens_per_s_graph"], s["prefill_tokens_per_s_eager"])
    assert s["prefill_tokens_per_s"] == faster
    assert s["prefill_mode"] == ("cuda-graph" if faster == s["prefill_tokens_per_s_graph"] else "eager")
    assert made[0].calls == 2 and made[0].released  # one replay a repeat; the pool freed before the decode
    assert s["graph_prefill_logits_equal_eager"] is True and s["graph_prefill_logits_rel_diff_eager"] == 0.0
    assert s["decode_mode"] == "cuda-graph" and s["decode_tokens_per_s"] > 0
    assert s["graph_tokens_equal_static_eager"] is True and s["graph_tokens_equal_dynamic_eager"] is True
    assert s["graph_first_divergence_from_dynamic_eager"] is None
    assert s["graph_first_step_logits_rel_diff_static_eager"] == 0.0
    assert s["graph_first_step_logits_rel_diff_dynamic_eager"] < 1e-12


@pytest.mark.parametrize("graph_faster", [True, False])
def test_the_faster_prefill_with_equal_logits_is_the_figure(monkeypatch, graph_faster):
    monkeypatch.setattr(evaluate, "_decode_mode", lambda requested, devices: ("cuda-graph", None))
    monkeypatch.setattr(decode, "GraphDecoder", EagerStandIn)
    monkeypatch.setattr(decode, "GraphPrefill", EagerPrefillStandIn)
    graph = 1e12 if graph_faster else 1e-3  # tokens/s: beyond / below any eager prefill
    monkeypatch.setattr(evaluate, "_graph_prefill", lambda lm, ids, repeats, devices: {
        "prefill_tokens_per_s_graph": graph, "graph_prefill_logits_equal_eager": True,
        "graph_prefill_logits_rel_diff_eager": 0.0})
    s = speed(MODELS[("llama", "sdpa")], prompts(1, 6)[0], decode_tokens=2, repeats=1)
    if graph_faster:
        assert s["prefill_mode"] == "cuda-graph" and s["prefill_tokens_per_s"] == graph
    else:
        assert s["prefill_mode"] == "eager" and "faster" in s["prefill_mode_reason"]
        assert s["prefill_tokens_per_s"] == s["prefill_tokens_per_s_eager"] > graph


def test_a_graph_prefill_whose_logits_differ_is_not_the_headline(monkeypatch):
    class Differs(EagerPrefillStandIn):
        def replay(self):
            super().replay()
            self.logits = self.logits * (1 + 1e-3)

    monkeypatch.setattr(evaluate, "_decode_mode", lambda requested, devices: ("cuda-graph", None))
    monkeypatch.setattr(decode, "GraphDecoder", EagerStandIn)
    monkeypatch.setattr(decode, "GraphPrefill", Differs)
    s = speed(MODELS[("llama", "sdpa")], prompts(1, 6)[0], decode_tokens=2, repeats=1)
    assert s["graph_prefill_logits_equal_eager"] is False and s["graph_prefill_logits_rel_diff_eager"] > 0
    assert s["prefill_mode"] == "eager" and s["prefill_tokens_per_s"] == s["prefill_tokens_per_s_eager"]
    assert "differ" in s["prefill_mode_reason"] and s["prefill_tokens_per_s_graph"] > 0


def test_a_failed_graph_decode_is_raised_or_recorded(monkeypatch):
    class Broken:
        def __init__(self, decoder, warmup=2):
            raise RuntimeError("CUDA-graph capture of the decode step failed (a host sync)")

    monkeypatch.setattr(evaluate, "_decode_mode", lambda requested, devices: ("cuda-graph", None))
    monkeypatch.setattr(decode, "GraphDecoder", Broken)
    monkeypatch.setattr(decode, "GraphPrefill", EagerPrefillStandIn)
    lm = MODELS[("llama", "sdpa")]
    with pytest.raises(RuntimeError, match="host sync"):
        speed(lm, prompts(1, 6)[0], decode_tokens=2, repeats=1)
    s = speed(lm, prompts(1, 6)[0], decode_tokens=2, repeats=1, graph_errors="record")
    assert s["decode_mode"] == "eager" and "host sync" in s["graph_error"] and "test_decode.py" in s["graph_traceback"]
    assert s["decode_tokens_per_s"] == s["decode_tokens_per_s_eager"]
    assert s["prefill_tokens_per_s_graph"] > 0  # the prefill's graph worked


def test_a_failed_graph_prefill_is_raised_or_recorded(monkeypatch):
    class Broken:
        def __init__(self, lm, ids, warmup=2):
            raise RuntimeError("CUDA-graph capture of the prefill failed (a host sync)")

    monkeypatch.setattr(evaluate, "_decode_mode", lambda requested, devices: ("cuda-graph", None))
    monkeypatch.setattr(decode, "GraphDecoder", EagerStandIn)
    monkeypatch.setattr(decode, "GraphPrefill", Broken)
    lm = MODELS[("llama", "sdpa")]
    with pytest.raises(RuntimeError, match="prefill failed"):
        speed(lm, prompts(1, 6)[0], decode_tokens=2, repeats=1)
    s = speed(lm, prompts(1, 6)[0], decode_tokens=2, repeats=1, graph_errors="record")
    assert "prefill failed" in s["prefill_graph_error"] and "prefill_tokens_per_s_graph" not in s
    assert "test_decode.py" in s["prefill_graph_traceback"]
    assert s["prefill_tokens_per_s"] == s["prefill_tokens_per_s_eager"] > 0
    assert s["prefill_mode"] == "eager" and "CUDA-graph prefill failed" in s["prefill_mode_reason"]
    assert s["decode_mode"] == "cuda-graph"  # the decode's graph still ran


def test_graph_prefill_refuses_a_model_off_the_gpu():
    with pytest.raises(ValueError, match="one CUDA device"):
        decode.GraphPrefill(MODELS[("llama", "sdpa")], prompts(1, 6), warmup=1)


@given(batch=st.integers(1, 3), t=st.integers(1, 12), seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_prefill_sdpa_is_the_eager_forwards_causal_attention(batch, t, seed):
    """A model run with `prefill_sdpa` (and its no-mask function) gives the sdpa model's logits bit
    for bit: the same causal SDPA call, no mask tensor built."""
    decode._register_prefill_attention()
    for kind in ("llama", "qwen3"):
        lm, ids = MODELS[(kind, "sdpa")], prompts(batch, t, seed)
        with torch.no_grad():
            want = lm(input_ids=ids, use_cache=True).logits
            with decode.attention_implementation(lm.config, decode.PREFILL_ATTENTION):
                got = lm(input_ids=ids, use_cache=True).logits
        assert torch.equal(got, want) and lm.config._attn_implementation == "sdpa"


def test_prefill_sdpa_refuses_a_mask_and_a_nonempty_cache():
    from types import SimpleNamespace

    module = SimpleNamespace(is_causal=True, num_key_value_groups=2, training=False)
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="given a mask"):
        decode.prefill_sdpa(module, q, k, k, torch.ones(1, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="5 queries against 7 keys"):
        decode.prefill_sdpa(module, q, torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16), None)


def test_attention_implementation_is_restored_after_an_exception():
    lm = MODELS[("llama", "sdpa")]
    with pytest.raises(RuntimeError, match="inside"):
        with decode.attention_implementation(lm.config, decode.PREFILL_ATTENTION):
            assert lm.config._attn_implementation == decode.PREFILL_ATTENTION
            raise RuntimeError("inside")
    assert lm.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_graph_prefill_captures_an_sdpa_model_with_prefill_sdpa(monkeypatch, attn):
    """The capture (stood in for by one eager call of what it records) runs under `prefill_sdpa`
    for an SDPA model and under the model's own attention otherwise; the config is restored and
    the recorded logits are the eager forward's."""
    lm, ids, seen = MODELS[("llama", attn)], prompts(1, 6), []

    def capture(warm, record, device, warmup, what, where):
        seen.append(lm.config._attn_implementation)
        with torch.no_grad():
            return None, record()

    monkeypatch.setattr(decode, "capture_graph", capture)
    prefill = decode.GraphPrefill.__new__(decode.GraphPrefill)
    prefill.lm, prefill.ids = lm, ids
    prefill._capture(torch.device("cpu"), 1)
    assert seen == [decode.PREFILL_ATTENTION if attn == "sdpa" else "eager"]
    assert lm.config._attn_implementation == attn
    with torch.no_grad():
        assert torch.equal(prefill.logits, prefill._forward())


def test_decode_sdpa_is_transformers_sdpa_without_repeating_the_kv_heads():
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    for heads, kv in ((8, 2), (4, 4), (6, 1)):
        q = torch.randn(3, heads, 1, 16, dtype=torch.float64, generator=g)
        k, v = (torch.randn(3, kv, 11, 16, dtype=torch.float64, generator=g) for _ in range(2))
        mask = torch.zeros(3, 1, 1, 11, dtype=torch.float64)
        mask[..., 7:] = torch.finfo(torch.float64).min
        mask[1, ..., 1:] = torch.finfo(torch.float64).min  # a row that sees one key only
        module = SimpleNamespace(num_key_value_groups=heads // kv, is_causal=True, training=False)
        want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
        got, _ = decode.decode_sdpa(module, q, k, v, mask, scaling=0.25)
        assert got.shape == want.shape == (3, 1, heads, 16)
        assert torch.allclose(got, want, rtol=0, atol=1e-12)  # float64: the same sums in another order


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_decode_sdpa_in_low_precision_and_with_a_boolean_mask(dtype):
    """The scores leave the first product in the cache's dtype, then float32: in fp16 / bf16 the
    output stays within that dtype's rounding of the float64 attention; a boolean mask (True:
    attend) gives what the equivalent additive mask gives."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(1)
    heads, kv, length, d = 8, 2, 37, 64
    q = torch.randn(2, heads, 1, d, dtype=torch.float64, generator=g) * 2
    k, v = (torch.randn(2, kv, length, d, dtype=torch.float64, generator=g) for _ in range(2))
    keep = torch.ones(2, 1, 1, length, dtype=torch.bool)
    keep[0, ..., 20:] = False
    keep[1, ..., 1:] = False  # one key only
    additive = torch.zeros(2, 1, 1, length, dtype=torch.float64).masked_fill(~keep, torch.finfo(dtype).min)
    module = SimpleNamespace(num_key_value_groups=heads // kv, is_causal=True, training=False)
    want, _ = decode.decode_sdpa(module, q, k, v, additive, scaling=d ** -0.5)
    low = [t.to(dtype) for t in (q, k, v)]
    got, _ = decode.decode_sdpa(module, *low, additive.to(dtype), scaling=d ** -0.5)
    got_bool, _ = decode.decode_sdpa(module, *low, keep, scaling=d ** -0.5)
    assert got.dtype == got_bool.dtype == dtype
    assert torch.equal(got, got_bool)
    # inputs, scores, probabilities and output each rounded once to the dtype: a few of its epsilons
    tol = {torch.float16: 1e-2, torch.bfloat16: 8e-2, torch.float32: 1e-5}[dtype]
    assert (got.double() - want).abs().max().item() <= tol


def test_the_step_of_an_sdpa_model_runs_decode_sdpa_and_restores_the_config():
    from transformers import AttentionInterface

    lm = MODELS[("llama", "sdpa")]
    dec = StaticDecoder(lm, 1, 8)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return decode.decode_sdpa(*args, **kwargs)

    AttentionInterface.register(decode.DECODE_ATTENTION, spy)
    try:
        dec.prefill(prompts(1, 3))
        assert calls == []  # the prefill keeps the model's own attention
        dec.step()
    finally:
        AttentionInterface.register(decode.DECODE_ATTENTION, decode.decode_sdpa)
    assert calls == [(1, 4, 1, 16)] * 2 and lm.config._attn_implementation == "sdpa"
    eager = StaticDecoder(MODELS[("llama", "eager")], 1, 8)
    assert eager._step_attention is None  # another attention implementation is left as it is
