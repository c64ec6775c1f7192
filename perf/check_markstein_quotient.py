"""CPU check of the activation quantizer's reciprocal path (docs/DESIGN.md §1): for float32 x and
a scale d, q0 = x * y, r = fma(-d, q0, x), q = fma(r, y, q0) with y = 1 / d (IEEE) is the
correctly rounded x / d (numpy's float32 division) wherever |x / d| >= 2**-20 and d in
[2**-99, 2**100], the range the kernel takes that path on.

    PYTHONPATH=$PWD python perf/check_markstein_quotient.py --rounds 150 --out reports/results/cpu-2core/markstein_quotient/result.json

Each round draws 2,000,000 pairs: scales with random significands, an eighth of them all ones, an
eighth a power of two and a sixteenth one to sixteen ulps below all ones; the quotients within
four ulps of a half-integer j + 0.5 (j in -8..7), within three ulps of an integer, or uniform in
[-7.5, 7.5] (round by round). The fused multiply-add is `fma_fp32` below: exact in float64
arithmetic, rounded once to float32 (portable: numpy has no fma, and not every Triton build exports
one). Exits 1 on any mismatch.
"""
import argparse
import json
import sys
import time

import numpy as np

F32 = np.float32


def fma_fp32(a, b, c):
    """float32 a * b + c with one rounding, for finite float32 arrays whose result is a normal
    float32. a * b is exact in float64 (48 significant bits); s + e = a * b + c exactly (TwoSum);
    s rounded to odd (moved one ulp towards e where e != 0 and s is even) then rounded to float32
    is the correctly rounded sum, since float64 has more than 24 + 2 bits (Boldo and Melquiond,
    "Emulation of FMA and correctly rounded sums: proved algorithms using rounding to odd", 2008)."""
    p = a.astype(np.float64) * b.astype(np.float64)
    c = np.asarray(c).astype(np.float64)
    s = p + c
    bp = s - c
    e = (p - bp) + (c - (s - bp))
    even = (s.view(np.int64) & 1) == 0
    s = np.where((e != 0) & even, np.nextafter(s, np.where(e > 0, np.inf, -np.inf)), s)
    return s.astype(F32)


def one_round(rng, it, n):
    sig = rng.integers(0, 2**23, n, dtype=np.int64)
    sig[: n // 8] = 2**23 - 1
    sig[n // 8: n // 4] = 0
    sig[n // 4: n // 4 + n // 16] = 2**23 - 1 - rng.integers(0, 16, n // 16)
    d = np.ldexp(1 + sig / 2**23, rng.integers(-99, 100, n)).astype(F32)
    y = (F32(1) / d).astype(F32)
    kind = it % 3
    if kind < 2:
        base = rng.integers(-8, 8, n) + (0.5 if kind == 0 else 0.0)
        x0 = (base * d.astype(np.float64)).astype(F32)
        x = (x0.view(np.int32) + rng.integers(-4 + kind, 5 - kind, n).astype(np.int32)).view(F32)
    else:
        x = (rng.uniform(-7.5, 7.5, n) * d.astype(np.float64)).astype(F32)
    q0 = (x * y).astype(F32)
    q = fma_fp32(fma_fp32((-d).astype(F32), q0, x), y, q0)
    ref = (x / d).astype(F32)
    bad = (q.view(np.int32) != ref.view(np.int32)) & ~(np.isnan(q) & np.isnan(ref)) & (np.abs(ref) >= 2.0**-20)
    return int(bad.sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--per-round", type=int, default=2_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    mismatches = sum(one_round(rng, it, args.per_round) for it in range(args.rounds))
    result = {"command": " ".join(sys.argv), "pairs": args.rounds * args.per_round, "mismatches": mismatches,
              "seconds": round(time.time() - t0, 1)}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
