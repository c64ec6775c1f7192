"""Perplexity on held-out text and prefill / decode speed.

Perplexity: the evaluation text is cut into non-overlapping windows of exactly `context` tokens
(no special tokens added, no overlap, no state carried between windows); each window predicts its
own tokens 2..context, so `eval_tokens` tokens score `windows * (context - 1)` predictions.
ppl = exp(mean negative log-likelihood over all predictions).

Speed: prefill = one forward of a [1, prefill_tokens] prompt (tokens/s, median of `repeats`);
decode = `decode_tokens` greedy single-token steps on the KV cache after that prompt (tokens/s,
median of `repeats`). CUDA is synchronized around every timed region.
"""
from __future__ import annotations

import math
import statistics
import time

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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed(lm, prompt, decode_tokens=32, repeats=3):
    """{prefill_tokens_per_s, decode_tokens_per_s, ...} for a prompt [T] of token ids."""
    if not isinstance(prompt, torch.Tensor) or prompt.ndim != 1 or prompt.numel() < 1:
        got = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise ValueError(f"prompt must be a non-empty 1-D tensor of token ids, got {got}")
    for name, value in (("decode_tokens", decode_tokens), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    device = next(lm.parameters()).device
    ids = prompt[None].to(device)
    prefill, decode = [], []
    with torch.no_grad():
        lm(ids[:, : min(8, ids.shape[1])], use_cache=False)  # warm-up (kernel compilation, allocator)
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            out = lm(ids, use_cache=True)
            _sync(device)
            t1 = time.perf_counter()
            prefill.append(ids.shape[1] / (t1 - t0))
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            _sync(device)
            t2 = time.perf_counter()
            for _ in range(decode_tokens):
                out = lm(tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
            _sync(device)
            decode.append(decode_tokens / (time.perf_counter() - t2))
    return {
        "prefill_tokens": int(ids.shape[1]),
        "decode_tokens": int(decode_tokens),
        "prefill_tokens_per_s": statistics.median(prefill),
        "decode_tokens_per_s": statistics.median(decode),
        "repeats": repeats,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
    }
