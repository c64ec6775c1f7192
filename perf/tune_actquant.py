"""Tune the activation quantizer's limits on this GPU (the launch table's `actquant` family: one
config per scales and M bucket): every candidate verified bit for bit against the oracle's codes
and scales, on rows that take its one-pass and its two-pass path, then timed per (scales, M) on
the input widths of the layer shapes.

    PYTHONUNBUFFERED=1 python perf/tune_actquant.py --out $OUT/tune_actquant.json [--budget-s 200] [--m 1,16,256,4096]

Per token: ONE_PASS_MAX_K, the longest row one program quantizes in one pass (longer rows take two
passes over ROW_CHUNK chunks: at M = 1 a single program walks the row, so this limit sets the
decode-time cost at K = 14,336); with groups: GROUP_BLOCK, the channels a program takes; both:
ELEMS_PER_THREAD, the channels a thread (which sets the warps a program). Each (scales, M) bucket
gets the candidate with the lowest geometric mean of time / best time over the shapes, written
into zqkernels/gpu/configs/<gpu>.json's `actquant` section (buckets not tuned stay); every
timing into --out.
"""

import numpy as np
import torch

import reference
from tuning import DEVICE, Sweep, parser

from zqkernels.gpu.actquant import quantize_activations

GROUP = 128


def candidates(scales):
    if scales == "per_token":
        return [dict(ONE_PASS_MAX_K=one, ROW_CHUNK=chunk, ELEMS_PER_THREAD=ept)
                for one in (8192, 16384) for chunk in (2048, 4096) for ept in (8, 16, 32)]
    return [dict(GROUP_BLOCK=gb, ELEMS_PER_THREAD=ept) for gb in (512, 1024, 2048) for ept in (8, 16, 32)]


def verify(cfg, group):
    """Codes and scales equal to the oracle's on rows shorter and longer than ONE_PASS_MAX_K (per
    token), or than one program's GROUP_BLOCK, ending in a short group (groups)."""
    rng = np.random.default_rng(0)
    if group is None:
        lengths = (cfg["ONE_PASS_MAX_K"] // 2 + 2, cfg["ONE_PASS_MAX_K"] + 2 * cfg["ROW_CHUNK"] + 6)
    else:
        lengths = (cfg["GROUP_BLOCK"] // 2 + 2, 3 * cfg["GROUP_BLOCK"] + group // 2 + 6)
    for k in lengths:
        x = rng.standard_normal((3, k)).astype(np.float32)
        x[1, 5] = 300.0  # an outlier channel
        inv = rng.uniform(0.5, 2.0, k).astype(np.float32)
        q, s = quantize_activations(torch.from_numpy(x).to(DEVICE), torch.from_numpy(inv).to(DEVICE), group,
                                    layout="int8", config=cfg, check_finite=False)
        xs = (x * inv).astype(np.float32)  # the contract's IEEE float32 product
        qr, sr = reference.quantize_activations(xs.astype(np.float64), group_size=group)
        if not (np.array_equal(q.cpu().numpy(), qr) and np.array_equal(s.cpu().numpy().astype(np.float64), sr)):
            return False, f"codes or scales differ from the oracle at K={k}"
    return True, "codes and scales equal to the oracle's (rows on every path of the candidate)"


def main():
    args = parser(__doc__).parse_args()
    sweep = Sweep("actquant", args)
    sweep.record["timed"] = "quantize_activations, fp16 x with a smoothing vector, packed int4 codes"
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    inputs = {}

    def call(cfg, shape, m, group):
        key = (m, shape.k)
        if key not in inputs:
            inputs.clear()
            inputs[key] = (torch.randn(m, shape.k, generator=gen, device=DEVICE).half(),
                           torch.rand(shape.k, generator=gen, device=DEVICE) + 0.5)
        x, inv = inputs[key]
        return lambda: quantize_activations(x, inv, group, config=cfg, check_finite=False)[0]

    for group, scales in ((None, "per_token"), (GROUP, "group")):
        for m in sweep.ms:
            win = sweep.run(scales, m, candidates(scales), lambda cfg, m, group=group: verify(cfg, group),
                            lambda cfg, shape, m, group=group: call(cfg, shape, m, group))
            print(scales, m, None if win is None else (win["config"], win["us"]), flush=True)
    if not sweep.record["winners"]:
        raise SystemExit("no candidate was timed: raise --budget-s")
    print("table written:", sweep.write_table())

if __name__ == "__main__":
    main()
