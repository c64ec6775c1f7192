"""Packed weight layouts: one frozen dataclass per format, built once per layer from the oracle's
codes and holding exactly the tensors its kernels read.

    DenseInt4      4-bit codes packed two per byte + float32 scales (W4A4 / W4A16 weights, the
                   ZipperQuant low part)
    MosaicBlocks   MosaicQuant: the dense 4-bit base + the kept 4-bit residual blocks, block-CSR
    ZipperHighGPU  ZipperQuant's high part for the GPU, in ONE of three layouts ("columns":
                   the input channels holding any outlier gathered densely; "ell": per output row
                   its nonzeros, padded to the longest row; "dense": every code packed as int4)

`X.from_codes(codes..., device)` packs and uploads; `to_codes()` returns the codes again as numpy:
integer codes exactly, scales as the float32 the kernels read (`float32(scale)` widened to
float64). verify/test_layouts.py holds the round-trip law `to_codes(from_codes(c)) == c` on those
terms. A layout builds and uploads only what its kernels use. This module imports no Triton: the
layers build layouts on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

import reference
from reference.validation import as_int_codes, as_scales


def _device(device):
    """`device` as a torch.device, or ValueError naming it."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device or its name ('cuda', 'cpu', 'cuda:1'), got {device!r}") from exc


def pack_to_device(q, device):
    """int codes [..., K] in [-8, 7] -> uint8 [..., K/2] on `device`: the oracle's own packing
    (`reference.pack_int4`, the one definition of the format) for numpy codes; for a torch tensor
    the same nibble arithmetic where the tensor is (`pack_tensor`), so codes quantized on a GPU
    are packed there instead of being copied to the host as int64."""
    if isinstance(q, torch.Tensor):
        return pack_tensor(q).to(device)
    return torch.from_numpy(np.ascontiguousarray(reference.pack_int4(q))).to(device)


def pack_tensor(q):
    """Integer codes tensor [..., K] in [-8, 7], K even -> uint8 [..., K/2] on q's device, equal to
    `reference.pack_int4` of the same codes: byte j holds code 2j in its low nibble and code 2j+1
    in its high one, each as its two's-complement low four bits. The checks are the oracle's (an
    integer dtype, the range, an even K); the range check is one host synchronization."""
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a torch tensor, got {type(q).__name__}")
    if q.dim() < 1:
        raise ValueError(f"q must have rank >= 1, got shape {tuple(q.shape)}")
    if q.shape[-1] % 2:
        raise ValueError(f"q's last dimension K must be even to pack two codes per byte, got K={q.shape[-1]}")
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ValueError(f"q must hold integer codes, got dtype {q.dtype}")
    if q.numel():
        lo, hi = (int(v) for v in torch.aminmax(q))
        if lo < -8 or hi > 7:
            raise ValueError(f"q holds codes outside [-8, 7] (min {lo}, max {hi})")
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).contiguous()


def _scales32(name, s, shape, factor=1.0):
    """The oracle's scale check (`reference.validation.as_scales`), then the float32 the kernels
    read: a finite float64 scale (times `factor`) beyond the float32 range is refused too."""
    arr = as_scales(name, s, tuple(shape))
    with np.errstate(over="ignore"):
        out = (arr * factor).astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} holds values beyond the float32 range of the kernels")
    return out


def _host(t):
    return t.detach().cpu().numpy()


@dataclass(frozen=True)
class DenseInt4:
    """4-bit codes [N, K] packed to uint8 [N, K/2] with float32 scales [N] or [N, ceil(K/g)]."""

    packed: torch.Tensor
    scale: torch.Tensor
    group_size: int | None
    shape: tuple

    @classmethod
    def from_codes(cls, q, scale, group_size=None, device="cpu"):
        """Codes `q` [N, K] and scales as numpy arrays (packed by the oracle on the host), or both
        as torch tensors: the codes checked and packed where they are, the scales (N or N x G
        numbers) checked on the host as for numpy ones, both then moved to `device`."""
        g = reference.validation.check_group_size("group_size", group_size)
        dev = _device(device)
        if isinstance(q, torch.Tensor):
            if q.dim() != 2:
                raise ValueError(f"q must have rank 2, got shape {tuple(q.shape)}")
            if not isinstance(scale, torch.Tensor):
                raise ValueError(f"scale must be a torch tensor when q is one, got {type(scale).__name__}")
            n, k = q.shape
            if k % 2:
                raise ValueError(f"q has odd K={k}; int4 packing needs an even K")
            want = (n,) if g is None else (n, -(-k // g))
            # the scales are N (or N x G) numbers: checked on the host by the oracle's rule
            scale32 = _scales32("scale", scale.detach().cpu().numpy(), want)
            return cls(packed=pack_to_device(q, dev), scale=torch.from_numpy(scale32).to(dev), group_size=g,
                       shape=(n, k))
        q = as_int_codes("q", q, -8, 7, rank=2)
        n, k = q.shape
        if k % 2:
            raise ValueError(f"q has odd K={k}; int4 packing needs an even K")
        want = (n,) if g is None else (n, -(-k // g))
        return cls(packed=pack_to_device(q, dev), scale=torch.from_numpy(_scales32("scale", scale, want)).to(dev),
                   group_size=g, shape=(n, k))

    def to_codes(self):
        """(q int8 [N, K], scale float64 holding the float32 values)."""
        return reference.unpack_int4(_host(self.packed)), _host(self.scale).astype(np.float64)

    @property
    def device(self):
        return self.packed.device


@dataclass(frozen=True)
class MosaicBlocks:
    """Device-side MosaicQuant weights.

    - the base `qb` packed to int4 `[N, K/2]` and its scale (per channel `[N]` or per group `[N, G]`);
    - the kept residual blocks packed block by block `[B, bn, bk/2]` with their row scales `[B, bn]`;
    - a block-CSR over the residual row-blocks: `indptr[rb]:indptr[rb+1]` are the kept blocks of
      row-block rb and `kblock[b]` their column-blocks, ascending. `reference.mosaic_quantize`
      emits `block_index` sorted row-major, so the CSR order IS the storage order and block ids
      are positions. For output tiles wider than bn (BLOCK_N a multiple of bn) `tile_lists` builds
      the same CSR per N-tile over the union of its row-blocks, with the block id of each
      row-block (-1 where it keeps none): the residual MMA of such a tile multiplies zeros in the
      absent part.
    """

    shape: tuple  # (N, K)
    block: tuple  # (bn, bk)
    group_size: object  # base weight group size or None
    qb_packed: torch.Tensor  # uint8 [N, K/2]
    scale_base: torch.Tensor  # float32 [N] or [N, G]
    res_packed: torch.Tensor  # uint8 [max(B,1), bn, bk/2] (one zero block when B == 0)
    scale_res: torch.Tensor  # float32 [max(B,1), bn]
    indptr: torch.Tensor  # int32 [NBr + 1]
    kblock: torch.Tensor  # int32 [max(B,1)]
    n_blocks: int  # B
    block_index: np.ndarray  # int64 [B, 2], host copy
    _tile_lists: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_codes(cls, codes, device):
        """`reference.MosaicCodes` -> `MosaicBlocks` on `device` (packing, CSR, float32 scales).

        Raises ValueError when the residual block list does not match the weight: wrong shapes, a
        block outside the grid, an unsorted or repeated block (density would exceed 1), nonzero
        codes past the matrix edge, odd K or odd bk (int4 packs two codes per byte), non-finite
        scales.
        """
        qb = np.asarray(codes.q_base)
        if qb.ndim != 2:
            raise ValueError(f"codes.q_base must be [N, K], got shape {qb.shape}")
        n, k = qb.shape
        if k % 2:
            raise ValueError(f"codes.q_base has odd K={k}; int4 packing needs an even K")
        qb = as_int_codes("codes.q_base", qb, -8, 7)
        try:
            bn, bk = (int(b) for b in codes.block)
        except (TypeError, ValueError):
            raise ValueError(f"codes.block must be (bn, bk), got {codes.block!r}") from None
        if bn <= 0 or bk <= 0 or bk % 2:
            raise ValueError(f"codes.block must be positive with an even bk, got {(bn, bk)}")
        group_size = codes.group_size
        want = (n,) if group_size is None else (n, -(-k // int(group_size)))
        sb = _scales32("codes.scale_base", codes.scale_base, want)

        nbr, nbc = -(-n // bn), -(-k // bk)
        bi = np.asarray(codes.block_index)
        if bi.size == 0:
            bi = bi.reshape(0, 2)
        if bi.ndim != 2 or bi.shape[1] != 2 or not np.issubdtype(bi.dtype, np.integer):
            raise ValueError(f"codes.block_index must be an integer [B, 2] array, got {bi.shape} {bi.dtype}")
        b = bi.shape[0]
        if b > nbr * nbc:
            raise ValueError(f"density must lie in [0, 1]: {b} blocks for a grid of {nbr * nbc}")
        if b and (bi[:, 0].min() < 0 or bi[:, 0].max() >= nbr or bi[:, 1].min() < 0 or bi[:, 1].max() >= nbc):
            raise ValueError(f"codes.block_index holds a block outside the {nbr} x {nbc} grid")
        flat = bi[:, 0].astype(np.int64) * nbc + bi[:, 1]
        if b and np.any(np.diff(flat) <= 0):
            raise ValueError("codes.block_index must be sorted row-major without repeats")
        qr = np.asarray(codes.q_res)
        if qr.shape != (b, bn, bk):
            raise ValueError(f"codes.q_res must have shape {(b, bn, bk)}, got {qr.shape}")
        qr = as_int_codes("codes.q_res", qr, -8, 7)
        sr = _scales32("codes.scale_res", codes.scale_res, (b, bn))
        for i in range(b):  # the kernel reads whole blocks: what lies past the edge must be zero
            rows = n - bi[i, 0] * bn
            cols = k - bi[i, 1] * bk
            if (rows < bn and np.any(qr[i, rows:, :])) or (cols < bk and np.any(qr[i, :, cols:])):
                raise ValueError(f"codes.q_res block {i} holds nonzero codes past the matrix edge")

        indptr = np.zeros(nbr + 1, dtype=np.int32)
        np.cumsum(np.bincount(bi[:, 0], minlength=nbr), out=indptr[1:])
        if b == 0:  # kernels take a pointer; one zero block is never read (every CSR list is empty)
            qr = np.zeros((1, bn, bk), dtype=np.int64)
            sr = np.zeros((1, bn), dtype=np.float32)
            kblock = np.zeros(1, dtype=np.int32)
        else:
            kblock = bi[:, 1].astype(np.int32)
        dev = _device(device)
        return cls(
            shape=(n, k), block=(bn, bk), group_size=None if group_size is None else int(group_size),
            qb_packed=pack_to_device(qb, dev),
            scale_base=torch.from_numpy(sb).to(dev).contiguous(),
            res_packed=pack_to_device(qr, dev).contiguous(),
            scale_res=torch.from_numpy(sr).to(dev).contiguous(),
            indptr=torch.from_numpy(indptr).to(dev),
            kblock=torch.from_numpy(kblock).to(dev),
            n_blocks=b,
            block_index=bi.astype(np.int64).copy(),
        )

    def to_codes(self):
        """The `reference.MosaicCodes` these tensors hold (scales as their float32 values)."""
        b = self.n_blocks
        bn, bk = self.block
        q_res = reference.unpack_int4(_host(self.res_packed))[:b].reshape(b, bn, bk)
        return reference.MosaicCodes(
            q_base=reference.unpack_int4(_host(self.qb_packed)),
            scale_base=_host(self.scale_base).astype(np.float64),
            block_index=self.block_index.copy(),
            q_res=q_res,
            scale_res=_host(self.scale_res)[:b].astype(np.float64),
            block=(bn, bk),
            group_size=self.group_size,
        )

    def tile_lists(self, list_width):
        """Block-CSR over N-tiles of `list_width` output rows (a multiple of bn), on the device.

        Returns (indptr int32 [T+1], kblock int32 [max(E,1)], bids int32 [max(E,1), R]): entries
        indptr[t]:indptr[t+1] are the column-blocks, ascending, where any of the R = list_width/bn
        row-blocks of tile t keeps a block, and bids[e, j] is the block id of row-block t*R + j
        at that column-block (-1 when that row-block keeps none there). R = 1 is the plain CSR.
        """
        if list_width not in self._tile_lists:
            bn, bk = self.block
            n, k = self.shape
            r = list_width // bn
            nbr, nbc = -(-n // bn), -(-k // bk)
            n_tiles = -(-nbr // r)
            bi = self.block_index
            keys = (bi[:, 0] // r) * nbc + bi[:, 1]
            uniq, inv = np.unique(keys, return_inverse=True)
            bids = np.full((max(len(uniq), 1), r), -1, dtype=np.int32)
            bids[inv.reshape(-1), bi[:, 0] % r] = np.arange(len(bi), dtype=np.int32)
            kblock = np.zeros(max(len(uniq), 1), dtype=np.int32)
            kblock[: len(uniq)] = uniq % nbc
            indptr = np.zeros(n_tiles + 1, dtype=np.int32)
            np.cumsum(np.bincount(uniq // nbc, minlength=n_tiles), out=indptr[1:])
            dev = self.device
            self._tile_lists[list_width] = tuple(torch.from_numpy(a).to(dev) for a in (indptr, kblock, bids))
        return self._tile_lists[list_width]

    @property
    def density(self):
        n, k = self.shape
        bn, bk = self.block
        total = -(-n // bn) * -(-k // bk)
        return self.n_blocks / total if total else 0.0

    @property
    def device(self):
        return self.qb_packed.device


ZIPPER_HIGH_METHODS = ("columns", "ell", "dense")


@dataclass(frozen=True)
class ZipperHighGPU:
    """ZipperQuant's high part `16 * Δ_n * q_high` for `zqkernels.gpu.zipper_high`, one layout:

    - "columns": the C input channels holding any nonzero `q_high`, gathered into a dense
      float32 `[C, N]` (transposed: coalesced per channel); work M·N·C, pays when C << K.
    - "ell": each output row's nonzeros (column, value), padded to the longest row E_max and stored
      `[E_max, N]` so a tile's loads coalesce; work M·N·E_max gathers.
    - "dense": every code of q_high packed two per byte (`reference.pack_int4`, uint8 [N, K/2]), for
      a 16-bit tensor-core GEMM (`w4a16`); work M·N·K on the tensor cores, K/2 bytes a row. Needs
      codes in [-8, 7] (`high_bits` 4 gives [-7, 7]) and K even.
    Codes up to ±127 are exact in float32 (columns, ell). `method="auto"` picks dense whenever the
    codes fit it: on the H200 it was the fastest layer at every LLaMA-3-8B shape and M for the
    per-row grid at outlier ratios 0.05 and 0.01, and for a high part in K/64 channels from M = 64
    on, within 1.25x of ELL below that, where ELL took up to 40x dense's time at large M
    (reports/results/h200/probe_zipper_layouts.json). Else columns while C <= E_max (the dense
    column pass does no more work than the gathers), else ell.
    """

    shape: tuple  # (N, K)
    method: str
    row_scale: torch.Tensor  # float32 [N], 16 * Δ_n
    index: torch.Tensor  # int32: columns [max(C,1)], ell [max(E_max,1), N], dense [1] (unused)
    values: torch.Tensor  # float32 columns [max(C,1), N] / ell [max(E_max,1), N] (0 in padding); dense uint8 [N, K/2]
    width: int  # C, E_max, or K (dense)
    nnz: int

    @classmethod
    def from_codes(cls, q_high, scale, device, method="auto"):
        if method not in ZIPPER_HIGH_METHODS + ("auto",):
            raise ValueError(f"method must be one of {ZIPPER_HIGH_METHODS + ('auto',)}, got {method!r}")
        qh = np.asarray(q_high)
        if qh.ndim != 2:
            raise ValueError(f"q_high must be [N, K], got shape {qh.shape}")
        qh = as_int_codes("q_high", qh, -128, 127)
        n, k = qh.shape
        s = _scales32("scale", scale, (n,))
        _scales32("scale", s, (n,), factor=16.0)  # the kernel reads 16 * Δ_n
        nz = qh != 0
        cols = np.flatnonzero(nz.any(axis=0)).astype(np.int32)
        counts = nz.sum(axis=1)
        e_max = int(counts.max()) if n else 0
        fits_dense = k % 2 == 0 and (qh.size == 0 or (qh.min() >= -8 and qh.max() <= 7))
        if method == "dense" and not fits_dense:
            raise ValueError("method 'dense' packs q_high as int4: it needs codes in [-8, 7] and K even, got "
                             f"K={k}, codes in [{qh.min() if qh.size else 0}, {qh.max() if qh.size else 0}]")
        if method == "auto":
            if fits_dense and e_max:
                method = "dense"
            else:
                method = "columns" if cols.size <= e_max or e_max == 0 else "ell"
        if method == "dense":
            index = np.zeros(1, dtype=np.int32)
            values = reference.pack_int4(qh) if k else np.zeros((n, 0), dtype=np.uint8)
            width = k
        elif method == "columns":
            c = cols.size
            values = qh[:, cols].T.astype(np.float32) if c else np.zeros((1, n), dtype=np.float32)
            index = cols if c else np.zeros(1, dtype=np.int32)
            width = c
        else:
            index = np.zeros((max(e_max, 1), n), dtype=np.int32)
            values = np.zeros((max(e_max, 1), n), dtype=np.float32)
            rows, cidx = np.nonzero(qh)  # row-major: columns ascend within each row
            if rows.size:
                start = np.zeros(n + 1, dtype=np.int64)
                np.cumsum(counts, out=start[1:])
                slot = np.arange(rows.size) - start[rows]
                index[slot, rows] = cidx
                values[slot, rows] = qh[rows, cidx]
            width = e_max
        dev = _device(device)
        return cls(shape=(n, k), method=method,
                   row_scale=torch.from_numpy((np.float32(16.0) * s).astype(np.float32)).to(dev),
                   index=torch.from_numpy(np.ascontiguousarray(index)).to(dev),
                   values=torch.from_numpy(np.ascontiguousarray(values)).to(dev),
                   width=int(width), nnz=int(nz.sum()))

    def to_codes(self):
        """(q_high int8 [N, K], scale float64 holding float32(Δ_n))."""
        n, k = self.shape
        qh = np.zeros((n, k), dtype=np.int8)
        idx, val = _host(self.index), _host(self.values)
        if self.method == "dense":
            return (reference.unpack_int4(_host(self.values)).astype(np.int8) if k else qh,
                    (_host(self.row_scale) / np.float32(16.0)).astype(np.float64))
        if self.width:
            if self.method == "columns":
                qh[:, idx[: self.width]] = val[: self.width].T.astype(np.int8)
            else:
                rows = np.broadcast_to(np.arange(n)[None, :], (self.width, n))
                keep = val[: self.width] != 0  # padding slots hold value 0
                qh[rows[keep], idx[: self.width][keep]] = val[: self.width][keep].astype(np.int8)
        return qh, (_host(self.row_scale) / np.float32(16.0)).astype(np.float64)

    @property
    def device(self):
        return self.row_scale.device
