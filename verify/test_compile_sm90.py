"""Every launch the shipped tables make compiles for Hopper (sm_90), on any machine.

The launchers of every family run over every bucket of every GPU launch table (`h200.json`,
`h100.json`, `default.json`: the launchers read it in place of the device's) with their kernels
replaced by recorders, so nothing executes: each
records the kernel, its arguments and its compile options as the launcher passed them. Each
distinct launch is then compiled ahead of time by Triton for an sm_90 target, through PTX and
ptxas to a cubin, with `USE_ASM=True` and `PDL=True` where the kernel takes them (what a GPU launch
passes: the inline-PTX nibble unpack and the grid-dependency wait, which the interpreter never
runs). So a CPU run proves what only a GPU run proved before: that the compiled path, inline
assembly included, builds for the GPU the tables are for. It does not prove the compiled kernels
right; the laws in the family tests do, compiled on a GPU and interpreted on a CPU. Integer
arguments are compiled without Triton's value specializations (a launch on a GPU may also
specialize an argument equal to 1 or divisible by 16).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import triton.language as tl

import reference as R
from zqkernels.gpu import actquant, configs, mosaic, w4a4, w4a16, zipper_high
from zqkernels.layouts import DenseInt4, MosaicBlocks, ZipperHighGPU

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TABLES = ("h200.json", "h100.json", "default.json")
MODULES = (actquant, w4a4, w4a16, mosaic, zipper_high)
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
        torch.int8: "*i8", torch.uint8: "*u8", torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64"}
_OPTIONS = ("num_warps", "num_stages")


class _Recorder:
    def __init__(self, module, kernel, launches):
        self.module, self.kernel, self.launches = module, kernel, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append((self.module, self.kernel, args, kwargs))
        return record


def _is_kernel(obj):
    return hasattr(obj, "fn") and hasattr(obj, "arg_names")  # JITFunction, or the interpreter's wrapper


@pytest.fixture
def launches(monkeypatch):
    """Every kernel of every family module (module attributes and VARIANTS tables) recorded."""
    got = []
    for mod in MODULES:
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.endswith("_kernel") and _is_kernel(obj):
                monkeypatch.setattr(mod, name, _Recorder(mod.__name__, obj, got))
        variants = getattr(mod, "VARIANTS", {})
        for key, obj in list(variants.items()):
            if _is_kernel(obj):
                monkeypatch.setitem(variants, key, _Recorder(mod.__name__, obj, got))
    return got


def _signature(kernel, args, kwargs):
    """(signature, constexprs, options) for ASTSource / triton.compile from one recorded launch."""
    params = inspect.signature(kernel.fn).parameters
    bound = dict(zip(params, args))
    bound.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
    options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
    sig, constexprs = {}, {}
    for name, p in params.items():
        if name not in bound:
            raise AssertionError(f"{kernel.fn.__name__}: the launcher passed no {name}")
        v = bound[name]
        if p.annotation is tl.constexpr or "constexpr" in str(p.annotation):
            if name == "USE_ASM":
                v = True  # a GPU launch's value (configs.use_asm): the inline-PTX path
            if name == "PDL":
                v = True  # an sm_90 launch's value (configs.use_pdl): the grid-dependency wait
            if not (v is None or isinstance(v, (bool, int, float, str))):
                raise AssertionError(f"{kernel.fn.__name__}: constexpr {name} of type {type(v).__name__}")
            sig[name], constexprs[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = _PTR[v.dtype]
        elif type(v).__name__ == "TensorDescriptor":  # a host TMA descriptor: its dtype and box
            sig[name] = f"tensordesc<{_PTR[v.base.dtype][1:]}[{', '.join(str(b) for b in v.block_shape)}]>"
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v is None:
            sig[name], constexprs[name] = "constexpr", None
        else:
            raise AssertionError(f"{kernel.fn.__name__}: argument {name} of type {type(v).__name__}")
    return sig, constexprs, options


# Run in a process of its own without the interpreter, so the kernels and the helpers they call
# are compiled functions (under TRITON_INTERPRET=1 they are the interpreter's wrappers).
_COMPILE = r"""
import json, sys
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

target = GPUTarget("cuda", 90, 32)
done = []
for job in json.load(sys.stdin):
    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    binary = triton.compile(ASTSource(fn=kernel, signature=job["signature"], constexprs=job["constexprs"]),
                            target=target, options=job["options"])
    assert binary.asm.get("cubin"), job
    done.append(job["module"] + "." + job["kernel"])
print(json.dumps(done))
"""


def compile_sm90(jobs, processes=None):
    """Compile every job for sm_90 in fresh processes (the jobs dealt over `processes` of them, by
    default 2, or 4 on a host of more than 8 cores, run side by side: compilation is CPU-bound);
    returns the names compiled."""
    processes = processes or (4 if (os.cpu_count() or 1) > 8 else 2)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    shares = [share for share in (jobs[i::processes] for i in range(processes)) if share]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as files:
        procs = []
        for i, share in enumerate(shares):  # all started before any is waited on
            job_file = Path(tmp) / f"jobs{i}.json"
            job_file.write_text(json.dumps(share))
            stdin, out, err = (files.enter_context(open(Path(tmp) / name, mode))
                               for name, mode in ((f"jobs{i}.json", "r"), (f"out{i}", "w"), (f"err{i}", "w")))
            procs.append((subprocess.Popen([sys.executable, "-c", _COMPILE], stdin=stdin, stdout=out, stderr=err,
                                           env=env, cwd=ROOT), i))
        done = []
        for proc, i in procs:
            proc.wait(timeout=900)
            assert proc.returncode == 0, (Path(tmp) / f"err{i}").read_text()[-4000:]
            done += json.loads((Path(tmp) / f"out{i}").read_text().strip().splitlines()[-1])
    return done


def _ms(buckets):
    """One M in each bucket of a family's table section (the smallest, then each bucket's key)."""
    return sorted({1} | {int(k) for k in buckets})


def _shape_entries(buckets):
    """The per-shape configs of a section's buckets (`configs.launch_config`'s "shapes")."""
    return [cfg for bucket in buckets.values() for cfg in bucket.get("shapes", {}).values()]


def _drive_w4a4(table):
    gen = torch.Generator().manual_seed(0)
    n, k = 192, 640  # K not a multiple of 256: the uneven-K paths
    qw = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen).to(KERNEL_DEVICE)
    sw = torch.rand(n).to(KERNEL_DEVICE) + 0.1
    for scales, group in (("per_token", None), ("group", 128)):
        for m in _ms(table["w4a4"][scales]):
            sx = (torch.rand(m) if group is None else torch.rand(m, -(-k // group))).to(KERNEL_DEVICE)
            cfg = configs.launch_config("w4a4", scales, m, KERNEL_DEVICE)
            for qx in (torch.randint(0, 256, (m, k // 2), dtype=torch.uint8, generator=gen),
                       torch.randint(-8, 8, (m, k), dtype=torch.int8, generator=gen)):
                # packed codes at a tma bucket run its "no_tma" config: that launch compiles too
                w4a4.w4a4_gemm(qx.to(KERNEL_DEVICE), sx, qw, sw, group, torch.float16, check_finite=False)
            x = torch.randn(m, k).half().to(KERNEL_DEVICE)
            w4a4.w4a4_linear(x, None, qw, sw, group, torch.float16)  # the layers' path: a "fused" bucket's GEMV
            if cfg["variant"] == "gemv":  # any gemv bucket may be made "fused": its tiles compile that way too
                inv = torch.rand(k).to(KERNEL_DEVICE) + 0.5
                w4a4.w4a4_gemv_quant(x, inv, qw, sw, group, torch.float16, config=cfg, check_finite=False)
        for cfg in _shape_entries(table["w4a4"][scales]):  # per-shape entries: their configs at this shape
            for qx in (torch.randint(0, 256, (4, k // 2), dtype=torch.uint8, generator=gen),
                       torch.randint(-8, 8, (4, k), dtype=torch.int8, generator=gen)):
                sx = (torch.rand(4) if group is None else torch.rand(4, -(-k // group))).to(KERNEL_DEVICE)
                w4a4.w4a4_gemm(qx.to(KERNEL_DEVICE), sx, qw, sw, group, torch.float16, config=cfg, check_finite=False)
    for scales, group in (("per_channel", None), ("group", 128)):
        swg = (torch.rand(n) if group is None else torch.rand(n, -(-k // group))).to(KERNEL_DEVICE) + 0.1
        for cfg in _shape_entries(table["w4a16"][scales]):
            for dtype in (torch.float16, torch.bfloat16):
                x = torch.randn(64, k).to(dtype).to(KERNEL_DEVICE)
                w4a16.w4a16_gemm(x, qw, swg, group_size=group, config=cfg, check_finite=False)
            # K not a multiple of 32: the entry's no_tma config
            w4a16.w4a16_gemm(x[:, :k - 16].contiguous(), qw[:, :(k - 16) // 2].contiguous(), swg, group_size=group,
                             config=cfg, check_finite=False)
        for m in _ms(table["w4a16"][scales]):
            x = torch.randn(m, k).half().to(KERNEL_DEVICE)
            w4a16.w4a16_gemm(x, qw, swg, group_size=group, check_finite=False)
            # bf16 activations in every bucket (the tma variant's unpack is its own PTX per dtype)
            w4a16.w4a16_gemm(x.bfloat16(), qw, swg, group_size=group, check_finite=False)
            if m > 1:  # K not a multiple of 32: a tma bucket's no_tma config
                w4a16.w4a16_gemm(x[:, :k - 16].contiguous(), qw[:, :(k - 16) // 2].contiguous(), swg,
                                 group_size=group, check_finite=False)


def _drive_mosaic(table):
    rng = np.random.default_rng(0)
    n, k = 128, 512
    w = rng.standard_normal((n, k))
    # per-channel base with per-token and grouped activations; groups of 32 with 16 x 128 blocks
    for wg, block, ags in ((None, (64, 64), (None, 64)), (32, (16, 128), (32, None))):
        weights = MosaicBlocks.from_codes(R.mosaic_quantize(w, rng.random(k) + 0.1, density=0.3, block=block,
                                                            group_size=wg), KERNEL_DEVICE)
        for m in _ms(table["mosaic"]["w4a4"]):
            qx = torch.randint(0, 256, (m, k // 2), dtype=torch.uint8).to(KERNEL_DEVICE)
            for ag in ags:
                sx = (torch.rand(m) if ag is None else torch.rand(m, k // ag)).to(KERNEL_DEVICE)
                mosaic.mosaic_w4a4_gemm(qx, sx, weights, act_group_size=ag, check_finite=False)
                if wg is None:
                    mosaic.mosaic_w4a4_gemm_unfused(qx, sx, weights, act_group_size=ag, check_finite=False)
        for m in _ms(table["mosaic"]["w4a16"]):
            x = torch.randn(m, k).half().to(KERNEL_DEVICE)
            mosaic.mosaic_w4a16_gemm(x, weights, check_finite=False)


def _drive_actquant(table):
    for scales, group_sizes in (("per_token", (None,)), ("group", (32, 128))):
        for m in _ms(table["actquant"][scales]):
            cfg = configs.launch_config("actquant", scales, m, KERNEL_DEVICE)
            # one pass, and (per token) the long-row path; values unread: the kernels are recorded
            for k in (512, 2 * cfg.get("ONE_PASS_MAX_K", 512)):
                inv = torch.rand(k).to(KERNEL_DEVICE) + 0.5
                x = torch.empty(m, k, dtype=torch.float16, device=KERNEL_DEVICE)
                for group in group_sizes:
                    for layout in ("int4", "int8"):
                        for smooth in (None, inv):
                            actquant.quantize_activations(x, smooth, group, layout=layout, check_finite=False)
                    for dtype in (torch.bfloat16, torch.float32):  # the other input types, once each
                        actquant.quantize_activations(x.to(dtype), inv, group, check_finite=False)


def _drive_zipper(table):
    rng = np.random.default_rng(0)
    n, k = 96, 200
    q_high = np.where(rng.random((n, k)) < 0.05, rng.integers(-8, 8, (n, k)), 0).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, n)
    for method in ("ell", "columns"):
        high = ZipperHighGPU.from_codes(q_high, scale, KERNEL_DEVICE, method=method)
        for m in _ms(table["zipper_high"][method]):
            for x_dtype in (torch.float32, torch.float16):
                x = torch.randn(m, k).to(x_dtype).to(KERNEL_DEVICE)
                out = torch.zeros(m, n).to(KERNEL_DEVICE)
                zipper_high.zipper_high_gpu(x, high, out, check_finite=False)
    # dense: the w4a16 table's kernels accumulating into float32 (K = 256 takes tma buckets, 200
    # their no_tma configs) and the 16-bit smoothing
    for kd in (200, 256):
        high = ZipperHighGPU.from_codes(q_high[:, :kd] if kd <= k else np.tile(q_high, 2)[:, :kd], scale,
                                        KERNEL_DEVICE, method="dense")
        inv = torch.rand(kd).to(KERNEL_DEVICE) + 0.5
        for m in _ms(table["w4a16"]["per_channel"]):
            for x_dtype in (torch.float32, torch.float16):
                x = torch.randn(m, kd).to(x_dtype).to(KERNEL_DEVICE)
                out = torch.zeros(m, n).to(KERNEL_DEVICE)
                zipper_high.zipper_high_gpu(zipper_high._dense_acts(x, inv), high, out, check_finite=False)
    # the whole dense layer at every M of the W4A4 table: where its bucket names gemv, the fused
    # GEMV with both code planes (per token and in groups; words, and bytes at K = 196)
    for kd in (256, 196):
        low = DenseInt4.from_codes(rng.integers(-8, 8, (n, kd)).astype(np.int8), scale, device=KERNEL_DEVICE)
        high = ZipperHighGPU.from_codes(np.tile(q_high, 2)[:, :kd], scale, KERNEL_DEVICE, method="dense")
        inv = torch.rand(kd).to(KERNEL_DEVICE) + 0.5
        for scales, group in (("per_token", None), ("group", 32)):
            for m in _ms(table["w4a4"][scales]):
                x = torch.randn(m, kd).half().to(KERNEL_DEVICE)
                zipper_high.zipper_gpu_linear(x, low, high, inv, group)


DRIVERS = {"w4a4+w4a16": _drive_w4a4, "mosaic": _drive_mosaic, "actquant": _drive_actquant,
           "zipper_high": _drive_zipper}


@pytest.mark.parametrize("table_name", TABLES)
def test_every_table_launch_compiles_for_sm90(table_name, launches, monkeypatch):
    """The launchers pick every config from `table_name` (its buckets by M, fitted to the operands
    as on that GPU) and every kernel of every family is reached and compiles."""
    table = json.loads((configs.CONFIG_DIR / table_name).read_text())
    for mod in (configs,) + MODULES:
        if hasattr(mod, "table_for"):
            monkeypatch.setattr(mod, "table_for", lambda device, _t=table: _t)
    jobs, seen, reached = [], set(), {}
    for family, drive in DRIVERS.items():
        start = len(launches)
        drive(table)
        reached[family] = len(launches) - start
        for module, kernel, args, kwargs in launches[start:]:
            sig, constexprs, options = _signature(kernel, args, kwargs)
            job = {"module": module, "kernel": kernel.fn.__name__, "signature": sig, "constexprs": constexprs,
                   "options": options}
            key = json.dumps(job, sort_keys=True)
            if key not in seen:
                seen.add(key)
                jobs.append(job)
    assert all(reached.values()), reached  # every driver reached its kernels
    done = compile_sm90(jobs)
    assert len(done) == len(jobs)
    every_kernel = {f"{mod.__name__}.{name}" for mod in MODULES for name in dir(mod)
                    if name.endswith("_kernel") and _is_kernel(getattr(mod, name))}
    assert every_kernel <= set(done), sorted(every_kernel - set(done))  # no kernel of a family left out
