"""Argument checks shared by every oracle function: each failure is a ValueError naming the argument."""
import numpy as np


def as_float_matrix(name, a, rank=2):
    """Return `a` as a finite float64 array of the given rank, or raise ValueError naming it."""
    arr = np.asarray(a)
    if arr.ndim != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or Inf")
    return arr


def as_int_codes(name, q, lo, hi, rank=None):
    """Return `q` as an int64 array whose values lie in [lo, hi], or raise ValueError naming it."""
    arr = np.asarray(q)
    if rank is not None and arr.ndim != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer codes, got dtype {arr.dtype}")
    # The range is checked on the original dtype, as Python ints: a uint64 code above 2**63 would
    # wrap to a small negative int64 and pass a check made after the cast.
    if arr.size:
        a_min, a_max = int(arr.min()), int(arr.max())
        if a_min < lo or a_max > hi:
            raise ValueError(f"{name} holds codes outside [{lo}, {hi}] (min {a_min}, max {a_max})")
    return arr.astype(np.int64, copy=False)


def as_scales(name, s, shape):
    """Return `s` as a finite float64 array of exactly `shape`, or raise ValueError naming it."""
    arr = np.asarray(s)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or Inf")
    return arr


def check_unit_interval(name, value):
    """A real number in [0, 1] (NaN refused), as a float."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if isinstance(value, bool) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return v


def check_bits(name, bits, allowed=range(2, 9)):
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or int(bits) not in allowed:
        raise ValueError(f"{name} must be an integer in [{min(allowed)}, {max(allowed)}], got {bits!r}")
    return int(bits)


def check_group_size(name, group_size):
    """None (whole row) or a positive integer."""
    if group_size is None:
        return None
    if not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"{name} must be None or a positive integer, got {group_size!r}")
    return int(group_size)


def check_block(block):
    """A residual block shape (block_n, block_k) of positive integers, as a pair of ints."""
    if (
        not isinstance(block, (tuple, list))
        or len(block) != 2
        or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ValueError(f"block must be a pair of positive integers (block_n, block_k), got {block!r}")
    return int(block[0]), int(block[1])


def n_groups(k, group_size):
    """Groups of `group_size` consecutive channels over k channels; the last may be short."""
    return 1 if group_size is None else -(-k // group_size)


def check_product(y, what):
    """A product of finite operands can still overflow float64; refuse it rather than return Inf/NaN."""
    if not np.all(np.isfinite(y)):
        raise ValueError(f"{what} overflows float64: the values are too large")
    return y
