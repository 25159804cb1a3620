"""Registry of the qaas module types that can appear inside a quantized model.

A quantized model is a stock HF architecture in which some submodules were replaced (``QuantLinear``
for ``nn.Linear``) or added (a KV-cache quantizer on each attention module, a norm-with-bias, ...).
To save and restore such a model without re-calibrating, every such module type is registered here
under a stable key and implements ``config() -> dict`` (JSON-serialisable structure) and
``from_config(cfg)`` (an empty module of that structure; tensors come from the state dict).

``record_modules(model)`` describes a model's qaas modules as ``{name: {"type": key, "config": cfg}}``;
``install_modules(base_model, layout)`` rebuilds them in a freshly constructed base model, after which
``load_state_dict(strict=True)`` restores every tensor. A type may declare a ``post_install`` hook
(e.g. the KV quantizer switches the model's attention implementation).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from quant.modules.linear import QuantLinear, set_module

PostInstall = Callable[[nn.Module, str, nn.Module], None]


@dataclass(frozen=True)
class ModuleType:
    key: str
    cls: type[nn.Module]
    post_install: PostInstall | None = None


_TYPES: dict[str, ModuleType] = {}

# modules that register qaas module types on import; consulted when a layout names an unknown key
_BUILTIN_PROVIDERS: tuple[str, ...] = ("quant.modules.kv_cache", "quant.modules.norms")


def register_module_type(key: str, post_install: PostInstall | None = None) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator registering a module type under ``key``."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        for attr in ("config", "from_config"):
            if not callable(getattr(cls, attr, None)):
                raise TypeError(f"{cls.__name__} must implement {attr}() to be a registered qaas module")
        existing = _TYPES.get(key)
        if existing is not None and existing.cls is not cls:
            if existing.cls.__qualname__ != cls.__qualname__ or existing.cls.__module__ != cls.__module__:
                raise ValueError(f"qaas module type {key!r} registered twice")
        _TYPES[key] = ModuleType(key=key, cls=cls, post_install=post_install)
        return cls

    return deco


register_module_type("quant_linear")(QuantLinear)


def registered_module_types() -> list[str]:
    _import_providers()
    return sorted(_TYPES)


def _import_providers(extra: tuple[str, ...] = ()) -> None:
    for mod in (*_BUILTIN_PROVIDERS, *extra):
        if mod.startswith("quant."):
            importlib.import_module(mod)


def get_module_type(key: str, provider: str | None = None) -> ModuleType:
    if key not in _TYPES:
        _import_providers((provider,) if provider else ())
    if key not in _TYPES:
        import quant.methods  # noqa: F401  (methods import the module types they install)
    try:
        return _TYPES[key]
    except KeyError:
        raise KeyError(f"unknown qaas module type {key!r}; known: {sorted(_TYPES)}") from None


def module_type_of(module: nn.Module) -> ModuleType | None:
    for entry in _TYPES.values():
        if type(module) is entry.cls:
            return entry
    return None


def record_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{name: {"type", "config", "provider"}}`` for the outermost qaas modules of ``model``.

    Nested qaas modules are rebuilt by their parent's ``from_config`` and are not listed.
    """
    _import_providers()
    layout: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        entry = module_type_of(module)
        if entry is None or not name:
            continue
        if any(name.startswith(parent + ".") for parent in layout):
            continue
        layout[name] = {"type": entry.key, "config": module.config(), "provider": entry.cls.__module__}
    return layout


def _placement(model: nn.Module, name: str) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the module currently at ``name`` (or of its parent / the model)."""
    candidates = [name, name.rpartition(".")[0], ""]
    for cand in candidates:
        try:
            mod = model.get_submodule(cand) if cand else model
        except AttributeError:
            continue
        for t in list(mod.parameters()) + list(mod.buffers()):
            if t.is_floating_point():
                return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def install_modules(model: nn.Module, layout: dict[str, dict[str, Any]]) -> dict[str, nn.Module]:
    """Rebuild the qaas modules of ``layout`` inside ``model`` (parents before children); returns them."""
    installed: dict[str, nn.Module] = {}
    for name in sorted(layout, key=lambda n: n.count(".")):
        spec = layout[name]
        entry = get_module_type(spec["type"], spec.get("provider"))
        device, dtype = _placement(model, name)
        module = entry.cls.from_config(spec["config"]).to(device=device, dtype=dtype)
        set_module(model, name, module)
        installed[name] = module
    for name, module in installed.items():
        entry = get_module_type(layout[name]["type"])
        if entry.post_install is not None:
            entry.post_install(model, name, module)
    return installed
