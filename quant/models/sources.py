"""Package-provided model sources: model IDs whose files ship with an installed package or the repo.

A source is a zero-argument callable returning the folder of an HF-format model (a folder with
``config.json``) or ``None`` when it is not available on this machine (package not installed, files
missing). Registrations live next to what they locate, e.g.::

    register_source("sentence-transformers/all-MiniLM-L6-v2", _locate_minilm_package)

The model store (:mod:`quant.models.store`) consults these after the local store folder and the HF cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

Locator = Callable[[], "Path | None"]

_SOURCES: dict[str, tuple[str, Locator]] = {}  # normalized id -> (id as registered, locator)


def normalize_id(model_id: str) -> str:
    """Canonical key of a model ID: ``org--name`` folder spelling and ``org/name`` are the same model."""
    return model_id.strip().replace("--", "/").lower()


def register_source(model_id: str, locate: Locator, replace: bool = False) -> None:
    """Register ``locate`` as a way to find ``model_id`` offline."""
    key = normalize_id(model_id)
    if key in _SOURCES and not replace and _SOURCES[key][1] is not locate:
        raise ValueError(f"a source for {model_id!r} is already registered")
    _SOURCES[key] = (model_id, locate)


def unregister_source(model_id: str) -> None:
    _SOURCES.pop(normalize_id(model_id), None)


def registered_sources() -> list[str]:
    """Model IDs with a registered source, as they were registered."""
    return sorted(model_id for model_id, _ in _SOURCES.values())


def locate_source(model_id: str) -> Path | None:
    """The folder a registered source provides for ``model_id`` (with a ``config.json``), else None."""
    entry = _SOURCES.get(normalize_id(model_id))
    if entry is None:
        return None
    locate = entry[1]
    try:
        found = locate()
    except (ImportError, OSError):
        return None
    if found is None:
        return None
    path = Path(found)
    return path if (path / "config.json").is_file() else None
