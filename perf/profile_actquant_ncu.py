"""A launch sequence for Nsight Compute: the activation quantizer at M = 4096 (K = 4096 and 14,336,
per token and groups of 128), then the M = 1 W4A4 GEMM (the launch table's variant) and the
fused GEMV on the o and down shapes, each launched three times. Run under ncu on a GPU host:

    ncu --clock-control none -k "regex:_quantize_activations_kernel|_w4a4_gemv|_w4a4_splitk" \\
        --section SpeedOfLight --section Occupancy --section SchedulerStats --section InstructionStats \\
        python perf/profile_actquant_ncu.py

Random operands (seed 0); the numbers ncu reports are the point, the outputs are not checked.
"""
import sys

import torch

from zqkernels.gpu.actquant import quantize_activations
from zqkernels.gpu.w4a4 import w4a4_gemm, w4a4_gemv_quant


def main():
    if not torch.cuda.is_available():
        sys.exit("profile_actquant_ncu.py profiles compiled kernels: it needs a CUDA GPU")
    torch.manual_seed(0)
    for k in (4096, 14336):
        x = torch.randn(4096, k, device="cuda", dtype=torch.float16)
        inv = torch.rand(k, device="cuda") + 0.5
        for group in (None, 128):
            for _ in range(3):
                quantize_activations(x, inv, group, check_finite=False)
    torch.cuda.synchronize()
    for n, k in ((4096, 4096), (4096, 14336)):
        qw = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
        sw = torch.rand(n, device="cuda")
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        qx, sx = quantize_activations(x, None, None, check_finite=False)
        for _ in range(3):
            w4a4_gemm(qx, sx, qw, sw, check_finite=False)
            w4a4_gemv_quant(x, None, qw, sw, check_finite=False)
    torch.cuda.synchronize()
    print("profiled launches done")


if __name__ == "__main__":
    main()
