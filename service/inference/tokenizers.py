"""Tokenizer of a served artifact: saved next to the artifact, else the base model's in the model store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
BASE_MODEL_KEYS = ("base_model_id", "base_model", "model_id")


def base_model_id(manifest: Any) -> str | None:
    """The base model id of an artifact manifest (``ArtifactManifest`` or its JSON as a dict)."""
    data = manifest if isinstance(manifest, dict) else getattr(manifest, "__dict__", {})
    for key in BASE_MODEL_KEYS:
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: Path, manifest: Any, model_store: Path | None = None) -> Any:
    """The artifact folder's own tokenizer, else the base model's (model store folder or offline HF cache)."""
    from transformers import AutoTokenizer

    if has_tokenizer(folder):
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model_id = base_model_id(manifest)
    if model_id is None:
        raise FileNotFoundError(f"no tokenizer in {folder} and the manifest names no base model")
    from quant.models.store import ModelNotFound, resolve_model

    try:
        resolved = resolve_model(model_id, store=model_store)
    except ModelNotFound as exc:
        raise FileNotFoundError(f"no tokenizer in {folder} and base model {model_id!r} is not available") from exc
    if resolved.path is None or not has_tokenizer(resolved.path):
        raise FileNotFoundError(f"no tokenizer in {folder} nor with base model {model_id!r}")
    return AutoTokenizer.from_pretrained(str(resolved.path), local_files_only=True)
