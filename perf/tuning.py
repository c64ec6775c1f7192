"""What the tune scripts (`perf/tune_<family>.py`) share: sweep candidate launch configs per M
bucket, verify each against the oracle before timing it, keep the fastest, write the table.

For each M bucket and candidate config: the config runs once on a verification case (exact int32
products, or the oracle within a named tolerance) and is dropped if wrong; survivors are timed on
every layer shape the way the perf suite times its figure (perf/timing.py): N back-to-back calls in
one CUDA graph, call i over copy i of the operands, the replay timed by do_bench (median, L2
flushed per replay) and divided by N (`timing.graph_median_ms`). The script's `make_call(cfg,
shape, m)` gives the call over copy 0; `Sweep.back_to_back` makes copies 1 .. N-1 by
`timing.clone_call` (the tensors the closure holds, cloned), N = `timing.calls_per_replay` of the
bytes the call touches (its operands and its output: `timing.operand_bytes`), `--l2-multiple` and
`--max-calls-per-replay`. Every row records the N of each shape (`calls_per_replay`). On the CPU
(a smoke run under the interpreter) there is no L2 to span: one call per replay.
The winner of a bucket has the lowest geometric mean of time / best time over the shapes. Where
another candidate beats it on one shape by more than SHAPE_MARGIN, that candidate is written for
that shape too (the bucket's "shapes", `configs.launch_config`): one tile cannot suit a 4096-row
and a 28,672-row weight alike (a 6144 x 4096 qkv at M = 1024 fills 1.45 waves of the H200's SMs
with the tile that suits the rest).
Winners are written into the family's section of `zqkernels/gpu/configs/<gpu>.json` (the file is
created from default.json when the GPU has none, its other families kept as they are; a bucket the
run tuned replaces the table's bucket of that M, the others stay as they were), and every
timing into the results JSON named on the command line, so a table's numbers can be traced.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

PERF_DIR = Path(__file__).resolve().parent
ROOT = PERF_DIR.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(PERF_DIR) not in sys.path:
    sys.path.insert(0, str(PERF_DIR))

from shapes import DEFAULT_SHAPES, M_VALUES, MODELS  # noqa: E402
from timing import (  # noqa: E402
    L2_MULTIPLE, MAX_CALLS_PER_REPLAY, calls_per_replay, clone_call, graph_median_ms, l2_cache_bytes, operand_bytes,
)

from zqkernels.gpu.configs import CONFIG_DIR, shape_key  # noqa: E402

# Every model's layer shapes (the benchmark set and smaller ones, e.g. smollm2-135m for a CPU smoke run).
SHAPES = {s.name: s for m in MODELS.values() for s in m.layer_shapes()}
# The device the tune scripts run on: a CUDA GPU, or the CPU under TRITON_INTERPRET=1 (a smoke run
# of the scripts themselves; its timings mean nothing and it writes no table unless asked).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# A per-shape entry is written only where it beats the bucket's winner on that shape by this much
# (a smaller gain is within the run-to-run spread of these timings).
SHAPE_MARGIN = 0.03
TIMER = ("CUDA graph of calls_per_replay back-to-back calls, each on its own copy of the operands, "
         "do_bench median, L2 flushed per replay, time per call")


def replay_l2_bytes():
    """The L2 size the copies of one replay must span: the GPU's; 0 on the CPU (one call per replay)."""
    return l2_cache_bytes() if DEVICE == "cuda" else 0


def parser(doc):
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--out", required=True, help="results JSON (every verification and timing)")
    ap.add_argument("--table", default=None, help="configs/<gpu>.json to update (default: from the device name)")
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES))
    ap.add_argument("--m", default=",".join(str(m) for m in M_VALUES))
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop timing new candidates after this")
    ap.add_argument("--verify-shape", default="1000,4000",
                    help="N,K of the verification case (no tile multiple, K not a multiple of 256)")
    ap.add_argument("--max-candidates", type=int, default=None, help="the first few candidates per bucket only")
    ap.add_argument("--l2-multiple", type=float, default=L2_MULTIPLE,
                    help=f"the operand copies of one replay span at least this many L2 sizes (default {L2_MULTIPLE:g})")
    ap.add_argument("--max-calls-per-replay", type=int, default=MAX_CALLS_PER_REPLAY,
                    help=f"most back-to-back calls in one replay (default {MAX_CALLS_PER_REPLAY}; 1: one call per replay)")
    return ap


def device_name():
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (TRITON_INTERPRET=1)"


def default_table_name():
    name = device_name().lower()
    for tag in ("h100", "h200", "a100", "l40s", "4090"):
        if tag in name:
            return f"{tag}.json"
    return name.replace(" ", "_") + ".json"


def _table_entry(cfg):
    """A winner as the table holds it: without its timings, its per-shape entries likewise."""
    entry = {k: v for k, v in cfg.items() if k not in ("us", "shapes")}
    if "shapes" in cfg:
        entry["shapes"] = {key: {k: v for k, v in c.items() if k != "us"} for key, c in cfg["shapes"].items()}
    return entry


def attach_no_tma(sweep, scales, m, fallback, strip=(), tma_variants=("tma",)):
    """Each TMA-loading entry (`tma_variants`) the run wrote for (scales, M), the bucket's and its per-shape ones, also names
    as `no_tma` a pointer-load candidate of this run (rows where `fallback(row)`): for the bucket the
    least geometric mean over the shapes, for a shape the fastest on it; the keys in `strip` are
    dropped from it. A TMA descriptor takes only aligned operands (K a multiple of 32, 16-byte
    rows); the family's dispatcher runs `no_tma` for the rest (`configs.tma_or_fallback`)."""
    bucket = sweep.record["winners"].get(scales, {}).get(str(m))
    if bucket is None:
        return
    entries = [(None, bucket)] + [(key, e) for key, e in bucket.get("shapes", {}).items()]
    if not any(e["variant"] in tma_variants for _, e in entries):
        return
    rows = [r for r in sweep.record["rows"] if r.get("scales") == scales and r.get("M") == m
            and r.get("geomean_vs_best") is not None and fallback(r)]
    if not rows:
        raise RuntimeError(f"{scales} M={m}: tma won but no pointer-load candidate was timed; "
                           "a tma entry needs one as its no_tma config (raise --budget-s)")
    names = {shape_key(s.n, s.k): s.name for s in sweep.shapes}
    for key, entry in entries:
        if entry["variant"] not in tma_variants:
            continue
        best = (min(rows, key=lambda r: r["geomean_vs_best"]) if key is None
                else min(rows, key=lambda r: r["us"][names[key]]))
        entry["no_tma"] = {k: v for k, v in best["config"].items() if k not in strip}
    sweep.save()


class Sweep:
    """One tune run: candidates timed per (scales, M bucket), winners and the full record."""

    def __init__(self, family, args):
        self.family = family
        self.args = args
        self.t0 = time.time()
        unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
        if unknown:
            raise SystemExit(f"--shapes: unknown {unknown}; known: {', '.join(SHAPES)}")
        self.shapes = [SHAPES[s] for s in args.shapes.split(",")]
        self.ms = [int(m) for m in args.m.split(",")]
        self.verify_n, self.verify_k = (int(v) for v in args.verify_shape.split(","))
        # scripts that build their own parser may lack the replay options: the defaults then
        self.l2_multiple = getattr(args, "l2_multiple", L2_MULTIPLE)
        self.max_calls = getattr(args, "max_calls_per_replay", MAX_CALLS_PER_REPLAY)
        if self.max_calls < 1:
            raise SystemExit(f"--max-calls-per-replay: {self.max_calls} must be >= 1")
        if not math.isfinite(self.l2_multiple) or self.l2_multiple < 0:
            raise SystemExit(f"--l2-multiple: {self.l2_multiple} must be a finite number >= 0")
        self.l2_bytes = replay_l2_bytes()
        self.record = {"family": family, "command": " ".join(sys.argv), "device": device_name(),
                       "torch": torch.__version__, "timer": TIMER,
                       "replay": {"l2_cache_bytes": self.l2_bytes, "l2_multiple": self.l2_multiple,
                                  "max_calls": self.max_calls},
                       "rows": [], "winners": {}}

    def back_to_back(self, fn):
        """The calls of one back-to-back replay: `fn` (copy 0) and N - 1 clones over copies of its
        tensors, N from the bytes one call touches (see the module docstring). Runs `fn` once."""
        touched = max(1, operand_bytes(fn) + operand_bytes(fn()))
        n = calls_per_replay(touched, self.l2_bytes, self.l2_multiple, self.max_calls)
        return [fn] + [clone_call(fn) for _ in range(n - 1)]

    def over_budget(self):
        return time.time() - self.t0 > self.args.budget_s

    def run(self, scales, m, candidates, verify, make_call, per_shape=True):
        """verify(cfg, m) -> (ok, detail); make_call(cfg, shape, m) -> zero-argument closure.
        per_shape: write a shape's own entry where it wins by SHAPE_MARGIN (False for a family whose
        launcher does not read them)."""
        timed = []
        for cfg in candidates[: self.args.max_candidates]:
            row = {"scales": scales, "M": m, "config": cfg}
            if self.over_budget():
                row["skipped"] = "time budget"
                self.record["rows"].append(row)
                continue
            try:
                ok, detail = verify(cfg, m)
            except Exception as exc:  # noqa: BLE001 - a config that cannot launch is recorded and dropped
                ok, detail = False, f"{type(exc).__name__}: {exc}"[:300]
            row["verified"], row["verify_detail"] = ok, detail
            if ok:
                row["us"], row["calls_per_replay"] = {}, {}
                for shape in self.shapes:
                    calls = self.back_to_back(make_call(cfg, shape, m))
                    row["us"][shape.name] = 1000.0 * graph_median_ms(calls)
                    row["calls_per_replay"][shape.name] = len(calls)
                    del calls  # the copies go before the next shape's are made
                timed.append(row)
            self.record["rows"].append(row)
            self.save()
        if not timed:
            return None
        best = {s.name: min(r["us"][s.name] for r in timed) for s in self.shapes}
        for r in timed:
            r["geomean_vs_best"] = math.exp(sum(math.log(r["us"][s] / best[s]) for s in best) / len(best))
        win = min(timed, key=lambda r: r["geomean_vs_best"])
        bucket = dict(win["config"], us=win["us"])
        shapes = {}
        # a shape's entry keeps the bucket's act_layout (the layers pick the quantizer's per bucket)
        same = [r for r in timed if r["config"].get("act_layout") == win["config"].get("act_layout")]
        for s in self.shapes if per_shape else ():
            fastest = min(same, key=lambda r: r["us"][s.name])
            if fastest is not win and fastest["us"][s.name] < (1 - SHAPE_MARGIN) * win["us"][s.name]:
                shapes[shape_key(s.n, s.k)] = dict(fastest["config"], us=fastest["us"][s.name])
        if shapes:
            bucket["shapes"] = shapes
        self.record["winners"].setdefault(scales, {})[str(m)] = bucket
        self.save()
        return win

    def save(self):
        Path(self.args.out).write_text(json.dumps(self.record, indent=1))

    def _table(self):
        path = CONFIG_DIR / (self.args.table or default_table_name())
        return path, json.loads(path.read_text() if path.exists() else (CONFIG_DIR / "default.json").read_text())

    def write_table(self, section_key=None):
        """Winners into configs/<gpu>.json's family section; returns the path written."""
        path, table = self._table()
        key = section_key or self.family
        for scales, buckets in self.record["winners"].items():
            # the buckets this run tuned replace theirs; the section's other buckets stay
            merged = dict(table.setdefault(key, {}).get(scales, {}))
            merged.update({m: _table_entry(cfg) for m, cfg in buckets.items()})
            table[key][scales] = dict(sorted(merged.items(), key=lambda kv: int(kv[0])))
        table.setdefault("match", [device_name()])
        table.setdefault("_tuned_by", {})[key] = {"command": self.record["command"],
                                                  "results": Path(self.args.out).name}
        path.write_text(json.dumps(table, indent=1) + "\n")
        return path
