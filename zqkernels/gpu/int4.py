"""Nibble helpers for packed signed int4, shared by every Triton kernel that reads or writes it.

Format (DESIGN.md §1): two two's-complement 4-bit codes per uint8, element 2i in the low nibble,
element 2i+1 in the high nibble. Hopper has no INT4 tensor-core MMA, so kernels unpack to int8 in
registers and feed int8 `tl.dot` (or fp16 for W4A16). Host-side packing is the oracle's own
`reference.pack_int4` (the definition), wrapped by `zqkernels.layouts.pack_to_device`.

Two ways to lay the unpacked codes out for a dot, both exact:
- planes: `unpack_lo_hi` gives the even-element plane and the odd-element plane, each [.., BK/2];
  a dot over K is a sum, so `dot(a_lo, w_lo) + dot(a_hi, w_hi)` equals the dot over the
  interleaved K. Needs BK/2 >= 32 for an int8 dot (Triton's minimum K for 8-bit operands).
- interleaved: `unpack_interleaved` rebuilds the natural order [.., BK] (join + reshape), one dot
  of depth BK; used when BK/2 would be too short (act group 32).
"""
import triton
import triton.language as tl


@triton.jit
def unpack_lo_hi(packed):
    """uint8 tile [.., P] -> (lo, hi) int8 tiles [.., P]: codes of elements 2i and 2i+1."""
    p = packed.to(tl.int32)
    # ((n ^ 8) - 8) sign-extends a 4-bit two's-complement nibble n in [0, 15] to [-8, 7].
    lo = ((p & 15) ^ 8) - 8
    hi = (((p >> 4) & 15) ^ 8) - 8
    return lo.to(tl.int8), hi.to(tl.int8)


@triton.jit
def unpack_interleaved(packed, ROWS: tl.constexpr, COLS: tl.constexpr):
    """uint8 tile [ROWS, COLS//2] -> int8 tile [ROWS, COLS] in natural element order."""
    lo, hi = unpack_lo_hi(packed)
    return tl.reshape(tl.join(lo, hi), (ROWS, COLS))


@triton.jit
def unpack_lo_hi_x16(packed, USE_ASM: tl.constexpr):
    """uint8 tile -> (16 * lo, 16 * hi) int8 tiles: each nibble moved to the top of its byte.

    A byte whose top nibble is a two's-complement code c reads as the int8 value 16 * c, so the
    unpack is one AND (high) and one shift + AND (low) -- on four bytes at once with USE_ASM
    (32-bit PTX on the packed register), instead of mask, xor, subtract and convert per element.
    A dot of two such tiles is 256x the dot of the codes (exact in int32 for K < 131072);
    kernels shift it back. USE_ASM needs a compiled NVIDIA target (the interpreter has no PTX).
    """
    if USE_ASM:
        lo, hi = tl.inline_asm_elementwise(
            asm="{ .reg .b32 t; shl.b32 t, $2, 4; and.b32 $0, t, 0xF0F0F0F0; and.b32 $1, $2, 0xF0F0F0F0; }",
            constraints="=r,=r,r",
            args=[packed],
            dtype=(tl.int8, tl.int8),
            is_pure=True,
            pack=4,
        )
    else:
        p = packed.to(tl.int32)
        lo = ((p << 4) & 0xF0).to(tl.int8)  # 0..240 truncates to 16 * code in int8
        hi = (p & 0xF0).to(tl.int8)
    return lo, hi


@triton.jit
def pack_lo_hi(lo, hi):
    """int32 code tiles in [-8, 7] (elements 2i, 2i+1) -> uint8 tile of packed bytes."""
    return ((lo & 15) | ((hi & 15) << 4)).to(tl.uint8)

