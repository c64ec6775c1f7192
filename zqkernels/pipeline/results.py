"""Results records: JSON that `zq report` reads, and the plain-text / Markdown tables of `zq run`.

A results file is a JSON list of records, one per (model, method configuration):
  model, model_source, model_note, architecture, method, label, params{...}, backend,
  ppl, predictions, eval_tokens, context, calib_tokens, calib_text, eval_text,
  effective_bits (bits per weight over all decoder linears: low + high + indices + scales),
  layer_summary{rel_error_mean, rel_error_max, bits_low/high/index/scale, lut_E, lut_U, lut_reuse,
                high_density (zipper), density_used (mosaic)},
  layer_stats[{name, N, K, rel_error, effective_bits{...}, lut_E, lut_U, lut_reuse, ... }],
  speed{prefill_tokens_per_s, decode_tokens_per_s, prefill_tokens, decode_tokens, device} (when timed),
  quantize_s, eval_s, command (the command line that produced it).
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


def format_table(records):
    """Fixed-width text table: perplexity, ratio to fp16, bits per weight, layer error, table stats."""
    rows = [list(COLUMNS)] + table_rows(records)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


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
