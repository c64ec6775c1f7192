"""Compare two `pytest perf/ --benchmark-json` runs benchmark by benchmark (the kernel-time figure,
`extra_info["time_us"]`): ratio after / before per (method, shape, M), and which differ beyond
a tolerance.

    python perf/compare.py BEFORE.json AFTER.json [--tol 0.10] [--abs-us 1.0] [--out diff.json]

A benchmark "agrees" when |after - before| <= tol * before or <= abs_us (sub-microsecond noise of
the smallest kernels). Exit status 0 when every benchmark present in both agrees, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import sys


def _key(b):
    e = b["extra_info"]
    return e["method"], e["shape"], e["M"]


def load(path):
    with open(path) as fh:
        data = json.load(fh)
    return {_key(b): b["extra_info"]["time_us"] for b in data.get("benchmarks", []) if "time_us" in b.get("extra_info", {})}


def compare(before, after, tol, abs_us):
    rows = []
    for key in sorted(set(before) & set(after), key=str):
        b, a = before[key], after[key]
        ok = abs(a - b) <= max(tol * b, abs_us)
        rows.append(dict(method=key[0], shape=key[1], M=key[2], before_us=b, after_us=a, ratio=a / b, agrees=ok))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--tol", type=float, default=0.10)
    ap.add_argument("--abs-us", type=float, default=1.0)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    before, after = load(args.before), load(args.after)
    rows = compare(before, after, args.tol, args.abs_us)
    if not rows:
        print("no benchmark in common", file=sys.stderr)
        return 1
    ratios = [r["ratio"] for r in rows]
    summary = dict(common=len(rows), only_before=len(set(before) - set(after)), only_after=len(set(after) - set(before)),
                   agree=sum(r["agrees"] for r in rows), geomean_ratio=math.exp(sum(map(math.log, ratios)) / len(ratios)),
                   min_ratio=min(ratios), max_ratio=max(ratios), tol=args.tol, abs_us=args.abs_us)
    for r in rows:
        if not r["agrees"]:
            print(f"DIFFERS {r['method']:28s} {r['shape']:20s} M={r['M']:<5d} {r['before_us']:10.1f} -> "
                  f"{r['after_us']:10.1f} us  x{r['ratio']:.3f}")
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(summary=summary, rows=rows), fh, indent=1)
    return 0 if summary["agree"] == summary["common"] else 1


if __name__ == "__main__":
    sys.exit(main())
