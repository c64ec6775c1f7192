"""The quantize-time entries of the perf scripts, on a CPU: `perf/models_device.py --time-quantize`
(every quantized method over a whole named model, seconds per method) and
`perf/time_quantizers.py --what layers` (each method's layer built on the device and through the
host oracle, the two found equal)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

PERF = Path(__file__).resolve().parents[1] / "perf"


def _run_script(monkeypatch, name, argv):
    spec = importlib.util.spec_from_file_location(f"zq_{name}_under_test", PERF / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(PERF))
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *map(str, argv)])
    return mod.main()


def test_time_quantize_records_seconds_for_every_quantized_method(tiny_named, tmp_path, monkeypatch, capsys):
    rc = _run_script(monkeypatch, "models_device", ["--model", tiny_named, "--dry", "--time-quantize", "--out", tmp_path])
    assert rc == 0
    data = json.loads((tmp_path / f"quantize_time_{tiny_named}.json").read_text())
    labels = [r["label"] for r in data["records"]]
    assert labels == ["w4a16", "rtn-w4a4", "mosaic-5pct", "mosaic", "zipper"]  # no fp16, no peers
    for r in data["records"]:
        assert "error" not in r, r.get("traceback")
        assert r["quantize_s"] > 0 and "speed" not in r
        assert len(r["layer_stats"]) == 7  # every decoder linear of the 1-layer --dry model
    out = capsys.readouterr().out
    assert "zipper" in out and "quantize" in out


def test_layer_timing_builds_both_paths_and_finds_them_equal(tmp_path, monkeypatch):
    out = tmp_path / "layers.json"
    _run_script(monkeypatch, "time_quantizers", ["--what", "layers", "--device", "cpu", "--shapes", "16x64,8x130",
                                                  "--repeats", "1", "--out", out])
    data = json.loads(out.read_text())
    rows = data["layers"]
    assert {tuple(r["shape"]) for r in rows} == {(16, 64), (8, 130)}
    assert {r["method"] for r in rows} == {"w4a16", "rtn-w4a4", "smoothquant-w4a4", "zipper", "mosaic"}
    assert all(r["codes_equal"] and r["device_s"] > 0 and r["host_oracle_s"] > 0 for r in rows)
