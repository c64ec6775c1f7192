"""transformers' RMSNorm modules swapped for one Triton launch each (`zqkernels.gpu.rmsnorm`).

`fuse_norms(lm)` replaces every RMSNorm of the classes in `FUSABLE` (LLaMA, Qwen2 / Qwen3 and
Mistral's, whose forward is `weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)`: Qwen3's per-head
q / k norms included) with `FusedRMSNorm`, which shares the module's weight. The speed harness
applies it to every method's model alike, fp16 included (`Settings.norms = "fused"`), so the
comparison between methods is unchanged in kind while the norms stop costing a pass over the
activations per elementwise op. Each replaced module is first run side by side with the new one on
a random input and must agree within the kernel's rounding bound (two ulps of the normalized
row, one of the product: `gpu.rmsnorm.rounding_bound`), else ValueError: a class whose forward has
changed is refused, not swapped silently. Models on a CPU are refused (the kernel needs CUDA, or
Triton's interpreter).
"""
from __future__ import annotations

import torch
from torch import nn

from zqkernels.gpu.configs import interpreting

FUSABLE = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")
NORMS = ("model", "fused")  # Settings.norms: transformers' own modules, or FusedRMSNorm


class FusedRMSNorm(nn.Module):
    """RMSNorm over the last dimension through `zqkernels.gpu.rmsnorm.rms_norm`, on a given weight."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = float(eps)

    def forward(self, x):
        from zqkernels.gpu.rmsnorm import rms_norm  # Triton is imported where a kernel runs

        return rms_norm(x, self.weight, self.variance_epsilon)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def _check_agrees(name, module, fused):
    """The module and its replacement on one random input, within the kernel's rounding bound."""
    from zqkernels.gpu.rmsnorm import rounding_bound

    w = module.weight
    gen = torch.Generator(device=w.device).manual_seed(0)
    x = torch.randn(8, w.shape[0], generator=gen, device=w.device).to(w.dtype) * 3
    with torch.no_grad():
        want, got = module(x), fused(x)
        ok = want.dtype == got.dtype and want.shape == got.shape and bool(
            ((got.double() - want.double()).abs() <= rounding_bound(x, w, want)).all())
    if not ok:
        raise ValueError(f"{name} ({type(module).__name__}): the fused RMSNorm does not reproduce this module's "
                         "forward within the kernel's rounding bound; not replaced")


def fuse_norms(lm) -> int:
    """Replace the model's RMSNorm modules in place (module docstring); returns how many the model
    then has (those replaced now and any fused before)."""
    targets = [(name, m) for name, m in lm.named_modules() if type(m).__name__ in FUSABLE]
    for name, m in targets:
        if m.weight.device.type != "cuda" and not interpreting():
            raise ValueError(f"fuse_norms: {name} is on {m.weight.device}; the fused RMSNorm needs a CUDA device "
                             "(or TRITON_INTERPRET=1)")
        eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
        if eps is None:
            raise ValueError(f"fuse_norms: {name} ({type(m).__name__}) has no variance_epsilon / eps")
        fused = FusedRMSNorm(m.weight, eps)
        _check_agrees(name, m, fused)
        parent_name, _, child = name.rpartition(".")
        setattr(lm.get_submodule(parent_name) if parent_name else lm, child, fused)
    return sum(isinstance(m, FusedRMSNorm) for m in lm.modules())
