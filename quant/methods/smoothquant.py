"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights with per-channel scales.

For each linear group with input ``X [.., C]`` and linears ``W_k [out_k, C]``::

    s_j = max|X_j| ** alpha / max_k max_i |W_k[i, j]| ** (1 - alpha)

(clamped to ``>= 1e-5``), then ``X' = X / s`` is folded into the producer of ``X`` (the norm for
``attn_in`` / ``mlp_in``; the producer linear for ``attn_out`` / ``mlp_out`` when its outputs map 1:1
onto the input channels) and ``W' = W * s`` into the group's linears, so the floating-point model is
unchanged. Groups whose producer cannot absorb a scale (nonlinear producer, grouped-query V, post-LN
norms feeding the residual) are left unsmoothed. ``max|X_j|`` comes from forward hooks over the
calibration data. The smoothed model is then quantized like RTN (or GPTQ weight rounding when the
recipe asks for it).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from quant.calibration.data import CalibrationData
from quant.calibration.stats import collect_group_stats, group_key
from quant.methods.base import MethodReport, ProgressCallback, QuantizationMethod, no_progress, register_method, sub_progress
from quant.methods.common import finalize, quantize_linears
from quant.methods.scaling import MIN_SCALE, migrate_group, migration_target, weight_absmax
from quant.models.adapters import get_adapter
from quant.recipes.schema import Recipe, SmoothQuantParams


def smoothing_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``max|X_j|^alpha / max|W_j|^(1 - alpha)``, clamped below at 1e-5 (statistics too)."""
    a = act_absmax.float().cpu().clamp(min=MIN_SCALE)
    w = w_absmax.float().cpu().clamp(min=MIN_SCALE)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=MIN_SCALE)


@torch.no_grad()
def smooth_model(
    model: nn.Module, calibration: CalibrationData, alpha: float, report: MethodReport | None = None,
    progress: ProgressCallback = no_progress,
) -> int:
    """Fold SmoothQuant scales into ``model`` (FP function unchanged); returns the groups smoothed."""
    adapter = get_adapter(model)
    blocks = adapter.iter_blocks()

    def smoothable(block, group) -> bool:  # noqa: ANN001
        return migration_target(adapter, block, group).can_scale

    stats = collect_group_stats(model, adapter, calibration, select=smoothable, progress=sub_progress(progress, 0.0, 0.8))
    done = 0
    for bi, block in enumerate(blocks):
        for group in block.groups:
            key = group_key(block, group)
            target = migration_target(adapter, block, group)
            if key not in stats or not target.can_scale:
                if report is not None:
                    report.add(key, smoothed=0.0)
                continue
            act = stats[key].absmax
            scale = smoothing_scales(act, weight_absmax(group), alpha)
            migrate_group(model, adapter, block, group, scale=scale)
            done += 1
            if report is not None:
                smoothed = act.cpu() / scale
                report.add(
                    key,
                    smoothed=1.0,
                    act_absmax_before=float(act.max()),
                    act_absmax_after=float(smoothed.max()),
                    act_channel_ratio_before=float(act.max() / act.clamp(min=MIN_SCALE).median()),
                    act_channel_ratio_after=float(smoothed.max() / smoothed.clamp(min=MIN_SCALE).median()),
                    scale_max=float(scale.max()),
                    scale_min=float(scale.min()),
                )
        progress(0.8 + 0.2 * (bi + 1) / max(1, len(blocks)), f"smoothquant: smoothed block {bi}")
    return done


@register_method
class SmoothQuantMethod(QuantizationMethod):
    name = "smoothquant"

    def calibrate(
        self,
        model: nn.Module,
        calibration: CalibrationData,
        recipe: Recipe,
        progress: ProgressCallback = no_progress,
    ) -> nn.Module:
        params = recipe.method
        if not isinstance(params, SmoothQuantParams):
            raise TypeError(f"smoothquant needs SmoothQuantParams, got {type(params).__name__}")
        start = time.perf_counter()
        report = MethodReport(method=self.name)
        progress(0.0, "smoothquant: collecting activation statistics")
        smoothed = smooth_model(model, calibration, params.alpha, report, sub_progress(progress, 0.0, 0.5))
        adapter = get_adapter(model)
        layers = quantize_linears(
            model, adapter, recipe, calibration=calibration, progress=sub_progress(progress, 0.5, 0.98)
        )
        finalize(model, adapter, recipe)
        report.summary.update(
            alpha=params.alpha, smoothed_groups=float(smoothed), quantized_layers=float(len(layers))
        )
        report.calibration_seconds = time.perf_counter() - start
        model.quant_report = report
        progress(1.0, f"smoothquant: {smoothed} groups smoothed, {len(layers)} linears quantized")
        return model
