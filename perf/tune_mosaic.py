"""Tune the ZipperEngine's (`mosaic_w4a4_gemm`) launch table on this GPU at 5 % residual density:
every candidate verified (int32 base and residual accumulators exact; the scaled output against a
float64 product) before it is timed.

    PYTHONUNBUFFERED=1 python perf/tune_mosaic.py --out $OUT/tune_mosaic.json [--budget-s 400]

Writes the winners into zqkernels/gpu/configs/<gpu>.json (mosaic/w4a4 section) and every timing
into --out. Synthetic codes: the data does not change the work, only the number of kept blocks.
"""
import numpy as np
import torch

import reference
from tuning import DEVICE, Sweep, parser

from zqkernels.gpu.mosaic import mosaic_w4a4_gemm, mosaic_w4a4_gemm_int32
from zqkernels.layouts import MosaicBlocks

DENSITY = 0.05


def C(variant, BM, BN, BK, W=4, S=3, GM=8, **kw):
    return dict(variant=variant, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=GM, num_warps=W, num_stages=S, **kw)


def candidates(m):
    if m <= 16:
        return [C("splitk", 16, bn, bk, GM=1, S=s, SPLIT_K=0) for bn in (64, 128) for bk in (128, 256) for s in (3, 4)]
    if m <= 64:
        return [C("inloop", 64, 64, 64, UNROLL=u, SPLIT_K=0) for u in (1, 2)] + [C("splitk", 64, 64, 256, S=4, SPLIT_K=0)]
    return [C("reslate", 64, 64, 256, S=4), C("reslate", 128, 128, 256, W=8), C("reslate", 128, 128, 128, W=8),
            C("reslate", 128, 256, 128, W=8), C("inloop", 128, 64, 64, UNROLL=1, SPLIT_K=1, W=4, S=4)]


def synthetic(n, k, seed):
    rng = np.random.default_rng(seed)
    nbr, nbc = -(-n // 64), -(-k // 64)
    flat = np.sort(rng.choice(nbr * nbc, size=max(1, int(DENSITY * nbr * nbc)), replace=False))
    bi = np.stack(np.divmod(flat, nbc), 1).astype(np.int64)
    q_res = rng.integers(-8, 8, size=(len(bi), 64, 64)).astype(np.int8)
    for i, (r, c) in enumerate(bi):  # the format: zero past the matrix edge
        q_res[i, n - r * 64:, :] = 0
        q_res[i, :, k - c * 64:] = 0
    return reference.MosaicCodes(q_base=rng.integers(-8, 8, size=(n, k)).astype(np.int8),
                                 scale_base=rng.uniform(0.1, 1, n), block_index=bi, q_res=q_res,
                                 scale_res=rng.uniform(0, 0.1, size=(len(bi), 64)), block=(64, 64))


def main():
    args = parser(__doc__).parse_args()
    sweep = Sweep("mosaic", args)
    weights = {}

    def layout(n, k):
        if (n, k) not in weights:
            weights[(n, k)] = (MosaicBlocks.from_codes(c := synthetic(n, k, n + k), DEVICE), c)
        return weights[(n, k)]

    def verify(cfg, m):
        vn, vk = sweep.verify_n, sweep.verify_k
        w, codes = layout(vn, vk)
        rng = np.random.default_rng(m)
        qx = rng.integers(-8, 8, size=(m, vk)).astype(np.int8)
        qxp = torch.from_numpy(reference.pack_int4(qx)).to(DEVICE)
        b, r = mosaic_w4a4_gemm_int32(qxp, w, config=cfg)
        q64 = torch.from_numpy(qx).double().to(DEVICE)
        want_b = q64 @ torch.from_numpy(codes.q_base).double().to(DEVICE).T
        unit = reference.MosaicCodes(codes.q_base, np.ones(vn), codes.block_index, codes.q_res,
                                     np.ones_like(codes.scale_res), codes.block)
        want_t = q64 @ torch.from_numpy(reference.mosaic_dequantize(unit)).to(DEVICE).T
        ok = torch.equal(b.double(), want_b) and torch.equal(b.double() + r.double(), want_t)
        sx = rng.uniform(0.01, 1, m)
        ref = torch.from_numpy((qx * sx[:, None]) @ reference.mosaic_dequantize(codes).T).to(DEVICE)
        y = mosaic_w4a4_gemm(qxp, torch.from_numpy(sx.astype(np.float32)).to(DEVICE), w, out_dtype=torch.float32,
                             config=cfg).double()
        rel = float((y - ref).norm() / ref.norm())
        return bool(ok) and rel < 1e-6, f"int32 exact {bool(ok)}, scaled rel error {rel:.1e}"

    for m in sweep.ms:
        def call(cfg, shape, m):
            w, _ = layout(shape.n, shape.k)
            qx = torch.randint(0, 256, (m, shape.k // 2), device=DEVICE, dtype=torch.uint8)
            sx = torch.rand(m, device=DEVICE) + 0.01
            return lambda: mosaic_w4a4_gemm(qx, sx, w, config=cfg, check_finite=False)

        win = sweep.run("w4a4", m, candidates(m), verify, call)
        print(m, None if win is None else (win["config"], win["us"]), flush=True)
    print("table written:", sweep.write_table("mosaic"))


if __name__ == "__main__":
    main()
