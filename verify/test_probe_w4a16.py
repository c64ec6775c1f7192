"""The W4A16 ceiling probe's own kernel (`perf/probe_w4a16.py`: Triton's fp16 GEMM through TMA
descriptors, no unpack) computes x @ w.T: its timings stand beside the W4A16 kernel's as the
ceiling of the same tiling, so a wrong kernel would make a ceiling out of the wrong work. Under
the interpreter on a CPU, compiled on a GPU.
Tolerance: fp16 output rounding (2**-11 relative) plus fp32 accumulation over K (2**-18 of
|x| @ |w|.T, as in test_w4a16)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import examples

PERF = Path(__file__).resolve().parents[1] / "perf"
if str(PERF) not in sys.path:
    sys.path.insert(0, str(PERF))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("tile", [(16, 16, 32, 4, 1), (32, 16, 64, 4, 2)])
@settings(max_examples=examples(3), deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), kt=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_probe_kernel_is_x_times_w_transposed(tile, m, n, kt, seed):
    from probe_w4a16 import fp16_tma_gemm

    k = 32 * kt  # TMA rows: 16-byte aligned
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).half().to(DEVICE)
    w = torch.randn(n, k, generator=gen).half().to(DEVICE)
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device=DEVICE)
    got = fp16_tma_gemm(x, w, out, tile).double().cpu().numpy()
    x64, w64 = x.double().cpu().numpy(), w.double().cpu().numpy()
    ref = x64 @ w64.T
    mag = np.abs(x64) @ np.abs(w64).T
    np.testing.assert_array_less(np.abs(got - ref), 2.0**-11 * np.abs(ref) + 2.0**-18 * mag + 2.0**-24)  # tolerance above
