"""perf/timing.py's pieces that need no GPU: the number of back-to-back calls in one replay
(`calls_per_replay`, a pure function of the bytes a call touches, the L2 size and the caps) and the
operand copies the calls run on (`clone_operands`, `clone_call`, `operand_tensors`,
`operand_bytes`), on CPU tensors and the project's own packed layouts."""
import functools
import sys
from collections import namedtuple
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "perf"))
import timing  # noqa: E402
from timing import calls_per_replay, clone_call, clone_operands, operand_bytes, operand_tensors  # noqa: E402

MIB = 2**20


# ------------------------------------------------------------------------------ calls_per_replay
@given(nbytes=st.integers(1, 2**36), l2=st.integers(0, 2**30),
       multiple=st.one_of(st.integers(0, 8), st.floats(0, 8, allow_nan=False)),
       cap=st.integers(1, 128), mem=st.integers(1, 2**34))
@example(nbytes=50 * MIB, l2=50 * MIB, multiple=3, cap=64, mem=4 * 2**30)  # exactly 3 L2s: N = 3, not 4
@example(nbytes=1, l2=2**30, multiple=3, cap=64, mem=4 * 2**30)  # a tiny call: the cap
@example(nbytes=2**33, l2=50 * MIB, multiple=3, cap=64, mem=4 * 2**30)  # larger than the copy budget: 1
@example(nbytes=3, l2=1, multiple=0.1, cap=64, mem=100)  # 0.1 is not a binary fraction: exact ceil
@example(nbytes=10, l2=0, multiple=3, cap=64, mem=100)  # no L2: one call
def test_calls_per_replay_is_the_smallest_n_spanning_the_l2_multiple_within_the_caps(nbytes, l2, multiple, cap, mem):
    n = calls_per_replay(nbytes, l2, multiple, cap, mem)
    target = Fraction(multiple) * l2  # exact: the float multiple as the binary fraction it is
    wanted = max(1, -(-target // nbytes))  # the smallest N with N * nbytes >= target (at least one)
    assert n == max(1, min(wanted, cap, mem // nbytes))
    assert 1 <= n <= cap
    assert n == 1 or n * nbytes <= mem  # never more copies than the memory budget holds
    if n < wanted:  # cut short: by the cap or by the memory budget, never otherwise
        assert n == cap or (n + 1) * nbytes > mem or n == 1
    else:
        assert n * nbytes >= target and (n == 1 or (n - 1) * nbytes < target)


def test_calls_per_replay_on_the_layers_of_the_suite():
    l2 = 50 * MIB
    # LLaMA-3-8B o at M = 1 (bytes_moved): fp16 33.6 MB -> 5 calls (4.7 L2 spans); our W4A4 8.4 MB -> 19
    assert calls_per_replay(33_570_816, l2) == 5 and calls_per_replay(8_415_236, l2) == 19
    assert calls_per_replay(234_946_560, l2) == 1  # gate_up in fp16 spans three L2s alone
    assert calls_per_replay(16_400, l2) == timing.MAX_CALLS_PER_REPLAY  # an activation-sized call: the cap
    assert calls_per_replay(2 * 2**30, 2**32) == 2  # the 4 GiB budget holds two copies of 2 GiB


@pytest.mark.parametrize("kwargs, name", [
    (dict(bytes_per_call=0, l2_bytes=1), "bytes_per_call"), (dict(bytes_per_call=True, l2_bytes=1), "bytes_per_call"),
    (dict(bytes_per_call=1.5, l2_bytes=1), "bytes_per_call"), (dict(bytes_per_call=1, l2_bytes=-1), "l2_bytes"),
    (dict(bytes_per_call=1, l2_bytes=1, l2_multiple=float("nan")), "l2_multiple"),
    (dict(bytes_per_call=1, l2_bytes=1, l2_multiple=-1.0), "l2_multiple"),
    (dict(bytes_per_call=1, l2_bytes=1, l2_multiple=float("inf")), "l2_multiple"),
    (dict(bytes_per_call=1, l2_bytes=1, max_calls=0), "max_calls"),
    (dict(bytes_per_call=1, l2_bytes=1, max_copy_bytes=0), "max_copy_bytes"),
])
def test_calls_per_replay_refuses_bad_arguments_by_name(kwargs, name):
    with pytest.raises(ValueError, match=name):
        calls_per_replay(**kwargs)


# ------------------------------------------------------------------------------ operand copies
def _disjoint(a, b):
    return not {t.untyped_storage().data_ptr() for t in a} & {t.untyped_storage().data_ptr() for t in b}


@dataclass(frozen=True)
class Layout:
    packed: torch.Tensor
    scale: torch.Tensor
    shape: tuple
    host: np.ndarray
    cache: dict


Pair = namedtuple("Pair", "x scale")


def test_clone_operands_copies_every_tensor_once_and_shares_the_rest():
    w = torch.arange(24.0).reshape(4, 6)
    host = np.arange(3)
    layout = Layout(w.t(), torch.ones(4), (6, 4), host, {"tiles": (torch.zeros(2, dtype=torch.int32),)})
    obj = {"layout": layout, "again": layout.packed, "pair": Pair(torch.randn(2, 3), 0.5), "cfg": {"BLOCK": 64}}
    out = clone_operands(obj)
    assert isinstance(out["layout"], Layout) and isinstance(out["pair"], Pair)
    before, after = operand_tensors(obj), operand_tensors(out)
    assert len(before) == len(after) == 4 and _disjoint(before, after)  # "again" is the layout's own
    for a, b in zip(before, after):
        assert torch.equal(a, b) and a.stride() == b.stride() and a.dtype == b.dtype
    assert out["layout"].packed.stride() == (1, 6)  # a transposed view stays column-major
    assert out["again"] is out["layout"].packed  # one tensor reached twice: one clone
    assert out["layout"].host is host and out["layout"].shape == (6, 4)  # host data is shared
    assert out["layout"].cache is not layout.cache and out["cfg"] == {"BLOCK": 64}


def test_clone_operands_of_the_packed_layouts():
    import reference
    from zqkernels.layouts import DenseInt4, MosaicBlocks

    rng = np.random.default_rng(0)
    dense = DenseInt4.from_codes(rng.integers(-8, 8, size=(8, 16)), rng.uniform(0.5, 1, 8), device="cpu")
    codes = reference.MosaicCodes(q_base=rng.integers(-8, 8, size=(64, 128), dtype=np.int8),
                                  scale_base=rng.uniform(0.5, 1, 64), block_index=np.array([[0, 1]]),
                                  q_res=rng.integers(-8, 8, size=(1, 64, 64), dtype=np.int8),
                                  scale_res=rng.uniform(0.05, 0.1, size=(1, 64)), block=(64, 64))
    mosaic = MosaicBlocks.from_codes(codes, "cpu")
    mosaic.tile_lists(128)  # a cache built before the copy is copied with it
    for layout in (dense, mosaic):
        copy = clone_operands(layout)
        assert type(copy) is type(layout) and _disjoint(operand_tensors(layout), operand_tensors(copy))
        got, want = copy.to_codes(), layout.to_codes()
        for a, b in zip(got if isinstance(got, tuple) else (got.q_base, got.q_res, got.scale_res),
                        want if isinstance(want, tuple) else (want.q_base, want.q_res, want.scale_res)):
            np.testing.assert_array_equal(a, b)
    copy = clone_operands(mosaic)
    assert copy.n_blocks == 1 and all(torch.equal(a, b) for a, b in zip(copy.tile_lists(128), mosaic.tile_lists(128)))


def test_clone_call_runs_the_same_call_on_operands_of_its_own():
    a, b = torch.randn(3, 5), torch.randn(5, 2)

    def make(x, w):
        scale = torch.tensor(2.0)

        def inner(y):
            return y * scale

        return lambda: inner(x @ w)

    fn = make(a, b)
    copy = clone_call(fn)
    assert copy is not fn and torch.equal(copy(), fn())
    assert len(operand_tensors(fn)) == 3 and _disjoint(operand_tensors(fn), operand_tensors(copy))
    a.add_(1.0)  # the copy no longer sees copy 0's data
    assert not torch.equal(copy(), fn())

    part = functools.partial(torch.matmul, a)
    copy = clone_call(lambda: part(b))
    assert torch.equal(copy(), a @ b) and _disjoint(operand_tensors(part), operand_tensors(copy))

    def with_default(x=a):
        return x.sum()

    assert clone_call(with_default)() == a.sum() and _disjoint([a], operand_tensors(clone_call(with_default)))

    def recursive(n):  # refers to itself through its cell
        return a.sum() if n == 0 else recursive(n - 1)

    assert clone_call(recursive)(3) == a.sum()


def test_clone_refuses_an_object_whose_tensors_it_cannot_reach():
    class Holder:
        def __init__(self):
            self.weights = {"w": torch.ones(2)}

    holder = Holder()
    with pytest.raises(ValueError, match="Holder holds tensors"):
        clone_call(lambda: holder.weights)
    with pytest.raises(ValueError, match="Holder holds tensors"):
        operand_bytes(holder)
    with pytest.raises(ValueError, match="fn: expected a callable"):
        clone_call(torch.ones(1))
    plain = object()
    assert clone_operands([plain])[0] is plain  # an object without tensors is shared


def test_operand_bytes_counts_each_storage_once():
    w = torch.zeros(100, 10)  # 4000 bytes
    assert operand_bytes(lambda: (w.t(), w[:10], torch.ones(3))) == 4000  # held: w; the rest is made per call
    held = (w, w.t(), w[:10], torch.ones(3, dtype=torch.int8))
    assert operand_bytes(lambda: held) == 4000 + 3
    assert operand_bytes(held[3]) == 3 and operand_bytes(None) == 0
