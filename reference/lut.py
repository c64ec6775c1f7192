"""Pattern lookup table for ZipperQuant's sparse high part (DESIGN.md §2.5).

K is cut into groups of `group_size` consecutive channels (the last may be short). Each nonzero
(row n, group j) of `q_high` is a pattern; the distinct (group, pattern) pairs form a dictionary of
U entries and every nonzero (n, j) stores its entry's id, CSR over rows (E entries in all). Per
token the table holds one partial product per dictionary entry, `U * group_size` multiply-adds,
and the output is gathered from it with E lookups and adds: the reuse factor E / U is what pays.
"""
from dataclasses import dataclass

import numpy as np

from .validation import as_float_matrix, as_int_codes, check_group_size, check_product


# Patterns wider than this hold mostly padding and never repeat: the table cannot pay there.
MAX_GROUP_SIZE = 256


@dataclass(frozen=True)
class PatternLUT:
    indptr: np.ndarray  # int64 [N+1]: entries of row n are indptr[n]:indptr[n+1]
    entry_ids: np.ndarray  # int32 [E]: dictionary entry of each nonzero (n, j)
    entry_groups: np.ndarray  # int32 [E]: group j of each entry, ascending within a row
    patterns: np.ndarray  # int8 [U, group_size], zero-padded past K in the last group
    pattern_groups: np.ndarray  # int32 [U]: group j of each dictionary entry
    group_size: int
    shape: tuple  # (N, K) of the q_high it was built from


def build_pattern_lut(q_high, group_size=4):
    """Dictionary of the distinct nonzero (group, pattern) pairs of `q_high` and the CSR of ids.

    The dictionary is sorted by (group, pattern) lexicographically, so it is deterministic.
    """
    q = as_int_codes("q_high", q_high, -128, 127, rank=2)
    g = check_group_size("group_size", group_size)
    if g is None or g > MAX_GROUP_SIZE:
        raise ValueError(f"group_size must be an integer in [1, {MAX_GROUP_SIZE}], got {group_size!r}")
    n, k = q.shape
    n_grp = -(-k // g)
    padded = np.zeros((n, n_grp * g), dtype=np.int64)
    padded[:, :k] = q
    blocks = padded.reshape(n, n_grp, g)
    rows, groups = np.nonzero(np.any(blocks != 0, axis=2))  # row-major: groups ascend per row
    keys = np.concatenate([groups[:, None], blocks[rows, groups]], axis=1)
    if len(keys):
        uniq, ids = np.unique(keys, axis=0, return_inverse=True)
    else:
        uniq, ids = np.zeros((0, g + 1), dtype=np.int64), np.zeros(0, dtype=np.int64)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return PatternLUT(
        indptr=indptr,
        entry_ids=ids.reshape(-1).astype(np.int32),
        entry_groups=groups.astype(np.int32),
        patterns=uniq[:, 1:].astype(np.int8),
        pattern_groups=uniq[:, 0].astype(np.int32),
        group_size=g,
        shape=(n, k),
    )


def check_pattern_lut(lut, name="lut"):
    """A `PatternLUT` (or any object with its fields) whose arrays agree: integer patterns in int8
    range, ids and groups in range, a CSR indptr from 0 to E. A hand-built table is refused
    rather than indexed out of bounds or multiplied with fractional patterns."""
    for field in ("indptr", "entry_ids", "entry_groups", "patterns", "pattern_groups", "group_size", "shape"):
        if not hasattr(lut, field):
            raise ValueError(f"{name} must be a PatternLUT, it has no field {field!r}")
    shape = tuple(lut.shape) if isinstance(lut.shape, (tuple, list)) else ()
    if len(shape) != 2 or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0
                                  for d in shape):
        raise ValueError(f"{name}.shape must be (N, K) of non-negative integers, got {lut.shape!r}")
    n, k = (int(d) for d in shape)
    g = check_group_size(f"{name}.group_size", lut.group_size)
    if g is None or g > MAX_GROUP_SIZE:
        raise ValueError(f"{name}.group_size must be an integer in [1, {MAX_GROUP_SIZE}], got {lut.group_size!r}")
    n_grp = -(-k // g)
    patterns = as_int_codes(f"{name}.patterns", lut.patterns, -128, 127, rank=2)
    if patterns.shape[1] != g:
        raise ValueError(f"{name}.patterns must have shape [U, {g}], got {patterns.shape}")
    u = patterns.shape[0]
    pattern_groups = as_int_codes(f"{name}.pattern_groups", lut.pattern_groups, 0, max(0, n_grp - 1), rank=1)
    if pattern_groups.shape != (u,):
        raise ValueError(f"{name}.pattern_groups must have shape ({u},), got {pattern_groups.shape}")
    entry_ids = as_int_codes(f"{name}.entry_ids", lut.entry_ids, 0, max(0, u - 1), rank=1)
    if u == 0 and entry_ids.size:
        raise ValueError(f"{name}.entry_ids has {entry_ids.size} entries but the dictionary is empty")
    e = entry_ids.size
    entry_groups = as_int_codes(f"{name}.entry_groups", lut.entry_groups, 0, max(0, n_grp - 1), rank=1)
    if entry_groups.shape != (e,):
        raise ValueError(f"{name}.entry_groups must have shape ({e},), got {entry_groups.shape}")
    indptr = as_int_codes(f"{name}.indptr", lut.indptr, 0, e, rank=1)
    if indptr.shape != (n + 1,) or indptr[0] != 0 or indptr[-1] != e or np.any(np.diff(indptr) < 0):
        raise ValueError(f"{name}.indptr must be a non-decreasing [N+1={n + 1}] array from 0 to E={e}")
    return lut


def _check_x_for(lut, x):
    check_pattern_lut(lut)
    x = as_float_matrix("x", x)
    if x.shape[1] != lut.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} but the table was built for K={lut.shape[1]}")
    return x


def lut_table(x, lut):
    """Per-token table `T[m, u] = Σ_i x[m, j_u*g + i] * pattern_u[i]`, float64 [M, U]."""
    x = _check_x_for(lut, x)
    m, k = x.shape
    g = lut.group_size
    n_grp = -(-k // g)
    padded = np.zeros((m, n_grp * g))
    padded[:, :k] = x
    grouped = padded.reshape(m, n_grp, g)
    with np.errstate(over="ignore", invalid="ignore"):
        table = np.einsum("mui,ui->mu", grouped[:, np.asarray(lut.pattern_groups, dtype=np.int64), :],
                          np.asarray(lut.patterns).astype(np.float64))
    return check_product(table, "x through the pattern table")


def lut_matmul(x, lut):
    """`x @ q_high.T` through the table: `Y[m, n] = Σ_{e in row n} T[m, id_e]` (no scales)."""
    table = lut_table(x, lut)
    n = lut.shape[0]
    out = np.zeros((table.shape[0], n))
    indptr = np.asarray(lut.indptr, dtype=np.int64)
    counts = np.diff(indptr)
    filled = counts > 0
    if filled.any():
        gathered = table[:, np.asarray(lut.entry_ids, dtype=np.int64)]
        with np.errstate(over="ignore", invalid="ignore"):
            out[:, filled] = np.add.reduceat(gathered, indptr[:-1][filled], axis=1)
    return check_product(out, "x @ q_high.T")


def sparse_matmul(x, q_high):
    """The direct product `x @ q_high.T` over the nonzeros of `q_high`: the table's baseline."""
    q = as_int_codes("q_high", q_high, -128, 127, rank=2)
    x = as_float_matrix("x", x)
    if x.shape[1] != q.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} but q_high has K={q.shape[1]}")
    rows, cols = np.nonzero(q)
    out = np.zeros((x.shape[0], q.shape[0]))
    with np.errstate(over="ignore", invalid="ignore"):
        np.add.at(out.T, rows, (x[:, cols] * q[rows, cols]).T)
    return check_product(out, "x @ q_high.T")


def uint_bytes(max_value):
    """Bytes of the smallest unsigned integer (1, 2, 4 or 8) that holds every value in [0, max_value]."""
    v = int(max_value)
    if v < 0:
        raise ValueError(f"max_value must be non-negative, got {max_value!r}")
    for nbytes in (1, 2, 4, 8):
        if v < 2 ** (8 * nbytes):
            return nbytes
    raise ValueError(f"max_value {max_value!r} does not fit 64 bits")


def _pattern_bits(patterns):
    """4 when every pattern value fits a signed nibble (packed two per byte), else 8."""
    return 4 if patterns.size == 0 or (patterns.min() >= -8 and patterns.max() <= 7) else 8


def lut_stats(lut):
    """Table statistics every report prints: E, U, reuse E/U and the bytes of each part.

    Bytes count the compact layout, every index in the smallest unsigned width that holds it:
    - index: one entry count per row (the CSR offsets as row lengths, at most ceil(K / g) each)
      and one dictionary id per entry (uint16 while U <= 65,536); an entry's group is not stored,
      it is `pattern_groups[entry_id]`;
    - patterns: U x g values packed at 4 bits when they fit a signed nibble (8 otherwise), plus
      the group of each dictionary entry.
    `oracle_index_bytes` is what this PatternLUT holds in memory (int64 offsets, int32 ids and groups).
    """
    check_pattern_lut(lut)
    e = int(lut.entry_ids.size)
    u = int(lut.patterns.shape[0])
    n = int(lut.shape[0])
    n_grp = -(-lut.shape[1] // lut.group_size) if lut.shape[1] else 0
    per_group = np.bincount(lut.pattern_groups, minlength=n_grp) if n_grp else np.zeros(0, dtype=np.int64)
    row_len = np.diff(lut.indptr)
    index_bytes = n * uint_bytes(row_len.max(initial=0)) + e * uint_bytes(max(u - 1, 0))
    pattern_bits = _pattern_bits(lut.patterns)
    pattern_bytes = -(-u * lut.group_size * pattern_bits // 8) + u * uint_bytes(max(n_grp - 1, 0))
    return {
        "E": e,
        "U": u,
        "reuse": e / u if u else 0.0,
        "group_size": lut.group_size,
        "index_bytes": int(index_bytes),
        "pattern_bytes": int(pattern_bytes),
        "pattern_bits": pattern_bits,
        "id_bytes": uint_bytes(max(u - 1, 0)),
        "oracle_index_bytes": int(lut.indptr.nbytes + lut.entry_ids.nbytes + lut.entry_groups.nbytes),
        "table_bytes_per_token": 4 * u,  # one float32 partial product per dictionary entry
        "patterns_per_group_max": int(per_group.max()) if per_group.size else 0,
        "patterns_per_group_mean": float(per_group.mean()) if per_group.size else 0.0,
    }
