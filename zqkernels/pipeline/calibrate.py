"""Calibration through forward pre-hooks on every decoder linear.

Per linear input channel k: the activation absmax `a_k = max_m |x[m,k]|` (SmoothQuant's
statistic) and the Hessian diagonal `h_k = mean_m x[m,k]**2` (MosaicQuant's block score), over
all calibration tokens; plus a fixed sample of input rows kept for the per-layer output error.
Linears that read the same input (q/k/v, gate/up) see the same statistics.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .model import decoder_linears, shared_input_groups


@dataclass
class InputStats:
    absmax: np.ndarray  # float64 [K]
    sumsq: np.ndarray  # float64 [K]
    count: int = 0
    samples: list = field(default_factory=list)  # float32 tensors [m_i, K] on the CPU
    n_sampled: int = 0

    @property
    def hdiag(self):
        return self.sumsq / max(1, self.count)

    def sample_rows(self):
        return torch.cat(self.samples, dim=0) if self.samples else torch.zeros(0, self.absmax.size)


def calibrate(lm, windows, sample_rows_per_window=32, max_sample_rows=256, progress=True):
    """Run `windows` [W, T] through the model and return {linear name: InputStats}."""
    from tqdm.auto import tqdm

    linears = decoder_linears(lm)
    stats = {}
    handles = []
    rng = np.random.default_rng(0)

    def make_hook(name, k):
        st = stats[name] = InputStats(np.zeros(k), np.zeros(k))

        def hook(_module, inputs):
            x = inputs[0].detach().reshape(-1, k).to(torch.float32)
            st.absmax = np.maximum(st.absmax, x.abs().amax(dim=0).double().cpu().numpy())
            st.sumsq += (x * x).sum(dim=0).double().cpu().numpy()
            st.count += x.shape[0]
            take = min(sample_rows_per_window, max_sample_rows - st.n_sampled, x.shape[0])
            if take > 0:
                rows = torch.from_numpy(np.sort(rng.choice(x.shape[0], size=take, replace=False)))
                st.samples.append(x[rows.to(x.device)].to("cpu", torch.float32))
                st.n_sampled += take

        return hook

    # One hook per shared input (q/k/v read one tensor, gate/up another): the group shares one InputStats.
    by_name = {n: m for n, m, *_ in linears}
    groups = shared_input_groups(lm)
    try:
        for group in groups:
            mod = by_name[group[0]]
            handles.append(mod.register_forward_pre_hook(make_hook(group[0], mod.in_features)))
        device = next(lm.parameters()).device
        with torch.no_grad():
            for w in tqdm(windows, desc="calibrate", unit="window", disable=not progress):
                lm(w[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for group in groups:
        for name in group[1:]:
            stats[name] = stats[group[0]]
    return stats
