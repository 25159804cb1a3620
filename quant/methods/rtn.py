"""Round-to-nearest: every block linear gets RTN weights (with per-group clip search) and per-token
dynamic activation fake-quant; no calibration data is needed (it is accepted and ignored, except when
the recipe asks for GPTQ weight rounding, which needs it)."""

from __future__ import annotations

import time

import torch
from torch import nn

from quant.calibration.data import CalibrationData
from quant.methods.base import MethodReport, ProgressCallback, QuantizationMethod, no_progress, register_method, sub_progress
from quant.methods.common import block_linear_names, finalize, quantize_linears
from quant.models.adapters import get_adapter
from quant.modules.linear import QuantLinear
from quant.recipes.schema import Recipe


@torch.no_grad()
def weight_error(original: torch.Tensor, layer: QuantLinear) -> float:
    """Relative Frobenius error of the dequantized weight against the float weight it replaced."""
    w = original.detach().float()
    wq = layer.dequantized_weight(torch.float32).to(w.device)
    return float((wq - w).norm() / w.norm().clamp(min=1e-12))


def report_layers(report: MethodReport, layers: dict[str, QuantLinear]) -> None:
    """Per-layer stats the rounder left on each layer (``quant_stats``), plus summary statistics."""
    for name, layer in layers.items():
        report.add(name, **(getattr(layer, "quant_stats", None) or {}))
    errs = [l.metrics["weight_rel_err"] for l in report.layers if "weight_rel_err" in l.metrics]
    if errs:
        report.summary["weight_rel_err_mean"] = sum(errs) / len(errs)
        report.summary["weight_rel_err_max"] = max(errs)
    report.summary["quantized_layers"] = float(len(layers))


@register_method
class RTNMethod(QuantizationMethod):
    name = "rtn"
    needs_calibration = False

    def calibrate(
        self,
        model: nn.Module,
        calibration: CalibrationData,
        recipe: Recipe,
        progress: ProgressCallback = no_progress,
    ) -> nn.Module:
        start = time.perf_counter()
        adapter = get_adapter(model)
        progress(0.0, "rtn: quantizing linears")
        report = MethodReport(method=self.name)
        if recipe.weight.enabled and recipe.weight.algorithm == "gptq":
            # GPTQ rounding is block-sequential; the rounder reports its own per-layer stats
            layers = quantize_linears(
                model, adapter, recipe, calibration=calibration, progress=sub_progress(progress, 0.0, 0.95)
            )
            report_layers(report, layers)
        else:
            layers = {}
            names = block_linear_names(adapter)
            for i, name in enumerate(names):
                original = model.get_submodule(name)
                done = quantize_linears(model, adapter, recipe, names=[name])
                if isinstance(original, nn.Linear) and name in done:
                    done[name].quant_stats = {"weight_rel_err": weight_error(original.weight, done[name])}
                layers.update(done)
                progress(0.95 * (i + 1) / max(1, len(names)), f"rtn: quantized {name}")
            report_layers(report, layers)
        finalize(model, adapter, recipe)
        report.calibration_seconds = time.perf_counter() - start
        model.quant_report = report
        progress(1.0, f"rtn: {len(layers)} linears quantized")
        return model
