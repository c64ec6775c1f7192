"""`zq report`: pytest-benchmark JSON (+ accuracy JSON) -> REPORT.md, REPORT.html and PNG plots.

Inputs
------
Benchmark JSON: what `pytest perf/ --benchmark-json out.json` writes. Each benchmark's
`extra_info` (perf/conftest.py) carries family, method, role, shape, M, N, K, device, time_us
(do_bench median: the CUDA-graph figure where capture worked), time_us_eager, TFLOP/s or TOPS,
GB/s, bytes moved. Runs with back-to-back timing add `calls_per_replay` (N: the graph figure is
one replay of N calls over copies of the operands, divided by N) and `time_us_graph_single` (one
call per replay); a run without them timed one call per replay, and its graph figure is read as
that single-call figure. Each row's `timing` names the timer (`timer_label`); the report shows
them per device and says when one table mixes them. A benchmark without these fields (a foreign
suite) is kept with its pytest-benchmark median and its name as the method. `zq_perf.skipped` (perf/conftest.py) lists skipped benchmarks
and why. Several files may be given: speedups are recomputed over all of them, per device, shape
and M; where one (device, shape, M, method) appears twice the later file wins.

Accuracy JSON (the pipeline's, zqkernels/pipeline/results.py), read tolerantly:
- a list of records, or an object holding one under "results", "records", "runs" or "rows", or an
  object mapping a method name to a record (or straight to a perplexity);
- a record is an object with a method (`method`, or `name`), a perplexity (`ppl` or `perplexity`;
  null or absent for a speed-only record) and optionally `model`, `label` and any other fields:
  scalars become columns, objects one level deep become `key.sub` columns (`params.alpha`,
  `speed.decode_tokens_per_s`, `layer_summary.lut_reuse`), deeper values and lists are ignored
  (the pipeline's records, zqkernels/pipeline/results.py, are read as they are);
- where a model has an `fp16` (or `fp`, `float`, `fp32`, `bf16`) record, `ppl / fp` is added.

Every problem with the inputs raises `ReportError` (a ValueError) with a message naming the file
and what is wrong; `reports.cli` prints it, never a traceback.

Ceilings and claims are data at the top of this file. FP8 rowwise `_scaled_mm` (`fp8_rowwise`,
perf/bench_baselines.py) is the prefill bar: the 8-bit GEMM a Hopper user would pick instead of a
4-bit one where the GEMM is compute-bound, so the report gives every method's speedup over it, a
table at prefill M, and a plot. A projection to an RTX 4090 is computed from our measured efficiency (the fraction of
our device's roofline each kernel reaches, applied to the RTX 4090's datasheet roofline) and
labelled "projection, not measured" wherever it appears.
"""
from __future__ import annotations

import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: files only

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


class ReportError(ValueError):
    """A problem with the report's inputs, stated for the user (no traceback)."""


# --------------------------------------------------------------------------------------- data
# Ceilings by device-name substring: what a kernel's rate is divided by. Bytes count reads and
# writes (a copy moves twice its size), as bytes_moved does. Hopper's INT8 and FP8 MMAs run at
# twice the FP16 rate, so their ceiling is 2x the measured FP16 one, not a measurement itself;
# each "source" says which number is measured and which comes from the datasheet.
CEILINGS = {
    "H100": {
        "copy_gbps": 3000.0,
        "fp16_tflops": 735.0,
        "int8_tops": 1470.0,
        "fp8_tflops": 1470.0,
        "source": "H100 80GB HBM3, measured with the perf/ harness: copy ~3.0 TB/s, cuBLAS FP16 ~735 TFLOP/s; "
                  "INT8 / FP8 peak taken as 2x the measured FP16 (not measured)",
    },
    "H200": {
        "copy_gbps": 4300.0,
        "fp16_tflops": 790.0,
        "int8_tops": 1580.0,
        "fp8_tflops": 1580.0,
        "source": "H200, measured by the workplace's device notes (not a result of this repository): "
                  "device-to-device copy ~4.3 TB/s (read + write), bf16 8192^3 torch matmul ~790 TFLOP/s on "
                  "random data; INT8 / FP8 peak taken as 2x that (not measured). "
                  "Datasheet, dense: FP16/BF16 989 TFLOP/s, INT8 1979 TOPS, FP8 1979 TFLOP/s, HBM3e 4.8 TB/s",
    },
}

# RTX 4090 datasheet (dense tensor-core peaks): the projection's target, never a measurement.
RTX4090 = {
    "name": "RTX 4090",
    "gbps": 1008.0,
    "fp16_tflops": 165.0,  # FP16 with FP32 accumulate
    "int4_tops": 1321.0,
    "int8_tops": 660.6,  # Ada datasheet, dense
    "fp8_tflops": 330.3,  # FP8 with FP32 accumulate (what _scaled_mm does), dense; 660.6 with FP16 accumulate
}

# Which peak a method's math runs on: on our device (Hopper has no INT4 MMA: W4A4 runs on INT8)
# and on the RTX 4090 (where the papers' W4A4 kernels use INT4 MMA).
INT_METHODS_PREFIX = ("zq_w4a4", "zq_mosaic", "sweep_mosaic", "zq_zipper")
INT8_BASELINES = ("cublas_int8", "gemlite_a8w8_int8")
FP8_METHODS = ("fp8_rowwise", "fp8_rowwise_dynamic", "gemlite_a8w8_fp8")

# The prefill bar: FP8 rowwise _scaled_mm, and the token counts it is read at.
FP8_BAR = "fp8_rowwise"
PREFILL_MIN_M = 1024
# (ours, bar): like against like; a layer with its activation quantization against the FP8
# layer with its activation cast, GEMMs alone against the GEMM alone.
PREFILL_PAIRS = (
    ("zq_w4a4", "fp8_rowwise"),
    ("zq_w4a4_g128", "fp8_rowwise"),
    ("zq_mosaic_w4a4", "fp8_rowwise"),
    ("zq_w4a4_aq", "fp8_rowwise_dynamic"),
    ("zq_zipper_gpu", "fp8_rowwise_dynamic"),
    ("cublas_fp16", "fp8_rowwise"),
)

CLAIMS = [
    {
        "paper": "ZipperQuant",
        "claim": "up to 3.01x over W4A16",
        "claimed": 3.01,
        "claim_device": "RTX 4090 (INT4)",
        "ours": ("zq_zipper_gpu", "zq_zipper_hybrid"),
        "over": ("zq_w4a16", "torch_int4_wo", "gemlite_a16w4"),
    },
    {
        "paper": "MosaicQuant",
        "claim": "up to 1.24x over W16A16",
        "claimed": 1.24,
        "claim_device": "as published (abstract)",
        "ours": ("zq_mosaic_w4a4",),
        "over": ("cublas_fp16",),
    },
]

FP_METHODS = ("fp16", "fp", "float", "fp32", "bf16", "w16a16")
PROJECTION = "projection, not measured"


# ------------------------------------------------------------------------------------ loading
@dataclass
class Run:
    path: str
    device: str
    machine: dict
    commit: dict
    datetime: str | None
    n_benchmarks: int
    skipped: list = field(default_factory=list)
    zq_perf: dict | None = None


def _read_json(path: Path, what: str):
    if not path.exists():
        raise ReportError(f"{path}: no such file ({what})")
    if path.is_dir():
        raise ReportError(f"{path}: is a directory, expected a {what} JSON file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ReportError(f"{path}: empty file, not {what} JSON (did the benchmark run write nothing, "
                          f"or was it interrupted?)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                          f"a truncated file usually means the benchmark run was interrupted") from None


def _device_of(machine: dict, zq_perf: dict | None) -> str:
    gpu = machine.get("gpu") if isinstance(machine, dict) else None
    if isinstance(gpu, dict) and gpu.get("name"):
        return str(gpu["name"])
    if isinstance(machine, dict) and machine.get("zq_device"):
        return str(machine["zq_device"])
    if zq_perf and zq_perf.get("device"):
        return str(zq_perf["device"])
    cpu = machine.get("cpu") if isinstance(machine, dict) else None
    if isinstance(cpu, dict) and cpu.get("brand_raw"):
        return f"cpu: {cpu['brand_raw']}"
    return "unknown device"


def _num(v):
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


TIMING_BACK_TO_BACK = "CUDA graph, back-to-back calls on operand copies (N per replay)"
TIMING_SINGLE = "CUDA graph, one call per replay"
TIMING_SINGLE_OLD = "CUDA graph, one call per replay (a run without back-to-back timing)"
TIMING_EAGER = "do_bench, launched eagerly"


def timer_label(extra: dict, fallback: str | None = None) -> str:
    """How a result's primary time was taken, from its extra_info: back-to-back graph replays, a
    single call per replay (a run before back-to-back timing, or one that fell back to it), eager
    launches, or `fallback` (the row's own timer: CPU and foreign benchmarks)."""
    mode = extra.get("primary_mode")
    if mode == "graph":
        if "calls_per_replay" not in extra:
            return TIMING_SINGLE_OLD
        if extra.get("single_call_reason"):
            return TIMING_SINGLE
        return TIMING_BACK_TO_BACK
    if mode == "eager":
        return TIMING_EAGER
    return str(fallback or extra.get("timer") or "timer not recorded")


def _row_from_benchmark(bench: dict, run: Run, index: int, path: Path) -> dict:
    if not isinstance(bench, dict):
        raise ReportError(f"{path}: benchmark #{index} is not an object")
    extra = bench.get("extra_info") or {}
    if not isinstance(extra, dict):
        extra = {}
    stats = bench.get("stats") if isinstance(bench.get("stats"), dict) else {}
    median_s = _num(stats.get("median"))
    name = str(bench.get("name") or bench.get("fullname") or f"benchmark-{index}")
    time_us = _num(extra.get("time_us"))
    timer = extra.get("timer")
    if time_us is None and median_s is not None:
        time_us, timer = median_s * 1e6, "pytest-benchmark median"
    fullname = str(bench.get("fullname") or name)
    family = extra.get("family")
    if not family:
        stem = fullname.split("::")[0].rsplit("/", 1)[-1]
        family = stem.removeprefix("bench_").removesuffix(".py") if stem.startswith("bench_") else "other"
    row = {
        "source": run.path,
        "name": name,
        "fullname": fullname,
        "family": str(family),
        "method": str(extra.get("method") or name.split("[")[0].removeprefix("test_")),
        "role": str(extra.get("role") or "other"),
        "shape": str(extra.get("shape") or extra.get("shape_name") or "?"),
        "M": _num(extra.get("M", extra.get("m"))),
        "N": _num(extra.get("N", extra.get("n"))),
        "K": _num(extra.get("K", extra.get("k"))),
        "device": str(extra.get("device") or run.device),
        "time_us": time_us,
        "time_us_eager": _num(extra.get("time_us_eager")),
        "time_us_graph": _num(extra.get("time_us_graph")),
        # a run without calls_per_replay replayed one call per graph: its graph figure is that one
        "time_us_graph_single": _num(extra.get("time_us_graph_single", extra.get("time_us_graph")
                                               if "calls_per_replay" not in extra else None)),
        "calls_per_replay": _num(extra.get("calls_per_replay", 1 if extra.get("primary_mode") == "graph" else None)),
        "single_call_reason": extra.get("single_call_reason"),
        "primary_mode": extra.get("primary_mode"),
        "timer": timer,
        "timing": timer_label(extra, timer),
        "tflops": _num(extra.get("tflops")),
        "ops_unit": extra.get("ops_unit"),
        "gbps": _num(extra.get("gbps")),
        "bytes_moved": _num(extra.get("bytes_moved")),
        "flops": _num(extra.get("flops")),
        "density": _num(extra.get("density")),
        "fused": extra.get("fused"),
        "graph_error": extra.get("graph_error"),
        "notes": "; ".join(str(n) for n in extra.get("notes", []) if n) if isinstance(extra.get("notes"), list)
        else (str(extra.get("notes")) if extra.get("notes") else ""),
        "stats_median_us": None if median_s is None else median_s * 1e6,
    }
    # LUT benchmarks (bench_lut.py): the reuse factor E/U, wherever it was put
    reuse = _num(extra.get("reuse", extra.get("E/U", extra.get("reuse_factor"))))
    lut_stats = extra.get("lut_stats") if isinstance(extra.get("lut_stats"), dict) else None
    if reuse is None and lut_stats:
        reuse = _num(lut_stats.get("reuse"))
    row["reuse"] = reuse
    row["case"] = str(extra.get("case") or extra.get("data") or extra.get("pattern") or "")
    return row


def load_benchmarks(paths) -> tuple[pd.DataFrame, list[Run]]:
    """All benchmark rows of `paths` as one DataFrame, and one `Run` per file."""
    rows, runs = [], []
    for p in paths:
        path = Path(p)
        data = _read_json(path, "pytest-benchmark")
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
            if isinstance(data, list) and data and isinstance(data[0], dict) and ("ppl" in data[0] or "perplexity" in data[0]):
                raise ReportError(f"{path}: this looks like accuracy results; pass it with --accuracy")
            raise ReportError(f"{path}: not a pytest-benchmark JSON (no 'benchmarks' list); "
                              f"write one with `pytest perf/ --benchmark-json {path.name}`")
        machine = data.get("machine_info") if isinstance(data.get("machine_info"), dict) else {}
        zq_perf = data.get("zq_perf") if isinstance(data.get("zq_perf"), dict) else None
        skipped = [s for s in (zq_perf or {}).get("skipped", []) if isinstance(s, dict)]
        run = Run(path=str(path), device=_device_of(machine, zq_perf), machine=machine,
                  commit=data.get("commit_info") if isinstance(data.get("commit_info"), dict) else {},
                  datetime=data.get("datetime"), n_benchmarks=len(data["benchmarks"]), skipped=skipped,
                  zq_perf=zq_perf)
        runs.append(run)
        for i, bench in enumerate(data["benchmarks"]):
            rows.append(_row_from_benchmark(bench, run, i, path))
    df = pd.DataFrame(rows)
    if not df.empty:
        # the later file wins for a repeated (device, shape, M, N, K, method)
        key = ["device", "shape", "M", "N", "K", "method", "density", "fullname"]
        df = df.drop_duplicates(subset=key, keep="last").reset_index(drop=True)
    return df, runs


def load_accuracy(paths) -> pd.DataFrame:
    """Accuracy records of `paths` (see the module docstring for the accepted shapes)."""
    frames = []
    for p in paths:
        path = Path(p)
        data = _read_json(path, "accuracy")
        records = data
        if isinstance(data, dict):
            for key in ("results", "records", "runs", "rows"):
                if isinstance(data.get(key), list):
                    records = data[key]
                    break
            else:  # {method: record or ppl}
                records = []
                for method, value in data.items():
                    if isinstance(value, dict):
                        records.append({"method": method, **value})
                    elif _num(value) is not None:
                        records.append({"method": method, "ppl": value})
        if not isinstance(records, list):
            raise ReportError(f"{path}: accuracy JSON must be a list of records {{model, method, ppl, ...}}")
        rows = []
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise ReportError(f"{path}: accuracy record #{i} is not an object")
            method = rec.get("method", rec.get("name"))
            if method is None:
                raise ReportError(f"{path}: accuracy record #{i} has no method (key 'method' or 'name'); "
                                  f"its keys: {sorted(rec)}")
            raw_ppl = rec.get("ppl", rec.get("perplexity"))
            ppl = _num(raw_ppl)
            if raw_ppl is not None and ppl is None:
                raise ReportError(f"{path}: accuracy record #{i} ({method}) has a non-numeric ppl {raw_ppl!r}")
            row = {"model": str(rec.get("model", "?")), "method": str(method), "ppl": np.nan if ppl is None else ppl}
            for k, v in rec.items():
                if k in ("model", "method", "name", "ppl", "perplexity"):
                    continue
                if isinstance(v, (str, int, float, bool)) or v is None:
                    row[k] = v
                elif isinstance(v, dict):  # one level of nesting: params.alpha, speed.decode_tokens_per_s
                    for k2, v2 in v.items():
                        if isinstance(v2, (str, int, float, bool)):
                            row[f"{k}.{k2}"] = v2
            row["source"] = str(path)
            rows.append(row)
        if not rows:
            raise ReportError(f"{path}: no accuracy records")
        if all(np.isnan(r["ppl"]) for r in rows) and not any(k.startswith("speed.") for r in rows for k in r):
            raise ReportError(f"{path}: no record has a numeric ppl (key 'ppl' or 'perplexity') or speed")
        frames.append(pd.DataFrame(rows))
    if not frames:
        return pd.DataFrame()
    acc = pd.concat(frames, ignore_index=True)
    fp = acc[acc["method"].str.lower().isin(FP_METHODS)].dropna(subset=["ppl"]).groupby("model")["ppl"].first()
    acc["ppl / fp"] = [row.ppl / fp[row.model] if row.model in fp.index and fp[row.model] > 0 else np.nan
                       for row in acc.itertuples()]
    return acc


ACC_MAIN = ("model", "label", "method", "backend", "ppl", "ppl / fp", "effective_bits", "context", "eval_tokens",
            "act_group_size", "speed.prefill_tokens_per_s", "speed.decode_tokens_per_s", "speed.device")


def accuracy_tables(acc: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The main accuracy table and a second one with every other (parameter, summary) column."""
    main = [c for c in ACC_MAIN if c in acc.columns and acc[c].notna().any()]
    rest = [c for c in acc.columns if c not in main and c != "source" and acc[c].notna().any()
            and c not in ("model_source", "command", "model_note", "calib_text", "eval_text")]
    key = [c for c in ("model", "label", "method") if c in main]
    return acc[main], (acc[key + rest] if rest else pd.DataFrame())


# -------------------------------------------------------------------------------- computing
def gemm_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Timed GEMM-like rows of a GPU run (ours and baselines), one per (device, shape, M, method)."""
    if df.empty:
        return df
    keep = df["role"].isin(["ours", "baseline"]) & df["time_us"].notna() & (df["primary_mode"] != "cpu")
    return df[keep].copy()


def speedups(df: pd.DataFrame) -> pd.DataFrame:
    """Long table: device, shape, M, method, baseline, speedup (= baseline time / method time)."""
    g = gemm_rows(df)
    out = []
    for (device, shape, m), grp in g.groupby(["device", "shape", "M"], sort=False):
        times = grp.groupby("method")["time_us"].last()
        bases = grp[grp["role"] == "baseline"]["method"].unique()
        for method, t in times.items():
            for base in bases:
                if base != method and t > 0:
                    out.append({"device": device, "shape": shape, "M": int(m), "method": method,
                                "baseline": base, "speedup": times[base] / t})
    return pd.DataFrame(out, columns=["device", "shape", "M", "method", "baseline", "speedup"])


def ceilings_for(device: str) -> dict | None:
    for key, ceil in CEILINGS.items():
        if key.lower() in device.lower():
            return ceil
    return None


def _peak(method: str, ops_unit, ceil: dict) -> float:
    if method in FP8_METHODS:
        return ceil["fp8_tflops"]
    if method.startswith(INT_METHODS_PREFIX) or method in INT8_BASELINES or ops_unit == "TOPS":
        return ceil["int8_tops"]
    return ceil["fp16_tflops"]


def _peak_4090(method: str) -> float:
    if method.startswith(INT_METHODS_PREFIX):
        return RTX4090["int4_tops"]
    if method in INT8_BASELINES:
        return RTX4090["int8_tops"]
    if method in FP8_METHODS:
        return RTX4090["fp8_tflops"]
    return RTX4090["fp16_tflops"]


def prefill_bar_table(g: pd.DataFrame) -> pd.DataFrame:
    """At M >= PREFILL_MIN_M: the FP8 bar's time and, per PREFILL_PAIRS pair timed in these runs,
    bar time / method time (above 1: faster than FP8 rowwise). Rows (shape, M)."""
    if g.empty or FP8_BAR not in set(g["method"]):
        return pd.DataFrame()
    big = g[g["M"] >= PREFILL_MIN_M]
    p = big.pivot_table(index=["shape", "M"], columns="method", values="time_us", aggfunc="last")
    if FP8_BAR not in p.columns:
        return pd.DataFrame()
    out = pd.DataFrame(index=p.index)
    out[f"{FP8_BAR} (us)"] = p[FP8_BAR]
    for ours, bar in PREFILL_PAIRS:
        if ours in p.columns and bar in p.columns:
            out[f"{ours} vs {bar}"] = p[bar] / p[ours]
    out.index = out.index.set_levels([out.index.levels[0], out.index.levels[1].astype(int)])
    return out if len(out.columns) > 1 else pd.DataFrame()


def project_4090(df: pd.DataFrame) -> pd.DataFrame:
    """Times projected to an RTX 4090 (projection, not measured): each kernel keeps the fraction of
    its roofline it reaches on our device, on the RTX 4090's datasheet roofline. CPU-bound methods
    (the hybrid) are not projected."""
    g = gemm_rows(df)
    rows = []
    for r in g.itertuples():
        ceil = ceilings_for(r.device)
        if ceil is None or not r.flops or not r.bytes_moved or r.method == "zq_zipper_hybrid":
            continue
        t = r.time_us * 1e-6
        roof_here = max(r.bytes_moved / (ceil["copy_gbps"] * 1e9), r.flops / (_peak(r.method, r.ops_unit, ceil) * 1e12))
        eff = roof_here / t
        roof_4090 = max(r.bytes_moved / (RTX4090["gbps"] * 1e9), r.flops / (_peak_4090(r.method) * 1e12))
        rows.append({"device": r.device, "shape": r.shape, "M": int(r.M), "method": r.method, "role": r.role,
                     "efficiency": eff, "time_us_4090": roof_4090 / eff * 1e6})
    return pd.DataFrame(rows, columns=["device", "shape", "M", "method", "role", "efficiency", "time_us_4090"])


def _best_worst(sel: pd.DataFrame):
    best, worst = sel.loc[sel["speedup"].idxmax()], sel.loc[sel["speedup"].idxmin()]
    fmt = lambda r: f"{r['speedup']:.2f}x ({r['shape']}, M={int(r['M'])})"  # noqa: E731
    return fmt(best), fmt(worst)


def claims_table(sp: pd.DataFrame, proj: pd.DataFrame) -> pd.DataFrame:
    """One row per claim, device, our method and baseline: the best and the worst ratio over the
    run's shapes and M (no cherry-picking of the baseline), and the RTX 4090 projection."""
    rows = []
    devices = sorted(set(sp["device"])) if not sp.empty else []
    for claim in CLAIMS:
        found = False
        for device in devices:
            for ours in claim["ours"]:
                for over in claim["over"]:
                    sel = sp[(sp["device"] == device) & (sp["method"] == ours) & (sp["baseline"] == over)]
                    if sel.empty:
                        continue
                    found = True
                    best, worst = _best_worst(sel)
                    proj_txt = "n/a"
                    if not proj.empty:
                        pj = proj[proj["device"] == device].pivot_table(index=["shape", "M"], columns="method",
                                                                       values="time_us_4090", aggfunc="last")
                        if ours in pj.columns and over in pj.columns:
                            ratio = (pj[over] / pj[ours]).dropna()
                            if not ratio.empty:
                                (shape, m), r = ratio.idxmax(), ratio.max()
                                proj_txt = f"{r:.2f}x ({shape}, M={int(m)})"
                    rows.append({"paper": claim["paper"], "claim": claim["claim"], "claim device": claim["claim_device"],
                                 "our device": device, "ours": ours, "over": over, "measured best": best,
                                 "measured worst": worst, f"RTX 4090 best ({PROJECTION})": proj_txt})
        if not found:
            rows.append({"paper": claim["paper"], "claim": claim["claim"], "claim device": claim["claim_device"],
                         "our device": ", ".join(devices) or "(no GPU results)", "ours": " / ".join(claim["ours"]),
                         "over": " / ".join(claim["over"]), "measured best": "not measured in these runs",
                         "measured worst": "", f"RTX 4090 best ({PROJECTION})": "n/a"})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------ output
class Doc:
    """Blocks rendered twice: Markdown and HTML, same content."""

    def __init__(self, title):
        self.title = title
        self.blocks = []

    def h(self, level, text):
        self.blocks.append(("h", level, text))

    def p(self, text):
        self.blocks.append(("p", text))

    def table(self, df: pd.DataFrame, caption=None, index=False):
        self.blocks.append(("table", df, caption, index))

    def img(self, filename, alt):
        self.blocks.append(("img", filename, alt))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            if b[0] == "h":
                out += ["#" * b[1] + " " + b[2], ""]
            elif b[0] == "p":
                out += [b[1], ""]
            elif b[0] == "table":
                if b[2]:
                    out += [f"*{b[2]}*", ""]
                out += [_md_table(b[1], b[3]), ""]
            elif b[0] == "img":
                out += [f"![{b[2]}]({b[1]})", ""]
        return "\n".join(out)

    def html(self) -> str:
        css = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
               "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 6px;"
               "text-align:right}th{background:#eee}img{max-width:100%}caption{caption-side:top;font-style:italic;"
               "text-align:left}")
        out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
               f"<style>{css}</style></head><body><h1>{html.escape(self.title)}</h1>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1] + 1}>{html.escape(b[2])}</h{b[1] + 1}>")
            elif b[0] == "p":
                out.append(f"<p>{_inline_html(b[1])}</p>")
            elif b[0] == "table":
                if b[2]:
                    out.append(f"<p><em>{html.escape(b[2])}</em></p>")
                out.append(_fmt_frame(b[1].reset_index() if b[3] else b[1]).to_html(index=False, na_rep="",
                                                                                      escape=True, border=0))
            elif b[0] == "img":
                out.append(f"<p><img src='{html.escape(b[1])}' alt='{html.escape(b[2])}'></p>")
        out.append("</body></html>")
        return "\n".join(out)


def _inline_html(text):
    # `code` spans and **bold** only; everything else escaped
    parts = html.escape(text).split("`")
    s = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = s.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _fmt(v):
    if v is None or v is pd.NA or (isinstance(v, (float, np.floating)) and not math.isfinite(v)):
        return ""
    if isinstance(v, (float, np.floating)):
        if v == int(v) and abs(v) < 1e15:
            return str(int(v))
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}" if abs(v) >= 0.01 else f"{v:.2e}"
    if isinstance(v, (np.integer,)):
        return str(int(v))
    return str(v)


def _fmt_frame(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for c in out.columns:
        out[c] = [_fmt(v) for v in out[c].tolist()]
    out.columns = [" / ".join(str(x) for x in c) if isinstance(c, tuple) else str(c) for c in out.columns]
    return out


def _md_table(df: pd.DataFrame, index=False) -> str:
    f = _fmt_frame(df.reset_index() if index else df)
    cols = [str(c) for c in f.columns]
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for row in f.itertuples(index=False):
        lines.append("| " + " | ".join(esc(v) for v in row) + " |")
    return "\n".join(lines)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _save(fig, out_dir: Path, filename: str) -> str:
    fig.savefig(out_dir / filename, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return filename


def _method_order(methods):
    rank = {"cublas_fp16": 0, "fp8_rowwise": 1, "fp8_rowwise_dynamic": 2, "cublas_int8": 3, "torch_int4_wo": 4,
            "gemlite_a16w4": 5, "gemlite_a8w8_int8": 6, "gemlite_a8w8_fp8": 7, "zq_w4a16": 8}
    return sorted(methods, key=lambda m: (rank.get(m, 20), m))


def plot_speedup(sp: pd.DataFrame, device: str, baseline: str, out_dir: Path):
    d = sp[(sp["device"] == device) & (sp["baseline"] == baseline)]
    if d.empty:
        return None
    shapes = list(dict.fromkeys(d["shape"]))
    wrap = min(4, len(shapes))
    grid = sns.relplot(data=d, x="M", y="speedup", hue="method", style="method", col="shape", col_order=shapes,
                       col_wrap=wrap, kind="line", markers=True, dashes=False, height=3.0, aspect=1.2,
                       hue_order=_method_order(d["method"].unique()), facet_kws={"sharey": False})
    for ax in grid.axes.flat:
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    grid.figure.suptitle(f"Speedup over {baseline} vs M — {device}", y=1.03)
    return _save(grid.figure, out_dir, f"speedup_vs_{_safe(baseline)}_{_safe(device)}.png")


def plot_roofline(g: pd.DataFrame, device: str, ceil: dict | None, out_dir: Path):
    d = g[(g["device"] == device) & g["flops"].notna() & g["bytes_moved"].notna() & g["tflops"].notna()].copy()
    if d.empty:
        return None
    d["intensity"] = d["flops"] / d["bytes_moved"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    sns.scatterplot(data=d, x="intensity", y="tflops", hue="method", style="method", ax=ax, s=40,
                    hue_order=_method_order(d["method"].unique()))
    ax.set_xscale("log")
    ax.set_yscale("log")
    if ceil:
        xs = np.logspace(np.log10(d["intensity"].min() / 2), np.log10(d["intensity"].max() * 2), 200)
        for peak, label, ls in ((ceil["fp16_tflops"], "FP16 peak", "-"), (ceil["int8_tops"], "INT8/FP8 peak", "--")):
            ax.plot(xs, np.minimum(xs * ceil["copy_gbps"] / 1000.0, peak), color="black", ls=ls, lw=1,
                    label=f"{label} {peak:g} / copy {ceil['copy_gbps'] / 1000:g} TB/s")
    ax.set_xlabel("arithmetic intensity (ops / compulsory byte)")
    ax.set_ylabel("achieved TFLOP/s (float) or TOPS (integer)")
    ax.set_title(f"Roofline — {device}" + ("" if ceil else " (no measured ceilings for this device)"))
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, out_dir, f"roofline_{_safe(device)}.png")


def plot_lut(lut: pd.DataFrame, out_dir: Path):
    if lut.empty:
        return None
    d = lut.assign(M=lut["M"].astype(int))
    synthetic = d[d["case"].astype(str).str.startswith("reuse")]
    other = d[~d.index.isin(synthetic.index)]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    style = "M" if d["M"].nunique() > 1 else None
    if not synthetic.empty:
        sns.lineplot(data=synthetic, x="reuse", y="ratio", hue="baseline", style=style, markers=True, ax=ax)
    if not other.empty:  # real-ish layers: one point each, not part of the synthetic reuse sweep
        sns.scatterplot(data=other, x="reuse", y="ratio", hue="baseline", marker="*", s=180, ax=ax, legend=False)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("reuse factor E / U (stars: " + (", ".join(sorted(set(other["case"].astype(str)))) or "none") + ")")
    ax.set_ylabel("baseline time / LUT time (above 1: LUT faster)")
    devices = ", ".join(sorted(set(d["device"])))
    ax.set_title(f"Pattern LUT vs direct products — {devices}")
    return _save(fig, out_dir, "lut_ratio_vs_reuse.png")


def plot_density(sw: pd.DataFrame, device: str, out_dir: Path):
    if sw.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.lineplot(data=sw, x="density", y="time_us", hue="method", style="M", markers=True, ax=ax)
    ax.set_yscale("log")
    ax.set_xlabel("residual block density")
    ax.set_ylabel("time (us, median)")
    ax.set_title(f"MosaicQuant time vs residual density — {device}")
    return _save(fig, out_dir, f"mosaic_density_{_safe(device)}.png")


def lut_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """LUT speedups: for LUT benchmarks with a reuse factor, baseline time / LUT time per case."""
    if df.empty:
        return pd.DataFrame()
    d = df[(df["family"] == "lut") & df["time_us"].notna()]
    if d.empty:
        return pd.DataFrame()
    is_lut = d["method"].str.contains("lut", case=False)
    rows = []
    for key, grp in d.groupby(["device", "shape", "M", "case"], dropna=False, sort=False):
        luts = grp[is_lut.loc[grp.index]]
        others = grp[~is_lut.loc[grp.index]]
        for lut_row in luts.itertuples():
            reuse = lut_row.reuse if lut_row.reuse is not None and not pd.isna(lut_row.reuse) else \
                grp["reuse"].dropna().iloc[0] if grp["reuse"].notna().any() else None
            if reuse is None:
                continue
            for o in others.itertuples():
                rows.append({"device": key[0], "shape": key[1], "M": key[2], "case": key[3], "reuse": reuse,
                             "lut": lut_row.method, "baseline": o.method, "ratio": o.time_us / lut_row.time_us})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------- report
def _pivot_times(g: pd.DataFrame, values="time_us") -> pd.DataFrame:
    p = g.pivot_table(index=["shape", "M"], columns="method", values=values, aggfunc="last")
    p = p[_method_order(p.columns)]
    p.index = p.index.set_levels([p.index.levels[0], p.index.levels[1].astype(int)])
    return p


def timing_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per timer (`timing`): how many results, of how many methods, and the calls per replay."""
    out = []
    for label, grp in rows.groupby("timing", sort=True):
        n = grp["calls_per_replay"].dropna()
        out.append({"timer": label, "results": len(grp), "methods": grp["method"].nunique(),
                    "calls per replay": "" if n.empty else (f"{int(n.min())}" if n.min() == n.max()
                                                            else f"{int(n.min())}–{int(n.max())}")})
    return pd.DataFrame(out, columns=["timer", "results", "methods", "calls per replay"])


RELATIVE = (  # (numerator, denominator, what it answers)
    ("zq_w4a4_g128", "zq_w4a4", "per-group-128 activation scales cost"),
    ("zq_w4a4_aq", "zq_w4a4", "activation quantization in front"),
    ("zq_mosaic_w4a4", "zq_w4a4", "residual at 5 % density, fused"),
    ("zq_mosaic_w4a4_unfused", "zq_mosaic_w4a4", "what fusion saves"),
    ("zq_zipper_gpu", "zq_w4a4_aq", "the high part on the GPU"),
    ("zq_zipper_hybrid", "zq_zipper_gpu", "hybrid vs all-GPU"),
)


def _relative_table(g: pd.DataFrame) -> pd.DataFrame:
    p = g.pivot_table(index=["shape", "M"], columns="method", values="time_us", aggfunc="last")
    out = pd.DataFrame(index=p.index)
    for num, den, _ in RELATIVE:
        if num in p.columns and den in p.columns:
            out[f"{num} / {den}"] = p[num] / p[den]
    return out if len(out.columns) else pd.DataFrame()


def _skip_summary(runs) -> pd.DataFrame:
    rows = []
    for run in runs:
        reasons = {}
        for s in run.skipped:
            reasons.setdefault(str(s.get("reason", "?")), []).append(str(s.get("nodeid", "")))
        for reason, ids in reasons.items():
            files = sorted({i.split("::")[0].rsplit("/", 1)[-1] for i in ids})
            rows.append({"run": Path(run.path).name, "skipped": len(ids), "reason": reason, "files": ", ".join(files)})
    return pd.DataFrame(rows)


def build_report(bench_paths, accuracy_paths=(), out_dir="reports/out", title=None) -> dict:
    """Write REPORT.md, REPORT.html and the plots into `out_dir`; return what was written and the
    messages for the user. Raises ReportError on unusable inputs."""
    bench_paths, accuracy_paths = list(bench_paths or []), list(accuracy_paths or [])
    if not bench_paths and not accuracy_paths:
        raise ReportError("nothing to report: give at least one benchmark JSON (or --accuracy)")
    df, runs = load_benchmarks(bench_paths)
    acc = load_accuracy(accuracy_paths)
    messages = []
    for run in runs:
        if run.n_benchmarks == 0:
            why = (f"{len(run.skipped)} benchmarks were skipped: "
                   + "; ".join(sorted({str(s.get('reason')) for s in run.skipped}))) if run.skipped else \
                "no benchmark was selected or run"
            messages.append(f"{run.path}: no benchmark results ({why})")
    if df.empty and acc.empty:
        raise ReportError("no results to report. " + " ".join(messages))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    devices = sorted(set(df["device"])) if not df.empty else []
    doc = Doc(title or "zqkernels benchmark report")
    doc.p("Devices: " + (", ".join(f"**{d}**" for d in devices) if devices else "none (accuracy only)") + ". "
          "GPU times are `triton.testing.do_bench` medians with the L2 cache flushed before every timed "
          "launch (CUDA events), on a CUDA graph where capture worked (`primary_mode`), eagerly otherwise. "
          "Where a result has N calls per replay (back-to-back timing), one replay holds N calls, each on "
          "its own copy of the operands (none of them in the L2 from the call before), and the time is the "
          "replay's divided by N, as layers run back to back in a model; a figure of one call per replay "
          "includes the fixed cost of a replay. The timers are listed per device. "
          "Speedup = baseline time / method time, same device, shape and M. Produced by `zq report` from "
          + ", ".join(f"`{Path(p).name}`" for p in bench_paths + accuracy_paths) + ".")

    # runs
    doc.h(2, "Runs")
    run_rows = []
    for run in runs:
        m = run.machine
        run_rows.append({"file": Path(run.path).name, "device": run.device, "torch": m.get("torch", ""),
                         "triton": m.get("triton", ""), "python": m.get("python_version", ""),
                         "commit": (run.commit.get("id") or "")[:10] + (" (dirty)" if run.commit.get("dirty") else ""),
                         "date": run.datetime or "", "benchmarks": run.n_benchmarks, "skipped": len(run.skipped)})
    if run_rows:
        doc.table(pd.DataFrame(run_rows))
    skips = _skip_summary(runs)
    if not skips.empty:
        doc.p("Skipped benchmarks (they are not in the tables below):")
        doc.table(skips)
    for msg in messages:
        doc.p(f"Note: {msg}.")

    sp = speedups(df) if not df.empty else pd.DataFrame()
    proj = project_4090(df) if not df.empty else pd.DataFrame()
    g_all = gemm_rows(df) if not df.empty else pd.DataFrame()
    images = []

    # claims first: the question the report answers
    doc.h(2, "Paper claims beside our measurements")
    doc.p("Each claim is from the paper's abstract. One row per claim, device, our method and baseline: the "
          "largest and smallest ratio (baseline time / ours) over the shapes and M of these runs, on the device named. The RTX 4090 column is a **" + PROJECTION + "**: our "
          "measured fraction of our device's roofline applied to the RTX 4090 datasheet roofline "
          f"({RTX4090['gbps']:g} GB/s; INT4 {RTX4090['int4_tops']:g} TOPS for W4A4 kernels; FP16 with FP32 "
          f"accumulate {RTX4090['fp16_tflops']:g} TFLOP/s; INT8 {RTX4090['int8_tops']:g} TOPS; FP8 with FP32 "
          f"accumulate {RTX4090['fp8_tflops']:g} TFLOP/s); the hybrid's "
          "CPU side is not projected.")
    doc.table(claims_table(sp if not sp.empty else
                           pd.DataFrame(columns=["device", "shape", "M", "method", "baseline", "speedup"]), proj))

    gpu_devices = [d for d in devices if not g_all.empty and (g_all["device"] == d).any()
                   or ((df["device"] == d) & (df["primary_mode"].isin(["graph", "eager"]))).any()]
    if not gpu_devices:
        doc.h(2, "GPU results")
        doc.p("No GPU benchmark results in these runs" + (" (they were skipped: see Runs)." if not skips.empty else "."))
    for device in gpu_devices:
        g = g_all[g_all["device"] == device] if not g_all.empty else g_all
        ceil = ceilings_for(device)
        doc.h(2, f"GPU kernels on {device}")
        if g.empty:
            doc.p(f"No GEMM results on {device}.")
        else:
            doc.table(_pivot_times(g), caption=f"time (us, median) per shape and M — {device}", index=True)
            timed = df[(df["device"] == device) & df["primary_mode"].isin(["graph", "eager"])]
            doc.p(f"Timers of the GPU results on {device} (`calls per replay`: N of the back-to-back replays):")
            doc.table(timing_summary(timed), caption=f"timers — {device}")
            graph_labels = sorted(set(g.loc[g["primary_mode"] == "graph", "timing"]))
            if len(graph_labels) > 1:
                mixed = (f"the GEMM results on {device} mix timers ({'; '.join(graph_labels)}): a ratio between a "
                         "back-to-back figure and a one-call-per-replay figure compares different things")
                doc.p(f"Note: {mixed}.")
                messages.append(mixed)
            if (g["calls_per_replay"].fillna(1) > 1).any():
                doc.table(_pivot_times(g, "calls_per_replay").astype("Int64"), index=True,
                          caption=f"calls per replay (N) of the figures above — {device}")
            single = g[g["time_us_graph_single"].notna() & (g["timing"] == TIMING_BACK_TO_BACK)]
            if not single.empty:
                doc.table(_pivot_times(single, "time_us_graph_single"), index=True,
                          caption=f"time (us, median) with one call per graph replay, the replay's fixed cost "
                                  f"included — {device}")
            bar = prefill_bar_table(g)
            if not bar.empty:
                doc.h(3, f"FP8 rowwise, the prefill bar, on {device}")
                doc.p(f"FP8 W8A8 (`torch._scaled_mm`, per-token x per-channel scales) is what a Hopper user runs "
                      f"instead of a 4-bit GEMM when the GEMM is compute-bound. Each column is the FP8 time over "
                      f"the method's at M >= {PREFILL_MIN_M} (above 1: faster than FP8), like against like: "
                      "GEMMs alone against `fp8_rowwise`, layers with their activation quantization against "
                      "`fp8_rowwise_dynamic` (its activation cast in front).")
                doc.table(bar, caption=f"speedup over FP8 rowwise at prefill (x) — {device}", index=True)
            d_sp = sp[sp["device"] == device]
            for base in ("cublas_fp16", FP8_BAR, "zq_w4a16", "torch_int4_wo"):
                s = d_sp[d_sp["baseline"] == base]
                if s.empty:
                    continue
                piv = s.pivot_table(index=["shape", "M"], columns="method", values="speedup", aggfunc="last")
                piv = piv[_method_order(piv.columns)]
                doc.table(piv, caption=f"speedup over {base} (x) — {device}", index=True)
                img = plot_speedup(sp, device, base, out)
                if img:
                    images.append(img)
                    doc.img(img, f"speedup over {base} vs M on {device}")
            eager = g[g["time_us_eager"].notna()]
            if not eager.empty and (g["primary_mode"] == "graph").any():
                pe = eager.pivot_table(index=["shape", "M"], columns="method", values="time_us_eager", aggfunc="last")
                doc.table(pe[_method_order(pe.columns)], index=True,
                          caption=f"time (us, median) launched eagerly, Python and launch overhead included — {device}")
            rel = _relative_table(g)
            if not rel.empty:
                doc.table(rel, index=True, caption=f"time ratios between our kernels (first time / second time) — {device}")
            graph_err = g[g["graph_error"].notna() & (g["primary_mode"] == "eager")]
            if not graph_err.empty:
                doc.p("Timed eagerly (no CUDA graph): " + "; ".join(
                    sorted({f"{r.method}: {r.graph_error}" for r in graph_err.itertuples()})))
            one_call = g[g["single_call_reason"].notna() & (g["primary_mode"] == "graph")]
            if not one_call.empty:
                doc.p("Timed one call per replay (no back-to-back copies): " + "; ".join(
                    sorted({f"{r.method}: {r.single_call_reason}" for r in one_call.itertuples()})))
            notes = g[g["notes"].astype(str) != ""]
            if not notes.empty:
                doc.p("Notes: " + "; ".join(sorted({f"{r.method}: {r.notes}" for r in notes.itertuples()})))

            # roofline
            doc.h(3, f"Roofline on {device}")
            if ceil:
                doc.p(f"Ceilings: {ceil['source']}. Bytes are the compulsory traffic (inputs read once, output "
                      "written once); W4A4 kernels run on INT8 tensor cores (Hopper has no INT4 MMA); FP8 "
                      "methods are held to the FP8 peak.")
            else:
                doc.p(f"No measured ceilings for {device}: achieved rates only.")
            rates = g.groupby("method").agg(best_tflops=("tflops", "max"), best_gbps=("gbps", "max"),
                                            unit=("ops_unit", "first")).reset_index()
            rates = rates.set_index("method").loc[_method_order(rates["method"])].reset_index()
            if ceil:
                rates["% of compute peak"] = [100 * r.best_tflops / _peak(r.method, r.unit, ceil)
                                              if r.best_tflops == r.best_tflops else np.nan for r in rates.itertuples()]
                rates["% of copy BW"] = 100 * rates["best_gbps"] / ceil["copy_gbps"]
            doc.table(rates, caption=f"best achieved rate per method over all shapes and M — {device}")
            img = plot_roofline(g, device, ceil, out)
            if img:
                images.append(img)
                doc.img(img, f"roofline on {device}")

        # activation quantization
        aq = df[(df["device"] == device) & (df["family"] == "actquant") & df["time_us"].notna()]
        if not aq.empty:
            doc.h(3, f"Activation quantization on {device}")
            t = aq[["shape", "M", "K", "method", "time_us", "gbps"]].copy()
            if ceil:
                t["% of copy BW"] = 100 * t["gbps"] / ceil["copy_gbps"]
            doc.table(t.sort_values(["method", "shape", "M"]),
                      caption=f"bytes read + written per second — {device}")

        # mosaic density sweep
        sw = df[(df["device"] == device) & df["method"].str.startswith("sweep_mosaic") & df["time_us"].notna()]
        if not sw.empty:
            doc.h(3, f"MosaicQuant: time vs residual density on {device}")
            sw = sw.assign(M=sw["M"].astype(int))
            piv = sw.pivot_table(index=["shape", "M", "density"], columns="method", values="time_us", aggfunc="last")
            if {"sweep_mosaic_fused", "sweep_mosaic_unfused"} <= set(piv.columns):
                piv["unfused / fused"] = piv["sweep_mosaic_unfused"] / piv["sweep_mosaic_fused"]
            base = g_all[(g_all["device"] == device) & (g_all["method"] == "zq_w4a4")] if not g_all.empty else g_all
            if not base.empty and "sweep_mosaic_fused" in piv.columns:
                w = base.set_index(["shape", "M"])["time_us"]
                piv["fused / zq_w4a4"] = [piv["sweep_mosaic_fused"].iloc[i] / w.get((s, m), np.nan)
                                          for i, (s, m, _) in enumerate(piv.index)]
            doc.table(piv, caption=f"time (us) vs density — {device}", index=True)
            img = plot_density(sw, device, out)
            if img:
                images.append(img)
                doc.img(img, f"mosaic time vs density on {device}")

    # projection table
    if not proj.empty:
        doc.h(2, f"RTX 4090 ({PROJECTION})")
        doc.p(f"Every number in this section is a **{PROJECTION}**: our kernels' measured roofline efficiency "
              "carried to the RTX 4090 datasheet roofline. It assumes the same efficiency there, which a different "
              "architecture (and the papers' INT4 MMA) need not give.")
        pp = proj.pivot_table(index=["shape", "M"], columns="method", values="time_us_4090", aggfunc="last")
        pp = pp[_method_order(pp.columns)]
        doc.table(pp, caption=f"projected time on RTX 4090 (us) — {PROJECTION}; measured on "
                  + ", ".join(sorted(set(proj["device"]))), index=True)

    # LUT
    lut = lut_ratios(df)
    lut_rows = df[df["family"] == "lut"] if not df.empty else df
    if not lut_rows.empty:
        doc.h(2, "Pattern LUT (CPU) vs the direct products")
        if lut.empty:
            doc.p("LUT benchmarks were found but none carries a reuse factor (`extra_info['reuse']` = E/U), "
                  "so no ratio-vs-reuse curve can be drawn. Times:")
            doc.table(lut_rows[["name", "device", "time_us"]])
        else:
            for device, part in lut.groupby("device"):
                t = part.assign(M=part["M"].astype(int)).pivot_table(
                    index=["case", "reuse", "M"], columns="baseline", values="ratio", aggfunc="last")
                t = t.sort_index(level=["reuse", "M"])
                doc.table(t, index=True, caption=f"baseline time / LUT time (above 1: the LUT is faster) by "
                          f"reuse E/U and M — {device}")
            img = plot_lut(lut, out)
            if img:
                images.append(img)
                doc.img(img, "LUT speedup vs reuse factor")

    # accuracy
    doc.h(2, "Accuracy")
    if acc.empty:
        doc.p("No accuracy results given (`--accuracy acc.json`, written by the pipeline).")
    else:
        main, rest = accuracy_tables(acc)
        doc.table(main, caption="perplexity (lower is better); ppl / fp against the model's fp16 record; from "
                  + ", ".join(sorted({Path(s).name for s in acc["source"]})))
        notes = sorted({str(v) for c in ("model_note", "eval_text", "calib_text") if c in acc.columns
                        for v in acc[c].dropna().unique()})
        if notes:
            doc.p("Model and text: " + "; ".join(notes))
        if not rest.empty:
            doc.table(rest, caption="parameters and layer summaries of the same records")

    # CPU / other benchmarks not shown above
    if not df.empty:
        other = df[~df.index.isin(g_all.index) & (df["family"] != "actquant") & (df["family"] != "lut")
                   & ~df["method"].str.startswith("sweep_mosaic")]
        if not other.empty:
            doc.h(2, "Other benchmarks")
            doc.table(other[["name", "device", "shape", "M", "N", "K", "time_us", "timer"]])

    (out / "REPORT.md").write_text(doc.markdown(), encoding="utf-8")
    (out / "REPORT.html").write_text(doc.html(), encoding="utf-8")
    return {"out_dir": str(out), "files": ["REPORT.md", "REPORT.html", *images], "messages": messages,
            "devices": devices}
