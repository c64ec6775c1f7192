"""What the pipeline reads from the source checkout's `perf/` folder, which is not part of the
installed package: the model dimensions (`perf/shapes.py`, the one place they are defined) and
the peer kernels' operand makers (`perf/bench_baselines.py`, the functions the benchmarks time and
tests/test_perf_fp8.py checks). Reading them, rather than keeping copies, keeps the model the
pipeline builds and the peers it times the same as the benchmarks'.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PERF_DIR = Path(__file__).resolve().parents[2] / "perf"


def perf_module(name, needed_for):
    """`perf/<name>.py` imported once (under a private module name, so it never shadows another
    `shapes` on sys.path); ValueError naming `needed_for` when the checkout lacks it."""
    key = f"zqkernels.pipeline._perf_{name}"
    if key in sys.modules:
        return sys.modules[key]
    path = PERF_DIR / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"{needed_for} reads perf/{name}.py of the source checkout, which is not at {path} "
                         "(install the package from a checkout: pip install -e .)")
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # before executing it: its dataclasses look their module up there
    # perf/'s modules import their siblings (`timing`) by plain name, as perf/conftest.py arranges
    added = str(PERF_DIR) not in sys.path
    if added:
        sys.path.insert(0, str(PERF_DIR))
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        del sys.modules[key]
        raise ValueError(f"{needed_for} reads perf/{name}.py, whose import failed: {exc} "
                         "(pip install 'zqkernels[perf]')") from exc
    except BaseException:
        del sys.modules[key]
        raise
    finally:
        if added:
            sys.path.remove(str(PERF_DIR))
    return module
