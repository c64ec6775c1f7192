"""Tune the ZipperEngine's (`mosaic_w4a4_gemm`) launch table on this GPU at 5 % residual density
(`--density`):
every candidate verified (int32 base and residual accumulators exact; the scaled output against a
float64 product) before it is timed.

    PYTHONUNBUFFERED=1 python perf/tune_mosaic.py --out $OUT/tune_mosaic.json [--budget-s 400]
        [--scales per_token,group] [--group 32]

`--scales per_token`: per-token activation and per-channel weight scales (the mosaic/w4a4 section);
`group`: activation and base-weight scales in groups of `--group` channels (the mosaic/w4a4_group
section; every K step then lies in one group, so the launcher halves a BLOCK_K above the group).
Writes the winners into zqkernels/gpu/configs/<gpu>.json and every timing into --out. Synthetic
codes: the data does not change the work, only the number of kept blocks.
"""
import numpy as np
import torch

import reference
from tuning import DEVICE, Sweep, attach_no_tma, parser

from zqkernels.gpu.mosaic import mosaic_w4a4_gemm, mosaic_w4a4_gemm_int32
from zqkernels.layouts import MosaicBlocks

DENSITY = 0.05


def C(variant, BM, BN, BK, W=4, S=3, GM=8, **kw):
    return dict(variant=variant, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=GM, num_warps=W, num_stages=S, **kw)


def candidates(m, group=None):
    """Per token, the tiles as tuned before; with groups, BLOCK_K at most the group (one scale per
    K step) and more stages and tile shapes in its place, since every step is shallow."""
    if group is None:
        if m <= 16:
            return [C("splitk", 16, bn, bk, GM=1, S=s, SPLIT_K=0) for bn in (64, 128) for bk in (128, 256)
                    for s in (3, 4)]
        if m <= 64:
            return [C("inloop", 64, 64, 64, UNROLL=u, SPLIT_K=0) for u in (1, 2)] + \
                [C("splitk", 64, 64, 256, S=4, SPLIT_K=0)]
        return [C("reslate", 64, 64, 256, S=4), C("reslate", 128, 128, 256, W=8), C("reslate", 128, 128, 128, W=8),
                C("reslate", 128, 256, 128, W=8), C("inloop", 128, 64, 64, UNROLL=1, SPLIT_K=1, W=4, S=4)]
    bk = min(group, 64)
    if m <= 16:
        return [C("splitk", 16, bn, bk, GM=1, S=s, SPLIT_K=0, SPLIT_TARGET_CTAS=t) for bn in (32, 64, 128)
                for s in (4, 6) for t in (264, 528)]
    if m <= 64:
        return [C("inloop", 64, 64, bk, UNROLL=u, SPLIT_K=0, S=s) for u in (1, 2) for s in (3, 4)] + \
            [C("splitk", 64, 64, bk, S=s, SPLIT_K=0) for s in (4, 6)] + \
            [C("dequant", 64, bn, bk, W=4, S=4) for bn in (64, 128)]
    # dequant: bf16 operands, one MMA a step; its no_tma is the best integer candidate (attach_no_tma)
    return [C("reslate", bm, bn, bk, W=w, S=s) for bm, bn, w in ((64, 64, 4), (64, 128, 4), (128, 64, 4),
                                                                 (128, 128, 8), (128, 128, 4), (128, 256, 8))
            for s in (4, 6)] + [C("inloop", 128, 64, bk, UNROLL=1, SPLIT_K=1, W=4, S=4)] + \
        [C("dequant", bm, bn, bk, W=w, S=s) for bm, bn, w, s in ((128, 128, 8, 4), (128, 128, 8, 3), (128, 64, 4, 4),
                                                                 (64, 128, 4, 4), (256, 128, 8, 3), (128, 256, 8, 3))]


def synthetic(n, k, seed, group=None, density=DENSITY):
    rng = np.random.default_rng(seed)
    nbr, nbc = -(-n // 64), -(-k // 64)
    flat = np.sort(rng.choice(nbr * nbc, size=max(1, int(density * nbr * nbc)), replace=False))
    bi = np.stack(np.divmod(flat, nbc), 1).astype(np.int64)
    q_res = rng.integers(-8, 8, size=(len(bi), 64, 64)).astype(np.int8)
    for i, (r, c) in enumerate(bi):  # the format: zero past the matrix edge
        q_res[i, n - r * 64:, :] = 0
        q_res[i, :, k - c * 64:] = 0
    sb_shape = n if group is None else (n, -(-k // group))
    return reference.MosaicCodes(q_base=rng.integers(-8, 8, size=(n, k)).astype(np.int8),
                                 scale_base=rng.uniform(0.1, 1, sb_shape), block_index=bi, q_res=q_res,
                                 scale_res=rng.uniform(0, 0.1, size=(len(bi), 64)), block=(64, 64), group_size=group)


def main():
    ap = parser(__doc__)
    ap.add_argument("--scales", default="per_token", help="per_token, group, or both (comma-separated)")
    ap.add_argument("--density", type=float, default=DENSITY, help="the synthetic residual density (default 0.05)")
    ap.add_argument("--group", type=int, default=32,
                    help="the activation and base-weight group size of --scales group (default 32: zq run's)")
    args = ap.parse_args()
    sweep = Sweep("mosaic", args)
    weights = {}

    def layout(n, k, group):
        if (n, k, group) not in weights:
            c = synthetic(n, k, n + k, group, args.density)
            weights[(n, k, group)] = (MosaicBlocks.from_codes(c, DEVICE), c)
        return weights[(n, k, group)]

    def verify(cfg, m, group):
        vn, vk = sweep.verify_n, sweep.verify_k
        w, codes = layout(vn, vk, group)
        rng = np.random.default_rng(m)
        qx = rng.integers(-8, 8, size=(m, vk)).astype(np.int8)
        qxp = torch.from_numpy(reference.pack_int4(qx)).to(DEVICE)
        ok = True
        if group is None:  # the int32 entry point: per-token accumulators only
            b, r = mosaic_w4a4_gemm_int32(qxp, w, config=cfg)
            q64 = torch.from_numpy(qx).double().to(DEVICE)
            want_b = q64 @ torch.from_numpy(codes.q_base).double().to(DEVICE).T
            unit = reference.MosaicCodes(codes.q_base, np.ones(vn), codes.block_index, codes.q_res,
                                         np.ones_like(codes.scale_res), codes.block)
            want_t = q64 @ torch.from_numpy(reference.mosaic_dequantize(unit)).to(DEVICE).T
            ok = bool(torch.equal(b.double(), want_b) and torch.equal(b.double() + r.double(), want_t))
        if group is None:
            sx = rng.uniform(0.01, 1, m)
            xs = qx * sx[:, None]
        else:
            sx = rng.uniform(0.01, 1, (m, -(-vk // group)))
            xs = qx * np.repeat(sx, group, axis=1)[:, :vk]
        ref = torch.from_numpy(xs @ reference.mosaic_dequantize(codes).T).to(DEVICE)
        y = mosaic_w4a4_gemm(qxp, torch.from_numpy(sx.astype(np.float32)).to(DEVICE), w, act_group_size=group,
                             out_dtype=torch.float32, config=cfg).double()
        rel = float((y - ref).norm() / ref.norm())
        # fp32 scale products (integer variants), or bf16 operands (dequant: 2**-8 a rounding, random signs)
        tol = 4e-3 if cfg["variant"] == "dequant" else 1e-6
        return ok and rel < tol, (f"int32 exact {ok}, " if group is None else "") + f"scaled rel error {rel:.1e}"

    for scales, group, section in (("per_token", None, "w4a4"), ("group", args.group, "w4a4_group")):
        if scales not in args.scales.split(","):
            continue
        for m in sweep.ms:
            def call(cfg, shape, m, group=group):
                w, _ = layout(shape.n, shape.k, group)
                qx = torch.randint(0, 256, (m, shape.k // 2), device=DEVICE, dtype=torch.uint8)
                sx = torch.rand(m, 1 if group is None else -(-shape.k // group), device=DEVICE) + 0.01
                return lambda: mosaic_w4a4_gemm(qx, sx if group else sx[:, 0].contiguous(), w, act_group_size=group,
                                                config=cfg, check_finite=False)

            # the Mosaic launcher picks per M bucket only (no per-shape entries)
            win = sweep.run(section, m, candidates(m, group), lambda cfg, m, group=group: verify(cfg, m, group), call,
                            per_shape=False)
            attach_no_tma(sweep, section, m, lambda r: r["config"]["variant"] != "dequant", tma_variants=("dequant",))
            print(section, m, None if win is None else (win["config"], win["us"]), flush=True)
    print("table written:", sweep.write_table("mosaic"))


if __name__ == "__main__":
    main()
