"""The `zq` command: selftest, the pipeline's quantize / eval / bench / run, and report.

Every error the user can cause is one line `zq <command>: error: ...` naming the option, exit
status 2, never a traceback (`ZQ_DEBUG=1` shows the traceback of an unexpected one).
"""
import argparse
import os
import sys


class ZqParser(argparse.ArgumentParser):
    """argparse with one-line errors: `prog: error: argument --x: ...` and no usage block
    (`--help` has it); subcommand parsers inherit the class."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low):
    def parse(text):
        try:
            value = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


def _group(text):
    if str(text).strip().lower() == "none":
        return None
    return _int_at_least(1)(text)


def _add_selftest(sub):
    from .selftest import MAX_ELEMENTS

    p = sub.add_parser("selftest", help="quantize a random layer with both methods via the oracle; print errors and table stats")
    p.add_argument("--n", type=_int_at_least(1), default=512, help="output features (default 512)")
    p.add_argument("--k", type=_int_at_least(1), default=1024, help="input features (default 1024)")
    p.add_argument("--m", type=_int_at_least(1), default=64, help="tokens (default 64)")
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--act-group-size", type=_group, default=None,
                   help="per-token-per-group activation scales, e.g. 32 (default none: per token)")

    def handler(args):
        from .selftest import run_selftest

        for a, b in (("n", "k"), ("m", "k")):
            if getattr(args, a) * getattr(args, b) > MAX_ELEMENTS:
                raise ValueError(f"--{a} x --{b} = {getattr(args, a) * getattr(args, b)} is beyond the smoke "
                                 f"test's {MAX_ELEMENTS} elements")
        run_selftest(n=args.n, k=args.k, m=args.m, seed=args.seed, act_group_size=args.act_group_size)
        return 0

    p.set_defaults(handler=handler)


def build_parser():
    parser = ZqParser(prog="zq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    """Run `zq` with `argv`; returns the exit status (argument errors too: 2, one line)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argument error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"zq {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one sentence for the user; ZQ_DEBUG=1 shows the traceback
        if os.environ.get("ZQ_DEBUG"):
            raise
        print(f"zq {args.command}: error: unexpected {type(exc).__name__}: {' '.join(str(exc).split())} "
              "(rerun with ZQ_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
