"""GPTQ as a method: GPTQ-rounded weights (block-sequential over the calibration data), per-token
RTN activation fake-quant, optional KV-cache quantization. The recipe's weight algorithm is forced
to ``gptq`` (the ``gptq`` hyper-parameters live in ``recipe.weight.gptq``)."""

from __future__ import annotations

import time

from torch import nn

from quant.calibration.data import CalibrationData
from quant.methods.base import MethodReport, ProgressCallback, QuantizationMethod, no_progress, register_method, sub_progress
from quant.methods.common import finalize, quantize_linears
from quant.methods.rtn import report_layers
from quant.models.adapters import get_adapter
from quant.recipes.schema import Recipe


def with_gptq_weights(recipe: Recipe) -> Recipe:
    if recipe.weight.algorithm == "gptq":
        return recipe
    return recipe.model_copy(update={"weight": recipe.weight.model_copy(update={"algorithm": "gptq"})})


@register_method
class GPTQMethod(QuantizationMethod):
    name = "gptq"
    needs_calibration = True

    def calibrate(
        self,
        model: nn.Module,
        calibration: CalibrationData,
        recipe: Recipe,
        progress: ProgressCallback = no_progress,
    ) -> nn.Module:
        start = time.perf_counter()
        adapter = get_adapter(model)
        recipe = with_gptq_weights(recipe)
        progress(0.0, "gptq: capturing block inputs")
        layers = quantize_linears(
            model, adapter, recipe, calibration=calibration, progress=sub_progress(progress, 0.0, 0.95)
        )
        report = MethodReport(method=self.name)
        report_layers(report, layers)
        errs = [l.metrics["output_rel_err"] for l in report.layers if "output_rel_err" in l.metrics]
        if errs:
            report.summary["output_rel_err_mean"] = sum(errs) / len(errs)
        finalize(model, adapter, recipe)
        report.calibration_seconds = time.perf_counter() - start
        model.quant_report = report
        progress(1.0, f"gptq: {len(layers)} linears quantized")
        return model
