"""The README's accuracy tables are generated from committed results JSON: every block between the
`<!-- accuracy-table: FILES -->` and `<!-- /accuracy-table -->` markers must equal what
`zqkernels.pipeline.results.accuracy_table` makes of the files it names. Rebuild them with
`python -m zqkernels.pipeline.results readme README.md`."""
import copy
import json
from pathlib import Path

import pytest

from zqkernels.pipeline import results

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_has_generated_accuracy_tables_naming_committed_files():
    blocks = results.table_blocks(README.read_text())
    assert blocks, "README.md has no accuracy-table block"
    for files, _, _ in blocks:
        assert files, "an accuracy-table block names no results file"
        for f in files:
            assert (ROOT / f).is_file(), f"{f} named by README.md is not committed"


def test_readme_tables_equal_the_committed_results():
    text = README.read_text()
    rebuilt = results.render_blocks(text, root=ROOT)
    for (files, start, end), (_, s2, e2) in zip(results.table_blocks(text), results.table_blocks(rebuilt)):
        assert text[start:end] == rebuilt[s2:e2], (
            f"README.md's table from {' '.join(files)} disagrees with the JSON; "
            "run: python -m zqkernels.pipeline.results readme README.md")


def _rec(method, ppl, bits, label=None, **params):
    return {"method": method, "label": label or method, "params": {"method": method, **params}, "ppl": ppl,
            "effective_bits": bits, "eval_text": "lice: cc_by_sa", "eval_tokens": 2048, "context": 512,
            "calib_text": "lice: apache", "calib_tokens": 4096}


RECORDS = [
    _rec("fp16", 20.0, 16.0),
    _rec("act-floor", 25.0, 16.0, label="floor", alpha=0.75, rotate=False, act_bits=4, act_group_size=32),
    _rec("zipper", 26.0, 4.6, alpha=0.75, outlier_ratio=0.05, high_bits=4, act_bits=4, act_group_size=32),
    _rec("rtn-w4a4", 80.0, 4.02, act_bits=4, act_group_size=32, group_size=None, weight_bits=4),
]


def test_table_states_ratios_to_fp_and_to_the_matching_floor():
    table = results.accuracy_table(RECORDS)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    zipper = rows["ZipperQuant α=0.75, outliers 0.05"].split(" | ")
    assert zipper[3:] == ["4.60", "26.00", "1.30", "1.040 |"]
    rtn = rows["RTN"].split(" | ")
    assert rtn[5] == "4.00" and rtn[6] == "- |"  # no floor without smoothing was run
    assert "Text: lice: cc_by_sa, 2048 tokens" in table


def test_a_changed_number_is_caught(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(RECORDS))
    md = f"intro\n{results.TABLE_OPEN} {path.name} -->\nstale\n{results.TABLE_CLOSE}\nrest\n"
    fresh = results.render_blocks(md, root=tmp_path)
    assert fresh != md and "26.00" in fresh and fresh.endswith(f"{results.TABLE_CLOSE}\nrest\n")
    assert results.render_blocks(fresh, root=tmp_path) == fresh  # rebuilding is idempotent
    changed = copy.deepcopy(RECORDS)
    changed[2]["ppl"] = 26.5
    path.write_text(json.dumps(changed))
    assert results.render_blocks(fresh, root=tmp_path) != fresh


def test_records_of_different_texts_are_refused():
    other = copy.deepcopy(RECORDS[2])
    other["eval_text"] = "lice: gpl3"
    with pytest.raises(ValueError, match="different texts"):
        results.accuracy_table([RECORDS[0], other])


def test_an_unclosed_block_is_refused():
    with pytest.raises(ValueError, match="never closed"):
        results.table_blocks(f"{results.TABLE_OPEN} a.json -->\n| x |\n")


def test_pareto_plot_is_written(tmp_path):
    out = results.plot_pareto(RECORDS, tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
