"""int4 packing: two signed 4-bit codes per uint8 (DESIGN.md §1).

Element 2i goes to the low nibble, element 2i+1 to the high nibble, both two's complement, so a
kernel unpacks with a mask, a shift and a sign extension and no lookup.
"""
import numpy as np

from .validation import as_int_codes


def pack_int4(q):
    """`q[..., K]` codes in [-8, 7] (K even) -> `uint8[..., K/2]`."""
    arr = np.asarray(q)
    if arr.ndim < 1:
        raise ValueError(f"q must have rank >= 1, got shape {arr.shape}")
    if arr.shape[-1] % 2:
        raise ValueError(f"q's last dimension K must be even to pack two codes per byte, got K={arr.shape[-1]}")
    codes = as_int_codes("q", arr, -8, 7)
    nibbles = (codes & 0xF).astype(np.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(p):
    """`uint8[..., K']` -> `int8[..., 2*K']`, the exact inverse of `pack_int4`."""
    arr = np.asarray(p)
    if arr.dtype != np.uint8:
        raise ValueError(f"p must be uint8 packed codes, got dtype {arr.dtype}")
    if arr.ndim < 1:
        raise ValueError(f"p must have rank >= 1, got shape {arr.shape}")
    lo = (arr & 0xF).astype(np.int8)
    hi = (arr >> 4).astype(np.int8)
    out = np.empty(arr.shape[:-1] + (2 * arr.shape[-1],), dtype=np.int8)
    out[..., 0::2] = np.where(lo >= 8, lo - 16, lo)
    out[..., 1::2] = np.where(hi >= 8, hi - 16, hi)
    return out
