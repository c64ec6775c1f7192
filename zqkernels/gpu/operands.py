"""The one place that checks tensors handed to a Triton kernel.

Every entry point of `zqkernels.gpu` validates its operands here before launching: a kernel given
the wrong dtype, shape, device or layout reads garbage silently, so each check raises ValueError
naming the argument and what it got. Kernels run on a CUDA device, or on the CPU under Triton's
interpreter (TRITON_INTERPRET=1).
"""
import torch

from zqkernels.gpu.configs import interpreting

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLOAT_ACT_DTYPES = (torch.float16, torch.bfloat16)


def _describe(t):
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {tuple(t.shape)}"
    return type(t).__name__


def check_kernel_device(name, t):
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"{name} is on {t.device}; the Triton kernel needs CUDA (or TRITON_INTERPRET=1)")


def check_same_device(name, t, device, other="the packed operands"):
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, {other} on {device}")


def check_packed(name, t, *, allow_empty_rows=False):
    """uint8 [rows, K/2] two int4 codes per byte, contiguous, on a kernel device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8:
        raise ValueError(f"{name} must be uint8 (two int4 codes per byte), got {t.dtype}")
    if t.dim() != 2 or (t.shape[0] == 0 and not allow_empty_rows) or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D packed tensor, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    check_kernel_device(name, t)


def check_int8_codes(name, t, k=None):
    """int8 [rows, K] one signed 4-bit code per byte (K = k when given), contiguous, on a kernel device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int8:
        raise ValueError(f"{name} must be int8 (one code per byte), got {t.dtype}")
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D [M, K] tensor of codes, got shape {tuple(t.shape)}")
    if k is not None and t.shape[1] != k:
        raise ValueError(f"{name} must be [M, {k}] (one code per byte), got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    check_kernel_device(name, t)


def check_float_acts(name, x, k=None, *, dtypes=FLOAT_ACT_DTYPES, allow_empty_rows=False):
    """Float activations [M, K] (K = k when given), rows contiguous, on a kernel device."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        wanted = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise ValueError(f"{name} dtype must be {wanted}, got {x.dtype}")
    if x.dim() != 2 or (x.shape[0] == 0 and not allow_empty_rows) or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D [M, K] tensor, got shape {tuple(x.shape)}")
    if k is not None and x.shape[1] != k:
        raise ValueError(f"{name} must be [M, {k}], got {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    check_kernel_device(name, x)


def check_scale(name, t, shape, device):
    """float32 scales of exactly `shape`, contiguous, on `device`."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
        raise ValueError(f"{name} must be a float32 tensor, got {_describe(t)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    check_same_device(name, t, device)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def refuse_non_finite(**tensors):
    """Raise ValueError naming the first of `tensors` (None skipped) that holds NaN or Inf.

    One host synchronization for all of them; skipped while a CUDA graph is being captured (no
    sync is allowed there). The entry points call it unless `check_finite=False`: the layers pass
    False on the per-token path, where a NaN then propagates to the output as it does through
    `torch.nn.Linear`, never as a finite wrong number."""
    items = [(name, t) for name, t in tensors.items() if t is not None]
    if not items:
        return
    if items[0][1].device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    flags = torch.stack([torch.isfinite(t).all() for _, t in items]).cpu().tolist()
    for (name, _), ok in zip(items, flags):
        if not ok:
            raise ValueError(f"{name} holds NaN or Inf")


def check_out_dtype(out_dtype):
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")


def check_out(out, shape, dtype, device, name="out"):
    """A caller's preallocated result (tests poison it), or a new one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(out, torch.Tensor) or out.dtype != dtype or tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must be a {dtype} tensor of shape {tuple(shape)}, got {_describe(out)}")
    if out.device != device or not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous on {device}")
    return out


def check_float_x_packed_w(x, qw_packed):
    """Float activations x [M, K] (already checked) against packed weights [N, K/2]: K even, the
    weights packed on x's device, the same K. Returns (M, N, K)."""
    if x.shape[1] % 2 != 0:
        raise ValueError(f"x: K must be even (int4 weights pack two codes per byte), got K={x.shape[1]}")
    check_packed("qw_packed", qw_packed)
    check_same_device("qw_packed", qw_packed, x.device, "x")
    M, K = x.shape
    N, KH = qw_packed.shape
    if 2 * KH != K:
        raise ValueError(f"qw_packed has K/2={KH} (K={2 * KH}), x has K={K}")
    return M, N, K

