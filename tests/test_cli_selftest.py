"""`zq selftest`: the oracle-only smoke test runs and ranks the methods sensibly."""
import subprocess
import sys

from zqkernels.cli import main
from zqkernels.selftest import run_selftest


def test_selftest_prints_errors_and_table_statistics(capsys):
    assert main(["selftest", "--n", "64", "--k", "128", "--m", "8"]) == 0
    out = capsys.readouterr().out
    for needle in ("rtn-w4a4", "zipper", "mosaic", "E/U=", "rel. output error"):
        assert needle in out


def test_disaggregation_beats_plain_rtn_on_outlier_activations():
    errors = run_selftest(n=128, k=256, m=16, seed=3)
    rtn = errors["rtn-w4a4"]
    zipper = next(v for name, v in errors.items() if name.startswith("zipper"))
    assert zipper < 0.5 * rtn


def test_console_script_reports_bad_arguments_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "zqkernels.cli", "selftest", "--n", "x"], capture_output=True, text=True)
    assert proc.returncode == 2 and "argument --n: expected an integer" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
