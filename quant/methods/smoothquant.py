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

``alpha`` is either one value for every group or ``"auto"``: each group then takes the candidate of
``alpha_grid``, or no smoothing at all (``s = 1``, always a candidate), that minimises
:func:`quant.methods.scaling.quantized_output_error` on ``search_tokens`` calibration tokens sampled
uniformly from that group's input, i.e. the MSE between the FP outputs ``X W_k^T`` and
``Q(X / s) Q(W_k s)^T`` with activations (per token) and weights (RTN, clip search included)
fake-quantized at the recipe's bits and granularity. The paper tunes one alpha per model; Intel Neural
Compressor's "auto alpha" tunes it per layer on the quantized layer's output loss, which is what is
done here. The search needs no extra model forward passes (only the token sample), and since the
no-smoothing candidate is kept on ties, a group is smoothed only where smoothing lowers the objective.
Weights are scored with RTN even when the recipe rounds them with GPTQ afterwards. The objective looks
at the group's own outputs only: effects downstream (attention softmax, SwiGLU, the KV cache for a
smoothed ``attn_out`` through ``v_proj`` without grouped-query attention) are not modelled.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import nn

from quant.calibration.data import CalibrationData
from quant.calibration.stats import DEFAULT_SAMPLE_BUDGET_BYTES, ChannelStats, group_key, iter_group_stats
from quant.methods.base import MethodReport, ProgressCallback, QuantizationMethod, no_progress, register_method, sub_progress
from quant.methods.common import finalize, quantize_linears
from quant.methods.scaling import MIN_SCALE, migrate_group, migration_target, quantized_output_error, weight_absmax
from quant.models.adapters import BlockInfo, LinearGroup, get_adapter
from quant.recipes.schema import DEFAULT_ALPHA_GRID, Recipe, SmoothQuantParams

Alpha = float | Literal["auto"]


def smoothing_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``max|X_j|^alpha / max|W_j|^(1 - alpha)``, clamped below at 1e-5 (statistics too)."""
    a = act_absmax.float().cpu().clamp(min=MIN_SCALE)
    w = w_absmax.float().cpu().clamp(min=MIN_SCALE)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=MIN_SCALE)


@dataclass
class AlphaChoice:
    """The smoothing of one group: ``alpha`` None (and ``scale`` None) means no smoothing."""

    alpha: float | None
    scale: torch.Tensor | None  # [C] on the CPU
    loss: float = math.nan  # quantized output error of the choice ("auto" only)
    loss_unsmoothed: float = math.nan  # the same error with s = 1 ("auto" only)
    candidates: list[tuple[float | None, float]] = field(default_factory=list)  # (alpha, loss), tried order


def alpha_candidates(grid: Sequence[float]) -> list[float | None]:
    """No smoothing first (it wins ties), then the grid."""
    return [None, *grid]


@torch.no_grad()
def search_alpha(
    sample: torch.Tensor,
    weights: list[torch.Tensor],
    act_absmax: torch.Tensor,
    w_absmax: torch.Tensor,
    recipe: Recipe,
    grid: Sequence[float] = DEFAULT_ALPHA_GRID,
) -> AlphaChoice:
    """The candidate (no smoothing or an alpha of ``grid``) with the least quantized output error of
    the linears ``weights`` on tokens ``sample [n, C]``; scales come from the full statistics."""
    x = sample.float().to(weights[0].device)
    reference = [x @ w.float().T for w in weights]
    best: AlphaChoice | None = None
    tried: list[tuple[float | None, float]] = []
    for alpha in alpha_candidates(grid):
        scale = None if alpha is None else smoothing_scales(act_absmax, w_absmax, alpha)
        loss = quantized_output_error(x, weights, recipe, scale, reference)
        tried.append((alpha, loss))
        if best is None or loss < best.loss:
            best = AlphaChoice(alpha, scale, loss)
    assert best is not None
    best.loss_unsmoothed = tried[0][1]
    best.candidates = tried
    return best


def choose_smoothing(
    stats: ChannelStats, group: LinearGroup, alpha: Alpha, recipe: Recipe | None, grid: Sequence[float]
) -> AlphaChoice:
    """The fixed ``alpha``'s scales, or the ``"auto"`` search's choice (needs ``stats.sample``)."""
    act = stats.absmax
    if alpha != "auto":
        return AlphaChoice(float(alpha), smoothing_scales(act, weight_absmax(group), float(alpha)))
    if recipe is None:
        raise ValueError("alpha='auto' scores candidates at the recipe's bits: pass the recipe")
    if stats.sample is None or stats.sample.shape[0] == 0:
        raise ValueError("alpha='auto' needs sampled calibration tokens (collect statistics with sample_tokens > 0)")
    weights = [lin.weight.detach() for lin in group.linears.values()]
    return search_alpha(stats.sample, weights, act, weight_absmax(group), recipe, grid)


def _group_metrics(stats: ChannelStats, choice: AlphaChoice, searched: bool) -> dict[str, float]:
    metrics: dict[str, float] = {"smoothed": float(choice.scale is not None)}
    if searched:
        metrics.update(searched=1.0, loss=choice.loss, loss_unsmoothed=choice.loss_unsmoothed)
    if choice.scale is None or choice.alpha is None:
        return metrics
    act = stats.absmax.float().cpu()
    smoothed = act / choice.scale
    metrics.update(
        alpha=choice.alpha,
        act_absmax_before=float(act.max()),
        act_absmax_after=float(smoothed.max()),
        act_channel_ratio_before=float(act.max() / act.clamp(min=MIN_SCALE).median()),
        act_channel_ratio_after=float(smoothed.max() / smoothed.clamp(min=MIN_SCALE).median()),
        scale_max=float(choice.scale.max()),
        scale_min=float(choice.scale.min()),
    )
    return metrics


@torch.no_grad()
def smooth_groups(
    model: nn.Module,
    calibration: CalibrationData,
    alpha: Alpha,
    report: MethodReport | None = None,
    progress: ProgressCallback = no_progress,
    *,
    recipe: Recipe | None = None,
    grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    search_tokens: int = 1024,
    sample_budget_bytes: int = DEFAULT_SAMPLE_BUDGET_BYTES,
) -> dict[str, AlphaChoice]:
    """Fold SmoothQuant scales into ``model`` (FP function unchanged); returns the choice of every
    group that can take a scale, by :func:`group_key` (``alpha`` None where none was folded)."""
    adapter = get_adapter(model)
    auto = alpha == "auto"
    if auto and recipe is None:
        raise ValueError("alpha='auto' scores candidates at the recipe's bits: pass the recipe")

    def smoothable(block: BlockInfo, group: LinearGroup) -> bool:
        return migration_target(adapter, block, group).can_scale

    entries = [(block, group) for block in adapter.iter_blocks() for group in block.groups]
    split = 0.6 if auto else 0.8
    choices: dict[str, AlphaChoice] = {}
    metrics: dict[str, dict[str, float]] = {}
    for stats in iter_group_stats(
        model, adapter, calibration, select=smoothable, sample_tokens=search_tokens if auto else 0,
        budget_bytes=sample_budget_bytes, seed=recipe.calibration.seed if recipe is not None else 0,
        progress=sub_progress(progress, 0.0, split),
    ):
        for block, group in entries:
            key = group_key(block, group)
            if key not in stats:
                continue
            choice = choose_smoothing(stats[key], group, alpha, recipe, grid)
            if choice.scale is not None:
                migrate_group(model, adapter, block, group, scale=choice.scale)
            choices[key] = choice
            metrics[key] = _group_metrics(stats[key], choice, auto)
            progress(split + (1 - split) * len(choices) / max(1, len(entries)), f"smoothquant: {key}")
    if report is not None:
        for block, group in entries:
            key = group_key(block, group)
            report.add(key, **metrics.get(key, {"smoothed": 0.0}))
    return choices


def smooth_model(
    model: nn.Module,
    calibration: CalibrationData,
    alpha: Alpha,
    report: MethodReport | None = None,
    progress: ProgressCallback = no_progress,
    *,
    recipe: Recipe | None = None,
    grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    search_tokens: int = 1024,
) -> int:
    """:func:`smooth_groups`, returning the number of groups smoothed."""
    choices = smooth_groups(
        model, calibration, alpha, report, progress, recipe=recipe, grid=grid, search_tokens=search_tokens
    )
    return sum(c.scale is not None for c in choices.values())


def summarize(choices: dict[str, AlphaChoice], params: SmoothQuantParams) -> dict[str, float]:
    """Method-level summary: the fixed alpha, or the spread of the searched ones."""
    smoothed = [c for c in choices.values() if c.scale is not None]
    summary = {"smoothed_groups": float(len(smoothed)), "smoothable_groups": float(len(choices))}
    if not params.auto:
        return {"alpha": float(params.alpha), **summary}
    alphas = [float(c.alpha) for c in smoothed if c.alpha is not None]
    ratios = [c.loss / c.loss_unsmoothed for c in choices.values() if c.loss_unsmoothed > 0]
    summary.update(
        alpha_auto=1.0,
        alpha_candidates=float(len(params.alpha_grid) + 1),
        unsmoothed_by_search=float(len(choices) - len(smoothed)),
        loss_ratio_mean=sum(ratios) / len(ratios) if ratios else 1.0,
    )
    if alphas:
        summary.update(alpha_mean=sum(alphas) / len(alphas), alpha_min=min(alphas), alpha_max=max(alphas))
    return summary


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
        choices = smooth_groups(
            model, calibration, params.alpha, report, sub_progress(progress, 0.0, 0.5),
            recipe=recipe, grid=params.alpha_grid, search_tokens=params.search_tokens,
        )
        adapter = get_adapter(model)
        layers = quantize_linears(
            model, adapter, recipe, calibration=calibration, progress=sub_progress(progress, 0.5, 0.98)
        )
        finalize(model, adapter, recipe)
        report.summary.update(summarize(choices, params), quantized_layers=float(len(layers)))
        report.calibration_seconds = time.perf_counter() - start
        model.quant_report = report
        smoothed = int(report.summary["smoothed_groups"])
        progress(1.0, f"smoothquant: {smoothed} groups smoothed, {len(layers)} linears quantized")
        return model
