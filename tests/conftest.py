"""Fixtures shared by the pipeline's tests.

Without a CUDA GPU, Triton kernels run under its CPU interpreter: TRITON_INTERPRET=1 is set here,
before any test module imports a module that decorates a kernel (Triton fixes interpreted or
compiled at decoration), as verify/conftest.py does for verify/. Set per test module instead, a
module collected earlier in the same process could import `perf/bench_baselines.py` compiled.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def tiny_named(monkeypatch):
    """A named random-weight configuration small enough for a CPU test, registered for the test
    only: LLaMA-shaped, 2 layers, every dimension a multiple of 128 or 16 as the peers' kernels
    need (torch-int4: K % 128, fp8-rowwise: N, K % 16)."""
    from zqkernels.pipeline import synthetic
    from zqkernels.pipeline.checkout import perf_module

    dims = perf_module("shapes", "tests").ModelDims("tiny-llama", hidden=128, q_heads=4, kv_heads=2, head_dim=32,
                                                   mlp=256, layers=2, vocab=128)
    fields = dict(max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    monkeypatch.setitem(synthetic.NAMED, "tiny-llama", synthetic.NamedConfig("llama", "tiny-llama", fields, dims=dims))
    return "tiny-llama"
