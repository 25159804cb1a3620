"""Loading of the compiled extension (``kernels/_C*.so``, built by ``python -m kernels.build``).

Importing never fails: without CUDA or without a build, :func:`extension` returns ``None`` and
:func:`unavailable_reason` says why, so ``kernels`` imports on CPU-only machines (CI) and
``kernels.dispatch.supports`` answers False there.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from types import ModuleType


@lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str]:
    import torch

    if not torch.cuda.is_available():
        return None, "CUDA is not available"
    try:
        module = importlib.import_module("kernels._C")
    except (ImportError, OSError) as exc:  # not built here, or built against another torch/CUDA
        return None, f"extension not built or not loadable ({exc}); run `python -m kernels.build`"
    return module, ""


def extension() -> ModuleType | None:
    return _load()[0]


def available() -> bool:
    return extension() is not None


def unavailable_reason() -> str:
    return _load()[1]
