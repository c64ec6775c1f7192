"""int4 packing laws (DESIGN.md §1)."""
import numpy as np
from hypothesis import given, settings

import reference as R
from strategies import codes


@settings(max_examples=300)
@given(q=codes(-8, 7, even_cols=True))
def test_unpack_after_pack_is_identity(q):
    p = R.pack_int4(q)
    assert p.dtype == np.uint8 and p.shape == (q.shape[0], q.shape[1] // 2)
    assert np.array_equal(R.unpack_int4(p), q)


@settings(max_examples=300)
@given(q=codes(-8, 7, even_cols=True))
def test_element_2i_is_the_low_nibble_in_twos_complement(q):
    p = R.pack_int4(q)
    assert np.array_equal(p & 0xF, (q[:, 0::2] & 0xF).astype(np.uint8))
    assert np.array_equal(p >> 4, (q[:, 1::2] & 0xF).astype(np.uint8))
