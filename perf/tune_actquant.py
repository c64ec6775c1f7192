"""Tune the activation quantizer's limits on this GPU (the launch table's `actquant` entry: one
dict for every M, not per bucket): every candidate verified bit for bit against the oracle's codes
and scales, on rows that take its one-pass and its two-pass path, then timed per (scales, M) on
the input widths of the layer shapes.

    PYTHONUNBUFFERED=1 python perf/tune_actquant.py --out $OUT/tune_actquant.json [--budget-s 200] [--m 1,16,256,4096]

ONE_PASS_MAX_K: the longest per-token row one program quantizes in one pass (longer rows take
two passes over ROW_CHUNK chunks: at M = 1 a single program walks the row, so this limit sets the
decode-time cost at K = 14,336); GROUP_BLOCK: the channels a program takes with group scales.
The winner is the candidate with the lowest geometric mean of time / best time over every
(scales, M, shape) it was timed at, among those timed at all of them; it is written into
zqkernels/gpu/configs/<gpu>.json's `actquant` entry, every timing into --out.
"""
import json
import math

import numpy as np
import torch

import reference
from tuning import DEVICE, Sweep, parser

from zqkernels.gpu.actquant import quantize_activations

GROUP = 128


def candidates():
    return [dict(ONE_PASS_MAX_K=one, ROW_CHUNK=2048, GROUP_BLOCK=gb, ELEMS_PER_THREAD=ept)
            for one in (8192, 16384) for gb in (1024, 2048) for ept in (8, 16, 32)]


def verify(cfg, group):
    """Codes and scales equal to the oracle's on rows shorter and longer than ONE_PASS_MAX_K."""
    rng = np.random.default_rng(0)
    for k in (cfg["ONE_PASS_MAX_K"] // 2 + 2, cfg["ONE_PASS_MAX_K"] + 2 * cfg["ROW_CHUNK"] + 6):
        x = rng.standard_normal((3, k)).astype(np.float32)
        x[1, 5] = 300.0  # an outlier channel
        inv = rng.uniform(0.5, 2.0, k).astype(np.float32)
        q, s = quantize_activations(torch.from_numpy(x).to(DEVICE), torch.from_numpy(inv).to(DEVICE), group,
                                    layout="int8", config=cfg, check_finite=False)
        xs = (x * inv).astype(np.float32)  # the contract's IEEE float32 product
        qr, sr = reference.quantize_activations(xs.astype(np.float64), group_size=group)
        if not (np.array_equal(q.cpu().numpy(), qr) and np.array_equal(s.cpu().numpy().astype(np.float64), sr)):
            return False, f"codes or scales differ from the oracle at K={k}"
    return True, "codes and scales equal to the oracle's (one- and two-pass rows)"


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
            win = sweep.run(scales, m, candidates(), lambda cfg, m, group=group: verify(cfg, group),
                            lambda cfg, shape, m, group=group: call(cfg, shape, m, group))
            print(scales, m, None if win is None else (win["config"], win["us"]), flush=True)
    # one entry for every M: the candidate best over every (scales, M, shape) it was timed at
    timed = [r for r in sweep.record["rows"] if "us" in r]
    cells = {(r["scales"], r["M"], s) for r in timed for s in r["us"]}
    best = {c: min(r["us"][c[2]] for r in timed if (r["scales"], r["M"]) == c[:2] and c[2] in r["us"]) for c in cells}
    scores = {}
    for r in timed:
        for s, us in r["us"].items():
            scores.setdefault(json.dumps(r["config"], sort_keys=True), {})[(r["scales"], r["M"], s)] = us
    complete = {c: v for c, v in scores.items() if set(v) == cells}
    if not complete:
        raise SystemExit("no candidate was timed at every (scales, M, shape): raise --budget-s")
    geo = {c: math.exp(sum(math.log(v[cell] / best[cell]) for cell in cells) / len(cells)) for c, v in complete.items()}
    winner = json.loads(min(geo, key=geo.get))
    sweep.record["overall"] = {"config": winner, "geomean_vs_best": geo[json.dumps(winner, sort_keys=True)],
                               "cells": len(cells)}
    sweep.save()
    print("overall", winner, "table written:", sweep.write_entry(winner))


if __name__ == "__main__":
    main()
