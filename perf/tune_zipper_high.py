"""Tune the launch table of ZipperQuant's GPU high part (`zipper_high_gpu`, both layouts) on this
GPU: every candidate tile (BLOCK_M, BLOCK_N, BLOCK_E) verified against a float64 product of the
high codes, then timed.

    PYTHONUNBUFFERED=1 python perf/tune_zipper_high.py --out $OUT/tune_zipper_high.json [--budget-s 300] [--m 1,16,256]

The high codes of each layer shape are those of `zqkernels.quantizers.zipper_quantize` (outlier
ratio 0.05, the method's default) of a seeded Student-t weight (3 degrees of freedom), packed once
per layout: "ell" (each row's nonzeros padded to the longest) takes them as they are, scattered
over every channel, as the layers of a model had them (its decode profile ran the ell kernel);
"columns" (the channels holding any nonzero, gathered densely) is the layout for outliers
concentrated in a few input channels, so it gets the same codes kept in the K / 64 channels with
the most nonzeros. BLOCK_E = 1 is the one-entry-a-step loop;
more sums BLOCK_E independent entries a step. Writes the winners into
zqkernels/gpu/configs/<gpu>.json (zipper_high section) and every timing into --out.
"""
import numpy as np
import torch

from tuning import DEVICE, Sweep, parser

from zqkernels import quantizers
from zqkernels.gpu.zipper_high import zipper_high_gpu
from zqkernels.layouts import ZipperHighGPU

OUTLIER_RATIO = 0.05
WIDE_N = 8192  # past it a layer takes BLOCK_N_WIDE_N; a candidate uses its BLOCK_N for both


def C(bm, bn, be):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_N_WIDE_N=bn, WIDE_N=WIDE_N, BLOCK_E=be)


def candidates(m):
    if m <= 16:  # the table's (16, 16 | 32, 1) first: what every run before measured
        return [C(16, 16, 1), C(16, 32, 1), C(16, 16, 8), C(16, 32, 8), C(4, 32, 16), C(4, 64, 16), C(2, 64, 32),
                C(1, 64, 32), C(1, 128, 16), C(8, 64, 8)]
    if m <= 256:
        return [C(32, 64, 1), C(32, 64, 4), C(16, 64, 8), C(32, 32, 8), C(16, 128, 4)]
    return [C(32, 128, 1), C(32, 128, 2), C(16, 128, 4), C(64, 64, 2)]


def high_layouts(n, k, seed):
    torch.manual_seed(seed)  # the Student-t draw uses the global generator
    w = (torch.distributions.StudentT(3.0).sample((n, k)) * 0.02).to(DEVICE, torch.float64)
    codes = quantizers.zipper_quantize(w, outlier_ratio=OUTLIER_RATIO)
    q_high, scale = codes.q_high.cpu().numpy(), codes.scale.cpu().numpy()
    keep = np.argsort(-(q_high != 0).sum(axis=0), kind="stable")[: max(1, k // 64)]
    q_cols = np.zeros_like(q_high)
    q_cols[:, keep] = q_high[:, keep]
    per_method = {"ell": q_high, "columns": q_cols}
    layouts = {m: ZipperHighGPU.from_codes(q, scale, DEVICE, method=m) for m, q in per_method.items()}
    return layouts, {m: torch.from_numpy(q).to(DEVICE, torch.float64) for m, q in per_method.items()}, codes.scale


def main():
    args = parser(__doc__).parse_args()
    sweep = Sweep("zipper_high", args)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    torch.manual_seed(0)
    n, k = sweep.verify_n, sweep.verify_k
    verify_layouts, verify_q, verify_scale = high_layouts(n, k, seed=1)
    layouts = {}

    def verify(cfg, m, method):
        x = torch.randn(m, k, generator=gen, device=DEVICE)
        out = torch.zeros(m, n, device=DEVICE)
        zipper_high_gpu(x, verify_layouts[method], out, block=(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_E"]))
        q64 = verify_q[method]
        ref = 16.0 * verify_scale[None, :] * (x.double() @ q64.T)
        mag = 16.0 * verify_scale[None, :] * (x.double().abs() @ q64.abs().T)
        # fp32 products and sums of at most a few hundred terms each (tests/verify: test_zipper.py)
        err = float(((out.double() - ref).abs() - 2.0**-20 * mag - 2.0**-22 * ref.abs()).max())
        return err <= 1e-30, f"max excess over 2**-20 * mag + 2**-22 * |ref|: {err:.3e}"

    for method in ("ell", "columns"):
        for m in sweep.ms:
            def call(cfg, shape, m, method=method):
                if shape.name not in layouts:
                    layouts[shape.name] = high_layouts(shape.n, shape.k, seed=2)[0]
                high = layouts[shape.name][method]
                x = torch.randn(m, shape.k, generator=gen, device=DEVICE)
                out = torch.zeros(m, shape.n, device=DEVICE)
                bn = cfg["BLOCK_N_WIDE_N"] if shape.n > cfg["WIDE_N"] else cfg["BLOCK_N"]
                block = (cfg["BLOCK_M"], bn, cfg["BLOCK_E"])
                return lambda: zipper_high_gpu(x, high, out, block=block, check_finite=False)

            win = sweep.run(method, m, candidates(m), lambda cfg, m, method=method: verify(cfg, m, method), call)
            print(method, m, None if win is None else (win["config"], win["us"]), flush=True)
    print("table written:", sweep.write_table())


if __name__ == "__main__":
    main()
