"""Greedy decode one token a step: on transformers' dynamic cache (eager, the reference) or on a
static KV cache whose step can be captured once in a CUDA graph and replayed.

`StaticDecoder` owns a `transformers.StaticCache` and three static buffers: the token ids
`ids [B, 1]`, the position `pos [B, 1]` and the key positions `0..max_len-1`. `prefill(prompt)`
runs the prompt eagerly into the cache; `step()` runs one token: it reads `ids` and `pos`, builds
the attention mask from `pos` on the device, and writes the greedy next token back into `ids` and
`pos + 1` into `pos`. The cache advances its own write position on the device
(`StaticLayer.cumulative_length`), in step with `pos`. So a step is a fixed sequence of kernels
on fixed tensors with no host work, and `GraphDecoder` captures it once and replays it for every
later token; on a CPU the same `step()` runs eagerly, which is how its tokens are tested against
`dynamic_greedy`. The mask is passed as a ready 4-D additive mask and the positions explicitly,
so transformers' own mask and position code (which changed across versions) is not on the path.

With a mask, transformers' SDPA attention (5.17; 5.24 no longer) copies every key/value head once per
query head that shares it (`repeat_kv`): for LLaMA-3-8B at batch 1 that is 4x the KV cache
written and read again each token, a cost of the attention code rather than of the linears being
compared. The step of an SDPA model therefore runs `decode_sdpa`, which puts the query heads of
each KV head along the query axis instead (as transformers' own `pack_gqa` does since), reading
the cache once, and computes the attention as two batched products around a float32 softmax
rather than one fused kernel. A fused kernel walks the keys of each (sequence, KV head) pair in
one thread block: at batch 1 that is 8 blocks for LLaMA-3-8B on a GPU of 132 SMs, and cuDNN's
flash kernel took 46 us a layer on the H200 to read an 8.5 MB cache
(reports/results/h200/profile_decode_llama3-8b.json). A batched product spreads the keys over the
whole GPU. The scores [B, KV, G, L] come out of the first product in the cache's dtype (one
rounding a fused kernel does not make), then are masked and normalized in float32 (float64 for a float64 model).

transformers >= 5 is needed for the static path (its StaticCache keeps the write position on the
device); an older one, or a cache of sliding-window layers, is refused with a ValueError.
"""
from __future__ import annotations

import inspect

import torch


def cache_keyword(lm):
    """The forward argument that takes a cache: "cache" (transformers 5.24) or "past_key_values" (5.17)."""
    params = inspect.signature(lm.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ValueError(f"{type(lm).__name__}.forward takes neither `cache` nor `past_key_values`: "
                     "not a transformers causal LM with a KV cache")


def output_cache(out, keyword):
    """The cache a forward returned (`out.cache` or `out.past_key_values`, by `keyword`)."""
    return getattr(out, keyword)


def model_devices(lm):
    """The distinct devices of the model's parameters and buffers (meta: offloaded by accelerate)."""
    return sorted({t.device for t in list(lm.parameters()) + list(lm.buffers())}, key=str)


DECODE_ATTENTION = "zq_decode_sdpa"


def decode_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface for the one-token step: query [B, H, 1, D] against the
    cache's key / value [B, KV, L, D] with the additive or boolean mask [B, 1, 1, L]; query head h
    reads KV head h // (H / KV), as `repeat_kv` maps them. Returns [B, 1, H, D] (module docstring:
    two batched products, float32 softmax). Any other call (a longer query, dropout) goes to
    transformers' own SDPA attention."""
    b, h, q_len, d = query.shape
    kv, length = key.shape[1], key.shape[2]
    if q_len != 1 or h % kv or dropout:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = d ** -0.5 if scaling is None else scaling
    packed = (query * scale).reshape(b, kv, h // kv, d)  # [B, KV, G, D]: the G heads of one KV head as G queries
    wide = torch.promote_types(query.dtype, torch.float32)  # float32, or float64 for a float64 model
    scores = torch.matmul(packed, key.transpose(-1, -2)).to(wide)  # [B, KV, G, L]
    if attention_mask is not None:
        mask = attention_mask[..., :length]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(wide)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).reshape(b, 1, h, d), None


def _register_decode_attention():
    from transformers import AttentionInterface

    AttentionInterface.register(DECODE_ATTENTION, decode_sdpa)


PREFILL_ATTENTION = "zq_prefill_sdpa"


def prefill_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface for a captured prompt forward: the prompt on an empty
    cache (query and keys of one length), unpadded, so the attention is SDPA's own causal one
    (`is_causal`, no mask tensor), as the eager forward runs it. transformers builds a mask tensor
    while a CUDA graph is being captured (its mask code takes a capture for tracing and keeps the
    mask it would otherwise drop), which sends SDPA to another kernel than the eager forward's
    (DESIGN.md §6); under this implementation no mask is built (`_no_mask`). Anything else
    (a mask, a query shorter than the keys) is refused rather than attended to wrongly."""
    if attention_mask is not None:
        raise ValueError("prefill_sdpa attends causally over an unpadded prompt; it was given a mask")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"prefill_sdpa attends over a prompt on an empty cache: {query.shape[2]} queries "
                         f"against {key.shape[2]} keys")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)


def _no_mask(*args, **kwargs):
    return None


def _register_prefill_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PREFILL_ATTENTION, prefill_sdpa)
    AttentionMaskInterface.register(PREFILL_ATTENTION, _no_mask)


class attention_implementation:
    """`with attention_implementation(config, name):` the model's attention layers (which read
    `config._attn_implementation` at each call) run `name`; the previous one is restored after,
    also on an exception."""

    def __init__(self, config, name):
        self.config, self.name = config, name

    def __enter__(self):
        self.previous = self.config._attn_implementation
        self.config._attn_implementation = self.name
        return self

    def __exit__(self, *exc):
        self.config._attn_implementation = self.previous
        return False


def _next_token(logits):
    return logits[:, -1, :].argmax(-1, keepdim=True)


def dynamic_prefill(lm, ids, keyword=None):
    """One forward of the prompt `ids [B, T]` on a new dynamic cache: (cache, next token [B, 1]).
    Only the last position's logits are computed, as generation does."""
    keyword = keyword or cache_keyword(lm)
    out = lm(input_ids=ids, use_cache=True, logits_to_keep=1)
    return output_cache(out, keyword), _next_token(out.logits)


def dynamic_step(lm, tok, cache, keyword):
    """One greedy step on a dynamic cache: (logits [B, V], next token [B, 1], cache)."""
    out = lm(input_ids=tok, use_cache=True, **{keyword: cache})
    return out.logits[:, -1, :], _next_token(out.logits), output_cache(out, keyword)


def dynamic_greedy(lm, ids, steps):
    """Greedy tokens [B, 1 + steps] after the prompt `ids [B, T]` on transformers' dynamic cache
    (the first from the prefill), and the logits [B, V] of the first step: the reference."""
    keyword = cache_keyword(lm)
    with torch.no_grad():
        cache, tok = dynamic_prefill(lm, ids, keyword)
        tokens, first = [tok], None
        for _ in range(steps):
            logits, tok, cache = dynamic_step(lm, tok, cache, keyword)
            first = logits if first is None else first
            tokens.append(tok)
    return torch.cat(tokens, dim=1), first


class StaticDecoder:
    """Greedy decode of `batch` sequences on a static KV cache of `max_len` positions (module
    docstring). `steps_left` counts, on the host, the positions the cache still has free; a step
    past them is refused before it could write outside the cache."""

    def __init__(self, lm, batch, max_len):
        from transformers import StaticCache

        for name, value in (("batch", batch), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        devices = model_devices(lm)
        if len(devices) != 1:
            raise ValueError(f"the static-cache decode needs the model on one device; it is on "
                             f"{', '.join(map(str, devices))} (a device_map across devices or offloading)")
        self.lm, self.batch, self.max_len = lm, batch, max_len
        self.keyword = cache_keyword(lm)
        self.device = devices[0]
        self.dtype = lm.get_input_embeddings().weight.dtype
        self.cache = StaticCache(config=lm.config, max_cache_len=max_len)
        layers = getattr(self.cache, "layers", None)
        if not layers or not all(isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
                                 for layer in layers):
            import transformers

            raise ValueError(f"transformers {transformers.__version__}: its StaticCache does not keep the write "
                             "position on the device (StaticLayer.cumulative_length); the static-cache decode "
                             "needs transformers >= 5")
        if any(getattr(layer, "is_sliding", False) for layer in layers):
            raise ValueError("the static-cache decode masks full attention only; this model has sliding-window "
                             "layers")
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.key_pos = torch.arange(max_len, device=self.device).view(1, 1, 1, max_len)
        self.prompt_len = None
        self.steps_left = 0
        self._config = lm.config
        self._step_attention = None
        if getattr(lm.config, "_attn_implementation", None) == "sdpa":
            _register_decode_attention()
            self._step_attention = DECODE_ATTENTION

    def prefill(self, ids):
        """Reset the cache and run the prompt `ids [batch, T]` into it (eager); afterwards `ids`
        holds the first generated token and `pos` = T. Returns the last position's logits."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != self.batch or ids.shape[1] < 1:
            got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"ids must be a [{self.batch}, T >= 1] tensor of token ids, got {got}")
        t = ids.shape[1]
        if t >= self.max_len:
            raise ValueError(f"a prompt of {t} tokens leaves no room in a cache of max_len {self.max_len}")
        self.cache.reset()  # in place: a captured graph keeps pointing at the same tensors
        with torch.no_grad():
            out = self.lm(input_ids=ids.to(self.device), use_cache=True, logits_to_keep=1, **{self.keyword: self.cache})
        self.ids.copy_(_next_token(out.logits))
        self.pos.fill_(t)
        self.prompt_len, self.steps_left = t, self.max_len - t
        return out.logits[:, -1, :]

    def _count_step(self):
        if self.prompt_len is None:
            raise ValueError("prefill a prompt before decoding: the cache is empty")
        if self.steps_left < 1:
            raise ValueError(f"the static cache of max_len {self.max_len} is full ({self.prompt_len} prompt tokens "
                             f"+ {self.max_len - self.prompt_len} steps); prefill again or build a longer one")
        self.steps_left -= 1

    def _step_kernels(self):
        # Keys at positions after `pos` are empty cache slots (or stale ones from before a reset):
        # they get the most negative finite value, as transformers' own static masks do (-inf
        # would give NaN for a row masked entirely).
        masked = (self.key_pos > self.pos.view(self.batch, 1, 1, 1)).to(self.dtype)
        mask = masked * torch.finfo(self.dtype).min
        # read by every attention layer at each call (module docstring)
        with attention_implementation(self._config, self._step_attention or self._config._attn_implementation):
            out = self.lm(input_ids=self.ids, position_ids=self.pos, attention_mask=mask, use_cache=True,
                          **{self.keyword: self.cache})
        logits = out.logits[:, -1, :]
        self.ids.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        return logits

    def step(self):
        """One greedy token, eagerly: returns the logits [batch, V] of the position it read."""
        self._count_step()
        with torch.no_grad():
            return self._step_kernels()

    def greedy(self, ids, steps):
        """Tokens [batch, 1 + steps] (the first from the prefill) and the first step's logits."""
        self.prefill(ids)
        tokens, first = [self.ids.clone()], None
        for _ in range(steps):
            logits = self.step()
            first = logits.clone() if first is None else first
            tokens.append(self.ids.clone())
        return torch.cat(tokens, dim=1), first


def capture_graph(warm, record, device, warmup, what, where):
    """`warm()` run `warmup` times on a side stream, as `torch.cuda.graph` asks (the allocator and
    cuBLAS settle, Triton kernels are compiled outside the capture; the recipe of perf/timing.py's
    `capture_graph`), then one call of `record()` captured: (graph, its output). A host
    synchronization in it fails the capture; the RuntimeError names `what` and `where`."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.no_grad():
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                warm()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = record()
        except Exception as exc:
            raise RuntimeError(f"CUDA-graph capture of {what} failed ({type(exc).__name__}: {exc}); "
                               f"something on {where} synchronizes with the host") from exc
    torch.cuda.synchronize(device)
    return graph, out


class GraphDecoder:
    """`StaticDecoder.step` captured once in a CUDA graph; `replay()` decodes one token.

    Built after a prefill (the cache's tensors are allocated by the first one). The step runs
    `warmup` times eagerly on a side stream first, as `torch.cuda.graph` asks (the allocator and
    cuBLAS settle, Triton kernels are compiled outside the capture; the same recipe as
    perf/timing.py's `capture_graph`), which advances the cache: prefill again before replaying.
    A host synchronization in the step fails the capture; the error says where.
    """

    def __init__(self, decoder, warmup=2):
        if decoder.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, not {decoder.device}")
        if decoder.prompt_len is None:
            raise ValueError("prefill a prompt before capturing: the cache's tensors are allocated by the first one")
        if decoder.steps_left < warmup:
            raise ValueError(f"the cache has {decoder.steps_left} free positions, fewer than the {warmup} warm-up steps")
        self.decoder = decoder
        # the warm-up counts its steps; the capture records the kernels, runs none, counts none
        self.graph, self.logits = capture_graph(decoder.step, decoder._step_kernels, decoder.device, warmup,
                                                "the decode step", "the per-token path")

    def replay(self):
        """One greedy token: `decoder.ids` / `pos` advance, `self.logits` holds its logits."""
        self.decoder._count_step()
        self.graph.replay()

    def greedy(self, ids, steps):
        """Tokens [batch, 1 + steps] (the first from the prefill) and the first step's logits."""
        d = self.decoder
        d.prefill(ids)
        tokens, first = [d.ids.clone()], None
        for _ in range(steps):
            self.replay()
            first = self.logits.clone() if first is None else first
            tokens.append(d.ids.clone())
        return torch.cat(tokens, dim=1), first


class GraphPrefill:
    """The eager prefill's forward (`dynamic_prefill`: `ids [B, T]` into a new dynamic cache, last
    position's logits only) captured once in a CUDA graph; `replay()` runs its kernels again on the
    same ids (the cache the capture made is rewritten in place) and leaves the logits [B, V] in
    `self.logits`. `eager_logits` holds the same forward run eagerly before the capture, for the
    check. An SDPA model is captured with `prefill_sdpa` as its attention, the causal SDPA call the
    eager forward makes (transformers would build a mask under capture and change the kernel).
    Warm-up on a side stream first, as in `GraphDecoder`. A host synchronization in the forward
    fails the capture; the error says so."""

    def __init__(self, lm, ids, warmup=2):
        devices = model_devices(lm)
        if len(devices) != 1 or devices[0].type != "cuda":
            raise ValueError(f"CUDA graphs need the model on one CUDA device; it is on {', '.join(map(str, devices))}")
        device = devices[0]
        self.lm, self.ids = lm, ids.to(device).clone()  # the captured forward reads this tensor
        with torch.no_grad():
            self.eager_logits = self._forward().clone()
        self._capture(device, warmup)

    def _capture(self, device, warmup):
        config = self.lm.config
        attention = config._attn_implementation
        if attention == "sdpa":
            _register_prefill_attention()
            attention = PREFILL_ATTENTION
        with attention_implementation(config, attention):
            self.graph, self.logits = capture_graph(self._forward, self._forward, device, warmup, "the prefill",
                                                    "the forward")

    def _forward(self):
        return self.lm(input_ids=self.ids, use_cache=True, logits_to_keep=1).logits[:, -1, :]

    def replay(self):
        self.graph.replay()

    def release(self):
        """Free the graph and its memory pool."""
        del self.graph, self.logits
        torch.cuda.empty_cache()
