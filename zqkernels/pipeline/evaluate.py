"""Perplexity on held-out text and prefill / decode speed.

Perplexity: the evaluation text is cut into non-overlapping windows of exactly `context` tokens
(no special tokens added, no overlap, no state carried between windows); each window predicts its
own tokens 2..context, so `eval_tokens` tokens score `windows * (context - 1)` predictions.
ppl = exp(mean negative log-likelihood over all predictions).

Speed (`speed`), for a batch of B prompts of T tokens (one prompt repeated, or B distinct ones):
- eager prefill = one forward of the [B, T] prompt on a new dynamic cache, computing the last
  position's logits only, as generation does: B*T / seconds, median of `repeats`
  (`prefill_tokens_per_s_eager`);
- CUDA-graph prefill on a GPU (`prefill_tokens_per_s_graph`): the same forward captured once in a
  CUDA graph and replayed (`decode.GraphPrefill`), so the host's per-launch work is not timed (at
  batch 1 the eager prefill of a quantized model is bound by it,
  reports/results/h200/models_llama3-8b_v4.json). Its last-position logits are compared with the
  same forward run eagerly (`graph_prefill_logits_equal_eager`, `graph_prefill_logits_rel_diff_eager`);
- `prefill_tokens_per_s` is the faster of the two when the graph ran and its logits equal the
  eager forward's bit for bit (each method at its best: on the H200 fp16's eager prefill can be
  the faster one), else the eager one; `prefill_mode` says which ("cuda-graph" or "eager", the
  latter with `prefill_mode_reason`);
- eager decode = `decode_tokens` greedy single-token steps after it on transformers' dynamic cache,
  each a Python-driven forward (`decode_tokens_per_s_eager`: B*steps / seconds, median);
- CUDA-graph decode (on a GPU, the `decode_tokens_per_s` figure, `decode_mode` "cuda-graph"): the
  same greedy steps on a static KV cache, the one-token step captured once in a CUDA graph and
  replayed (`decode.StaticDecoder`, `decode.GraphDecoder`); the prefill into the static cache
  before each timed run is not timed. Its tokens are checked against the same step run eagerly
  (`graph_tokens_equal_static_eager`: the replay runs the kernels the eager step runs, so true is
  expected) and compared with the dynamic cache's (reported only: see below). On a CPU `decode_tokens_per_s` is the eager decode
  (`decode_mode` "eager", with the reason); a model spread over several devices needs
  `decode_mode="eager"`.
The same measurement runs for every method, fp16 included. CUDA is synchronized around every
timed region; on a GPU the peak memory allocated during the call (`peak_memory_bytes`, summed over
the model's GPUs) and what was allocated when it began (`memory_at_start_bytes`) are recorded.
"""
from __future__ import annotations

import math
import statistics
import time
import traceback

import torch


def perplexity(lm, windows, progress=True):
    """(ppl, predictions) over windows [W, T]."""
    from tqdm.auto import tqdm

    if not isinstance(windows, torch.Tensor) or windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        got = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(f"windows must be a [W >= 1, T >= 2] tensor of token ids (at least one window of two "
                         f"tokens to predict from), got {got}")
    device = next(lm.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
            ids = w[None].to(device)
            logits = lm(ids, use_cache=False).logits[0, :-1].float()
            target = ids[0, 1:]
            nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            count += target.numel()
    return math.exp(nll / count), count


def _sync(devices):
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


DECODE_MODES = ("cuda-graph", "eager")
GRAPH_WARMUP = 2  # eager steps on a side stream before the capture (GraphDecoder)


def _prompt_batch(prompt, batch):
    """[batch, T] token ids: a 1-D prompt repeated, or a 2-D one of `batch` distinct rows."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if not isinstance(prompt, torch.Tensor) or prompt.ndim not in (1, 2) or prompt.shape[-1] < 1:
        got = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise ValueError(f"prompt must be a non-empty 1-D tensor of token ids (repeated batch times) or a "
                         f"[batch, T] tensor of distinct prompts, got {got}")
    if prompt.ndim == 2 and prompt.shape[0] != batch:
        raise ValueError(f"batch={batch} but the prompt holds {prompt.shape[0]} rows")
    return prompt.expand(batch, -1).contiguous() if prompt.ndim == 1 else prompt


def _decode_mode(requested, devices):
    """The decode that is timed: CUDA graphs where the whole model is on one CUDA device."""
    if requested is not None and requested not in DECODE_MODES:
        raise ValueError(f"decode_mode must be one of {DECODE_MODES} or None (chosen by the device), got {requested!r}")
    on_one_gpu = len(devices) == 1 and devices[0].type == "cuda"
    if requested is None:
        if devices[0].type != "cuda" and len(devices) == 1:
            return "eager", f"the model is on {devices[0]}: CUDA graphs need a CUDA device"
        if not on_one_gpu:
            raise ValueError(f"decode_mode: the model is on {', '.join(map(str, devices))}; CUDA-graph decode "
                             "needs it on one GPU: pass decode_mode='eager' to time the eager decode alone")
        return "cuda-graph", None
    if requested == "cuda-graph" and not on_one_gpu:
        raise ValueError(f"decode_mode='cuda-graph' needs the model on one CUDA device; it is on "
                         f"{', '.join(map(str, devices))}")
    return requested, "requested" if requested == "eager" else None


def _first_divergence(a, b):
    """The first decode step (0 = the prefill's token) where two token tables differ, or None."""
    differ = (a.cpu() != b.cpu()).any(dim=0).nonzero()
    return None if differ.numel() == 0 else int(differ[0])


def _rel_max_diff(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _settle(devices):
    """Wait for the devices after a failed capture, which can leave a stream in error."""
    try:
        _sync(devices)
    except Exception:  # noqa: BLE001 - the error that matters is the capture's, already recorded
        pass


def _graph_decode(lm, ids, eager_tokens, eager_first, decode_tokens, repeats, devices):
    """The CUDA-graph decode's rate and its token checks (module docstring)."""
    from .decode import GraphDecoder, StaticDecoder

    b, t = ids.shape
    decoder = StaticDecoder(lm, b, t + max(decode_tokens, GRAPH_WARMUP))
    static_tokens, static_first = decoder.greedy(ids, decode_tokens)  # the same step, not captured
    decoder.prefill(ids)  # room for the warm-up steps before the capture
    graph = GraphDecoder(decoder, warmup=GRAPH_WARMUP)
    graph_tokens, graph_first = graph.greedy(ids, decode_tokens)
    rates = []
    for _ in range(repeats):
        decoder.prefill(ids)
        _sync(devices)
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            graph.replay()
        _sync(devices)
        rates.append(b * decode_tokens / (time.perf_counter() - t0))
    return {
        "decode_tokens_per_s": statistics.median(rates),
        # The replay runs the kernels the eager step runs, so its tokens should be those of the
        # eager step; against the dynamic cache (other attention kernels, unpadded keys) float
        # rounding may flip a near-tie of a random-weight model's logits: reported, not required.
        "graph_tokens_equal_static_eager": bool(torch.equal(graph_tokens, static_tokens)),
        "graph_tokens_equal_dynamic_eager": bool(torch.equal(graph_tokens.cpu(), eager_tokens.cpu())),
        "graph_first_divergence_from_dynamic_eager": _first_divergence(graph_tokens, eager_tokens),
        "graph_first_step_logits_rel_diff_static_eager": _rel_max_diff(graph_first, static_first),
        "graph_first_step_logits_rel_diff_dynamic_eager": _rel_max_diff(graph_first, eager_first),
    }


def _graph_prefill(lm, ids, repeats, devices):
    """The CUDA-graph prefill's rate and its check against the same forward run eagerly (module
    docstring)."""
    from .decode import GraphPrefill

    b, t = ids.shape
    graph = GraphPrefill(lm, ids, warmup=GRAPH_WARMUP)
    rates = []
    for _ in range(repeats):
        _sync(devices)
        t0 = time.perf_counter()
        graph.replay()
        _sync(devices)
        rates.append(b * t / (time.perf_counter() - t0))
    result = {
        "prefill_tokens_per_s_graph": statistics.median(rates),
        "graph_prefill_logits_equal_eager": bool(torch.equal(graph.logits, graph.eager_logits)),
        "graph_prefill_logits_rel_diff_eager": _rel_max_diff(graph.logits, graph.eager_logits),
    }
    graph.release()  # its memory pool goes before the decode is measured
    return result


def _prefill_headline(result):
    """prefill_tokens_per_s and prefill_mode from the eager and graph figures (module docstring)."""
    if "prefill_tokens_per_s_graph" in result and result["graph_prefill_logits_equal_eager"]:
        if result["prefill_tokens_per_s_graph"] >= result["prefill_tokens_per_s_eager"]:
            return {"prefill_tokens_per_s": result["prefill_tokens_per_s_graph"], "prefill_mode": "cuda-graph"}
        reason = "the eager prefill ran faster than its CUDA graph (same logits); the faster is the figure"
    elif "prefill_graph_error" in result:
        reason = "the CUDA-graph prefill failed (prefill_graph_error); the eager prefill is timed"
    elif "prefill_tokens_per_s_graph" in result:
        reason = (f"the CUDA-graph prefill's logits differ from the eager forward's (relative "
                  f"{result['graph_prefill_logits_rel_diff_eager']:.3g}); the eager prefill is the figure")
    else:
        reason = result.get("decode_mode_reason", "no CUDA graph on this device")
    return {"prefill_tokens_per_s": result["prefill_tokens_per_s_eager"], "prefill_mode": "eager",
            "prefill_mode_reason": reason}


def speed(lm, prompt, decode_tokens=32, repeats=3, batch=1, decode_mode=None, graph_errors="raise"):
    """Prefill and greedy-decode rates of `lm` on `prompt` (module docstring): a dict of
    prefill_tokens_per_s and decode_tokens_per_s (CUDA graphs on a GPU, eager on a CPU:
    `prefill_mode` / `decode_mode` say which), prefill_tokens_per_s_eager,
    decode_tokens_per_s_eager, on a GPU prefill_tokens_per_s_graph, peak memory and the graphs'
    checks. `decode_mode="eager"` times no graph. `graph_errors="record"` keeps the
    eager figures when a CUDA-graph measurement fails, with `graph_error` / `prefill_graph_error`
    saying why (and `decode_mode` "eager"); the default raises."""
    from .decode import cache_keyword, dynamic_prefill, dynamic_step, model_devices

    if graph_errors not in ("raise", "record"):
        raise ValueError(f"graph_errors must be 'raise' or 'record', got {graph_errors!r}")
    ids = _prompt_batch(prompt, batch)
    for name, value in (("decode_tokens", decode_tokens), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    devices = model_devices(lm)
    mode, reason = _decode_mode(decode_mode, devices)
    keyword = cache_keyword(lm)
    device = lm.get_input_embeddings().weight.device
    gpus = [d for d in devices if d.type == "cuda"]
    ids = ids.to(device)
    b, t = ids.shape
    start_bytes = sum(torch.cuda.memory_allocated(d) for d in gpus)
    for d in gpus:
        torch.cuda.reset_peak_memory_stats(d)
    prefill, eager = [], []
    with torch.no_grad():
        lm(ids[:, : min(8, t)], use_cache=False)  # warm-up (kernel compilation, allocator)
        for _ in range(repeats):
            _sync(devices)
            t0 = time.perf_counter()
            cache, tok = dynamic_prefill(lm, ids, keyword)
            _sync(devices)
            t1 = time.perf_counter()
            prefill.append(b * t / (t1 - t0))
            eager_tokens, eager_first = [tok], None
            _sync(devices)
            t2 = time.perf_counter()
            for _ in range(decode_tokens):
                logits, tok, cache = dynamic_step(lm, tok, cache, keyword)
                eager_first = logits if eager_first is None else eager_first
                eager_tokens.append(tok)
            _sync(devices)
            eager.append(b * decode_tokens / (time.perf_counter() - t2))
            del cache
    result = {
        "prefill_tokens": int(t),
        "decode_tokens": int(decode_tokens),
        "batch": int(b),
        "prefill_tokens_per_s_eager": statistics.median(prefill),
        "decode_mode": mode,
        "decode_tokens_per_s_eager": statistics.median(eager),
        "repeats": repeats,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
    }
    if reason:
        result["decode_mode_reason"] = reason
    if mode == "cuda-graph":
        try:
            result.update(_graph_prefill(lm, ids, repeats, devices))
        except Exception as exc:
            if graph_errors != "record":
                raise
            _settle(devices)
            result["prefill_graph_error"] = f"{type(exc).__name__}: {exc}"[:2000]
            result["prefill_graph_traceback"] = traceback.format_exc()[-4000:]
        try:
            result.update(_graph_decode(lm, ids, torch.cat(eager_tokens, dim=1), eager_first, decode_tokens, repeats,
                                        devices))
        except Exception as exc:
            if graph_errors != "record":
                raise
            _settle(devices)
            mode = result["decode_mode"] = "eager"
            result["graph_error"] = f"{type(exc).__name__}: {exc}"[:2000]
            result["graph_traceback"] = traceback.format_exc()[-4000:]  # where the step synchronized
            result["decode_mode_reason"] = "the CUDA-graph decode failed (graph_error); the eager decode is timed"
    if mode == "eager":
        result["decode_tokens_per_s"] = result["decode_tokens_per_s_eager"]
    result.update(_prefill_headline(result))
    if gpus:
        result["memory_at_start_bytes"] = int(start_bytes)
        result["peak_memory_bytes"] = int(sum(torch.cuda.max_memory_allocated(d) for d in gpus))
    return result
