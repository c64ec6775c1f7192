"""The M = 1 GEMV probe's own kernel (`perf/probe_gemv.py`) computes what its rows are labelled
with: the exact int32 product of the codes for each form, and the XOR of each weight row's words
for the read-only form, at every split (the probe's timings stand beside the shipped gemv's, so a
wrong probe kernel would make a ceiling out of the wrong work). Under the interpreter on a CPU,
compiled on a GPU; the PDL forms need a GPU launch and run there only.
"""
import functools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as R
from strategies import examples

PERF = Path(__file__).resolve().parents[1] / "perf"
if str(PERF) not in sys.path:
    sys.path.insert(0, str(PERF))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PDL = (False, True) if DEVICE == "cuda" and torch.cuda.get_device_capability() >= (9, 0) else (False,)


@pytest.mark.parametrize("pdl", PDL)
@pytest.mark.parametrize("prefetch", [False, True])
@settings(max_examples=examples(3), deadline=None)
@given(n=st.integers(1, 40), words=st.integers(1, 300), split=st.sampled_from([1, 2, 3, 8]),
       extreme=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_probe_kernel_is_the_exact_product_and_the_read_only_fold(n, words, split, extreme, seed, prefetch, pdl):
    from probe_gemv import probe_launch

    if pdl and not prefetch:
        pytest.skip("the probe's PDL form is its prefetch form")
    k = 8 * words  # whole int32 words of packed codes, as the probe takes them
    rng = np.random.default_rng(seed)
    ca = np.full((1, k), -8, np.int8) if extreme else rng.integers(-8, 8, (1, k)).astype(np.int8)
    cw = np.full((n, k), -8, np.int8) if extreme else rng.integers(-8, 8, (n, k)).astype(np.int8)
    exact = torch.from_numpy(ca.astype(np.int64) @ cw.astype(np.int64).T).to(torch.int32).to(DEVICE)
    pa = torch.from_numpy(R.pack_int4(ca)).to(DEVICE)
    pw = torch.from_numpy(R.pack_int4(cw)).to(DEVICE)
    out = torch.full((n,), -1, dtype=torch.int32, device=DEVICE)
    probe_launch(pa, pw, out, 16, 256, 4, split, prefetch, False, pdl)
    assert torch.equal(out[None, :], exact), (n, k, split)
    folds = torch.full((split * n,), -1, dtype=torch.int32, device=DEVICE)
    probe_launch(pa, pw, folds, 16, 256, 4, split, prefetch, True, pdl)
    words_of = pw.view(torch.int32).cpu().tolist()
    want = torch.tensor([functools.reduce(lambda a, b: a ^ b, row) for row in words_of], dtype=torch.int32)
    used = min(split, -(-words // 32))  # the probe clamps the split to the K tiles (32 words each)
    got = functools.reduce(lambda a, b: a ^ b, list(folds.view(split, n)[:used].cpu()))
    assert torch.equal(got, want), (n, k, split)
