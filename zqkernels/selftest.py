"""`zq selftest`: quantize one random layer with both methods through the oracle and print the
errors and the pattern table's statistics. Needs no GPU and no model: a smoke test of the formats.
"""
import time

import numpy as np

import reference as R

# n*k and m*k at most this: the oracle keeps several float64 copies of each (a LLaMA 4096x4096
# layer is 2**24); beyond it the smoke test would take minutes and gigabytes.
MAX_ELEMENTS = 2**24


def _synthetic_layer(rng, n, k, m):
    """A layer whose activations carry a few outlier channels, as LLM linear inputs do."""
    w = rng.standard_normal((n, k)) * 0.02
    x = rng.standard_normal((m, k))
    outlier_channels = rng.choice(k, size=max(1, k // 100), replace=False)
    x[:, outlier_channels] *= 40.0
    return w, x


def _rel_err(y, ref):
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def run_selftest(n=512, k=1024, m=64, seed=0, alpha=0.85, outlier_ratio=0.01, mosaic_alpha=0.5, density=0.05, act_group_size=None):
    for name, v in (("n", n), ("k", k), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if n * k > MAX_ELEMENTS or m * k > MAX_ELEMENTS:
        raise ValueError(f"n*k = {n * k} and m*k = {m * k} must be at most {MAX_ELEMENTS}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if act_group_size is not None and (isinstance(act_group_size, bool) or not isinstance(act_group_size, (int, np.integer))
                                       or act_group_size < 1):
        raise ValueError(f"act_group_size must be None or a positive integer, got {act_group_size!r}")
    rng = np.random.default_rng(seed)
    w, x = _synthetic_layer(rng, n, k, m)
    ref = x @ w.T
    rows = []

    t0 = time.perf_counter()
    qx, sx = R.quantize_activations(x, group_size=act_group_size)
    qw, sw = R.quantize_weights(w)
    rows.append(("rtn-w4a4", _rel_err(R.w4a4_matmul(qx, sx, qw, sw, act_group_size=act_group_size), ref), 4.0 + 16 / k))

    s = R.smooth_scales(np.abs(x).max(axis=0), np.abs(w).max(axis=0), alpha=0.5)
    qx, sx = R.quantize_activations(x / s, group_size=act_group_size)
    qw, sw = R.quantize_weights(w * s)
    rows.append(("smoothquant-w4a4 (a=0.5)", _rel_err(R.w4a4_matmul(qx, sx, qw, sw, act_group_size=act_group_size), ref), 4.0 + 16 / k))

    s = R.smooth_scales(np.abs(x).max(axis=0), np.abs(w).max(axis=0), alpha=alpha)
    codes = R.zipper_quantize(w * s, outlier_ratio=outlier_ratio)
    lut = R.build_pattern_lut(codes.q_high)
    stats = R.lut_stats(lut)
    y_zip = R.zipper_matmul(x / s, codes, act_group_size=act_group_size)
    high_bits = 8 * (stats["index_bytes"] + stats["pattern_bytes"]) / (n * k)
    rows.append((f"zipper (a={alpha}, outliers={outlier_ratio})", _rel_err(y_zip, ref), 4.0 + high_bits + 16 / k))
    assert np.allclose(R.lut_matmul(x / s, lut), R.sparse_matmul(x / s, codes.q_high)), "LUT != direct product"

    # Mosaic keeps a plain 4-bit base, so it smooths gently: heavy smoothing puts outliers in W.
    s = R.smooth_scales(np.abs(x).max(axis=0), np.abs(w).max(axis=0), alpha=mosaic_alpha)
    hdiag = np.mean((x / s) ** 2, axis=0)
    mcodes = R.mosaic_quantize(w * s, hdiag, density=density)
    y_mos = R.mosaic_matmul(x / s, mcodes, act_group_size=act_group_size)
    res_bits = 8 * (mcodes.q_res.size / 2 + mcodes.scale_res.size * 2 + mcodes.block_index.size * 4) / (n * k)
    rows.append((f"mosaic (a={mosaic_alpha}, density={density})", _rel_err(y_mos, ref), 4.0 + 16 / k + res_bits))
    elapsed = time.perf_counter() - t0

    print(f"zq selftest: random layer N={n} K={k}, M={m} tokens with {max(1, k // 100)} outlier channels (x40)")
    print(f"activations: 4-bit, {'per token' if act_group_size is None else f'per token and group of {act_group_size}'}")
    print(f"{'method':<36}{'rel. output error':>18}{'bits/weight':>13}")
    for name, err, bits in rows:
        print(f"{name:<36}{err:>18.4f}{bits:>13.2f}")
    print(
        f"pattern table (zipper high part, group 4): E={stats['E']} U={stats['U']} "
        f"E/U={stats['reuse']:.2f} index={stats['index_bytes']} B patterns={stats['pattern_bytes']} B "
        f"table/token={stats['table_bytes_per_token']} B"
    )
    print(f"mosaic: {len(mcodes.block_index)} residual blocks of {mcodes.block[0]}x{mcodes.block[1]}")
    print(f"done in {elapsed:.2f} s")
    return {name: err for name, err, _ in rows}
