"""Probe: where does the CUDA-graph prefill's output leave the eager forward's?

On the H200 the prefill forward replayed from a CUDA graph (`zqkernels.pipeline.decode.GraphPrefill`)
gives last-position logits that differ from the same forward run eagerly, deterministically
(fp16 LLaMA-3-8B: 0.0052 relative), and the captured fp16 prefill runs at 0.94x its eager rate
(reports/results/h200/models_llama3-8b_graph_prefill.json). This probe finds the first module
whose output differs:
- a forward hook on every module of a --layers model (fp16, seeded random weights) keeps a copy
  of its output, once in an eager forward and once in a captured forward, replayed; the modules
  are listed in call order with the max relative difference of their outputs, the first differing
  one named;
- the same for single ops at the prefill's shapes, outside the model: `x @ w.T` for the decoder's
  linear shapes and `scaled_dot_product_attention` (causal) at --prefill tokens, eager against
  captured, bit for bit, each with its time both ways (CUDA events around one call / one replay).

    PYTHONUNBUFFERED=1 python perf/probe_graph_prefill.py --out $OUT/probe_graph_prefill.json [--layers 2]

`--dry` runs the module comparison on a CPU, eager against eager (the plumbing; no graph).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from zqkernels.pipeline import decode  # noqa: E402


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


class Recorder:
    """Forward hooks keeping a copy of every module's first tensor output, in call order."""

    def __init__(self, model):
        self.outputs, self.masks, self.on = {}, {}, False
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules() if name]
        self.handles += [m.register_forward_pre_hook(self._mask_hook(name), with_kwargs=True)
                         for name, m in model.named_modules() if name.endswith("self_attn")]

    def _mask_hook(self, name):
        def hook(module, args, kwargs):
            if self.on:  # what the attention layer was handed: a mask tensor, or None (SDPA's is_causal)
                mask = kwargs.get("attention_mask")
                self.masks[name] = None if mask is None else list(mask.shape)
        return hook

    def _hook(self, name):
        def hook(module, args, out):
            if not self.on:
                return
            t = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(t, torch.Tensor):
                self.outputs[name] = t.detach().clone()
        return hook

    def record(self, fn):
        self.outputs, self.masks, self.on = {}, {}, True
        try:
            return fn()
        finally:
            self.on = False

    def remove(self):
        for h in self.handles:
            h.remove()


def compare_modules(lm, ids, graph, attention=None):
    """Each module's output, eager against captured-and-replayed (or eager again without `graph`);
    the other forward under the attention implementation `attention` if given (the eager one under
    the model's own). Also the mask each attention layer was handed, both ways."""
    from zqkernels.pipeline.decode import attention_implementation, capture_graph

    forward = lambda: lm(input_ids=ids, use_cache=True, logits_to_keep=1).logits[:, -1, :]
    rec = Recorder(lm)
    with torch.no_grad():
        eager_logits = rec.record(forward).clone()
        eager, eager_masks = rec.outputs, rec.masks
        with attention_implementation(lm.config, attention or lm.config._attn_implementation):
            if graph:
                g, logits = capture_graph(forward, lambda: rec.record(forward), ids.device, 2, "the prefill",
                                          "the forward")
                g.replay()
                torch.cuda.synchronize()
            else:
                logits = rec.record(forward)
        other, other_masks = rec.outputs, rec.masks
    rec.remove()
    rows = [{"module": name, "shape": list(t.shape), "equal": bool(torch.equal(t, other[name])),
             "rel_diff": _rel(other[name], t)} for name, t in eager.items() if name in other]
    first = next((r["module"] for r in rows if not r["equal"]), None)
    return {"attention": attention or lm.config._attn_implementation, "first_differing_module": first,
            "logits_equal": bool(torch.equal(logits, eager_logits)), "logits_rel_diff": _rel(logits, eager_logits),
            "attention_masks_eager": eager_masks, "attention_masks_other": other_masks, "modules": rows}


def _time_us(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return 1000.0 * start.elapsed_time(end)


def compare_op(name, op):
    """One op eager against captured: bit equality and one call's time both ways."""
    from zqkernels.pipeline.decode import capture_graph

    eager = op().clone()
    g, out = capture_graph(op, op, eager.device, 1, name, "the op")
    g.replay()
    torch.cuda.synchronize()
    return {"op": name, "equal": bool(torch.equal(out, eager)), "rel_diff": _rel(out, eager),
            "eager_us": _time_us(op), "graph_us": _time_us(g.replay)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry", action="store_true", help="CPU plumbing check: eager against eager, 1 layer, 16 tokens")
    args = ap.parse_args()
    if not args.dry and not torch.cuda.is_available():
        ap.error("no CUDA GPU here (--dry checks the plumbing on a CPU)")
    from zqkernels.pipeline import synthetic

    device = "cpu" if args.dry else "cuda"
    t = 16 if args.dry else args.prefill
    lm = synthetic.build(args.model, layers=1 if args.dry else args.layers,
                         dtype=torch.float32 if args.dry else torch.float16, device=device)
    vocab = lm.config.vocab_size
    ids = torch.randint(0, vocab, (1, t), generator=torch.Generator().manual_seed(0)).to(device)
    result = {"model": args.model, "layers": 1 if args.dry else args.layers, "prefill": t, "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if not args.dry else "cpu (--dry)",
              "command": "python perf/probe_graph_prefill.py " + " ".join(sys.argv[1:])}
    result["model_forward"] = compare_modules(lm, ids, graph=not args.dry)
    # the captured forward as decode.GraphPrefill runs an SDPA model: under prefill_sdpa
    decode._register_prefill_attention()
    result["model_forward_prefill_sdpa"] = compare_modules(lm, ids, graph=not args.dry,
                                                           attention=decode.PREFILL_ATTENTION)
    if not args.dry:
        ops = []
        cfg = lm.config
        hidden, inter = cfg.hidden_size, cfg.intermediate_size
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        head_dim = hidden // heads
        x = torch.randn(t, hidden, device=device, dtype=torch.float16)
        for lname, (n, k) in {"qkv": ((heads + 2 * kv) * head_dim, hidden), "o": (hidden, hidden),
                              "gate_up": (2 * inter, hidden), "down": (hidden, inter)}.items():
            a = x if k == hidden else torch.randn(t, k, device=device, dtype=torch.float16)
            w = torch.randn(n, k, device=device, dtype=torch.float16) / k ** 0.5
            ops.append(compare_op(f"matmul {lname} [{t}, {k}] x [{n}, {k}]^T", lambda a=a, w=w: a @ w.T))
        q = torch.randn(1, heads, t, head_dim, device=device, dtype=torch.float16)
        kk = torch.randn(1, heads, t, head_dim, device=device, dtype=torch.float16)
        v = torch.randn(1, heads, t, head_dim, device=device, dtype=torch.float16)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        ops.append(compare_op(f"sdpa causal [1, {heads}, {t}, {head_dim}]", lambda: sdpa(q, kk, v, is_causal=True)))
        causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
        ops.append(compare_op(f"sdpa boolean causal mask [1, {heads}, {t}, {head_dim}]",
                              lambda: sdpa(q, kk, v, attn_mask=causal)))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION):
            eff = sdpa(q, kk, v, attn_mask=causal)
        result["sdpa_mask_vs_is_causal_rel"] = _rel(sdpa(q, kk, v, attn_mask=causal), sdpa(q, kk, v, is_causal=True))
        result["sdpa_efficient_vs_is_causal_rel"] = _rel(eff, sdpa(q, kk, v, is_causal=True))
        result["ops"] = ops
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for key in ("model_forward", "model_forward_prefill_sdpa"):
        mf = result[key]
        first_attn = next(iter(mf["attention_masks_other"].items()), None)
        print(f"{key} ({mf['attention']}): logits equal {mf['logits_equal']} (rel {mf['logits_rel_diff']:.3g}); "
              f"first differing module: {mf['first_differing_module']}; first attention's mask eager "
              f"{next(iter(mf['attention_masks_eager'].values()), None)}, other {first_attn}")
        for r in [r for r in mf["modules"] if not r["equal"]][:12]:
            print(f"  {r['module']:50s} rel {r['rel_diff']:.3g}")
    for r in result.get("ops", []):
        print(f"  {r['op']:55s} equal {r['equal']}  rel {r['rel_diff']:.3g}  eager {r['eager_us']:.1f} us  "
              f"graph {r['graph_us']:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
