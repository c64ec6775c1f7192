"""Shared set-up for the property tests.

Triton decides at decoration time whether a kernel is compiled or interpreted, so the choice is
made here, before any test module imports `zqkernels.gpu`: with no CUDA GPU the kernels run under
Triton's CPU interpreter (`TRITON_INTERPRET=1`) on small shapes; with one they run compiled.
"""
import os

import torch
from hypothesis import HealthCheck, settings

GPU_AVAILABLE = torch.cuda.is_available()
if not GPU_AVAILABLE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Kernel tests run on this device: compiled on a GPU, interpreted (tensors on the CPU) otherwise.
KERNEL_DEVICE = "cuda" if GPU_AVAILABLE else "cpu"

# No deadline: the first example of a kernel test pays Triton/Numba compilation.
settings.register_profile(
    "zq", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("zq")
