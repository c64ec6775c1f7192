"""The `zq` command: selftest, the pipeline's quantize / eval / bench / run, and report."""
import argparse
import sys


def _add_selftest(sub):
    p = sub.add_parser("selftest", help="quantize a random layer with both methods via the oracle; print errors and table stats")
    p.add_argument("--n", type=int, default=512, help="output features (default 512)")
    p.add_argument("--k", type=int, default=1024, help="input features (default 1024)")
    p.add_argument("--m", type=int, default=64, help="tokens (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--act-group-size", type=int, default=None, help="per-token-per-group activation scales (32, 64, 128)")

    def handler(args):
        from .selftest import run_selftest

        run_selftest(n=args.n, k=args.k, m=args.m, seed=args.seed, act_group_size=args.act_group_size)
        return 0

    p.set_defaults(handler=handler)


def build_parser():
    parser = argparse.ArgumentParser(prog="zq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_selftest(sub)
    # Imported here, not at the top: each module keeps its heavy imports inside its handlers,
    # so `zq selftest` and `zq --help` stay fast.
    from reports.cli import register as register_report

    from .pipeline.cli import register as register_pipeline

    register_pipeline(sub)
    register_report(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"zq {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
