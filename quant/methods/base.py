"""The one interface every quantization method implements, and the method registry.

A method turns a floating-point model into a quantized one::

    method = get_method(recipe.method.name)
    qmodel = method.calibrate(model, calibration, recipe, progress)

``calibrate`` may modify ``model`` in place and returns the quantized model: the same HF model
object with its linears replaced by :class:`quant.modules.QuantLinear` (and, for KV-cache
quantization, a KV quantizer attached to each attention module). The returned model's
``quant_report`` attribute (a :class:`MethodReport`) carries per-layer diagnostics such as QSUR.

Adding a method = adding one module under ``quant/methods/`` that defines a subclass of
:class:`QuantizationMethod` decorated with ``@register_method``, and importing it in
``quant/methods/__init__.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Protocol

import torch
from pydantic import BaseModel, Field
from torch import nn

from quant.calibration.data import CalibrationData
from quant.recipes.schema import Recipe


class ProgressCallback(Protocol):
    def __call__(self, fraction: float, message: str) -> None:  # fraction in [0, 1]
        ...


def no_progress(fraction: float, message: str) -> None:
    return None


class LayerReport(BaseModel):
    name: str
    metrics: dict[str, float] = Field(default_factory=dict)


class MethodReport(BaseModel):
    method: str
    calibration_seconds: float = 0.0
    layers: list[LayerReport] = Field(default_factory=list)
    summary: dict[str, float] = Field(default_factory=dict)

    def add(self, name: str, **metrics: float) -> None:
        self.layers.append(LayerReport(name=name, metrics={k: float(v) for k, v in metrics.items()}))


class QuantizationMethod(ABC):
    name: ClassVar[str]
    #: methods that need calibration data; RTN does not (it still accepts it)
    needs_calibration: ClassVar[bool] = True

    @abstractmethod
    def calibrate(
        self,
        model: nn.Module,
        calibration: CalibrationData,
        recipe: Recipe,
        progress: ProgressCallback = no_progress,
    ) -> nn.Module:
        """Quantize ``model`` according to ``recipe``; returns the quantized model."""


_REGISTRY: dict[str, type[QuantizationMethod]] = {}


def register_method(cls: type[QuantizationMethod]) -> type[QuantizationMethod]:
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> QuantizationMethod:
    import quant.methods  # noqa: F401  (registers the built-in methods)

    try:
        return _REGISTRY[name]()
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {sorted(_REGISTRY)}") from None


def registered_methods() -> list[str]:
    import quant.methods  # noqa: F401

    return sorted(_REGISTRY)


def sub_progress(progress: ProgressCallback, start: float, end: float) -> ProgressCallback:
    """A callback mapping [0, 1] onto [start, end] of ``progress``."""

    def inner(fraction: float, message: str) -> None:
        progress(start + (end - start) * min(max(fraction, 0.0), 1.0), message)

    return inner


