"""Results records: JSON that `zq report` reads, and the plain-text / Markdown tables of `zq run`.

A results file is a JSON list of records, one per (model, method configuration):
  model, model_source, model_note, architecture, method, label, params{...}, backend,
  ppl, predictions, eval_tokens, context, calib_tokens, calib_text, eval_text,
  effective_bits (bits per weight over all decoder linears: low + high + indices + scales),
  layer_summary{rel_error_mean, rel_error_max, bits_low/high/index/scale, lut_E, lut_U, lut_reuse,
                high_density (zipper), density_used (mosaic)},
  layer_stats[{name, N, K, rel_error, effective_bits{...}, lut_E, lut_U, lut_reuse, ... }],
  speed{prefill_tokens_per_s, decode_tokens_per_s (CUDA graphs on a GPU, eager on a CPU:
        prefill_mode, decode_mode), prefill_tokens_per_s_eager, decode_tokens_per_s_eager,
        prefill_tokens_per_s_graph (GPU), batch,
        prefill_tokens, decode_tokens, device,
        peak_memory_bytes, graph_tokens_equal_static_eager, ...} (when timed; evaluate.speed),
  speed_b<B>{...} (the same at each further batch size B of `zq bench --batch`),
  dtype, quantize_s, eval_s, command (the command line that produced it).
A named random-weight configuration (`--model llama3-8b`) has no ppl and no evaluation text; its
record holds the model's `config` dimensions instead.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


def _clean(rec):
    return {k: v for k, v in rec.items() if not k.startswith("_")}


def write_records(path, records):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([_clean(r) for r in records], indent=1, default=float) + "\n")
    return path


def load_records(path):
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: a results file is a JSON list of records")
    return data


def _fp_ppl(records):
    for r in records:
        if r.get("method") == "fp16" and r.get("ppl"):
            return r["ppl"]
    return None


def _fmt(v, spec):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


COLUMNS = ("method", "ppl", "x FP", "bits/w", "out err", "max err", "E", "U", "E/U", "hi dens", "res dens",
           "prefill t/s", "decode t/s")


def table_rows(records):
    fp = _fp_ppl(records)
    rows = []
    for r in records:
        s = r.get("layer_summary", {})
        sp = r.get("speed", {})
        ppl = r.get("ppl")
        rows.append([
            r.get("label", r.get("method")),
            _fmt(ppl, ".2f"),
            _fmt(ppl / fp if (ppl and fp) else None, ".2f"),
            _fmt(r.get("effective_bits"), ".2f"),
            _fmt(s.get("rel_error_mean"), ".3f"),
            _fmt(s.get("rel_error_max"), ".3f"),
            _fmt(s.get("lut_E"), "d"),
            _fmt(s.get("lut_U"), "d"),
            _fmt(s.get("lut_reuse"), ".2f"),
            _fmt(s.get("high_density"), ".4f"),
            _fmt(s.get("density_used"), ".3f"),
            _fmt(sp.get("prefill_tokens_per_s"), ".1f"),
            _fmt(sp.get("decode_tokens_per_s"), ".1f"),
        ])
    return rows


def _fixed_width(columns, body):
    """Header, a rule, then the rows: the first column left-aligned, the others right-aligned."""
    rows = [list(columns)] + body
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_table(records):
    """Fixed-width text table: perplexity, ratio to fp16, bits per weight, layer error, table stats."""
    return _fixed_width(COLUMNS, table_rows(records))


def speed_entries(rec):
    """[(batch, speed dict)] of a record: `speed`, then every `speed_b<B>`."""
    out = [(v.get("batch", 1), v) for k, v in rec.items()
           if (k == "speed" or (k.startswith("speed_b") and k[7:].isdigit())) and isinstance(v, dict)]
    return sorted(out, key=lambda e: e[0])


SPEED_COLUMNS = ("method", "batch", "prefill t/s", "prefill", "eager prefill t/s", "decode t/s", "decode",
                 "eager decode t/s", "graph = eager step", "peak GiB", "bits/w", "quantize s")


def speed_rows(records):
    rows = []
    for r in records:
        for batch, sp in speed_entries(r):
            same = sp.get("graph_tokens_equal_static_eager")
            peak = sp.get("peak_memory_bytes")
            rows.append([r.get("label", r.get("method")), str(batch), _fmt(sp.get("prefill_tokens_per_s"), ".1f"),
                         sp.get("prefill_mode", "-"), _fmt(sp.get("prefill_tokens_per_s_eager"), ".1f"),
                         _fmt(sp.get("decode_tokens_per_s"), ".1f"), sp.get("decode_mode", "-"),
                         _fmt(sp.get("decode_tokens_per_s_eager"), ".1f"),
                         "-" if same is None else ("yes" if same else "NO"),
                         _fmt(peak / 2**30 if peak is not None else None, ".2f"),
                         _fmt(r.get("effective_bits"), ".2f"), _fmt(r.get("quantize_s"), ".1f")])
    return rows


def speed_table(records):
    """Fixed-width text table of every timed batch size: prefill and decode tokens/s (the mode each
    figure is, the eager one beside it), whether the CUDA graph's tokens equal
    the same step run eagerly, peak GPU memory, bits per weight and quantization time."""
    return _fixed_width(SPEED_COLUMNS, speed_rows(records))


def _md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def write_report(path, records, command=""):
    """Markdown: the main table, then per-layer table statistics and output error of each method."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    r0 = records[0] if records else {}
    parts = [
        f"# zq run: {r0.get('model', '?')}",
        "",
        f"- model: `{r0.get('model_source', '?')}` ({r0.get('architecture', '?')})",
        f"- note: {r0.get('model_note') or '-'}",
        f"- perplexity: {r0.get('eval_tokens')} evaluation tokens ({r0.get('eval_text')}), non-overlapping "
        f"windows of {r0.get('context')} tokens",
        f"- calibration: {r0.get('calib_tokens')} tokens ({r0.get('calib_text')}), disjoint from the evaluation text",
        f"- backend: {r0.get('backend')}",
        f"- command: `{command}`" if command else "",
        "",
        _md_table(COLUMNS, table_rows(records)),
        "",
        "bits/w: bits per weight over all decoder linears (4-bit low/base part + high part or residual blocks + "
        "indices + fp16 scales). out err: relative Frobenius error of each layer's output against the float layer "
        "on calibration rows (mean / max over layers). E, U, E/U: ZipperQuant pattern-table entries, distinct "
        "patterns and reuse. hi dens: nonzero fraction of q_high. res dens: MosaicQuant residual blocks kept.",
        "",
    ]
    for r in records:
        layers = r.get("layer_stats", [])
        if r.get("method") not in ("zipper", "mosaic") or not layers:
            continue
        parts += [f"## per-layer: {r.get('label')} {json.dumps(r.get('params', {}))}", ""]
        if r["method"] == "zipper":
            header = ("layer", "N x K", "E", "U", "E/U", "hi dens", "bits/w", "out err")
            rows = [(x["name"], f"{x['N']}x{x['K']}", x.get("lut_E"), x.get("lut_U"), _fmt(x.get("lut_reuse"), ".2f"),
                     _fmt(x.get("high_density"), ".4f"), _fmt(x["effective_bits"]["total"], ".2f"),
                     _fmt(x.get("rel_error"), ".4f")) for x in layers]
        else:
            header = ("layer", "N x K", "blocks kept", "res dens", "bits/w", "out err")
            rows = [(x["name"], f"{x['N']}x{x['K']}", f"{x.get('blocks_kept')}/{x.get('blocks_total')}",
                     _fmt(x.get("density_used"), ".3f"), _fmt(x["effective_bits"]["total"], ".2f"),
                     _fmt(x.get("rel_error"), ".4f")) for x in layers]
        parts += [_md_table(header, rows), ""]
    path.write_text("\n".join(parts))
    return path


# -- the README's accuracy table -------------------------------------------------------------------
# A README block between these markers is generated from the results files named in the opening
# marker; tests/test_readme_tables.py fails when the two disagree.
TABLE_OPEN = "<!-- accuracy-table:"
TABLE_CLOSE = "<!-- /accuracy-table -->"
_FAMILY = {"act-floor": "activation floor", "rtn-w4a4": "RTN", "smoothquant-w4a4": "SmoothQuant",
           "hadamard-w4a4": "Hadamard RTN", "zipper": "ZipperQuant", "mosaic": "MosaicQuant", "w4a16": "RTN W4A16"}


def _alpha(p):
    a = p.get("alpha")
    return "no smoothing" if a is None else f"α={a:g}"


def describe(rec):
    """(method, weights, activations) of a record in words, from its params."""
    p = rec.get("params", {})
    m = rec.get("method")
    if m == "fp16":
        return "FP (dequantized Q4_1)", "float", "float"
    acts = "float" if p.get("act_bits") is None else (
        f"{p['act_bits']}-bit, " + (f"groups of {p['act_group_size']}" if p.get("act_group_size") else "per token"))
    group = f"groups of {p['group_size']}" if p.get("group_size") else "per channel"
    if m == "act-floor":
        name = f"activation floor, {_alpha(p)}" + (", rotated" if p.get("rotate") else "")
        return name, "float", acts
    if m == "zipper":
        return (f"ZipperQuant {_alpha(p)}, outliers {p['outlier_ratio']:g}",
                f"4-bit low + {p['high_bits']}-bit sparse high, per channel", acts + " (high part: float)")
    if m == "mosaic":
        return (f"MosaicQuant {_alpha(p)}, density {p['density']:g}",
                f"4-bit {group} + 4-bit {p['block'][0]}x{p['block'][1]} residual blocks", acts)
    name = _FAMILY.get(m, m) + ("" if m == "rtn-w4a4" else f" {_alpha(p)}")
    return name, f"{p.get('weight_bits', 4)}-bit {group}", acts


def _matching_floor(rec, floors):
    """The floor with the record's smoothing, rotation and activation format (None if not run)."""
    p = rec.get("params", {})
    key = (p.get("alpha") if rec["method"] != "rtn-w4a4" else None, rec["method"] == "hadamard-w4a4",
           p.get("act_bits"), p.get("act_group_size"))
    return floors.get(key)


def accuracy_table(records):
    """Markdown table of perplexity, x FP, x the matching activation floor and bits per weight.

    All records must score the same text, tokens and context (else ValueError); a configuration
    (label and params) that appears twice is shown once, from its first record. Rows go by method
    family, then bits per weight.
    """
    if not records:
        raise ValueError("no records")
    keys = ("eval_text", "eval_tokens", "context", "calib_text", "calib_tokens")
    first = {k: records[0].get(k) for k in keys}
    for r in records:
        other = {k: r.get(k) for k in keys}
        if other != first:
            raise ValueError(f"records score different texts: {first} vs {other}")
    seen, rows = set(), []
    for r in records:
        key = (r.get("label"), json.dumps(r.get("params", {}), sort_keys=True))
        if key not in seen and r.get("ppl") is not None:
            seen.add(key)
            rows.append(r)
    rank = {m: i for i, m in enumerate(("fp16", "act-floor", "rtn-w4a4", "smoothquant-w4a4", "hadamard-w4a4",
                                        "zipper", "mosaic"))}
    rows.sort(key=lambda r: (rank.get(r["method"], len(rank)), r.get("effective_bits") or 0.0))
    fp = _fp_ppl(rows)
    floors = {}
    for r in rows:
        if r["method"] == "act-floor":
            p = r["params"]
            floors.setdefault((p.get("alpha"), bool(p.get("rotate")), p.get("act_bits"), p.get("act_group_size")), r)
    header = ("method", "weights", "activations", "bits/weight", "ppl", "× FP", "× its floor")
    body = []
    for r in rows:
        name, weights, acts = describe(r)
        floor = _matching_floor(r, floors) if r["method"] not in ("fp16", "act-floor") else None
        body.append((name, weights, acts, _fmt(r.get("effective_bits"), ".2f"), _fmt(r["ppl"], ".2f"),
                     _fmt(r["ppl"] / fp if fp else None, ".2f"),
                     _fmt(r["ppl"] / floor["ppl"] if floor else None, ".3f")))
    lines = [f"Text: {first['eval_text']}, {first['eval_tokens']} tokens in windows of {first['context']}; "
             f"calibration: {first['calib_text']}, {first['calib_tokens']} tokens.", ""]
    return "\n".join(lines) + _md_table(header, body) + "\n"


def table_blocks(markdown):
    """[(files, start, end)] of every generated block in a Markdown text: `files` as named in the
    opening marker, [start, end) the character span of the block's body."""
    out, pos = [], 0
    while (i := markdown.find(TABLE_OPEN, pos)) >= 0:
        j = markdown.index("-->", i)
        files = markdown[i + len(TABLE_OPEN): j].split()
        start = j + len("-->") + 1
        end = markdown.find(TABLE_CLOSE, start)
        if end < 0:
            raise ValueError(f"accuracy table opened at character {i} is never closed with {TABLE_CLOSE}")
        out.append((files, start, end))
        pos = end
    return out


def render_blocks(markdown, root="."):
    """The Markdown text with every generated block rebuilt from its results files."""
    parts, last = [], 0
    for files, start, end in table_blocks(markdown):
        records = [r for f in files for r in load_records(Path(root) / f)]
        parts += [markdown[last:start], accuracy_table(records)]
        last = end
    return "".join(parts) + markdown[last:]


def plot_pareto(records, path, act_bits=4, act_group_size=32):
    """Perplexity against bits per weight for one activation format, one marker per configuration,
    the Pareto front of each method family joined; the floors and FP as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    fams = {}
    for r in records:
        p = r.get("params", {})
        same_format = p.get("act_bits") == act_bits and p.get("act_group_size") == act_group_size
        if r.get("ppl") is None or not (same_format or r.get("method") == "fp16"):
            continue
        if r["method"] in ("fp16", "act-floor"):
            style = ":" if r["method"] == "fp16" else "--"
            ax.axhline(r["ppl"], ls=style, lw=0.8, color="grey")
            ax.text(0.99, r["ppl"], describe(r)[0], fontsize=6, va="bottom", ha="right", color="grey",
                    transform=ax.get_yaxis_transform())
            continue
        fams.setdefault(_FAMILY.get(r["method"], r["method"]), []).append((r["effective_bits"], r["ppl"]))
    for fam, pts in fams.items():
        pts.sort()
        front, best = [], float("inf")
        for b, p in pts:
            if p < best:
                front.append((b, p))
                best = p
        sc = ax.scatter(*zip(*pts), s=18, label=fam)
        ax.plot(*zip(*front), color=sc.get_facecolor()[0], lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (indices at their smallest width, fp16 scales)")
    ax.set_ylabel("perplexity")
    fmt = "per token" if act_group_size is None else f"groups of {act_group_size}"
    ax.set_title(f"{act_bits}-bit activations, {fmt}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_speed(records, path):
    """Prefill and decode tokens/s per method (bars), one group of bars per batch size; the decode
    panel shows the timed decode (CUDA graphs on a GPU) with the eager decode hatched beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    entries = [(r.get("label", r.get("method")), b, sp) for r in records for b, sp in speed_entries(r)]
    if not entries:
        raise ValueError("no record holds a speed measurement to plot")
    labels = list(dict.fromkeys(e[0] for e in entries))
    batches = sorted({e[1] for e in entries})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(batches)
    x = np.arange(len(labels))
    for j, b in enumerate(batches):
        got = {lab: sp for lab, bb, sp in entries if bb == b}
        pre = [got.get(lab, {}).get("prefill_tokens_per_s", np.nan) for lab in labels]
        dec = [got.get(lab, {}).get("decode_tokens_per_s", np.nan) for lab in labels]
        eag = [got.get(lab, {}).get("decode_tokens_per_s_eager", np.nan) for lab in labels]
        mode = next((sp.get("decode_mode") for sp in got.values()), "?")
        axes[0].bar(x + j * width, pre, width, label=f"batch {b}")
        if mode == "eager":  # the timed decode is the eager one: one bar
            axes[1].bar(x + j * width, dec, width, label=f"batch {b}, eager")
            continue
        bars = axes[1].bar(x + j * width - width / 4, dec, width / 2, label=f"batch {b}, {mode}")
        axes[1].bar(x + j * width + width / 4, eag, width / 2, color=bars.patches[0].get_facecolor(), alpha=0.45,
                    hatch="//", label=f"batch {b}, eager")
    for ax, title in zip(axes, ("prefill tokens/s", "decode tokens/s")):
        ax.set_xticks(x + width * (len(batches) - 1) / 2)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3, axis="y")
    r0 = records[0]
    fig.suptitle(f"{r0.get('model', '?')} on {entries[0][2].get('device', '?')}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main(argv=None):
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m zqkernels.pipeline.results",
                                description="accuracy tables and plots from results JSON")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table", help="print the accuracy table of results files")
    t.add_argument("files", nargs="+")
    r = sub.add_parser("readme", help="rebuild every accuracy-table block of a Markdown file in place")
    r.add_argument("markdown")
    g = sub.add_parser("plot", help="perplexity vs bits/weight PNG")
    g.add_argument("files", nargs="+")
    g.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        if args.cmd == "table":
            print(accuracy_table([x for f in args.files for x in load_records(f)]), end="")
        elif args.cmd == "readme":
            path = Path(args.markdown)
            path.write_text(render_blocks(path.read_text()))
        else:
            print(plot_pareto([x for f in args.files for x in load_records(f)], args.out))
    except (ValueError, OSError) as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
