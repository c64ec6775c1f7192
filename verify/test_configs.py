"""The launch tables are data the kernels can run: `zqkernels/gpu/configs/*.json`.

- Every bucket of every table names a variant its family ships and tile parameters that variant
  can launch (power-of-two tiles, swap-AB tiles with BLOCK_N >= 64: the MMA's M side; int8 planes
  with BLOCK_K >= 64: an int8 dot is >= 32 deep), and every w4a4 bucket an activation layout
  (`act_layout`, required: int4, int8, or "fused" in a gemv bucket); the interpreter's table sends
  both layouts through every variant and has a fused bucket in each scale section.
- The loader matches a GPU's name to its table, picks the smallest bucket >= M, and falls back
  to default.json only with a warning.
"""
import json
import warnings
from pathlib import Path

import pytest
import torch

from zqkernels.gpu import configs, mosaic, w4a4, w4a16

PATHS = sorted(configs.CONFIG_DIR.glob("*.json"))
FAMILY_VARIANTS = {"w4a4": set(w4a4.VARIANTS), "w4a16": set(w4a16.VARIANTS)}
SCALES = {"w4a4": {"per_token", "group"}, "w4a16": {"per_channel", "group"}}


def _pow2(v):
    return v >= 16 and v & (v - 1) == 0


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_every_bucket_names_a_launchable_variant(path):
    table = json.loads(path.read_text())
    assert isinstance(table.get("_about"), str) and table["_about"]
    for family, variants in FAMILY_VARIANTS.items():
        assert set(table[family]) == SCALES[family], (path.name, family)
        for scales, buckets in table[family].items():
            assert buckets and all(int(k) >= 1 for k in buckets), (path.name, family, scales)
            entries = []
            for bucket in buckets.values():
                entries.append(bucket)
                # per-shape entries ("NxK": a whole config) are configs of the same kind, and keep
                # the bucket's act_layout (the layers pick the quantizer's layout per bucket)
                for key, cfg in bucket.get("shapes", {}).items():
                    n, k = key.split("x")
                    assert int(n) >= 1 and int(k) >= 1 and key == configs.shape_key(int(n), int(k)), (path.name, key)
                    assert "shapes" not in cfg and cfg.get("act_layout") == bucket.get("act_layout"), (path.name, cfg)
                    entries.append(cfg)
            for cfg in entries:
                assert cfg["variant"] in variants, (path.name, family, cfg)
                for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
                    if cfg["variant"] == "gemv" and key in ("BLOCK_M", "BLOCK_N"):  # CUDA cores, no MMA: 1, 2, 4, ...
                        assert cfg[key] >= 1 and cfg[key] & (cfg[key] - 1) == 0, (path.name, cfg)
                    else:
                        assert _pow2(cfg[key]), (path.name, family, cfg)
                assert cfg["num_warps"] in (4, 8) and cfg["num_stages"] >= 1
                if cfg["variant"] == "gemv":
                    assert cfg["BLOCK_K"] >= 32 and cfg["SPLIT_K"] >= 0 and "PLANES" not in cfg, (path.name, cfg)
                elif cfg["variant"] == "splitk" or (cfg["variant"] == "tma" and family == "w4a16"):
                    assert cfg.get("SPLIT_K", 1) >= 0  # w4a16's tma splits K at a few tokens
                else:
                    assert "SPLIT_K" not in cfg and "SWAP_AB" not in cfg, (path.name, cfg)
                if cfg.get("SWAP_AB") and path.name != "interpreter.json":
                    assert cfg["BLOCK_N"] >= 64
                if cfg.get("PLANES") and family == "w4a4":
                    assert cfg["BLOCK_K"] >= 64
                # tma takes aligned operands through descriptors only: its entry names the config for the rest
                assert (cfg["variant"] == "tma") == ("no_tma" in cfg), (path.name, scales, cfg)
                if "no_tma" in cfg:
                    pk = cfg["no_tma"]
                    assert pk["variant"] in variants - {"tma"} and "act_layout" not in pk, (path.name, cfg)
                    tiles = ("BLOCK_K",) if pk["variant"] == "gemv" else ("BLOCK_M", "BLOCK_N", "BLOCK_K")
                    assert all(_pow2(pk[k]) for k in tiles), (path.name, cfg)
                if family == "w4a4":
                    assert cfg["act_layout"] in w4a4.TABLE_ACT_LAYOUTS, (path.name, scales, cfg)
                    assert cfg["act_layout"] != "fused" or cfg["variant"] == "gemv", (path.name, scales, cfg)
                else:
                    assert "act_layout" not in cfg, (path.name, family, cfg)
    assert set(table["mosaic"]) == {"w4a4", "w4a4_group", "w4a16"}, path.name
    for cfg in [*table["mosaic"]["w4a4"].values(), *table["mosaic"]["w4a4_group"].values()]:
        assert cfg["variant"] in mosaic.VARIANTS
        assert "act_layout" not in cfg  # the Mosaic kernels take packed activations only
        # dequant loads through TMA descriptors: its bucket names the integer config for the rest
        assert (cfg["variant"] == "dequant") == ("no_tma" in cfg), (path.name, cfg)
        if "no_tma" in cfg:
            assert cfg["no_tma"]["variant"] in set(mosaic.VARIANTS) - {"dequant"}, (path.name, cfg)
        assert all(_pow2(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    for cfg in table["mosaic"]["w4a16"].values():
        assert "variant" not in cfg and all(_pow2(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    for method in ("ell", "columns"):
        for cfg in table["zipper_high"][method].values():
            assert all(_pow2(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_N_WIDE_N"))
            assert cfg["BLOCK_E"] >= 1 and cfg["BLOCK_E"] & (cfg["BLOCK_E"] - 1) == 0, (path.name, cfg)
    assert set(table["actquant"]) == {"per_token", "group"}, path.name
    keys = {"per_token": {"ONE_PASS_MAX_K", "ROW_CHUNK", "ELEMS_PER_THREAD"}, "group": {"GROUP_BLOCK", "ELEMS_PER_THREAD"}}
    for scales, buckets in table["actquant"].items():
        assert buckets and all(int(m) >= 1 for m in buckets), (path.name, scales)
        for cfg in buckets.values():
            assert set(cfg) == keys[scales], (path.name, scales, cfg)
            assert all(v >= 1 and v & (v - 1) == 0 for v in cfg.values()), (path.name, scales, cfg)
            assert scales == "group" or cfg["ROW_CHUNK"] <= cfg["ONE_PASS_MAX_K"], (path.name, cfg)


def test_every_shipped_variant_appears_in_some_table():
    used = {f: set() for f in FAMILY_VARIANTS}
    used_mosaic = set()
    for path in PATHS:
        table = json.loads(path.read_text())
        for family in FAMILY_VARIANTS:
            used[family] |= {c["variant"] for b in table[family].values() for c in b.values()}
            used[family] |= {e["variant"] for b in table[family].values() for c in b.values()
                             for e in c.get("shapes", {}).values()}
        used_mosaic |= {c["variant"] for section in ("w4a4", "w4a4_group") for c in table["mosaic"][section].values()}
    assert used == FAMILY_VARIANTS
    assert used_mosaic == set(mosaic.VARIANTS)


def test_the_interpreter_table_sends_both_layouts_through_both_variants():
    table = json.loads((configs.CONFIG_DIR / "interpreter.json").read_text())
    pairs = {(c["variant"], c["act_layout"]) for b in table["w4a4"].values() for c in b.values()}
    # tma takes int8 codes with K a multiple of 32 only, which not every CPU test's layer has: the
    # interpreter's buckets (they serve every shape) leave it out, and its laws run on explicit
    # configs (test_w4a4.TMA_CONFIGS).
    general = set(w4a4.VARIANTS) - {"tma"}
    assert pairs == {(v, a) for v in general for a in w4a4.ACT_LAYOUTS} | {("gemv", "fused")}
    for buckets in table["w4a4"].values():
        assert {c["act_layout"] for c in buckets.values()} == set(w4a4.TABLE_ACT_LAYOUTS)


def test_act_layout_reads_the_bucket_and_refuses_a_bucket_without_one(monkeypatch):
    cpu = torch.device("cpu")
    table = configs.table_for(cpu)["w4a4"]
    for scales, group in (("per_token", None), ("group", 32)):
        for key, cfg in table[scales].items():
            assert w4a4.act_layout(int(key), group, cpu) == cfg["act_layout"]
    monkeypatch.setattr(w4a4, "launch_config", lambda *a: {"variant": "gemm"})
    with pytest.raises(ValueError, match="act_layout must be one of"):
        w4a4.act_layout(4, None, cpu)


def test_act_layouts_refuse_a_tma_bucket_without_a_no_tma_config(monkeypatch):
    cpu = torch.device("cpu")
    tma = {"variant": "tma", "act_layout": "int8", "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1,
           "num_warps": 4, "num_stages": 2}
    for bad in (None, {"variant": "tma"}, "gemm"):
        cfg = dict(tma) if bad is None else dict(tma, no_tma=bad)
        monkeypatch.setattr(w4a4, "launch_config", lambda *a, cfg=cfg: dict(cfg))
        with pytest.raises(ValueError, match="a tma bucket needs a 'no_tma' config"):
            w4a4.act_layouts(None, cpu)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend to be on a named CUDA GPU (compiled mode), with the caches cleared."""
    def use(name):
        monkeypatch.setattr(configs, "interpreting", lambda: False)
        monkeypatch.setattr(configs, "_device_name", lambda index: name)
        configs.table_name.cache_clear()
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        return torch.device("cuda", 0)

    yield use
    configs.table_name.cache_clear()


def test_launch_config_reads_the_gpu_table(fake_gpu):
    dev = fake_gpu("NVIDIA H100 80GB HBM3")
    table = json.loads((configs.CONFIG_DIR / "h100.json").read_text())
    for m, key in [(1, "1"), (2, "16"), (16, "16"), (17, "64"), (300, "1024"), (5000, "4096")]:
        assert configs.launch_config("w4a4", "per_token", m, dev) == table["w4a4"]["per_token"][key], (m, key)
    assert configs.table_name("NVIDIA H200") == "h200.json"


def test_a_per_shape_entry_replaces_its_bucket_for_that_shape_only(fake_gpu, monkeypatch):
    """A bucket's "shapes" entry is what a launch of that N x K gets; any other shape, and a caller
    that names no shape, get the bucket's own config (without the "shapes" key)."""
    dev = fake_gpu("NVIDIA H200")
    table = json.loads((configs.CONFIG_DIR / "h200.json").read_text())
    bucket = dict(table["w4a16"]["group"]["4096"])
    bucket.pop("shapes", None)
    entry = dict(bucket, BLOCK_M=64, num_stages=2)
    table["w4a16"]["group"]["4096"] = dict(bucket, shapes={configs.shape_key(6144, 4096): entry})
    monkeypatch.setattr(configs, "_load", lambda name: table)
    assert configs.launch_config("w4a16", "group", 3000, dev, 6144, 4096) == entry
    assert configs.launch_config("w4a16", "group", 3000, dev, 4096, 6144) == bucket
    assert configs.launch_config("w4a16", "group", 3000, dev) == bucket


def test_an_unknown_gpu_gets_the_default_table_with_a_warning(fake_gpu):
    dev = fake_gpu("Some Future GPU 9000")
    with pytest.warns(RuntimeWarning, match="default.json"):
        cfg = configs.launch_config("w4a16", "group", 64, dev)
    default = json.loads((configs.CONFIG_DIR / "default.json").read_text())
    assert cfg == default["w4a16"]["group"]["64"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per device name, not per launch
        configs.launch_config("w4a16", "group", 64, dev)


def test_a_missing_family_is_a_clear_error():
    with pytest.raises(KeyError, match="nonesuch"):
        configs.launch_config("nonesuch", "per_token", 1, torch.device("cpu"))


def test_describe_shows_every_family_and_bucket_of_a_table():
    text = configs.describe("h200.json")
    table = json.loads((configs.CONFIG_DIR / "h200.json").read_text())
    for family in ("w4a4", "w4a16", "mosaic", "zipper_high"):
        for scales, buckets in table[family].items():
            line = next(l for l in text.splitlines() if l.strip().startswith(f"{family}/{scales}:"))
            assert line.count(":") - 1 == len(buckets)  # one "span: variant tiles" entry per bucket
    line = {l.strip().split(":")[0]: l for l in text.splitlines() if l.strip().startswith("w4a4/")}
    assert "M>1024: tma 128x128x128 act int8 (else gemm 128x128x256)" in line["w4a4/per_token"]
    assert "M>1024: tma 64x128x128 act int8 (else gemm 128x128x128)" in line["w4a4/group"]
    layouts = [l for l in text.splitlines() if l.strip().startswith("w4a4/")]
    assert layouts and all(l.count(" act ") == l.count(":") - 1 for l in layouts)  # each bucket's act_layout


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_the_dense_zipper_sections_name_fused_only_where_the_w4a4_bucket_is_a_gemv(path):
    """zipper_high/dense (per-token activations) and dense_group name "fused" or "two_pass" per M;
    the fused GEMV runs the W4A4 gemv bucket's tiles, so every M of a fused bucket has one."""
    table = json.loads(path.read_text())
    for section, scales in (("dense", "per_token"), ("dense_group", "group")):
        buckets = table["zipper_high"][section]
        w4a4_buckets = table["w4a4"][scales]
        lo = 1
        for key in sorted(buckets, key=int):
            assert buckets[key]["variant"] in ("fused", "two_pass"), (path.name, section, key)
            if buckets[key]["variant"] == "fused":
                for m in range(lo, int(key) + 1):
                    pick = next((b for b in sorted(map(int, w4a4_buckets)) if b >= m), max(map(int, w4a4_buckets)))
                    assert w4a4_buckets[str(pick)]["variant"] == "gemv", (path.name, section, m)
            lo = int(key) + 1
