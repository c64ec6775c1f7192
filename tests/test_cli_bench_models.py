"""`zq bench --model <named configuration>` end to end on a tiny registered configuration (the
8B ones are the same code with other numbers: tests/test_synthetic.py checks their shapes): every
method and peer timed at each --batch, --layers cutting the model, no perplexity, JSON that
`zq report` reads, the plot; and each argument error one line naming its option, exit status 2."""
import json

import pytest

transformers = pytest.importorskip("transformers")

from zqkernels.pipeline import cli  # noqa: E402

FAST = ["--prefill-tokens", "8", "--decode-tokens", "3", "--context", "32", "--calib-tokens", "64", "--no-progress"]


def _zq(argv, capsys):
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_bench_times_every_method_at_every_batch_on_random_weights(tiny_named, tmp_path, capsys):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    rc, text, err = _zq(["bench", "--model", tiny_named, "--layers", "1", "--batch", "1,2", "--method", "fp16",
                         "--method", "rtn-w4a4", "--method", "fp8-rowwise", "--method", "torch-int4", "--out", out,
                         "--plot", plot, *FAST], capsys)
    assert rc == 0, err
    recs = json.loads(out.read_text())
    assert [r["label"] for r in recs] == ["fp16", "rtn-w4a4", "fp8-rowwise", "torch-int4-g128"]
    for r in recs:
        assert "ppl" not in r and r["model"] == tiny_named and "perplexity is not measured" in r["model_note"]
        assert r["config"]["num_hidden_layers"] == 1 and len(r["layer_stats"]) == 7
        for key, batch in (("speed", 1), ("speed_b2", 2)):
            sp = r[key]
            assert sp["batch"] == batch and sp["prefill_tokens"] == 8 and sp["decode_tokens"] == 3
            assert sp["decode_mode"] == "eager" and sp["decode_tokens_per_s"] == sp["decode_tokens_per_s_eager"] > 0
    assert [r["dtype"] for r in recs] == ["float32", "float32", "bfloat16", "bfloat16"]
    assert "perplexity is not measured" in text and "eager decode t/s" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reports = pytest.importorskip("reports.report")
    acc = reports.load_accuracy([out])
    assert {"speed.decode_tokens_per_s", "speed_b2.decode_tokens_per_s", "speed.decode_mode"} <= set(acc.columns)


def _assert_clean_error(rc, err, command, option):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"zq {command}: error:") and option in lines[0], lines[0]


@pytest.mark.parametrize("extra, option", [
    (["--layers", "0"], "--layers"),
    (["--layers", "3"], "--layers"),  # the tiny configuration has 2
    (["--batch", "0"], "--batch"),
    (["--batch", "1,x"], "--batch"),
    (["--batch", "1,1"], "--batch"),
    (["--batch", "1,"], "--batch"),
    (["--ppl"], "--ppl"),
    (["--decode-mode", "cuda-graph", "--device", "cpu"], "--decode-mode"),
    (["--decode-mode", "graph"], "--decode-mode"),
    (["--norms", "fused", "--device", "cpu"], "--norms"),
    (["--norms", "layer"], "--norms"),
    (["--prefill-tokens", "250", "--decode-tokens", "10"], "--prefill-tokens"),  # past its 256 positions
])
def test_bad_bench_arguments_are_one_line_naming_the_option(tiny_named, tmp_path, capsys, extra, option):
    rc, _, err = _zq(["bench", "--model", tiny_named, "--method", "fp16", "--out", tmp_path / "b.json", *FAST, *extra],
                     capsys)
    _assert_clean_error(rc, err, "bench", option)


def test_what_a_random_weight_model_cannot_do_is_refused_by_name(tiny_named, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("some words " * 100)
    rc, _, err = _zq(["eval", "--model", tiny_named, "--method", "fp16", "--out", tmp_path / "e.json", *FAST[4:]],
                     capsys)
    _assert_clean_error(rc, err, "eval", "--model")
    rc, _, err = _zq(["bench", "--model", tiny_named, "--method", "fp16", "--calib-text", text, "--out",
                      tmp_path / "b.json", *FAST], capsys)
    _assert_clean_error(rc, err, "bench", "--calib-text")
    rc, _, err = _zq(["bench", "--model", tmp_path / "no-such-model", "--layers", "2", "--method", "fp16", "--out",
                      tmp_path / "b.json", *FAST], capsys)
    _assert_clean_error(rc, err, "bench", "--layers")


def _models_device(monkeypatch, argv):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "perf" / "models_device.py"
    spec = importlib.util.spec_from_file_location("zq_models_device_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr("sys.argv", ["models_device.py", *map(str, argv)])
    return mod.main()


def test_the_device_script_writes_each_method_and_keeps_to_its_budget(tiny_named, tmp_path, monkeypatch, capsys):
    rc = _models_device(monkeypatch, ["--model", tiny_named, "--dry", "--methods", "fp16,torch-int4", "--batch", "1,2",
                                      "--out", tmp_path])
    assert rc == 0
    data = json.loads((tmp_path / f"models_{tiny_named}.json").read_text())
    assert [r["label"] for r in data["records"]] == ["fp16", "torch-int4"] and not data["meta"]["skipped_for_time"]
    assert all("error" not in r and r["speed_b2"]["batch"] == 2 for r in data["records"])
    assert "eager decode t/s" in capsys.readouterr().out
    rc = _models_device(monkeypatch, ["--model", tiny_named, "--dry", "--methods", "fp16,rtn-w4a4", "--budget-s", "0",
                                      "--out", tmp_path])
    data = json.loads((tmp_path / f"models_{tiny_named}.json").read_text())
    assert rc == 0 and data["records"] == [] and data["meta"]["skipped_for_time"] == ["fp16", "rtn-w4a4"]
    assert data["meta"]["norms"] == "model"
    with pytest.raises(SystemExit):  # the fused norms need a GPU: refused before anything is built
        _models_device(monkeypatch, ["--model", tiny_named, "--dry", "--norms", "fused", "--out", tmp_path])
    assert "--norms fused needs a CUDA GPU" in capsys.readouterr().err
