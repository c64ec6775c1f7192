"""MosaicQuant on the ZipperEngine (`zqkernels.gpu.mosaic`): dense W4A4 base + block-sparse residual.

- zq_mosaic_w4a4:         `mosaic_w4a4_gemm`, base and residual in ONE launch (the fused kernel).
- zq_mosaic_w4a4_unfused: `mosaic_w4a4_gemm_unfused`, dense GEMM then a second residual launch:
                          the baseline that shows what fusion buys (role "baseline").
Both at 5 % residual density (64 x 64 blocks) on the --shapes x --m grid; `test_mosaic_density`
sweeps density 0 .. 20 % at M = 16 and M = 4096 (those of --m) on the first selected shape.

Codes are synthetic: a random 4-bit base and residual, kept blocks drawn uniformly at random
(seeded) at the requested density; the data does not change the work, the block count and their
spread over N-tiles do (a real model's blocks crowd onto outlier channels: see the pipeline's
table statistics). Activations are per-token quantized (packed int4 + fp32 scales); the timed
call is the GEMM alone. bytes_moved is the compulsory traffic (inputs once, output once). Timed
back to back over copies of the layout and the activations (perf/conftest.py); copies of a layout
are clones of its tensors.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from timing import clone_operands

pytestmark = pytest.mark.gpu

BLOCK = (64, 64)
DENSITY = 0.05
SWEEP_DENSITIES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
SWEEP_M = (16, 4096)


def synthetic_mosaic_codes(n, k, density, seed=0):
    import reference

    rng = np.random.default_rng(seed)
    bn, bk = BLOCK
    nbr, nbc = -(-n // bn), -(-k // bk)
    n_keep = min(nbr * nbc, math.ceil(density * nbr * nbc))
    kept = np.sort(rng.choice(nbr * nbc, size=n_keep, replace=False))
    q_res = rng.integers(-8, 8, size=(n_keep, bn, bk), dtype=np.int8)
    block_index = np.stack([kept // nbc, kept % nbc], axis=1).astype(np.int64)
    for i, (rb, cb) in enumerate(block_index):  # nothing past the matrix edge
        q_res[i, max(0, n - rb * bn):, :] = 0
        q_res[i, :, max(0, k - cb * bk):] = 0
    return reference.MosaicCodes(
        q_base=rng.integers(-8, 8, size=(n, k), dtype=np.int8),
        scale_base=rng.uniform(0.5, 1.5, size=n) / 7,
        block_index=block_index,
        q_res=q_res,
        scale_res=rng.uniform(0.05, 0.15, size=(n_keep, bn)) / 7,
        block=BLOCK,
        group_size=None,
    )


def _weights(cache, zq_kernel, shape, density, i=0):
    mosaic_blocks = zq_kernel("zqkernels.layouts", "MosaicBlocks")
    return cache.copy(("mosaic", shape.name, density), i,
                      lambda: mosaic_blocks.from_codes(synthetic_mosaic_codes(shape.n, shape.k, density), "cuda"))


def _time(zq_bench, zq_kernel, weight_cache, shape, m, density, fused, method=None, role=None):
    name = "mosaic_w4a4_gemm" if fused else "mosaic_w4a4_gemm_unfused"
    gemm = zq_kernel("zqkernels.gpu.mosaic", name)
    weights = _weights(weight_cache, zq_kernel, shape, density)
    acts = (torch.randint(0, 256, (m, shape.k // 2), device="cuda", dtype=torch.uint8),
            torch.rand(m, device="cuda") * 0.1 + 0.01)

    def make_fn(i):
        qx, sx = clone_operands(acts) if i else acts
        w = _weights(weight_cache, zq_kernel, shape, density, i)
        return lambda: gemm(qx, sx, w, check_finite=False)

    bn, bk = BLOCK
    blocks = int(weights.n_blocks)
    res_bytes = blocks * (bn * bk // 2 + 4 * bn + 4) + 4 * (-(-shape.n // bn) + 1)
    moved = m * shape.k // 2 + 4 * m + shape.n * shape.k // 2 + 4 * shape.n + res_bytes + 2 * m * shape.n
    flops = 2 * m * shape.n * shape.k + 2 * m * blocks * bn * bk
    return zq_bench.gpu(make_fn=make_fn, family="mosaic",
                        method=method or ("zq_mosaic_w4a4" if fused else "zq_mosaic_w4a4_unfused"),
                        role=role or ("ours" if fused else "baseline"), shape=shape, m=m, flops=flops, ops_unit="TOPS",
                        bytes_moved=moved, density=density, actual_density=float(weights.density),
                        residual_blocks=blocks, block=list(BLOCK), placement="uniform random",
                        fused=fused)


def test_zq_mosaic_w4a4(zq_bench, zq_kernel, weight_cache, shape, m):
    _time(zq_bench, zq_kernel, weight_cache, shape, m, DENSITY, fused=True)


def test_zq_mosaic_w4a4_unfused(zq_bench, zq_kernel, weight_cache, shape, m):
    _time(zq_bench, zq_kernel, weight_cache, shape, m, DENSITY, fused=False)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("density", SWEEP_DENSITIES, ids=[f"d{d:g}" for d in SWEEP_DENSITIES])
@pytest.mark.parametrize("sweep_m", SWEEP_M, ids=[f"M{m}" for m in SWEEP_M])
def test_mosaic_density(zq_bench, zq_kernel, weight_cache, selected_shapes, selected_ms, sweep_m, density, fused):
    if sweep_m not in selected_ms:
        pytest.skip(f"M={sweep_m} not selected with --m")
    shape = selected_shapes[0]
    # a method and role of its own: the sweep stays out of the 5 % grid's speedups
    _time(zq_bench, zq_kernel, weight_cache, shape, sweep_m, density, fused,
          method=f"sweep_mosaic_{'fused' if fused else 'unfused'}", role="sweep")
