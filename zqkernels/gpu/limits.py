"""What the Triton kernels support, declared once.

Launchers check their arguments against these, and the `nn` layers check the same limits when a
layer is built, so an unsupported option fails at build time with its name, not at the first
forward. The oracle (`reference`) and the torch backend take any group size; only the kernels are
limited, each for a hardware or layout reason given below.
"""
import numbers

import numpy as np

# Activation / weight scale groups the dense kernels take: a K tile must lie inside one group, and
# the smallest compiled int8 dot is 32 deep.
ACT_GROUPS = (32, 64, 128, 256)
W4A16_GROUPS = (32, 64, 128, 256)
# One K step of the Mosaic kernels must lie inside one scale group, and the shallowest step is 32
# (an int8 dot's minimum depth: steps of 64 or more dot the two nibble planes, a step of 32 dots
# them re-interleaved): groups must be multiples of 32.
MOSAIC_GROUP_MULTIPLE = 32
# Both W4A4 operands are unpacked as 16 * code, so an int32 accumulator holds 256 * 64 * K < 2**31.
MAX_K = 131070


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _group(value, allowed, name, what):
    """None, or a Python int among `allowed` (numpy integers are taken as their value)."""
    if value is None:
        return None
    if not _is_int(value) or int(value) not in allowed:
        raise ValueError(f"{name} must be None or one of {allowed} for {what}, got {value!r}")
    return int(value)


def check_act_group(act_group_size, name="act_group_size"):
    """The activation group size as a Python int (or None); ValueError naming it otherwise."""
    return _group(act_group_size, ACT_GROUPS, name, "the Triton kernels")


def check_w4a16_group(group_size, name="group_size"):
    """The W4A16 weight group size as a Python int (or None); ValueError naming it otherwise."""
    return _group(group_size, W4A16_GROUPS, name, "the Triton W4A16 kernel")


def check_k(k, name="K"):
    if k % 2:
        raise ValueError(f"{name}={k} must be even: int4 packs two codes per byte")
    if k > MAX_K:
        raise ValueError(f"{name}={k} too large: the int32 accumulators (256x the code product) hold K <= {MAX_K}")


def check_mosaic_groups(act_group_size, weight_group_size, act_name="act_group_size",
                        weight_name="group_size"):
    for name, g in ((act_name, act_group_size), (weight_name, weight_group_size)):
        if g is None:
            continue
        if not _is_int(g) or g <= 0 or g % MOSAIC_GROUP_MULTIPLE:
            raise ValueError(f"{name}={g!r}: the Triton Mosaic kernels need None or a multiple of "
                             f"{MOSAIC_GROUP_MULTIPLE} (their shallowest K step)")


def check_mosaic_block(block, name="block"):
    """Residual blocks (bn, bk): the kernels tile N by a divisor or multiple of bn and step the
    residual tail bk deep, so both are powers of two, bk >= 64."""
    try:
        bn, bk = (int(b) for b in block)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (bn, bk), got {block!r}") from None
    for label, v, lo in (("bn", bn, 16), ("bk", bk, 64)):
        if v < lo or v & (v - 1):
            raise ValueError(f"{name}: {label}={v} must be a power of two >= {lo} for the Triton Mosaic kernels")
