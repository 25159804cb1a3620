from quant.recipes.presets import get_preset, list_presets
from quant.recipes.schema import (
    ActivationQuantSpec,
    CalibrationSpec,
    EvaluationSpec,
    KVCacheQuantSpec,
    Recipe,
    WeightQuantSpec,
)

__all__ = [
    "ActivationQuantSpec",
    "CalibrationSpec",
    "EvaluationSpec",
    "KVCacheQuantSpec",
    "Recipe",
    "WeightQuantSpec",
    "get_preset",
    "list_presets",
]
