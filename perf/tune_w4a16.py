"""Tune `w4a16_gemm`'s launch table on this GPU: every candidate verified against a float64
product of the dequantized weights (fp32 accumulation tolerance), then timed.

    PYTHONUNBUFFERED=1 python perf/tune_w4a16.py --out $OUT/tune_w4a16.json [--budget-s 400]

Writes the winners into zqkernels/gpu/configs/<gpu>.json (w4a16 section) and every timing into --out.
"""
import torch

from tune_w4a4 import rand_packed, unpack
from tuning import DEVICE, Sweep, attach_no_tma, parser

from zqkernels.gpu.w4a16 import w4a16_gemm


def C(variant, BM, BN, BK, W=4, S=4, GM=8, **kw):
    return dict(variant=variant, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=GM, num_warps=W, num_stages=S, **kw)


# gemv tiles (BLOCK_N, BLOCK_K, warps): deep narrow rows (a K tile may span groups), and the wide
# 128-deep tiles that won with groups when a tile could not span them
GEMV_DEEP = ((4, 4096, 4), (8, 2048, 4), (8, 1024, 4), (16, 1024, 4), (16, 2048, 8), (32, 512, 4), (32, 1024, 8))
GEMV_TILES = {None: GEMV_DEEP, 128: GEMV_DEEP + ((64, 128, 4), (128, 128, 8))}


def candidates(m, group):
    bk = 128 if group else 256
    if m <= 16:
        gemv = [C("gemv", 1, bn, k, W=w, S=s, GM=1, SPLIT_K=sk) for bn, k, w in GEMV_TILES[group] for s in (2, 3)
                for sk in (0, 1)] if m <= 4 else []
        # tma at a few tokens: a 16-row activation box, K split by the launcher
        tma = [C("tma", 16, bn, k, GM=1, S=s, SPLIT_K=0) for bn, k in ((64, 128), (128, 64), (64, 256), (128, 128), (64, 64))
               for s in (3, 4) if not (group and k > group)]
        return [C("splitk", 16, bn, k, GM=1, S=s, SPLIT_K=0, SWAP_AB=True, PLANES=p) for bn in (64, 128)
                for k in (64, bk, 2 * bk) for s in (3, 4) for p in (False, True) if not (group and k > group)] + gemv + tma
    if m <= 256:
        return [C("splitk", 64, 64, 128, SPLIT_K=0), C("gemm", 64, 64, 128), C("gemm", 128, 128, 64, W=8),
                C("gemm", 64, 128, 64)] + [C("tma", bm, bn, 64, W=w, S=4) for bm, bn, w in
                                           ((64, 128, 4), (128, 128, 8), (128, 64, 4), (128, 128, 4))]
    gemm = [C("gemm", bm, bn, k, W=w, S=s) for bm, bn, k, w, s in ((128, 128, 64, 8, 4), (128, 128, 32, 4, 4))]
    tiles = ((256, 128, 64, 8, 3), (256, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4),
             (128, 128, 128, 8, 3), (256, 64, 64, 4, 4))
    return [C("tma", bm, bn, k, W=w, S=s) for bm, bn, k, w, s in tiles] + gemm


def main():
    ap = parser(__doc__)
    ap.add_argument("--scales", default="per_channel,group", help="the table sections to tune (comma-separated)")
    args = ap.parse_args()
    sweep = Sweep("w4a16", args)
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def verify(cfg, m, group):
        n, k = sweep.verify_n, sweep.verify_k
        x = torch.randn(m, k, generator=gen, device=DEVICE).half()
        qw = rand_packed(n, k, gen)
        g = 1 if group is None else -(-k // group)
        sw = torch.rand(n, g, generator=gen, device=DEVICE) + 0.01
        sw = sw[:, 0].contiguous() if group is None else sw
        w = unpack(qw) * (sw.double()[:, None] if group is None
                          else sw.double().repeat_interleave(group, dim=1)[:, :k])
        ref = x.double() @ w.T
        got = w4a16_gemm(x, qw, sw, group_size=group, config=cfg).double()
        err = float((got - ref).abs().max() / ref.abs().max())
        return err < 2e-3, f"max rel error {err:.2e} (fp16 output rounding)"

    for group, scales in ((None, "per_channel"), (128, "group")):
        if scales not in args.scales.split(","):
            continue
        for m in sweep.ms:
            def call(cfg, shape, m, group=group):
                x = torch.randn(m, shape.k, generator=gen, device=DEVICE).half()
                qw = rand_packed(shape.n, shape.k, gen)
                g = 1 if group is None else -(-shape.k // group)
                sw = torch.rand(shape.n, g, generator=gen, device=DEVICE) + 0.01
                sw = sw[:, 0].contiguous() if group is None else sw
                return lambda: w4a16_gemm(x, qw, sw, group_size=group, config=cfg, check_finite=False)

            win = sweep.run(scales, m, candidates(m, group), lambda cfg, m, group=group: verify(cfg, m, group), call)
            attach_no_tma(sweep, scales, m, lambda r: r["config"]["variant"] != "tma")
            print(scales, m, None if win is None else (win["config"], win["us"]), flush=True)
    print("table written:", sweep.write_table())


if __name__ == "__main__":
    main()
