"""The `report` subcommand: `zq report out.json [more.json ...] [--accuracy acc.json] --out DIR`.

`register(subparsers)` adds it to the `zq` parser (zqkernels/cli.py calls it); the handler
returns the exit status: 0 written, 2 unusable input (a message, never a traceback).
`python -m reports.cli report ...` runs the same thing without the package's console script.
"""
from __future__ import annotations

import argparse
import os
import sys


def register(subparsers):
    p = subparsers.add_parser(
        "report",
        help="turn perf/ benchmark JSON (and accuracy JSON) into REPORT.md / REPORT.html with plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="BENCH.json",
                   help="pytest-benchmark JSON files (`pytest perf/ --benchmark-json out.json`)")
    p.add_argument("--accuracy", action="append", default=[], metavar="ACC.json",
                   help="the pipeline's accuracy JSON (list of {model, method, ppl, ...}); may repeat")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder, e.g. reports/h100/")
    p.add_argument("--title", default=None, help="report title")
    p.set_defaults(handler=run, func=run)
    return p


def run(args) -> int:
    try:
        from .report import ReportError, build_report
    except ImportError as exc:  # pandas / seaborn / matplotlib are the `report` extra, not runtime needs
        print(f"zq report: error: needs the report extra ({exc.name} is missing): pip install 'zqkernels[report]'",
              file=sys.stderr)
        return 2

    try:
        result = build_report(args.inputs, args.accuracy, args.out, title=args.title)
    except ReportError as exc:
        print(f"zq report: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the user gets a sentence; ZQ_DEBUG=1 shows the traceback
        if os.environ.get("ZQ_DEBUG"):
            raise
        print(f"zq report: error: could not build the report ({type(exc).__name__}: {exc}); "
              f"rerun with ZQ_DEBUG=1 for the traceback", file=sys.stderr)
        return 2
    for msg in result["messages"]:
        print(f"zq report: note: {msg}", file=sys.stderr)
    print(f"zq report: wrote {result['out_dir']}/REPORT.md, REPORT.html and {len(result['files']) - 2} plots"
          f" (devices: {', '.join(result['devices']) or 'none'})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="zq")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
