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


# The 16-bit float form of a nibble, with no conversion instruction: a value 0..15 ORed into the
# low mantissa bits of 1024.0 (fp16, where the step is 1) or 128.0 (bf16) *is* 1024 + u (128 + u).
# XOR 8 first maps the two's-complement code c to u = c + 8, so subtracting 1032 (136) gives c
# exactly. One LOP3 computes (bytes & mask) ^ (base | 8) for two codes at once; one fma.x2 takes
# the base off both. The fp16 high nibble needs no shift: 1024 + 16u is exact too (step 1), and
# the fma scales it by 1/16. bf16's mantissa is too short for that, so its high nibbles are
# shifted down first. Each tuple: the nibble mask, the LOP3's XOR constant (base | 8), the fma's
# factor (1.0, or 1/16 for fp16's high nibbles) and its addend (-(base + 8), or -(base/16 + 8)).
_F16_LO = ("0x000F000F", "0x64086408", "0x3C003C00", "0xE408E408")
_F16_HI = ("0x00F000F0", "0x64806480", "0x2C002C00", "0xD480D480")
_BF16 = ("0x000F000F", "0x43084308", "0x3F803F80", "0xC308C308")


def _unpack_float_asm(bf16):
    """PTX: one b32 register of four packed bytes ($4) -> the four low-nibble codes as two x2
    registers ($0, $1) and the four high-nibble codes ($2, $3), elements in byte order."""
    lo, hi = (_BF16, _BF16) if bf16 else (_F16_LO, _F16_HI)
    fma = "fma.rn.bf16x2" if bf16 else "fma.rn.f16x2"
    shift = "shr.b32 h0, t0, 4; shr.b32 h1, t1, 4;" if bf16 else "mov.b32 h0, t0; mov.b32 h1, t1;"
    return (
        "{ .reg .b32 t0, t1, h0, h1, s, c, z; mov.b32 z, 0;"
        " prmt.b32 t0, $4, z, 0x4140; prmt.b32 t1, $4, z, 0x4342;"  # bytes 0,1 (2,3) in the two halves
        f" {shift}"
        f" lop3.b32 $0, t0, {lo[0]}, {lo[1]}, 0x6A; lop3.b32 $1, t1, {lo[0]}, {lo[1]}, 0x6A;"  # (a & b) ^ c
        f" mov.b32 s, {lo[2]}; mov.b32 c, {lo[3]}; {fma} $0, $0, s, c; {fma} $1, $1, s, c;"
        f" lop3.b32 $2, h0, {hi[0]}, {hi[1]}, 0x6A; lop3.b32 $3, h1, {hi[0]}, {hi[1]}, 0x6A;"
        f" mov.b32 s, {hi[2]}; mov.b32 c, {hi[3]}; {fma} $2, $2, s, c; {fma} $3, $3, s, c; }}"
    )


_ASM_F16 = tl.constexpr(_unpack_float_asm(False))
_ASM_BF16 = tl.constexpr(_unpack_float_asm(True))


@triton.jit
def unpack_lo_hi_float(packed, DTYPE: tl.constexpr, USE_ASM: tl.constexpr):
    """uint8 tile -> (lo, hi) tiles of DTYPE (fp16 | bf16 | fp32) holding the codes themselves,
    exactly: with USE_ASM (fp16 / bf16) by the magic-number form above, eight codes in ten
    instructions and no int -> float conversion; else the codes converted one by one."""
    if USE_ASM and DTYPE == tl.float16:
        lo, hi = tl.inline_asm_elementwise(asm=_ASM_F16, constraints="=r,=r,=r,=r,r", args=[packed],
                                           dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    elif USE_ASM and DTYPE == tl.bfloat16:
        lo, hi = tl.inline_asm_elementwise(asm=_ASM_BF16, constraints="=r,=r,=r,=r,r", args=[packed],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        lo8, hi8 = unpack_lo_hi(packed)
        lo = lo8.to(DTYPE)
        hi = hi8.to(DTYPE)
    return lo, hi


@triton.jit
def pack_lo_hi(lo, hi):
    """int32 code tiles in [-8, 7] (elements 2i, 2i+1) -> uint8 tile of packed bytes."""
    return ((lo & 15) | ((hi & 15) << 4)).to(tl.uint8)



# Word-wise helpers for kernels that multiply on the CUDA cores (no MMA), e.g. a GEMV at M = 1:
# one int32 word holds four packed bytes, i.e. eight codes.
NIBBLE_TOPS = tl.constexpr(-252645136)  # 0xF0F0F0F0 as an int32


@triton.jit
def load_words(ptr, row_off, word, nwords, nbytes, WORDS: tl.constexpr):
    """int32 words `word` (any shape; row starts `row_off` broadcast against it) of rows holding
    `nwords` words: loaded as words (WORDS: the rows are 4-byte aligned, offsets in words), else
    as their four bytes, assembled little-endian (offsets in bytes; `nbytes` bytes per row, the
    bytes past it zero). Out-of-row words are 0, i.e. codes 0."""
    if WORDS:
        return tl.load(ptr + row_off + word, mask=word < nwords, other=0)
    else:
        j = tl.arange(0, 4)
        byte = tl.expand_dims(word * 4, len(word.shape)) + j
        b = tl.load(ptr + tl.expand_dims(row_off, len(word.shape)) + byte, mask=byte < nbytes, other=0)
        return tl.sum((b.to(tl.int32) & 0xFF) << (8 * j), axis=len(word.shape))


def words_aligned(a, qw):
    """True when a GEMV may load int32 words: K/2 a multiple of 4, both rows 4-byte aligned."""
    return qw.shape[1] % 4 == 0 and a.data_ptr() % 4 == 0 and qw.data_ptr() % 4 == 0


@triton.jit
def unpack_words_x16(w):
    """int32 words of packed bytes -> (lo, hi) int32 words whose four int8 bytes are 16 * the codes
    of the even / odd elements (byte j of lo: element 2j; of hi: element 2j + 1). Plain 32-bit
    ops: one shift + AND and one AND per eight codes."""
    return (w << 4) & NIBBLE_TOPS, w & NIBBLE_TOPS


@triton.jit
def even_odd_bytes(a0, a1, USE_ASM: tl.constexpr):
    """Two int32 words of int8 codes (elements 0-3, 4-7) -> (even, odd): words of elements 0, 2, 4, 6
    and 1, 3, 5, 7, the bytes that meet a packed weight word's lo / hi planes (one PTX byte permute each)."""
    if USE_ASM:
        even, odd = tl.inline_asm_elementwise(
            asm="prmt.b32 $0, $2, $3, 0x6420; prmt.b32 $1, $2, $3, 0x7531;",
            constraints="=r,=r,r,r",
            args=[a0, a1],
            dtype=(tl.int32, tl.int32),
            is_pure=True,
            pack=1,
        )
    else:
        even = (a0 & 0xFF) | ((a0 >> 8) & 0xFF00) | ((a1 & 0xFF) << 16) | (((a1 >> 16) & 0xFF) << 24)
        odd = ((a0 >> 8) & 0xFF) | ((a0 >> 16) & 0xFF00) | (((a1 >> 8) & 0xFF) << 16) | (((a1 >> 24) & 0xFF) << 24)
    return even, odd


@triton.jit
def dp4a(a, b, c, USE_ASM: tl.constexpr):
    """c + the dot of the four signed bytes of int32 words a and b (PTX dp4a.s32.s32, one
    instruction); exact in int32 for the accumulations the kernels make (see their K limits)."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            asm="dp4a.s32.s32 $0, $1, $2, $3;",
            constraints="=r,r,r,r",
            args=[a, b, c],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:
        acc = c
        for j in tl.static_range(4):
            acc += ((a << (24 - 8 * j)) >> 24) * ((b << (24 - 8 * j)) >> 24)
        return acc


@triton.jit
def codes_f32(nib):
    """Two's-complement 4-bit codes (int32 nibbles 0..15) as exact float32 with no int -> float
    conversion: (nib ^ 8) ORed into the mantissa of 2^23 is 2^23 + nib ^ 8, and subtracting
    2^23 + 8 leaves the signed code. One LOP3 and one FADD (I2F issues at a quarter of their rate)."""
    return (nib ^ 0x4B000008).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def word_products(w, x0, x1, x2, x3, x4, x5, x6, x7):
    """float32, the broadcast shape of w and the x_n: the eight codes of each packed int32 word w
    (nibble n = channel 8 * word + n) times their float32 activations x_n, summed; every product
    exact (a 4-bit code times a 16-bit float fits float32's mantissa)."""
    part = codes_f32(w & 0xF) * x0
    part += codes_f32((w >> 4) & 0xF) * x1
    part += codes_f32((w >> 8) & 0xF) * x2
    part += codes_f32((w >> 12) & 0xF) * x3
    part += codes_f32((w >> 16) & 0xF) * x4
    part += codes_f32((w >> 20) & 0xF) * x5
    part += codes_f32((w >> 24) & 0xF) * x6
    return part + codes_f32((w >> 28) & 0xF) * x7


@triton.jit
def split8(x):
    """[A, B, 8] -> the eight [A, B] slices along the last axis (element n = 4a + 2b + c sits at
    [.., a, b, c] of the [.., 2, 2, 2] view: three rounds of splits, in registers)."""
    A: tl.constexpr = x.shape[0]
    B: tl.constexpr = x.shape[1]
    x0246, x1357 = tl.split(tl.reshape(x, (A, B, 4, 2)))
    x04, x26 = tl.split(tl.reshape(x0246, (A, B, 2, 2)))
    x15, x37 = tl.split(tl.reshape(x1357, (A, B, 2, 2)))
    x0, x4 = tl.split(x04)
    x2, x6 = tl.split(x26)
    x1, x5 = tl.split(x15)
    x3, x7 = tl.split(x37)
    return x0, x1, x2, x3, x4, x5, x6, x7
