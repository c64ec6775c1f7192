"""Hypothesis strategies that generate the hard cases on purpose.

Matrices come from a drawn numpy seed and a drawn *kind*, so every kind of adversary is searched:
ties exactly at rounding boundaries, all-zero rows, one enormous outlier, heavy tails, integer
values (exact products), shapes down to 1 x 1 and K not a multiple of any group.
"""
import os

import numpy as np
from hypothesis import strategies as st

# the root conftest.py documents the profiles; "thorough" multiplies every law's example budget.
_FACTOR = 10 if os.environ.get("ZQ_HYPOTHESIS_PROFILE") == "thorough" else 1


def examples(n):
    """A law's Hypothesis example budget under the active profile (n, or 10 n under thorough)."""
    return n * _FACTOR

MATRIX_KINDS = ("normal", "ties", "outlier", "zero_rows", "heavy_tail", "integers", "all_zero")


def _fill(rng, kind, m, k):
    if kind == "normal":
        return rng.standard_normal((m, k))
    if kind == "ties":
        # Each row's absmax is 7 * 2**e, so its float32 scale is exactly 2**e and every other
        # element sits exactly half-way between two codes: round-half-to-even decides all of them.
        e = rng.integers(-6, 6, size=(m, 1)).astype(np.float64)
        half = (rng.integers(-7, 7, size=(m, k)) + 0.5) * 2.0**e
        half[:, 0] = 7.0 * 2.0**e[:, 0] * rng.choice([-1.0, 1.0], size=m)
        return half
    if kind == "outlier":
        x = rng.standard_normal((m, k))
        x[rng.integers(m), rng.integers(k)] = rng.choice([-1.0, 1.0]) * 10.0 ** rng.uniform(2, 5)
        return x
    if kind == "zero_rows":
        x = rng.standard_normal((m, k))
        x[rng.random(m) < 0.5] = 0.0
        return x
    if kind == "heavy_tail":
        return rng.standard_t(1.5, size=(m, k))
    if kind == "integers":
        return rng.integers(-20, 21, size=(m, k)).astype(np.float64)
    if kind == "all_zero":
        return np.zeros((m, k))
    raise AssertionError(kind)


@st.composite
def matrices(draw, max_rows=8, max_cols=48, min_rows=1, min_cols=1, even_cols=False, kinds=MATRIX_KINDS, shape=None):
    """A float64 matrix of a drawn adversarial kind; `shape` pins (rows, cols)."""
    if shape is None:
        m = draw(st.integers(min_rows, max_rows))
        k = draw(st.integers(min_cols, max_cols))
        if even_cols and k % 2:
            k += 1
    else:
        m, k = shape
    kind = draw(st.sampled_from(kinds))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return _fill(rng, kind, m, k)


@st.composite
def codes(draw, lo, hi, max_rows=8, max_cols=48, even_cols=False, shape=None):
    """An int64 code matrix in [lo, hi]; a third of the draws are sparse (mostly zero)."""
    if shape is None:
        m = draw(st.integers(1, max_rows))
        k = draw(st.integers(1, max_cols))
        if even_cols and k % 2:
            k += 1
    else:
        m, k = shape
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.integers(lo, hi + 1, size=(m, k))
    if draw(st.booleans()):
        q[rng.random((m, k)) < 0.9] = 0
    # The range's ends are where off-by-one and sign bugs live.
    if q.size:
        q.flat[rng.integers(q.size)] = draw(st.sampled_from([lo, hi]))
    return q


group_sizes = st.sampled_from([None, 1, 3, 4, 8, 32])
