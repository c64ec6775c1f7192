"""Probe: where does the W4A4 GEMM lose against FP8 rowwise `_scaled_mm` on Hopper?

Times, side by side in one run (CUDA-graph replay, do_bench median, L2 flushed), at M = 4096 on the
LLaMA-3-8B o, gate_up and down shapes, each variant verified exactly against the int32 product:
- cuBLAS FP16, FP8 rowwise `torch._scaled_mm`, cuBLAS INT8 `torch._int_mm` (peers);
- `w4a4_gemm` as shipped;
- the ceilings of Triton's own tensor-core paths on operands already in MMA form: int8 x int8 and
  e4m3 x e4m3 bytes in memory (no unpack at all);
- activation codes as int8 bytes in memory (16 * code, no unpack) x packed int4 weights unpacked in
  registers, in both orientations (`dot(x, w.T)` and the swapped `dot(w, x.T)`, where the unpacked
  weights are the MMA's A operand);
- both operands packed int4 (the shipped data path) at more tile shapes;
- (`--set ceiling`) Triton's persistent TMA GEMM (one program per SM, descriptor loads) on int8
  and e4m3 operands in memory: the most a kernel that must also unpack can hope for;
- (`--set tma`) int8 activation codes x packed int4 weights, the weights packed either in natural
  order (byte j holds codes 2j, 2j+1: the unpacked halves must be interleaved back, a register
  shuffle) or in tile halves (byte j of each BLOCK_K tile holds codes j and j + BLOCK_K/2: the two
  unpacked planes are the two contiguous halves of the tile, each dotted with its half of the
  activation tile, no shuffle), with plain pointer loads or TMA tensor descriptors;
- (`--set e4m3`) e4m3 activation codes x packed int4 weights on the FP8 tensor cores. A nibble u in
  0..15 in the low four bits of a byte (the rest zero) *is* the e4m3 value u * 2^-9 (exponent field
  0 or 1: the subnormals and the first binade are one linear scale), so the weights unpack with one
  AND + XOR (offset binary, u = code + 8) per four bytes, like the int8 x16 unpack; the dot is then
  2^-9 (sum a u) = 2^-9 (sum a code + 8 sum a), fixed in the epilogue with the activation row sums.
  Exactness needs the tensor cores to keep the subnormals and the partial sums: tried with Triton's
  default fast accumulation and with promotion to fp32 every 32 / 64 / BLOCK_K products
  (`max_num_imprecise_acc`), one tile per program and persistent, both MMA orientations;
- (`--set group`) activation groups of 128 on the `tma` data path: each K tile's int32 product
  rescaled into the fp32 accumulator as soon as its MMA returns (the shipped kernel's way), with a
  conversion instruction or with the int32 -> float32 conversion done as an integer add and a
  float subtract (i + 0x4B400000 read as
  a float is 1.5 * 2^23 + i exactly for |i| < 2^22; a tile's product of BLOCK_K <= 256 codes is at
  most 256 * 64 = 16384), where a conversion instruction may run at a lower rate than the add,
  on 64-row tiles (one tile late, and 128-row tiles, lost: reports/results/h200/probe_group_m4096.json);
  against the shipped `w4a4_gemm` with the table's group bucket, each within a relative 1e-5 of
  the float64 product.
Run on the GPU machine: `python perf/probe_hopper_w4a4.py --out $OUT/probe.json [--set tma|ceiling]`.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import triton
import triton.language as tl

from zqkernels.gpu.int4 import unpack_lo_hi_x16
from zqkernels.gpu.tiling import tile_ids


@triton.jit
def _probe_kernel(a_ptr, w_ptr, out_ptr, M, N, K, stride_a, stride_w,
                  A_FMT: tl.constexpr, W_FMT: tl.constexpr, SWAP: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # A_FMT / W_FMT: 0 packed int4 (x16 unpack in registers), 1 int8 bytes, 2 e4m3 bytes.
    _, pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    BKH: tl.constexpr = BLOCK_K // 2
    ka = tl.arange(0, BKH) if A_FMT == 0 else tl.arange(0, BLOCK_K)
    kw = tl.arange(0, BKH) if W_FMT == 0 else tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_a + ka[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_w + kw[None, :]
    FP8: tl.constexpr = (A_FMT == 2) or (W_FMT == 2)
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32 if FP8 else tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if FP8 else tl.int32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs)
        w = tl.load(w_ptrs)
        if A_FMT == 0:
            a_lo, a_hi = unpack_lo_hi_x16(a, True)
            a = tl.reshape(tl.join(a_lo, a_hi), (BLOCK_M, BLOCK_K))
        if W_FMT == 0:
            w_lo, w_hi = unpack_lo_hi_x16(w, True)
            w = tl.reshape(tl.join(w_lo, w_hi), (BLOCK_N, BLOCK_K))
        if SWAP:
            if FP8:
                acc = tl.dot(w, tl.trans(a), acc)
            else:
                acc = tl.dot(w, tl.trans(a), acc, out_dtype=tl.int32)
        else:
            if FP8:
                acc = tl.dot(a, tl.trans(w), acc)
            else:
                acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        a_ptrs += BKH if A_FMT == 0 else BLOCK_K
        w_ptrs += BKH if W_FMT == 0 else BLOCK_K
    if SWAP:
        acc = tl.trans(acc)
    om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    on = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (om[:, None] < M) & (on[None, :] < N)
    tl.store(out_ptr + om.to(tl.int64)[:, None] * N + on[None, :], acc.to(tl.float32), mask=mask)


@triton.jit
def _probe_tma_kernel(a_desc, w_desc, a_ptr, w_ptr, out_ptr, M, N, K, stride_a, stride_w,
                      HALVES: tl.constexpr, TMA: tl.constexpr, USE_ASM: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # a: int8 codes [M, K]; w: packed int4 [N, K/2] (natural order, or tile halves with HALVES).
    _, pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    BKH: tl.constexpr = BLOCK_K // 2
    rm = (off_m + tl.arange(0, BLOCK_M)) % M
    rn = (off_n + tl.arange(0, BLOCK_N)) % N
    ka = tl.arange(0, BKH) if HALVES else tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_a + ka[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_w + tl.arange(0, BKH)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, K, BLOCK_K):
        if TMA:
            w = w_desc.load([off_n, k // 2])
        else:
            w = tl.load(w_ptrs)
        w_lo, w_hi = unpack_lo_hi_x16(w, USE_ASM)
        if HALVES:
            if TMA:
                a0 = a_desc.load([off_m, k])
                a1 = a_desc.load([off_m, k + BKH])
            else:
                a0 = tl.load(a_ptrs)
                a1 = tl.load(a_ptrs + BKH)
            acc = tl.dot(a0, tl.trans(w_lo), acc, out_dtype=tl.int32)
            acc = tl.dot(a1, tl.trans(w_hi), acc, out_dtype=tl.int32)
        else:
            if TMA:
                a = a_desc.load([off_m, k])
            else:
                a = tl.load(a_ptrs)
            wj = tl.reshape(tl.join(w_lo, w_hi), (BLOCK_N, BLOCK_K))
            acc = tl.dot(a, tl.trans(wj), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BKH
    om = off_m + tl.arange(0, BLOCK_M)
    on = off_n + tl.arange(0, BLOCK_N)
    mask = (om[:, None] < M) & (on[None, :] < N)
    tl.store(out_ptr + om.to(tl.int64)[:, None] * N + on[None, :], acc.to(tl.float32), mask=mask)


@triton.jit
def _ceiling_kernel(a_desc, b_desc, out_ptr, M, N, K, FP8: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
                    FLATTEN: tl.constexpr):
    # Triton's best 8-bit GEMM on operands already in MMA form: persistent tile loop (one program
    # per SM), TMA descriptor loads, grouped tile order; int8 x int8 (int32 accumulate) or
    # e4m3 x e4m3 (fp32, the default fast accumulation).
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    in_group = GROUP_M * num_pid_n
    for tile in tl.range(start, num_tiles, NUM_SMS, flatten=FLATTEN):
        group = tile // in_group
        first_m = group * GROUP_M
        size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % size_m)
        pid_n = (tile % in_group) // size_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if FP8 else tl.int32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BLOCK_K])
            b = b_desc.load([off_n, ki * BLOCK_K])
            if FP8:
                acc = tl.dot(a, b.T, acc)
            else:
                acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        om = off_m + tl.arange(0, BLOCK_M)
        on = off_n + tl.arange(0, BLOCK_N)
        mask = (om[:, None] < M) & (on[None, :] < N)
        tl.store(out_ptr + om.to(tl.int64)[:, None] * N + on[None, :], acc.to(tl.float32), mask=mask)


CEILING_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
]


def run_ceiling_set(results, sname, M, N, K, a8, w8, af8, wf8, exact, out, budget_end):
    """Triton's persistent TMA 8-bit GEMM, int8 and e4m3 operands in memory (no unpack), each
    config with and without the flattened tile loop: the ceiling a W4A4 kernel with in-register
    unpacking works under, beside cuBLASLt FP8 in the same run."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    row = lambda **kw: results["rows"].append(dict(shape=sname, N=N, K=K, **kw))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for cfg in CEILING_CONFIGS:
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        for fp8, (a_t, w_t, scale) in ((False, (a8, w8, 256.0)), (True, (af8, wf8, 1.0))):
            for flatten in (True, False):
                vname = f"ceiling_{'f8' if fp8 else 'i8'}_tma_persistent{'_flat' if flatten else ''}"
                if time.time() > budget_end:
                    row(variant=vname, config=cfg, skipped="time budget")
                    continue
                try:
                    a_desc = TensorDescriptor.from_tensor(a_t, [bm, bk])
                    w_desc = TensorDescriptor.from_tensor(w_t, [bn, bk])
                    grid = (min(sms, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)
                    launch = lambda: _ceiling_kernel[grid](a_desc, w_desc, out, M, N, K, FP8=fp8, BLOCK_M=bm,
                                                           BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
                                                           NUM_SMS=sms, FLATTEN=flatten,
                                                           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
                    time_probe(row, vname, cfg, launch, out, exact, scale)
                except Exception as exc:  # noqa: BLE001
                    row(variant=vname, config=cfg, error=repr(exc)[:300])


@triton.jit
def _unpack_e4m3_offset(packed):
    """uint8 tile of packed codes -> (lo, hi) e4m3 tiles of (code + 8) * 2^-9: the nibble, xor 8,
    in the low bits of its byte (one AND + XOR, and a shift for hi, per four bytes)."""
    lo, hi = tl.inline_asm_elementwise(
        asm="{ .reg .b32 t; and.b32 t, $2, 0x0F0F0F0F; xor.b32 $0, t, 0x08080808; "
            "shr.u32 t, $2, 4; and.b32 t, t, 0x0F0F0F0F; xor.b32 $1, t, 0x08080808; }",
        constraints="=r,=r,r", args=[packed], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    return lo.to(tl.float8e4nv, bitcast=True), hi.to(tl.float8e4nv, bitcast=True)


@triton.jit
def _probe_e4m3_kernel(a_desc, w_desc, rs_ptr, out_ptr, M, N, K, IMPRECISE: tl.constexpr, SWAP: tl.constexpr,
                       PERSIST: tl.constexpr, NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # a: e4m3 codes [M, K] via TMA; w: packed int4 [N, K/2] via TMA; rs: fp32 row sums of the codes.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    in_group = GROUP_M * num_pid_n
    BKH: tl.constexpr = BLOCK_K // 2
    if PERSIST:
        start = tl.program_id(0)
        step = NUM_SMS
    else:
        start = tl.program_id(0)
        step = num_tiles
    for tile in tl.range(start, num_tiles, step):
        first_m = (tile // in_group) * GROUP_M
        size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + ((tile % in_group) % size_m)
        pid_n = (tile % in_group) // size_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(0, tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([off_m, t * BLOCK_K])
            w_lo, w_hi = _unpack_e4m3_offset(w_desc.load([off_n, t * BKH]))
            w = tl.reshape(tl.join(w_lo, w_hi), (BLOCK_N, BLOCK_K))
            if SWAP:
                acc = tl.dot(w, tl.trans(a), acc, max_num_imprecise_acc=IMPRECISE)
            else:
                acc = tl.dot(a, tl.trans(w), acc, max_num_imprecise_acc=IMPRECISE)
        if SWAP:
            acc = tl.trans(acc)
        om = off_m + tl.arange(0, BLOCK_M)
        on = off_n + tl.arange(0, BLOCK_N)
        rs = tl.load(rs_ptr + om, mask=om < M, other=0.0)
        acc = acc * 512.0 - 8.0 * rs[:, None]
        mask = (om[:, None] < M) & (on[None, :] < N)
        tl.store(out_ptr + om.to(tl.int64)[:, None] * N + on[None, :], acc, mask=mask)


E4M3_CONFIGS = [
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
]


def run_e4m3_set(results, sname, M, N, K, ca, cw, exact, out, budget_end):
    """The FP8 tensor-core W4A4 path (module docstring), every config x accumulation x loop shape,
    the adversarial case too: codes at the extremes (a = 7, code 7: every partial sum at its
    largest), where truncated accumulation would show first."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    row = lambda **kw: results["rows"].append(dict(shape=sname, N=N, K=K, **kw))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    pw = ((cw[:, 0::2] & 15) | ((cw[:, 1::2] & 15) << 4)).to(torch.uint8).contiguous()
    af8 = ca.to(torch.float16).to(torch.float8_e4m3fn).contiguous()
    rs = ca.float().sum(1).contiguous()
    # extremes: a in {7, -7} by row halves and weight codes 7 / -8 by column halves
    ca_x = torch.full_like(ca, 7)
    ca_x[M // 2:] = -7
    cw_x = torch.full_like(cw, 7)
    cw_x[N // 2:] = -8
    pw_x = ((cw_x[:, 0::2] & 15) | ((cw_x[:, 1::2] & 15) << 4)).to(torch.uint8).contiguous()
    af8_x = ca_x.to(torch.float16).to(torch.float8_e4m3fn).contiguous()
    rs_x = ca_x.float().sum(1).contiguous()
    exact_x = ca_x.float() @ cw_x.float().T
    for cfg in E4M3_CONFIGS:
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        for imprecise in (bk, 32, None):
            for persist in (True, False):
                for swap in ((False, True) if cfg is E4M3_CONFIGS[1] else (False,)):
                    vname = (f"e4m3_offset_{'persist' if persist else 'tiles'}{'_swap' if swap else ''}"
                             f"_acc{imprecise or 'fast'}")
                    if time.time() > budget_end:
                        row(variant=vname, config=cfg, skipped="time budget")
                        continue
                    ntile = triton.cdiv(M, bm) * triton.cdiv(N, bn)
                    grid = (min(sms, ntile) if persist else ntile,)
                    try:
                        descs = {}
                        for key, (a_t, w_t) in {"rand": (af8, pw), "ext": (af8_x, pw_x)}.items():
                            descs[key] = (TensorDescriptor.from_tensor(a_t, [bm, bk]),
                                          TensorDescriptor.from_tensor(w_t, [bn, bk // 2]))
                        mk = lambda key, r: (lambda: _probe_e4m3_kernel[grid](
                            descs[key][0], descs[key][1], r, out, M, N, K, IMPRECISE=imprecise, SWAP=swap,
                            PERSIST=persist, NUM_SMS=sms, **meta, num_warps=cfg["num_warps"],
                            num_stages=cfg["num_stages"]))
                        out.fill_(float("nan"))
                        mk("ext", rs_x)()
                        torch.cuda.synchronize()
                        ok_x = bool(torch.equal(out, exact_x))
                        err_x = float((out - exact_x).abs().max())
                        time_probe(row, vname, cfg, mk("rand", rs), out, exact, 1.0)
                        results["rows"][-1].update(exact_extremes=ok_x, max_err_extremes=err_x)
                    except Exception as exc:  # noqa: BLE001
                        row(variant=vname, config=cfg, error=repr(exc)[:300])


@triton.jit
def _probe_group_kernel(a_desc, w_desc, sx_ptr, out_ptr, M, N, K, G, USE_ASM: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                        MAGIC: tl.constexpr):
    # a: int8 codes [M, K]; w: packed [N, K/2]; sx: fp32 [M, G] scales of groups of BLOCK_K.
    _, pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    BKH: tl.constexpr = BLOCK_K // 2
    rm = (off_m + tl.arange(0, BLOCK_M)) % M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([off_m, t * BLOCK_K])
        w_lo, w_hi = unpack_lo_hi_x16(w_desc.load([off_n, t * BKH]), USE_ASM)
        w8 = tl.reshape(tl.join(w_lo, w_hi), (BLOCK_N, BLOCK_K))
        part = tl.dot(a, tl.trans(w8), out_dtype=tl.int32)
        sa = tl.load(sx_ptr + rm * G + t)
        if MAGIC:
            acc += ((part + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0) * sa[:, None]
        else:
            acc += part.to(tl.float32) * sa[:, None]
    om = off_m + tl.arange(0, BLOCK_M)
    on = off_n + tl.arange(0, BLOCK_N)
    mask = (om[:, None] < M) & (on[None, :] < N)
    tl.store(out_ptr + om.to(tl.int64)[:, None] * N + on[None, :], acc * 0.0625, mask=mask)


# 128-row tiles (8 and 4 warps), and the rescale one tile late, lost to the 64-row tile on one
# warpgroup rescaled at once in every shape (reports/results/h200/probe_group_m4096.json)
GROUP_CONFIGS = [
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=5),
    dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
]


def run_group_set(results, sname, M, N, K, ca, cw, out, budget_end):
    """Groups of 128 (module docstring): rescale at once or one tile late, beside the shipped GEMM."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from zqkernels.gpu.w4a4 import act_layout, w4a4_gemm

    row = lambda **kw: results["rows"].append(dict(shape=sname, N=N, K=K, **kw))
    G = K // 128
    sx = (torch.rand(M, G, device="cuda") + 0.01).contiguous()
    ref = torch.zeros(M, N, device="cuda", dtype=torch.float64)
    for g in range(G):
        sl = slice(g * 128, (g + 1) * 128)
        ref += (ca[:, sl].double() @ cw[:, sl].double().T) * sx[:, g:g + 1].double()
    pw = ((cw[:, 0::2] & 15) | ((cw[:, 1::2] & 15) << 4)).to(torch.uint8).contiguous()
    ones = torch.ones(N, device="cuda")
    ok = lambda y: float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    layout = act_layout(M, 128, ca.device)
    qx = ca if layout == "int8" else ((ca[:, 0::2] & 15) | ((ca[:, 1::2] & 15) << 4)).to(torch.uint8).contiguous()
    y = w4a4_gemm(qx, sx, pw, ones, act_group_size=128, out_dtype=torch.float32)
    row(variant=f"w4a4_gemm_shipped_g128_{layout}", exact=ok(y),
        us=bench(lambda: w4a4_gemm(qx, sx, pw, ones, act_group_size=128, out_dtype=torch.float32)))
    for cfg in GROUP_CONFIGS:
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        a_desc = TensorDescriptor.from_tensor(ca, [bm, bk])
        w_desc = TensorDescriptor.from_tensor(pw, [bn, bk // 2])
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        for vname, magic in (("tma_g128_at_once", False), ("tma_g128_at_once_magic", True)):
            if time.time() > budget_end:
                row(variant=vname, config=cfg, skipped="time budget")
                continue
            try:
                launch = lambda: _probe_group_kernel[grid](a_desc, w_desc, sx, out, M, N, K, G, USE_ASM=True,
                                                           MAGIC=magic, **meta, num_warps=cfg["num_warps"],
                                                           num_stages=cfg["num_stages"])
                out.fill_(float("nan"))
                h = launch()
                torch.cuda.synchronize()
                row(variant=vname, config=cfg, exact=ok(out), us=bench(launch), n_regs=getattr(h, "n_regs", None),
                    n_spills=getattr(h, "n_spills", None))
            except Exception as exc:  # noqa: BLE001
                row(variant=vname, config=cfg, error=repr(exc)[:300])


def pack_halves(codes, block_k):
    """[N, K] int8 codes -> [N, K/2] bytes, byte j of each block_k tile = code j | code (j + block_k/2) << 4."""
    n, k = codes.shape
    t = codes.reshape(n, k // block_k, 2, block_k // 2)
    return ((t[:, :, 0] & 15) | ((t[:, :, 1] & 15) << 4)).to(torch.uint8).reshape(n, k // 2).contiguous()


TMA_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
]
# (name, HALVES, TMA)
TMA_VARIANTS = [
    ("a_i8_w_i4_join", False, False),
    ("a_i8_w_i4_halves", True, False),
    ("a_i8tma_w_i4tma_join", False, True),
    ("a_i8tma_w_i4tma_halves", True, True),
]


def run_tma_set(results, sname, M, N, K, ca, cw, exact, out, budget_end):
    from triton.tools.tensor_descriptor import TensorDescriptor

    row = lambda **kw: results["rows"].append(dict(shape=sname, N=N, K=K, **kw))
    pw_nat = ((cw[:, 0::2] & 15) | ((cw[:, 1::2] & 15) << 4)).to(torch.uint8).contiguous()
    for cfg in TMA_CONFIGS:
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        pw_half = pack_halves(cw, bk)
        meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        for vname, halves, tma in TMA_VARIANTS:
            if time.time() > budget_end:
                row(variant=vname, config=cfg, skipped="time budget")
                continue
            w_t = pw_half if halves else pw_nat
            a_desc = TensorDescriptor.from_tensor(ca, [bm, bk // 2 if halves else bk]) if tma else None
            w_desc = TensorDescriptor.from_tensor(w_t, [bn, bk // 2]) if tma else None
            try:
                launch = lambda: _probe_tma_kernel[grid](a_desc, w_desc, ca, w_t, out, M, N, K, ca.stride(0),
                                                         w_t.stride(0), HALVES=halves, TMA=tma, USE_ASM=True, **meta,
                                                         num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
                time_probe(row, vname, cfg, launch, out, exact, 16.0)
            except Exception as exc:  # noqa: BLE001
                row(variant=vname, config=cfg, error=repr(exc)[:300])


def time_probe(row, vname, cfg, launch, out, exact, scale):
    """One probe kernel: run into a NaN-filled `out`, check `out / scale` equals the int32 product
    exactly, record its registers / spills / shared memory / wgmma use where Triton reports them,
    and its time."""
    out.fill_(float("nan"))
    h = launch()
    torch.cuda.synchronize()
    ok = bool(torch.equal(out / scale, exact))
    info = {}
    try:
        info = dict(n_regs=h.n_regs, n_spills=h.n_spills, shared=h.metadata.shared,
                    wgmma="wgmma" in h.asm.get("ptx", ""))
    except Exception:  # noqa: BLE001 - a Triton version without these fields
        pass
    row(variant=vname, config=cfg, us=bench(launch), exact=ok, **info)


def bench(fn, graph=True):
    fn()
    torch.cuda.synchronize()
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        torch.cuda.synchronize()
        run = g.replay
    else:
        run = fn
    return 1000.0 * float(triton.testing.do_bench(run, warmup=5, rep=40, return_mode="median"))


SHAPES = {"o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=256, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
]
# (name, A_FMT, W_FMT, SWAP)
VARIANTS = [
    ("i8xi8_mem", 1, 1, False),
    ("f8xf8_mem", 2, 2, False),
    ("a_i8mem_w_i4reg", 1, 0, False),
    ("a_i8mem_w_i4reg_swap", 1, 0, True),
    ("a_i4reg_w_i4reg", 0, 0, False),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", type=int, default=4096)
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    ap.add_argument("--set", choices=("data-path", "tma", "ceiling", "e4m3", "group"), default="data-path",
                    help="data-path: the formats and orientations above; tma: int8 activations x packed "
                         "weights, natural or tile-halves order, pointer or TMA loads; ceiling: Triton's "
                         "persistent TMA GEMM on int8 / e4m3 operands in memory; e4m3: e4m3 activation "
                         "codes x packed weights on the FP8 tensor cores; group: groups of 128, rescaled at once or "
                         "one tile late")
    args = ap.parse_args()
    t_start = time.time()
    from zqkernels.gpu.w4a4 import act_layout, w4a4_gemm

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    M = args.m
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "M": M, "timer": "CUDA-graph replay, do_bench median (ms->us), L2 flushed", "rows": []}
    for sname in args.shapes.split(","):
        N, K = SHAPES[sname]
        ca = torch.randint(-8, 8, (M, K), device="cuda", dtype=torch.int8)
        cw = torch.randint(-8, 8, (N, K), device="cuda", dtype=torch.int8)
        exact = (ca.float() @ cw.float().T)  # |sum| < 2**24 for K <= 14336 * 64: exact in fp32
        pa = ((ca[:, 0::2] & 15) | ((ca[:, 1::2] & 15) << 4)).to(torch.uint8).contiguous()
        pw = ((cw[:, 0::2] & 15) | ((cw[:, 1::2] & 15) << 4)).to(torch.uint8).contiguous()
        a8 = (ca * 16).contiguous()  # 16 * code: what the x16 unpack yields
        w8 = (cw * 16).contiguous()
        af8 = ca.to(torch.float16).to(torch.float8_e4m3fn).contiguous()
        wf8 = cw.to(torch.float16).to(torch.float8_e4m3fn).contiguous()
        x16 = torch.randn(M, K, device="cuda", dtype=torch.float16)
        w16 = torch.randn(N, K, device="cuda", dtype=torch.float16)
        row = lambda **kw: results["rows"].append(dict(shape=sname, N=N, K=K, **kw))
        row(variant="cublas_fp16", us=bench(lambda: x16 @ w16.T))
        sa = torch.ones(M, 1, device="cuda")
        sw = torch.ones(1, N, device="cuda")
        wf8t = wf8.T
        try:
            y = torch._scaled_mm(af8, wf8t, scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=True)
            row(variant="fp8_rowwise_scaled_mm", us=bench(lambda: torch._scaled_mm(
                af8, wf8t, scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=True)),
                exact=bool(torch.equal(y.float(), exact.bfloat16().float())))
        except Exception as exc:  # noqa: BLE001
            row(variant="fp8_rowwise_scaled_mm", error=repr(exc)[:300])
        row(variant="cublas_int8", us=bench(lambda: torch._int_mm(ca, cw.T)))
        sxs = torch.ones(M, device="cuda")
        sws = torch.ones(N, device="cuda")
        shipped_a = ca if act_layout(M, None, ca.device) == "int8" else pa  # the table's layout for this M
        y = w4a4_gemm(shipped_a, sxs, pw, sws, out_dtype=torch.float32)
        row(variant="w4a4_gemm_shipped", us=bench(lambda: w4a4_gemm(shipped_a, sxs, pw, sws, out_dtype=torch.float32)),
            exact=bool(torch.equal(y, exact)))
        out = torch.empty(M, N, device="cuda", dtype=torch.float32)
        if args.set == "tma":
            row(variant="i8xi8_mem", config=CONFIGS[0], us=bench(lambda: _probe_kernel[
                (triton.cdiv(M, 128) * triton.cdiv(N, 128),)](a8, w8, out, M, N, K, a8.stride(0), w8.stride(0),
                A_FMT=1, W_FMT=1, SWAP=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8,
                num_warps=8, num_stages=3)))
            run_tma_set(results, sname, M, N, K, ca, cw, exact, out, t_start + args.budget_s)
        if args.set == "group":
            run_group_set(results, sname, M, N, K, ca, cw, out, t_start + args.budget_s)
        if args.set == "e4m3":
            run_e4m3_set(results, sname, M, N, K, ca, cw, exact, out, t_start + args.budget_s)
        if args.set == "ceiling":
            run_ceiling_set(results, sname, M, N, K, a8, w8, af8, wf8, exact, out, t_start + args.budget_s)
        # the ceiling set times the pointer-load 8-bit kernels beside its persistent ones
        variants = {"data-path": VARIANTS, "tma": [], "ceiling": VARIANTS[:2], "e4m3": [], "group": []}[args.set]
        for vname, afmt, wfmt, swap in variants:
            a_t = pa if afmt == 0 else (a8 if afmt == 1 else af8)
            w_t = pw if wfmt == 0 else (w8 if wfmt == 1 else wf8)
            scale = 1.0 if (afmt == 2) else (256.0 if (afmt != 2 and wfmt != 2) else 16.0)
            for cfg in (CONFIGS if args.set == "data-path" else CONFIGS[:2]):
                if time.time() - t_start > args.budget_s:
                    row(variant=vname, config=cfg, skipped="time budget")
                    continue
                meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
                grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
                try:
                    launch = lambda: _probe_kernel[grid](a_t, w_t, out, M, N, K, a_t.stride(0), w_t.stride(0),
                                                         A_FMT=afmt, W_FMT=wfmt, SWAP=swap, **meta,
                                                         num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
                    time_probe(row, vname, cfg, launch, out, exact, scale)
                except Exception as exc:  # noqa: BLE001
                    row(variant=vname, config=cfg, error=repr(exc)[:300])
        del ca, cw, exact, pa, pw, a8, w8, af8, wf8, x16, w16
        torch.cuda.empty_cache()
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    # summary: best per variant and shape
    best = {}
    for r in results["rows"]:
        if "us" in r and r.get("exact", True):
            key = (r["shape"], r["variant"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    for (s, v), r in sorted(best.items()):
        print(f"{s:8s} {v:28s} {r['us']:9.1f} us  {r.get('config', '')} regs={r.get('n_regs')} "
              f"spills={r.get('n_spills')} wgmma={r.get('wgmma')}")
    bad = [r for r in results["rows"] if r.get("exact") is False or "error" in r]
    for r in bad:
        print("BAD", r["shape"], r["variant"], r.get("config"), r.get("error", "inexact"))


if __name__ == "__main__":
    main()
