"""Hypothesis profiles for every test directory (verify/, tests/), chosen by the environment
variable ZQ_HYPOTHESIS_PROFILE (default: `gpu` when a CUDA GPU is present, else `ci`):
- `ci`: each law's own example budget (`verify/strategies.examples(n)` = n), no deadline; what CI runs.
- `gpu`: the same budgets, compiled kernels; the `gpu`-marked tests add LLaMA-sized shapes.
- `thorough`: ten times every budget, for a long hunt before a release or after a kernel change.
No profile has a deadline: a test's first example pays Triton / Numba compilation, and a loaded
machine (parallel workers, a 2-core CI host) makes any wall-clock limit a coin toss. Set here, at
the root, so `pytest tests/` alone runs under the same profile as `pytest verify/ tests/`.
"""
import os

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the timing suite (perf/) alone does not need Hypothesis
    settings = None

if settings is not None:
    import torch

    _BASE = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", **_BASE)
    settings.register_profile("gpu", **_BASE)
    settings.register_profile("thorough", max_examples=1000, **_BASE)
    PROFILE = os.environ.get("ZQ_HYPOTHESIS_PROFILE") or ("gpu" if torch.cuda.is_available() else "ci")
    if PROFILE not in ("ci", "gpu", "thorough"):
        raise ValueError(f"ZQ_HYPOTHESIS_PROFILE must be ci, gpu or thorough, got {PROFILE!r}")
    settings.load_profile(PROFILE)
