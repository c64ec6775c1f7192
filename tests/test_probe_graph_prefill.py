"""perf/probe_graph_prefill.py on a CPU: its module comparison (eager against eager, --dry) and
the recorder that names the first module whose output differs."""
import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _probe():
    spec = importlib.util.spec_from_file_location("zq_probe_graph_prefill", ROOT / "perf" / "probe_graph_prefill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_dry_run_finds_eager_equal_to_eager(tiny_named, tmp_path, monkeypatch):
    probe = _probe()
    out = tmp_path / "p.json"
    monkeypatch.setattr("sys.argv", ["probe_graph_prefill.py", "--model", tiny_named, "--dry", "--out", str(out)])
    assert probe.main() == 0
    result = json.loads(out.read_text())
    mf = result["model_forward"]
    assert mf["logits_equal"] and mf["first_differing_module"] is None
    assert set(mf["attention_masks_eager"]) == {"model.layers.0.self_attn"}
    assert mf["attention_masks_eager"]["model.layers.0.self_attn"] is None  # an unpadded prompt: SDPA's is_causal
    other = result["model_forward_prefill_sdpa"]
    assert other["attention"] == "zq_prefill_sdpa" and other["logits_equal"]
    assert other["attention_masks_other"]["model.layers.0.self_attn"] is None
    names = [r["module"] for r in mf["modules"]]
    assert names.index("model.layers.0.self_attn.q_proj") < names.index("model.layers.0.mlp.down_proj") < \
        names.index("lm_head")  # call order


def test_the_recorder_names_the_first_module_that_differs():
    probe = _probe()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    rec = probe.Recorder(net)
    x = torch.randn(4, 8)
    with torch.no_grad():
        rec.record(lambda: net(x))
        before = rec.outputs
        net[2].weight[0, 0] += 1.0  # only the last layer changes
        rec.record(lambda: net(x))
        after = rec.outputs
    rec.remove()
    differ = [name for name in before if not torch.equal(before[name], after[name])]
    assert differ == ["2"]
    assert not net._forward_hooks and not net[0]._forward_hooks  # removed
