"""Shared set-up for the property tests.

Triton decides at decoration time whether a kernel is compiled or interpreted, so the choice is
made here, before any test module imports `zqkernels.gpu`: with no CUDA GPU the kernels run under
Triton's CPU interpreter (`TRITON_INTERPRET=1`) on small shapes; with one they run compiled.

Hypothesis profiles (ZQ_HYPOTHESIS_PROFILE): the repository's root conftest.py, shared with tests/.

ZQ_TEST_TIMES=<file> appends one line per test phase as it finishes (seconds, phase, outcome,
node id), so a run cut short by a time limit still says where its time went.

Under pytest-xdist (`-n W`) each worker sizes torch's, Numba's and OpenMP's thread pools to its
share of the host's cores (cores // W, at least 1; a variable already set is kept), so W workers
do not each start a pool as large as the host and oversubscribe it.
"""
import os

import torch

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if _WORKERS > 1 and "PYTEST_XDIST_WORKER" in os.environ:
    # before any test module imports numba: NUMBA_NUM_THREADS is read once, at its import
    _SHARE = max(1, (os.cpu_count() or 1) // _WORKERS)
    for _var in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_SHARE))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

GPU_AVAILABLE = torch.cuda.is_available()
if not GPU_AVAILABLE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Kernel tests run on this device: compiled on a GPU, interpreted (tensors on the CPU) otherwise.
KERNEL_DEVICE = "cuda" if GPU_AVAILABLE else "cpu"


_TIMES = os.environ.get("ZQ_TEST_TIMES")
# under pytest-xdist every report reaches this hook twice (in its worker, then in the controller):
# only the controller (or a run without workers) writes
if _TIMES and "PYTEST_XDIST_WORKER" not in os.environ:
    def pytest_runtest_logreport(report):
        with open(_TIMES, "a") as f:
            f.write(f"{report.duration:.3f}\t{report.when}\t{report.outcome}\t{report.nodeid}\n")
