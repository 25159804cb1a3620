"""The repository's ``kernels`` package shares its import name with Hugging Face's ``kernels`` distribution, which
transformers 5.x requires; scripts/install.sh removes that distribution so that transformers, finding only ours
under the name (version 0.1.0), keeps its optional hub-kernels integration off instead of importing ours as theirs."""

from __future__ import annotations

import importlib
from pathlib import Path

import kernels


def test_transformers_does_not_take_this_kernels_package_for_hugging_faces() -> None:
    from transformers.utils import import_utils

    assert (Path(kernels.__file__).parent / "csrc").is_dir()  # ours, not theirs
    assert not import_utils.is_kernels_available()
    activations = importlib.import_module("transformers.activations")  # imports the hub-kernels integration
    assert hasattr(activations, "ACT2FN")
