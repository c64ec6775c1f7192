"""Packed layouts invert exactly: `to_codes(from_codes(c)) == c` (`zqkernels.layouts`).

Integer codes and block lists come back exactly; scales come back as the float32 the kernels read
(`float32(scale)`, widened to float64). Codes are drawn at their extremes, with zero rows, odd
and tiny shapes, K not a multiple of the group or block, and empty residual / high parts. Layouts
are built on the CPU here (packing and upload are plain torch); the GPU kernels that read them are
proven in the family tests.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as R
from strategies import codes, examples, matrices
from zqkernels.layouts import ZIPPER_HIGH_METHODS, DenseInt4, MosaicBlocks, ZipperHighGPU, pack_tensor


def f32(a):
    return np.asarray(a, dtype=np.float64).astype(np.float32).astype(np.float64)


def dense_case(data, group):
    """(q int8 [N, K] at its extremes, scales [N] or [N, ceil(K/group)] with zero rows and outliers, N, K)."""
    n = data.draw(st.integers(1, 40))
    k = 2 * data.draw(st.integers(1, 100))
    q = data.draw(codes(-8, 7, shape=(n, k))).astype(np.int8)
    g = 1 if group is None else -(-k // group)
    scale = np.abs(data.draw(matrices(shape=(n, g), kinds=("normal", "outlier", "zero_rows"))))
    return q, (scale[:, 0] if group is None else scale), n, k


@settings(max_examples=examples(40))
@given(data=st.data(), group=st.sampled_from([None, 32, 64, 128]))
def test_dense_int4_round_trip(data, group):
    q, scale, n, k = dense_case(data, group)
    layout = DenseInt4.from_codes(q, scale, group, "cpu")
    q2, s2 = layout.to_codes()
    np.testing.assert_array_equal(q2, q)  # exact
    np.testing.assert_array_equal(s2, f32(scale))  # the float32 the kernels read
    assert layout.packed.shape == (n, k // 2) and layout.shape == (n, k)


@settings(max_examples=examples(30))
@given(w=matrices(max_rows=130, max_cols=200, min_cols=2, even_cols=True),
       density=st.sampled_from([0.0, 0.01, 0.3, 1.0]), block=st.sampled_from([(64, 64), (16, 64), (32, 128)]),
       group=st.sampled_from([None, 64]), seed=st.integers(0, 2**32 - 1))
def test_mosaic_blocks_round_trip(w, density, block, group, seed):
    hdiag = np.random.default_rng(seed).uniform(0.0, 2.0, w.shape[1])
    c = R.mosaic_quantize(w, hdiag, density=density, block=block, group_size=group)
    back = MosaicBlocks.from_codes(c, "cpu").to_codes()
    for name in ("q_base", "block_index", "q_res"):
        np.testing.assert_array_equal(getattr(back, name), getattr(c, name), err_msg=name)  # exact
    np.testing.assert_array_equal(back.scale_base, f32(c.scale_base))
    np.testing.assert_array_equal(back.scale_res, f32(c.scale_res).reshape(back.scale_res.shape))
    assert back.block == tuple(c.block) and back.group_size == c.group_size


@pytest.mark.parametrize("method", ZIPPER_HIGH_METHODS + ("auto",))
@settings(max_examples=examples(25))
@given(data=st.data(), density=st.sampled_from([0.0, 0.01, 0.2, 1.0]))
def test_zipper_high_round_trip(method, data, density):
    n = data.draw(st.integers(1, 50))
    k = data.draw(st.integers(1, 90))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    if method == "dense":  # int4 codes, K even: what the dense layout holds (its refusals below)
        k += k % 2
        lo, hi = -8, 8
    else:
        lo, hi = data.draw(st.sampled_from([(-128, 128), (-8, 8)]))  # auto takes dense only for int4 codes
    q_high = np.where(rng.random((n, k)) < density, rng.integers(lo, hi, size=(n, k)), 0).astype(np.int8)
    q_high[rng.random(n) < 0.2] = 0  # rows without outliers
    scale = rng.uniform(0.0, 0.1, n)
    layout = ZipperHighGPU.from_codes(q_high, scale, "cpu", method=method)
    q2, s2 = layout.to_codes()
    np.testing.assert_array_equal(q2, q_high)  # exact
    np.testing.assert_array_equal(s2, f32(scale))
    assert layout.nnz == int(np.count_nonzero(q_high))


def test_bad_codes_are_refused_by_name():
    with pytest.raises(ValueError, match="q holds codes outside"):
        DenseInt4.from_codes(np.full((2, 4), 8), np.ones(2), None, "cpu")
    with pytest.raises(ValueError, match="q must hold integer codes"):
        DenseInt4.from_codes(np.full((2, 4), 1.5), np.ones(2), None, "cpu")
    with pytest.raises(ValueError, match="odd K"):
        DenseInt4.from_codes(np.zeros((2, 3), np.int8), np.ones(2), None, "cpu")
    with pytest.raises(ValueError, match="scale holds NaN"):
        DenseInt4.from_codes(np.zeros((2, 4), np.int8), np.array([1.0, np.nan]), None, "cpu")
    with pytest.raises(ValueError, match="scale must have shape"):
        DenseInt4.from_codes(np.zeros((2, 4), np.int8), np.ones(3), None, "cpu")
    with pytest.raises(ValueError, match="q_high holds codes outside"):
        ZipperHighGPU.from_codes(np.full((2, 4), 2**40, dtype=np.uint64), np.ones(2), "cpu")
    with pytest.raises(ValueError, match=r"codes in \[-8, 7\] and K even"):
        ZipperHighGPU.from_codes(np.full((2, 4), -9, np.int8), np.ones(2), "cpu", method="dense")
    with pytest.raises(ValueError, match=r"codes in \[-8, 7\] and K even"):
        ZipperHighGPU.from_codes(np.ones((2, 3), np.int8), np.ones(2), "cpu", method="dense")


@pytest.mark.parametrize("build", [
    lambda d: DenseInt4.from_codes(np.zeros((2, 4), np.int8), np.ones(2), None, d),
    lambda d: ZipperHighGPU.from_codes(np.zeros((2, 4), np.int8), np.ones(2), d),
    lambda d: MosaicBlocks.from_codes(R.mosaic_quantize(np.ones((8, 64)), np.ones(64), density=0.5), d),
])
def test_a_bad_device_is_refused_by_name(build):
    with pytest.raises(ValueError, match="device must be"):
        build("gpu0")


def test_scales_beyond_float32_are_refused():
    with pytest.raises(ValueError, match="float32 range"):
        DenseInt4.from_codes(np.zeros((2, 4), np.int8), np.array([1.0, 1e300]), None, "cpu")
    with pytest.raises(ValueError, match="float32 range"):
        ZipperHighGPU.from_codes(np.ones((2, 4), np.int8), np.array([1.0, 3e37]), "cpu")  # 16 * Δ overflows
    with pytest.raises(ValueError, match="real numeric"):
        DenseInt4.from_codes(np.zeros((2, 4), np.int8), np.array(["a", "b"]), None, "cpu")


@settings(max_examples=examples(40))
@given(data=st.data(), group=st.sampled_from([None, 32, 64, 128]),
       dtype=st.sampled_from(["int8", "int16", "int32", "int64"]))
def test_dense_int4_from_tensors_equals_from_numpy(data, group, dtype):
    """Codes and scales given as torch tensors are checked and packed where they are
    (`layouts.pack_tensor`); the layout equals the one the oracle's host packing builds, byte for
    byte, whatever the codes' integer dtype."""
    import torch

    q, scale, _, _ = dense_case(data, group)
    want = DenseInt4.from_codes(q, scale, group, "cpu")
    got = DenseInt4.from_codes(torch.from_numpy(q.astype(dtype)), torch.from_numpy(scale), group, "cpu")
    assert got.packed.dtype == torch.uint8 and torch.equal(got.packed, want.packed)  # exact
    assert got.scale.dtype == torch.float32 and torch.equal(got.scale, want.scale)
    assert got.shape == want.shape and got.group_size == want.group_size
    np.testing.assert_array_equal(R.pack_int4(q), pack_tensor(torch.from_numpy(q.astype(dtype))).numpy())


def test_bad_code_tensors_are_refused_by_name():
    import torch

    ones = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"q holds codes outside \[-8, 7\] \(min -9"):
        DenseInt4.from_codes(torch.tensor([[-9, 0, 0, 0], [0, 0, 0, 7]]), ones, None, "cpu")
    with pytest.raises(ValueError, match="q holds codes outside"):
        DenseInt4.from_codes(torch.full((2, 4), 8, dtype=torch.int8), ones, None, "cpu")
    with pytest.raises(ValueError, match="q must hold integer codes"):
        DenseInt4.from_codes(torch.full((2, 4), 1.0), ones, None, "cpu")
    with pytest.raises(ValueError, match="odd K"):
        DenseInt4.from_codes(torch.zeros(2, 3, dtype=torch.int8), ones, None, "cpu")
    with pytest.raises(ValueError, match="rank 2"):
        DenseInt4.from_codes(torch.zeros(4, dtype=torch.int8), ones, None, "cpu")
    with pytest.raises(ValueError, match="scale must be a torch tensor"):
        DenseInt4.from_codes(torch.zeros(2, 4, dtype=torch.int8), np.ones(2), None, "cpu")
    with pytest.raises(ValueError, match="scale holds NaN"):
        DenseInt4.from_codes(torch.zeros(2, 4, dtype=torch.int8), torch.tensor([1.0, float("nan")]), None, "cpu")
    with pytest.raises(ValueError, match="float32 range"):
        DenseInt4.from_codes(torch.zeros(2, 4, dtype=torch.int8), torch.tensor([1.0, 1e300], dtype=torch.float64),
                             None, "cpu")
    with pytest.raises(ValueError, match="scale must have shape"):
        DenseInt4.from_codes(torch.zeros(2, 4, dtype=torch.int8), torch.ones(3), None, "cpu")
    with pytest.raises(ValueError, match="real numeric"):
        DenseInt4.from_codes(torch.zeros(2, 4, dtype=torch.int8), torch.ones(2, dtype=torch.bool), None, "cpu")
    with pytest.raises(ValueError, match="odd|even"):
        pack_tensor(torch.zeros(3, dtype=torch.int8))
