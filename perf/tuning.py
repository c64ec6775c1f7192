"""What the tune scripts (`perf/tune_<family>.py`) share: sweep candidate launch configs per M
bucket, verify each against the oracle before timing it, keep the fastest, write the table.

For each M bucket and candidate config: the config runs once on a verification case (exact int32
products, or the oracle within a named tolerance) and is dropped if wrong; survivors are timed on
every layer shape by CUDA-graph replay (`timing.graph_median_ms`: do_bench median, L2 flushed per
replay). The winner of a bucket has the lowest geometric mean of time / best time over the shapes.
Winners are written into the family's section of `zqkernels/gpu/configs/<gpu>.json` (the file is
created from default.json when the GPU has none, its other families kept as they are), and every
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
from timing import graph_median_ms  # noqa: E402

from zqkernels.gpu.configs import CONFIG_DIR  # noqa: E402

# Every model's layer shapes (the benchmark set and smaller ones, e.g. smollm2-135m for a CPU smoke run).
SHAPES = {s.name: s for m in MODELS.values() for s in m.layer_shapes()}
# The device the tune scripts run on: a CUDA GPU, or the CPU under TRITON_INTERPRET=1 (a smoke run
# of the scripts themselves; its timings mean nothing and it writes no table unless asked).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"



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
    return ap


def device_name():
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (TRITON_INTERPRET=1)"


def default_table_name():
    name = device_name().lower()
    for tag in ("h100", "h200", "a100", "l40s", "4090"):
        if tag in name:
            return f"{tag}.json"
    return name.replace(" ", "_") + ".json"


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
        self.record = {"family": family, "command": " ".join(sys.argv), "device": device_name(),
                       "torch": torch.__version__, "timer": "CUDA-graph replay, do_bench median, L2 flushed",
                       "rows": [], "winners": {}}

    def over_budget(self):
        return time.time() - self.t0 > self.args.budget_s

    def run(self, scales, m, candidates, verify, make_call):
        """verify(cfg, m) -> (ok, detail); make_call(cfg, shape, m) -> zero-argument closure."""
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
                row["us"] = {}
                for shape in self.shapes:
                    row["us"][shape.name] = 1000.0 * graph_median_ms(make_call(cfg, shape, m))
                timed.append(row)
            self.record["rows"].append(row)
            self.save()
        if not timed:
            return None
        best = {s.name: min(r["us"][s.name] for r in timed) for s in self.shapes}
        for r in timed:
            r["geomean_vs_best"] = math.exp(sum(math.log(r["us"][s] / best[s]) for s in best) / len(best))
        win = min(timed, key=lambda r: r["geomean_vs_best"])
        self.record["winners"].setdefault(scales, {})[str(m)] = dict(win["config"], us=win["us"])
        self.save()
        return win

    def save(self):
        Path(self.args.out).write_text(json.dumps(self.record, indent=1))

    def write_table(self, section_key=None):
        """Winners into configs/<gpu>.json's family section; returns the path written."""
        name = self.args.table or default_table_name()
        path = CONFIG_DIR / name
        table = json.loads(path.read_text() if path.exists() else (CONFIG_DIR / "default.json").read_text())
        key = section_key or self.family
        for scales, buckets in self.record["winners"].items():
            table.setdefault(key, {})[scales] = {m: {k: v for k, v in cfg.items() if k != "us"}
                                                 for m, cfg in sorted(buckets.items(), key=lambda kv: int(kv[0]))}
        table.setdefault("match", [device_name()])
        table.setdefault("_tuned_by", {})[key] = {"command": self.record["command"],
                                                  "results": Path(self.args.out).name}
        path.write_text(json.dumps(table, indent=1) + "\n")
        return path
