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
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < lo or arr.max() > hi):
        raise ValueError(f"{name} holds codes outside [{lo}, {hi}] (min {arr.min()}, max {arr.max()})")
    return arr


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


def n_groups(k, group_size):
    """Groups of `group_size` consecutive channels over k channels; the last may be short."""
    return 1 if group_size is None else -(-k // group_size)
