"""Every `perf/tune_zipper_high.py` candidate checked on a 40 x 256 layer at M = 1 and 40, with its
error printed: each line is (layout, M, BLOCK_M, BLOCK_N, BLOCK_E, the largest excess of |out - ref|
over the fp32 bound 2**-20 * mag + 2**-22 * |ref| (<= 0: within it), the largest |out - ref|).
Needs a CUDA GPU.

    PYTHONPATH=$PWD python perf/probe_zipper_high_block_e.py > $OUT/zipper_high_block_e_probe.log
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tune_zipper_high as tune  # noqa: E402

from zqkernels.gpu.zipper_high import zipper_high_gpu  # noqa: E402


def main():
    n, k = 40, 256
    layouts, q, scale = tune.high_layouts(n, k, seed=1)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for method in ("columns", "ell"):
        for m in (1, 40):
            for cfg in tune.candidates(m):
                x = torch.randn(m, k, generator=gen, device="cuda")
                out = torch.zeros(m, n, device="cuda")
                block = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_E"])
                try:
                    zipper_high_gpu(x, layouts[method], out, block=block)
                    torch.cuda.synchronize()
                except Exception as exc:  # noqa: BLE001 - a candidate that cannot launch is reported
                    print(method, m, *block, "EXC", type(exc).__name__, str(exc)[:300], flush=True)
                    continue
                ref = 16.0 * scale[None, :] * (x.double() @ q[method].T)
                mag = 16.0 * scale[None, :] * (x.double().abs() @ q[method].abs().T)
                diff = (out.double() - ref).abs()
                excess = float((diff - 2.0**-20 * mag - 2.0**-22 * ref.abs()).max())
                print(method, m, *block, "excess", excess, "maxdiff", float(diff.max()), flush=True)


if __name__ == "__main__":
    main()
