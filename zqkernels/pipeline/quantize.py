"""Quantize every decoder linear of a LLaMA / Qwen model in place with one method.

Methods (DESIGN §1-3) and the layers that implement them (`zqkernels.nn`):
- fp16: the float model, untouched (the reference perplexity);
- w4a16: RTN 4-bit weights, 16-bit activations (`W4A16Linear`);
- rtn-w4a4: RTN 4-bit weights and activations (`W4A4Linear`);
- smoothquant-w4a4: the same after SmoothQuant smoothing with `alpha` (`W4A4Linear(smooth=s)`);
- zipper: ZipperQuant (`ZipperLinear`: smoothing `alpha`, `outlier_ratio`, `high_bits`; or with
  `channel_fraction` the channel-structured grid, its high part in those input channels only);
- mosaic: MosaicQuant (`MosaicLinear`: `density`, `block`, optional smoothing `alpha`);
- hadamard-w4a4: block-Hadamard rotated RTN (`zqkernels.rotation.HadamardW4A4Linear`);
- act-floor: float weights with the smoothing `alpha` (and the rotation, `rotate=True`) of a method
  and its quantized activations (`zqkernels.rotation.FloatWeightLinear`): the activation floor.
`weight_bits` (rtn-w4a4, smoothquant-w4a4, hadamard-w4a4) widens RTN to 5-8 bits
(`zqkernels.rotation.RTNLinear`) and `group_size` gives it finer weight groups, the equal-bits
neighbours of ZipperQuant and MosaicQuant.
`act_bits` (4, 8 or None = 16) and `act_group_size` choose the activation format of every
quantized method, which is how the W4A16 / W4A8 / W4A4 ablation is run.
Linears that read one input (q/k/v, gate/up) share one smoothing vector, built from the shared
activation absmax and the column absmax over all of their weights (K numbers, on the host, by
`reference.smooth_scales`); each layer then quantizes its weight where the model is (on the GPU
for a CUDA model, `zqkernels.nn`), one progress-bar step per linear.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

import reference
from zqkernels import nn as zqnn
from zqkernels import rotation

from .model import decoder_linears, shared_input_groups

METHODS = ("fp16", "w4a16", "rtn-w4a4", "smoothquant-w4a4", "zipper", "mosaic", "hadamard-w4a4", "act-floor")
WIDE_METHODS = ("rtn-w4a4", "smoothquant-w4a4", "hadamard-w4a4")  # the methods that take weight_bits
# alpha=None means no smoothing. SmoothQuant's customary 0.5; ZipperQuant and MosaicQuant smooth
# harder (DESIGN §2.1): the activations' outliers move into W', where the high part (zipper) or the
# residual blocks (mosaic) absorb them. 0.75 measured best of 0.5-0.85 on the embedded model.
# hadamard-w4a4: smoothing with 0.5 before the rotation beat none (perplexity 35.5 against 115 on
# the validation text: reports/results/cpu-2core/heldout/sweep_validation.json).
DEFAULT_ALPHA = {"smoothquant-w4a4": 0.5, "zipper": 0.75, "mosaic": 0.75, "act-floor": 0.75, "hadamard-w4a4": 0.5}


@dataclass
class MethodConfig:
    method: str
    alpha: float | None = -1.0  # -1: the method's default (DEFAULT_ALPHA)
    outlier_ratio: float = 0.01
    high_bits: int = 4
    group_size: int | None = None  # weight scale groups (None: per output channel)
    act_bits: int | None = 4  # None: 16-bit activations
    act_group_size: int | None = None  # None: one activation scale per token
    density: float = 0.05
    block: tuple = (64, 64)
    weight_bits: int = 4  # rtn-w4a4, smoothquant-w4a4, hadamard-w4a4
    rotate: bool = False  # act-floor: rotate input and weight as hadamard-w4a4 does
    channel_fraction: float | None = None  # zipper: the high part in this fraction of input channels only
    channel_score: str = "absmax"  # zipper with channel_fraction: "absmax" or "hessian" (DESIGN §2.7)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.alpha == -1.0:
            self.alpha = DEFAULT_ALPHA.get(self.method)
        if self.method == "w4a16":
            self.act_bits = None
        if self.alpha is not None and not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
        if not 0.0 <= float(self.outlier_ratio) <= 1.0:
            raise ValueError(f"outlier_ratio must lie in [0, 1], got {self.outlier_ratio}")
        if not 0.0 <= float(self.density) <= 1.0:
            raise ValueError(f"density must lie in [0, 1], got {self.density}")
        self.block = tuple(int(b) for b in self.block)
        if self.weight_bits != 4 and self.method not in WIDE_METHODS:
            raise ValueError(f"weight_bits applies to {', '.join(WIDE_METHODS)} only, not {self.method!r}")
        rotation._check_weight_bits(self.weight_bits)
        if self.channel_fraction is not None:
            if self.method != "zipper":
                raise ValueError(f"channel_fraction applies to zipper only, not {self.method!r}")
            if not 0.0 <= float(self.channel_fraction) <= 1.0:
                raise ValueError(f"channel_fraction must lie in [0, 1], got {self.channel_fraction}")
        if self.channel_score not in reference.OUTLIER_CHANNEL_SCORES:
            raise ValueError(f"channel_score must be one of {reference.OUTLIER_CHANNEL_SCORES}, got {self.channel_score!r}")
        if self.rotate and self.method != "act-floor":
            raise ValueError(f"rotate applies to act-floor only (hadamard-w4a4 always rotates), not {self.method!r}")

    @property
    def label(self):
        """Short name with the formats, e.g. zipper-w4a4-g32."""
        if self.method == "fp16":
            return "fp16"
        a = "a16" if self.act_bits is None else f"a{self.act_bits}"
        if self.method == "w4a16":
            base = self.method
        elif self.method == "act-floor":
            smooth = "nosmooth" if self.alpha is None else f"alpha{self.alpha:g}"
            base = f"floor-{smooth}" + ("-had" if self.rotate else "") + f"-w16{a}"
        else:
            base = self.method.replace("-w4a4", "") + f"-w{self.weight_bits}{a}"
        if self.channel_fraction is not None:
            base += f"-ch{self.channel_fraction:g}" + ("-hess" if self.channel_score == "hessian" else "")
        if self.method in WIDE_METHODS and self.group_size:
            base += f"-wg{self.group_size}"
        return base + (f"-g{self.act_group_size}" if self.act_group_size and self.act_bits else "")

    def params(self):
        """The parameters that matter for this method (what a record stores)."""
        p = asdict(self)
        keep = {"method", "act_bits", "act_group_size", "group_size"}
        if self.method in ("smoothquant-w4a4", "zipper", "mosaic", "hadamard-w4a4", "act-floor"):
            keep.add("alpha")
        if self.method in WIDE_METHODS:
            keep.add("weight_bits")
        if self.method == "act-floor":
            keep.add("rotate")
            keep.discard("group_size")
        if self.method == "zipper":
            keep |= {"outlier_ratio", "high_bits"}
            if self.channel_fraction is not None:  # the channel-structured grid ignores outlier_ratio
                keep = (keep - {"outlier_ratio"}) | {"channel_fraction", "channel_score"}
        if self.method == "mosaic":
            keep |= {"density", "block"}
        if self.method == "zipper":
            keep.discard("group_size")
        if self.method == "fp16":
            keep = {"method"}
        out = {k: v for k, v in p.items() if k in keep}
        if "block" in out:
            out["block"] = list(out["block"])
        return out

    def check_backend(self, backend):
        """Refuse, before any model loads, a method the backend lacks or an option its kernels cannot run."""
        if self.method != "fp16":
            zqnn.check_method_backend(self.method, backend, self.act_bits, act_group_size=self.act_group_size,
                                      group_size=self.group_size, block=getattr(self, "block", None))
        if self.method in ("rtn-w4a4", "smoothquant-w4a4") and self.weight_bits != 4 and backend not in ("torch", "reference"):
            raise ValueError(f"method {self.method!r} with weight_bits={self.weight_bits} runs on the torch and "
                             f"reference backends only, not {backend!r}")


def _group_smoothing(linears, stats, groups, alpha):
    """{linear name: s} with one s per shared-input group."""
    by_name = {n: m for n, m, *_ in linears}
    out = {}
    for group in groups:
        w_absmax = np.max([by_name[n].weight.detach().abs().amax(dim=0).double().cpu().numpy() for n in group], axis=0)
        s = reference.smooth_scales(stats[group[0]].absmax, w_absmax, alpha=alpha)
        for n in group:
            out[n] = s
    return out


def build_layer(cfg, linear, input_stats, smooth, backend):
    common = dict(act_bits=cfg.act_bits, act_group_size=cfg.act_group_size, backend=backend)
    if cfg.method == "w4a16":
        return zqnn.W4A16Linear(linear, group_size=cfg.group_size, backend=backend)
    if cfg.method in ("rtn-w4a4", "smoothquant-w4a4") and cfg.weight_bits != 4:
        return rotation.RTNLinear(linear, smooth=smooth, weight_bits=cfg.weight_bits, group_size=cfg.group_size,
                                  **common)
    if cfg.method in ("rtn-w4a4", "smoothquant-w4a4"):
        return zqnn.W4A4Linear(linear, smooth=smooth, group_size=cfg.group_size, **common)
    if cfg.method == "hadamard-w4a4":
        return rotation.HadamardW4A4Linear(linear, smooth=smooth, weight_bits=cfg.weight_bits,
                                           group_size=cfg.group_size, **common)
    if cfg.method == "act-floor":
        block = reference.hadamard_block_size(linear.in_features) if cfg.rotate else None
        return rotation.FloatWeightLinear(linear, smooth=smooth, rotation_block=block, **common)
    if cfg.method == "zipper":
        return zqnn.ZipperLinear(linear, smooth=smooth, outlier_ratio=cfg.outlier_ratio, high_bits=cfg.high_bits,
                                 channel_fraction=cfg.channel_fraction, channel_score=cfg.channel_score,
                                 hdiag=input_stats.hdiag if cfg.channel_score == "hessian" else None, **common)
    if cfg.method == "mosaic":
        return zqnn.MosaicLinear(linear, hdiag=input_stats.hdiag, smooth=smooth, density=cfg.density,
                                 block=cfg.block, group_size=cfg.group_size, **common)
    raise ValueError(f"no layer for method {cfg.method!r}")


def relative_output_error(float_linear, quant_linear, x):
    """||Q(x) - F(x)||_F / ||F(x)||_F on the calibration rows x (float32 on the layer's device)."""
    if x.numel() == 0:
        return float("nan")
    dev = float_linear.weight.device
    with torch.no_grad():
        ref = float_linear(x.to(dev, float_linear.weight.dtype)).double()
        q = quant_linear(x.to(dev, float_linear.weight.dtype)).double()
    denom = ref.norm().item()
    return (q - ref).norm().item() / denom if denom > 0 else float("nan")


def quantize_model(lm, stats, cfg, backend="torch", progress=True):
    """Replace every decoder linear of `lm` in place; return one record per layer
    (name, shape, effective bits, table statistics, relative output error on calibration rows)."""
    from tqdm.auto import tqdm

    cfg.check_backend(backend)
    linears = decoder_linears(lm)
    if cfg.method == "fp16":
        return [{"name": n, "N": m.out_features, "K": m.in_features, "effective_bits": {"total": 16.0},
                 "rel_error": 0.0} for n, m, *_ in linears]
    smoothing = {}
    if cfg.method in ("smoothquant-w4a4", "zipper", "mosaic", "hadamard-w4a4", "act-floor") and cfg.alpha is not None:
        smoothing = _group_smoothing(linears, stats, shared_input_groups(lm), cfg.alpha)
    records = []
    for name, mod, parent, attr in tqdm(linears, desc=f"quantize {cfg.label}", unit="linear", disable=not progress):
        q = build_layer(cfg, mod, stats[name], smoothing.get(name), backend)
        rec = {"name": name, "N": mod.out_features, "K": mod.in_features}
        rec.update(q.stats)
        rec["rel_error"] = relative_output_error(mod, q, stats[name].sample_rows())
        records.append(rec)
        setattr(parent, attr, q)
    return records


def summarize_layers(records):
    """Model-level numbers: effective bits weighted by N*K, mean/max output error, table totals."""
    nk = np.array([r["N"] * r["K"] for r in records], dtype=np.float64)
    bits = np.array([r["effective_bits"]["total"] for r in records])
    err = np.array([r["rel_error"] for r in records])
    out = {
        "effective_bits": float((bits * nk).sum() / nk.sum()),
        "rel_error_mean": float(np.nanmean(err)),
        "rel_error_max": float(np.nanmax(err)),
        "n_layers": len(records),
    }
    for part in ("low", "high", "index", "scale"):
        if all(part in r["effective_bits"] for r in records):
            out[f"bits_{part}"] = float((np.array([r["effective_bits"][part] for r in records]) * nk).sum() / nk.sum())
    if records and "lut_E" in records[0]:
        e = sum(r["lut_E"] for r in records)
        u = sum(r["lut_U"] for r in records)
        out.update(lut_E=e, lut_U=u, lut_reuse=e / u if u else 0.0,
                   high_density=float(sum(r["high_nonzeros"] for r in records) / nk.sum()))
    if records and "blocks_kept" in records[0]:
        out["density_used"] = sum(r["blocks_kept"] for r in records) / sum(r["blocks_total"] for r in records)
    return out
