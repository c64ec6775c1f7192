"""Tune `w4a4_gemm`'s launch table on this GPU: every candidate verified exact against the int64
product of the codes (int32 entry point) and against the oracle with group scales, then timed.

    PYTHONUNBUFFERED=1 python perf/tune_w4a4.py --out $OUT/tune_w4a4.json [--budget-s 400] [--m 1,16,4096]

Each tile config is a candidate twice, once per activation layout (`act_layout`: packed int4 or
one int8 code per byte), verified and timed with activations in that layout, so the layout is
picked by the GEMM's time. Not timed: the quantizer's M*K/2 more bytes written for int8 codes
(8 MB at M = K = 4096; the layer benchmark `zq_w4a4_aq` times quantizer and GEMM together).
Writes the winners into zqkernels/gpu/configs/<gpu>.json (w4a4 section) and every timing into --out.
"""
import torch

import reference
from tuning import DEVICE, Sweep, attach_no_tma, parser

from zqkernels.gpu.w4a4 import ACT_LAYOUTS, w4a4_gemm, w4a4_gemm_int32


def C(variant, BM, BN, BK, W=4, S=4, GM=8, PLANES=True, **kw):
    return dict(variant=variant, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=GM, PLANES=PLANES, num_warps=W,
                num_stages=S, **kw)


def gemv(m):
    """CUDA-core candidates for a few tokens (M <= 4; BLOCK_M rows of tokens per program). At
    M = 16 the best, BLOCK_M 8, was 3.3-7.4x slower than splitk (tune_w4a4_small_m_group.json):
    each weight word is multiplied once per token, on the CUDA cores. Narrow deep tiles (4-8 rows
    of 2,048-4,096 channels) stream best at M = 1 (probe_gemv_m1.json); the kernel's loop has no
    dot for Triton to pipeline, so num_stages is 1 (1 and 3 timed equal in tune_w4a4_m124.json)."""
    return [dict(variant="gemv", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=k, num_warps=w, num_stages=1, SPLIT_K=0,
                 SPLIT_TARGET_CTAS=t)
            for bm in (1, 2, 4) if m <= 4 and bm <= m < 2 * bm
            for bn, k in ((4, 4096), (8, 2048), (8, 4096), (16, 1024), (16, 2048), (32, 512), (32, 1024))
            for w in (4, 8) for t in (264, 528)]


def tiles(m, group):
    bk = 128 if group else 256
    if m <= 16:
        return gemv(m) + [C("splitk", 16, bn, k, W=4, S=s, GM=1, SPLIT_K=0, SWAP_AB=True, SPLIT_TARGET_CTAS=t)
                          for bn in (64, 128) for k in (bk, 2 * bk) for s in (3, 4) for t in (264, 396)
                          if not (group and k > group)]
    if m <= 256:
        return [C("splitk", 64, bn, bk, W=4, S=4, SPLIT_K=0) for bn in (64, 128)] + \
               [C("gemm", bm, bn, bk, W=w, S=s) for bm, bn, w, s in ((64, 64, 4, 4), (64, 128, 4, 4),
                                                                      (128, 128, 8, 3), (128, 128, 4, 4))]
    tma = [dict(variant="tma", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, num_warps=w, num_stages=s)
           for bm, bn, w, s in ((128, 128, 4, 4), (128, 128, 8, 3), (128, 256, 8, 3))]
    return [C("gemm", bm, bn, k, W=w, S=s, PLANES=p) for bm, bn, k, w, s in
            ((128, 128, bk, 8, 3), (128, 256, 128, 8, 3), (128, 128, 128, 4, 4), (256, 128, 128, 8, 3),
             (128, 256, 64, 8, 4)) for p in (True, False) if not (group and k > group)] + tma


def candidates(m, group):
    """Every tile config once per activation layout (tma: int8 only), side by side; at M <= 16 packed int4
    only (a few KB of activations: the int8 codes save nothing there and were equal to 12 % slower
    in reports/results/h200/perf_w4a4_b2b.json)."""
    layouts = ("int4",) if m <= 16 else ACT_LAYOUTS
    return [dict(cfg, act_layout=layout) for cfg in tiles(m, group) for layout in layouts
            if cfg["variant"] != "tma" or layout == "int8"]  # tma takes int8 codes only


def rand_packed(rows, k, gen):
    return torch.randint(0, 256, (rows, k // 2), generator=gen, device=DEVICE, dtype=torch.uint8)


def unpack(p):
    """Packed uint8 codes -> float64 codes on p's device, by the oracle's own unpacking."""
    return torch.from_numpy(reference.unpack_int4(p.cpu().numpy())).double().to(p.device)


def in_layout(p, layout):
    """Packed activation codes in `layout`: as they are ("int4"), or one int8 code per byte."""
    return p if layout == "int4" else torch.from_numpy(reference.unpack_int4(p.cpu().numpy())).to(p.device)


def main():
    ap = parser(__doc__)
    ap.add_argument("--scales", default="per_token,group", help="the table sections to tune (comma-separated)")
    args = ap.parse_args()
    sweep = Sweep("w4a4", args)
    sweep.record["timed"] = "w4a4_gemm alone, activations in the candidate's act_layout"
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    cache = {}

    def operands(shape, m, group):
        key = (shape.name, m, group)
        if key not in cache:
            g = 1 if group is None else -(-shape.k // group)
            cache.clear()
            qx = rand_packed(m, shape.k, gen)
            cache[key] = ({layout: in_layout(qx, layout) for layout in ACT_LAYOUTS},
                          torch.rand(m, g, generator=gen, device=DEVICE).squeeze(1).contiguous() + 0.01,
                          rand_packed(shape.n, shape.k, gen), torch.rand(shape.n, generator=gen, device=DEVICE) + 0.01)
        return cache[key]

    def verify(cfg, m, group):
        n, k = sweep.verify_n, sweep.verify_k
        qx, qw = rand_packed(m, k, gen), rand_packed(n, k, gen)
        exact = unpack(qx) @ unpack(qw).T
        qx_in = in_layout(qx, cfg["act_layout"])
        if group is None:
            got = w4a4_gemm_int32(qx_in, qw, config=cfg).double()
            return bool(torch.equal(got, exact)), f"int32 exact, {cfg['act_layout']} activations"
        sx = torch.rand(m, -(-k // group), generator=gen, device=DEVICE) + 0.01
        sw = torch.rand(n, generator=gen, device=DEVICE) + 0.01
        got = w4a4_gemm(qx_in, sx, qw, sw, act_group_size=group, out_dtype=torch.float32, config=cfg).double()
        ref = torch.zeros_like(exact)
        cx, cw = unpack(qx), unpack(qw)
        for gi in range(sx.shape[1]):
            sl = slice(gi * group, (gi + 1) * group)
            ref += (cx[:, sl] @ cw[:, sl].T) * sx[:, gi:gi + 1].double()
        ref *= sw.double()[None, :]
        err = float((got - ref).abs().max() / ref.abs().max())
        return err < 1e-5, f"max rel error {err:.2e} (fp32 accumulation of rescaled int32 partials)"

    for group, scales in ((None, "per_token"), (128, "group")):
        if scales not in args.scales.split(","):
            continue
        for m in sweep.ms:
            def call(cfg, shape, m, group=group):
                qx, sx, qw, sw = operands(shape, m, group)
                qx = qx[cfg["act_layout"]]
                return lambda: w4a4_gemm(qx, sx, qw, sw, act_group_size=group, config=cfg, check_finite=False)

            win = sweep.run(scales, m, candidates(m, group), lambda cfg, m, group=group: verify(cfg, m, group), call)
            attach_no_tma(sweep, scales, m, lambda r: r["config"]["act_layout"] == "int4", strip=("act_layout",))
            print(scales, m, None if win is None else (win["config"], win["us"]), flush=True)
    print("table written:", sweep.write_table())


if __name__ == "__main__":
    main()
