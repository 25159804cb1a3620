"""Package-provided model sources: model IDs whose files ship with an installed package or the repo.

A source is a zero-argument callable returning the folder of an HF-format model (a folder with
``config.json``) or ``None`` when it is not available on this machine (package not installed, files
missing). Registrations live next to what they locate, e.g.::

    register_source("sentence-transformers/all-MiniLM-L6-v2", _locate_minilm_package)

The model store (:mod:`quant.models.store`) consults these after the local store folder and the HF cache.
Concrete registrations live in :data:`REGISTRATION_MODULE` (imported lazily on the first lookup, when it
exists) or in any module imported before the lookup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

Locator = Callable[[], "Path | None"]

_SOURCES: dict[str, tuple[str, Locator]] = {}  # normalized id -> (id as registered, locator)

#: the module holding the project's own registrations (packaged models, models trained in the repo)
REGISTRATION_MODULE = "quant.models.known_sources"


def _load_registrations() -> None:
    import importlib

    try:
        importlib.import_module(REGISTRATION_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != REGISTRATION_MODULE:
            raise


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
    _load_registrations()
    return sorted(model_id for model_id, _ in _SOURCES.values())


def locate_source(model_id: str) -> Path | None:
    """The folder a registered source provides for ``model_id`` (with a ``config.json``), else None."""
    _load_registrations()
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
