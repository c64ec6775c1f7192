"""Laws of the channel-structured ZipperQuant grid (`reference.zipper_quantize_channels`,
`reference.select_outlier_channels`):
- the split is exact (`q == q_low + 16 q_high`) and nothing clips (`|W' - Δ q| <= Δ / 2`, up to
  one float64 rounding of the quotient);
- the high part lives in the chosen channels only, and every other weight is a 4-bit code;
- the selected channels are the top C by their score, ascending, ties to the lower index.
Adversarial weights: ties, zero rows, one huge outlier, heavy tails, K = 1, N = 1.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as R
from strategies import examples, matrices


@st.composite
def weights_and_channels(draw):
    w = draw(matrices(max_rows=24, max_cols=60))
    k = w.shape[1]
    how = draw(st.sampled_from(["absmax", "hessian", "explicit"]))
    if how == "explicit":
        ch = np.array(sorted(draw(st.sets(st.integers(0, k - 1), max_size=k))), dtype=np.int64)
    else:
        hdiag = np.abs(draw(matrices(shape=(1, k))))[0] if how == "hessian" else None
        ch = R.select_outlier_channels(w, n_channels=draw(st.integers(0, k)), score=how, hdiag=hdiag)
    return w, ch, draw(st.sampled_from([4, 8]))


@settings(max_examples=examples(150))
@given(weights_and_channels())
def test_split_is_exact_nothing_clips_and_the_high_part_stays_in_its_channels(case):
    w, ch, high_bits = case
    c = R.zipper_quantize_channels(w, ch, high_bits=high_bits)
    q = c.q_low.astype(np.int64) + 16 * c.q_high.astype(np.int64)
    np.testing.assert_array_equal(R.bit_join(c.q_low, c.q_high), q)  # exact
    outside = np.ones(w.shape[1], bool)
    outside[ch] = False
    assert not np.any(c.q_high[:, outside]), "a high part outside the chosen channels"
    assert np.all(np.abs(q[:, outside]) <= 7), "a weight outside the channels needs more than 4 bits"
    err = np.abs(w - c.scale[:, None] * q)
    # no clipping: every weight within half a step of its code (one rounding of w / Δ: 2**-52)
    assert np.all(err <= c.scale[:, None] * (0.5 + 2.0**-40) + 1e-300)
    assert np.all(c.scale >= 0) and np.all(c.scale[np.abs(w).max(axis=1, initial=0) == 0] == 0)


@settings(max_examples=examples(100))
@given(w=matrices(max_rows=16, max_cols=50), frac=st.sampled_from([0.0, 0.02, 0.1, 0.5, 1.0]),
       score=st.sampled_from(["absmax", "hessian"]), seed=st.integers(0, 2**32 - 1))
def test_selected_channels_are_the_top_scores(w, frac, score, seed):
    k = w.shape[1]
    hdiag = np.random.default_rng(seed).uniform(0.0, 2.0, k) if score == "hessian" else None
    ch = R.select_outlier_channels(w, channel_fraction=frac, score=score, hdiag=hdiag)
    assert len(ch) == int(np.ceil(frac * k)) and np.all(np.diff(ch) > 0)
    col = np.abs(w).max(axis=0)
    s = col if score == "absmax" else hdiag * col**2
    rest = np.setdiff1d(np.arange(k), ch)
    if len(ch) and len(rest):
        assert s[ch].min() >= s[rest].max()
        tied = rest[s[rest] == s[ch].min()]
        assert np.all(tied > ch[s[ch] == s[ch].min()].max()), "ties keep the lower channel index"


def test_channel_codes_multiply_like_any_zipper_codes():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((20, 64))
    w[:, [5, 40]] *= 60.0  # two outlier channels, as smoothing leaves them
    ch = R.select_outlier_channels(w, n_channels=2)
    np.testing.assert_array_equal(ch, [5, 40])
    c = R.zipper_quantize_channels(w, ch)
    assert np.any(c.q_high[:, [5, 40]])
    x = rng.standard_normal((3, 64))
    y = R.zipper_matmul(x, c, act_bits=None)
    # W4A16 low part + exact high part: the weight error is at most half a step per weight
    bound = 0.5 * np.abs(x) @ np.repeat(c.scale[:, None], 64, axis=1).T
    assert np.all(np.abs(y - x @ w.T) <= bound + 1e-12)


@pytest.mark.parametrize("call, match", [
    (lambda: R.select_outlier_channels(np.ones((2, 4))), "exactly one"),
    (lambda: R.select_outlier_channels(np.ones((2, 4)), n_channels=5), "n_channels"),
    (lambda: R.select_outlier_channels(np.ones((2, 4)), n_channels=1, score="hessian"), "hdiag"),
    (lambda: R.select_outlier_channels(np.ones((2, 4)), n_channels=1, score="l2"), "score"),
    (lambda: R.zipper_quantize_channels(np.ones((2, 4)), np.array([3, 1])), "ascending"),
    (lambda: R.zipper_quantize_channels(np.ones((2, 4)), np.array([4])), r"\[0, K=4\)"),
    (lambda: R.zipper_quantize_channels(np.ones((2, 4)), np.array([0.5])), "integer"),
    (lambda: R.zipper_quantize_channels(np.full((2, 4), np.nan), np.array([0])), "NaN"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
