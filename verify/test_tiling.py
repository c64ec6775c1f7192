"""The shared split-K workspace (`zqkernels.gpu.tiling.splitk_workspace`): what a CUDA graph captured
before a growth relies on (the old buffers stay alive), the zeroed counters, bounded growth, and the
refusal to grow during capture."""
import gc
import weakref

import pytest
import torch

from zqkernels.gpu import tiling

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture
def fresh_workspaces(monkeypatch):
    monkeypatch.setattr(tiling, "_WORKSPACES", {})
    monkeypatch.setattr(tiling, "_RETIRED", [])


def test_growth_keeps_the_replaced_buffers_alive_and_zeroes_the_counters(fresh_workspaces):
    ws, cnt = tiling.splitk_workspace(DEVICE, torch.int32, 100, 10)
    old_ws, old_cnt = weakref.ref(ws), weakref.ref(cnt)
    assert ws.numel() >= 100 and cnt.numel() >= 10 and not bool(cnt.any())
    same_ws, same_cnt = tiling.splitk_workspace(DEVICE, torch.int32, 100, 10)
    assert same_ws.data_ptr() == ws.data_ptr() and same_cnt.data_ptr() == cnt.data_ptr()
    n_ws, n_cnt = ws.numel(), cnt.numel()
    del ws, cnt, same_ws, same_cnt
    big_ws, big_cnt = tiling.splitk_workspace(DEVICE, torch.int32, n_ws + 1, n_cnt + 1)
    gc.collect()
    assert old_ws() is not None and old_cnt() is not None  # a graph captured earlier may point at them
    assert big_ws.numel() >= 2 * n_ws and big_cnt.numel() >= 2 * n_cnt  # growth at least doubles
    assert not bool(big_cnt.any())
    f32, _ = tiling.splitk_workspace(DEVICE, torch.float32, n_ws + 1, n_cnt + 1)
    assert f32.dtype == torch.float32 and f32.data_ptr() == big_ws.data_ptr()  # one buffer, a view


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA GPU")
def test_growing_during_capture_is_refused_by_name(fresh_workspaces):
    tiling.splitk_workspace(DEVICE, torch.int32, 100, 10)
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="before capturing"):
        with torch.cuda.graph(graph, stream=stream):
            tiling.splitk_workspace(DEVICE, torch.int32, 1 << 24, 10)
    torch.cuda.synchronize()
