"""The tune scripts (`perf/tune_<family>.py`) run end to end: each candidate they would time is
launched and verified on a small case, the fastest per bucket is written in the table format the
loader reads, and every winner names a variant its family ships. On the CPU the kernels run under
the interpreter and the timer is replaced by one call of each closure of a replay (two: copy 0
and a copy the sweep made): a smoke run of the scripts, whose timings mean nothing; on a GPU the
tuning itself is a device run (perf/README.md).
"""
import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

PERF = Path(__file__).resolve().parents[1] / "perf"
if str(PERF) not in sys.path:
    sys.path.insert(0, str(PERF))


@pytest.mark.parametrize("script, family", [("tune_w4a4", "w4a4"), ("tune_w4a16", "w4a16"), ("tune_mosaic", "mosaic"),
                                            ("tune_zipper_high", "zipper_high")])
def test_tune_script_verifies_candidates_and_writes_a_table(script, family, tmp_path, monkeypatch):
    import tuning

    from zqkernels.gpu import configs, mosaic, w4a4, w4a16, zipper_high

    import timing

    mod = importlib.import_module(script)
    calls = []

    def one_call(fns):
        """A replay's copy run once (the sweep ran copy 0 already): copy 1 holds the same values as
        copy 0 in tensors of its own, so the back-to-back replay the GPU times streams a fresh copy
        per call; on the first replay both run and must agree (the interpreter is slow: once)."""
        assert len(fns) == 2, len(fns)
        first, second = (timing.operand_tensors(f) for f in fns)
        assert len(first) == len(second) and first
        assert not {t.data_ptr() for t in first} & {t.data_ptr() for t in second}
        assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(first, second))
        out = fns[1]()
        if not calls:
            assert torch.equal(out, fns[0]())  # a copy computes what copy 0 computes
        calls.append(len(fns))
        return 1.0 + 0.01 * len(calls)  # distinct fake times: the first candidate wins

    monkeypatch.setattr(tuning, "graph_median_ms", one_call)
    # an L2 no call fills, capped at two calls: each timed call gets one copy besides its own
    monkeypatch.setattr(tuning, "replay_l2_bytes", lambda: 2**40)
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    shutil.copy(configs.CONFIG_DIR / "default.json", tmp_path / "default.json")
    out = tmp_path / "result.json"
    monkeypatch.setattr(sys, "argv", [script, "--out", str(out), "--table", "smoke.json", "--shapes",
                                      "smollm2-135m.o", "--m", "1,40", "--verify-shape", "40,256",
                                      "--max-candidates", "2", "--max-calls-per-replay", "2"]
                        + (["--scales", "per_token,group"] if family == "mosaic" else []))
    mod.main()
    record = json.loads(out.read_text())
    timed = [r for r in record["rows"] if "us" in r]
    assert timed and all(r["verified"] for r in timed), [r.get("verify_detail") for r in record["rows"]]
    assert all(r["calls_per_replay"] == {"smollm2-135m.o": 2} for r in timed) and len(calls) == len(timed)
    assert record["replay"]["max_calls"] == 2 and "back-to-back" in record["timer"]
    assert not [r for r in record["rows"] if r.get("verified") is False], "a candidate failed verification"
    table = json.loads((tmp_path / "smoke.json").read_text())
    sections = table[family]
    if family == "mosaic":  # both scale layouts tuned, into their own sections
        assert set(record["winners"]) == {"w4a4", "w4a4_group"}, record["winners"].keys()
    for scales, winners in record["winners"].items():
        assert set(winners) == {"1", "40"}
        for m, cfg in sections[scales].items():
            if m not in winners:
                continue
            assert "us" not in cfg
            if family == "zipper_high":  # one kernel per layout (the section's key), tiles only
                assert scales in zipper_high.VARIANTS
                assert set(cfg) == {"BLOCK_M", "BLOCK_N", "BLOCK_N_WIDE_N", "WIDE_N", "BLOCK_E"}, cfg
            else:
                variants = {"w4a4": w4a4.VARIANTS, "w4a16": w4a16.VARIANTS, "mosaic": mosaic.VARIANTS}[family]
                assert cfg["variant"] in variants
    assert table["_tuned_by"][family]["command"]


def test_tune_actquant_verifies_candidates_and_writes_its_buckets(tmp_path, monkeypatch):
    """The quantizer's tune script: candidates verified bit for bit on rows that take every path,
    and each (scales, M) winner written as the bucket of the table's actquant section."""
    import tune_actquant
    import tuning

    from zqkernels.gpu import configs

    times = iter(range(1000))
    monkeypatch.setattr(tuning, "graph_median_ms", lambda fns: 1.0 + 0.01 * next(times))
    monkeypatch.setattr(tuning, "replay_l2_bytes", lambda: 2**40)
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    shutil.copy(configs.CONFIG_DIR / "default.json", tmp_path / "default.json")
    out = tmp_path / "result.json"
    monkeypatch.setattr(sys, "argv", ["tune_actquant", "--out", str(out), "--table", "smoke.json", "--shapes",
                                      "smollm2-135m.o", "--m", "1,40", "--max-candidates", "2",
                                      "--max-calls-per-replay", "2"])
    tune_actquant.main()
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert len(rows) == 8 and all(r["verified"] for r in rows), [r.get("verify_detail") for r in rows]
    table = json.loads((tmp_path / "smoke.json").read_text())
    assert table["_tuned_by"]["actquant"]["command"]
    for scales in ("per_token", "group"):
        for m in ("1", "40"):  # the fake times rise: each bucket's first candidate wins
            assert table["actquant"][scales][m] == tune_actquant.candidates(scales)[0], (scales, m)


def test_a_candidate_faster_on_one_shape_is_written_for_that_shape_with_its_no_tma(tmp_path, monkeypatch):
    """The sweep's winner is the least geometric mean over the shapes; a candidate that beats it on
    one shape by more than SHAPE_MARGIN becomes that shape's entry of the bucket, and a tma entry
    names as no_tma the fastest pointer-load candidate on its own shape. The table then launches
    that shape with it, the other shapes with the bucket's config."""
    import tuning

    from zqkernels.gpu import configs

    times = {"A": (1.0, 1.0), "B": (0.8, 1.5), "C": (1.2, 0.995)}  # geomean: A 1.12, B 1.23, C 1.22
    cands = {"A": dict(variant="gemm", BLOCK_M=64), "B": dict(variant="tma", BLOCK_M=128),
             "C": dict(variant="splitk", BLOCK_M=32)}
    current = {}

    def make_call(cfg, shape, m):
        current["key"] = (cfg["BLOCK_M"], shape.name)
        return lambda t=torch.zeros(4): t + 1

    def fake_timer(fns):
        bm, shape = current["key"]
        tag = next(t for t, c in cands.items() if c["BLOCK_M"] == bm)
        return times[tag][0 if shape.endswith(".o") else 1] / 1000.0

    monkeypatch.setattr(tuning, "graph_median_ms", fake_timer)
    monkeypatch.setattr(tuning, "replay_l2_bytes", lambda: 2**40)
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    shutil.copy(configs.CONFIG_DIR / "default.json", tmp_path / "default.json")
    args = tuning.parser("t").parse_args(["--out", str(tmp_path / "r.json"), "--table", "smoke.json", "--shapes",
                                          "smollm2-135m.o,smollm2-135m.down", "--m", "4096"])
    sweep = tuning.Sweep("w4a16", args)
    win = sweep.run("group", 4096, list(cands.values()), lambda cfg, m: (True, ""), make_call)
    assert win["config"] == cands["A"]
    tuning.attach_no_tma(sweep, "group", 4096, lambda r: r["config"]["variant"] != "tma")
    o, down = sweep.shapes
    bucket = sweep.record["winners"]["group"]["4096"]
    # B beats A on o by 20 %: o's entry; C beats A on down by 0.5 %, within the margin: none
    assert set(bucket["shapes"]) == {configs.shape_key(o.n, o.k)}
    entry = bucket["shapes"][configs.shape_key(o.n, o.k)]
    assert entry["variant"] == "tma" and entry["no_tma"] == cands["A"]  # A is the fastest non-tma on o
    assert "no_tma" not in bucket  # the bucket's own winner is no tma config
    table = json.loads(sweep.write_table().read_text())
    written = table["w4a16"]["group"]["4096"]
    assert "us" not in written and all("us" not in e for e in written["shapes"].values())
    monkeypatch.setattr(configs, "table_for", lambda device: table)
    cpu = torch.device("cpu")
    assert configs.launch_config("w4a16", "group", 4096, cpu, o.n, o.k) == dict(cands["B"], no_tma=cands["A"])
    assert configs.launch_config("w4a16", "group", 4096, cpu, down.n, down.k) == cands["A"]
