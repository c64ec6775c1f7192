"""Pattern lookup table for ZipperQuant's sparse high part (DESIGN.md §2.5).

K is cut into groups of `group_size` consecutive channels (the last may be short). Each nonzero
(row n, group j) of `q_high` is a pattern; the distinct (group, pattern) pairs form a dictionary of
U entries and every nonzero (n, j) stores its entry's id, CSR over rows (E entries in all). Per
token the table holds one partial product per dictionary entry, `U * group_size` multiply-adds,
and the output is gathered from it with E lookups and adds: the reuse factor E / U is what pays.
"""
from dataclasses import dataclass

import numpy as np

from .validation import as_float_matrix, as_int_codes, check_group_size


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
    if g is None:
        raise ValueError("group_size must be a positive integer, got None")
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


def _check_x_for(lut, x):
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
    return np.einsum("mui,ui->mu", grouped[:, lut.pattern_groups, :], lut.patterns.astype(np.float64))


def lut_matmul(x, lut):
    """`x @ q_high.T` through the table: `Y[m, n] = Σ_{e in row n} T[m, id_e]` (no scales)."""
    table = lut_table(x, lut)
    n = lut.shape[0]
    out = np.zeros((x.shape[0], n))
    counts = np.diff(lut.indptr)
    filled = counts > 0
    if filled.any():
        gathered = table[:, lut.entry_ids]
        out[:, filled] = np.add.reduceat(gathered, lut.indptr[:-1][filled], axis=1)
    return out


def sparse_matmul(x, q_high):
    """The direct product `x @ q_high.T` over the nonzeros of `q_high`: the table's baseline."""
    q = as_int_codes("q_high", q_high, -128, 127, rank=2)
    x = as_float_matrix("x", x)
    if x.shape[1] != q.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} but q_high has K={q.shape[1]}")
    rows, cols = np.nonzero(q)
    out = np.zeros((x.shape[0], q.shape[0]))
    np.add.at(out.T, rows, (x[:, cols] * q[rows, cols]).T)
    return out


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
