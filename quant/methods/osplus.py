"""Outlier Suppression+ (Wei et al., 2023): equivalent channel-wise shifting and scaling.

For a linear group with input ``X [tokens, C]`` (per-channel calibration ``max_j`` / ``min_j``):

1. **Shift** ``z_j = (max_j + min_j) / 2`` centres every channel, removing the asymmetry across
   channels (a channel living in ``[4, 6]`` costs a per-token quantizer the range of ``[-6, 6]``).
   With per-token activation quantization a centre set by a rare extreme token can instead raise
   every other token's absmax, so the method keeps the shift only where it lowers the search
   objective below (best scaling with vs. without shift; ``shift_policy="always"`` forces it).
2. **Scale**: after shifting, channel ``j`` spans ``[-r_j, r_j]``. For an outlier threshold ``t`` the
   scale ``s_j = max(1, r_j / t)`` squeezes every channel into ``[-t, t]`` and moves the excess into
   the weights. The *fast scale search* tries thresholds from ``t = max_j r_j`` (no scaling) down to
   ``min_j r_j`` (geometric grid of ``search_grid`` values) and scores each by the output error of the
   group's linears on sampled calibration tokens, with activations (per-token, like QuantLinear) and
   weights (RTN per the recipe) fake-quantized at the recipe's bits:
   ``sum_k mean_tokens || Q(X'/s) Q(W_k s)^T - X' W_k^T ||^2``. The best threshold is kept, so the
   chosen scaling is never worse on this objective than no scaling.
3. Both migrate exactly (see :mod:`quant.methods.scaling`): into the preceding norm
   (``weight' = weight / s``, ``bias' = (bias - z) / s``; a bias-free RMSNorm is replaced by
   :class:`quant.modules.norms.RMSNormWithBias`) and into the linears (``W' = W s``, ``b' = b + W z``).

Sites: ``attn_in`` and ``mlp_in`` (norm; shift + scale), and ``attn_out`` / ``mlp_out`` through an
elementwise producer linear (``v_proj``; ``up_proj`` of SwiGLU MLPs, as the reference does for LLaMA's
``down_proj``): scale only, as in the paper. Post-LN encoders (BERT), where the norm output is also
the residual: shift only, compensated in the residual branch's output bias (scales cannot be
compensated there without an extra online operation).

The reference scores ``q/k/v`` candidates through the full attention and ``gate/up`` through SwiGLU;
here candidates are scored on the group's linear outputs, which needs no architecture-specific code.
Weights are scored with RTN rounding even when the recipe rounds them with GPTQ afterwards (a GPTQ run
per candidate would multiply the calibration cost by the grid size).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

from quant.calibration.data import CalibrationData
from quant.calibration.stats import DEFAULT_SAMPLE_BUDGET_BYTES, ChannelStats, group_key, iter_group_stats
from quant.methods.base import MethodReport, ProgressCallback, QuantizationMethod, no_progress, register_method, sub_progress
from quant.methods.common import finalize, is_skipped, quantize_linears
from quant.methods.scaling import (
    RESIDUAL_OUTPUT_GROUP,
    MigrationTarget,
    migrate_group,
    migration_target,
    quantized_output_error,
)
from quant.models.adapters import BlockInfo, LinearGroup, get_adapter
from quant.recipes.schema import OSPlusParams, Recipe

EPS = 1e-6


@dataclass
class ScaleSearchResult:
    scale: torch.Tensor  # [C], >= 1
    threshold: float
    loss: float  # quantized output error with ``scale``
    baseline_loss: float  # the same error without scaling (threshold = max range)
    candidates: list[tuple[float, float]] = field(default_factory=list)  # (threshold, loss), tried order


def threshold_candidates(half_range: torch.Tensor, grid: int) -> torch.Tensor:
    """``grid`` thresholds, geometric from ``max r`` (no scaling) down to ``min r`` (full equalising)."""
    r = half_range.float().clamp(min=EPS)
    hi, lo = float(r.max()), float(r.min())
    lo = min(max(lo, hi * 1e-4), hi)
    if grid < 2 or hi <= lo:
        return torch.tensor([hi])
    steps = torch.arange(grid, dtype=torch.float64) / (grid - 1)
    return (hi * (lo / hi) ** steps).float()


def scales_for_threshold(half_range: torch.Tensor, threshold: float) -> torch.Tensor:
    """``s_j = max(1, r_j / t)``."""
    return (half_range.float().clamp(min=0) / max(threshold, EPS)).clamp(min=1.0)


@torch.no_grad()
def search_scale(
    x: torch.Tensor, weights: list[torch.Tensor], half_range: torch.Tensor, recipe: Recipe, grid: int
) -> ScaleSearchResult:
    """The OS+ fast scale search on (already shifted) tokens ``x [n, C]`` for linears ``weights``."""
    xf = x.float()
    reference = [xf @ w.float().to(xf.device).T for w in weights]
    r = half_range.float().to(xf.device)
    best: tuple[float, float, torch.Tensor] | None = None
    tried: list[tuple[float, float]] = []
    baseline = float("nan")
    for i, t in enumerate(threshold_candidates(r, grid).tolist()):
        s = scales_for_threshold(r, t)
        loss = quantized_output_error(xf, weights, recipe, s, reference)
        tried.append((t, loss))
        if i == 0:
            baseline = loss
        if best is None or loss < best[1]:
            best = (t, loss, s)
    assert best is not None
    return ScaleSearchResult(scale=best[2].cpu(), threshold=best[0], loss=best[1], baseline_loss=baseline, candidates=tried)


ShiftPolicy = Literal["auto", "always", "never"]


@dataclass
class GroupPlan:
    """What OS+ folds into one group, and the calibration objective it was chosen on."""

    shift: torch.Tensor | None  # [C] or None
    search: ScaleSearchResult | None  # None where the group takes no scale
    loss: float  # quantized output error of the chosen migration
    loss_unmigrated: float  # the same error with neither shift nor scale
    loss_other_shift: float | None = None  # "auto": the best error of the option not chosen


@dataclass
class GroupMigration:
    key: str
    target: MigrationTarget
    plan: GroupPlan


@torch.no_grad()
def plan_group(
    stats: ChannelStats,
    target: MigrationTarget,
    weights: list[torch.Tensor],
    params: OSPlusParams,
    recipe: Recipe,
    shift_policy: ShiftPolicy = "auto",
) -> GroupPlan:
    """Shift and scale of one group from its statistics (nothing is modified).

    ``shift_policy``: ``always`` applies the shift wherever the group can absorb one; ``auto`` (what
    the method uses) scores the best scaling with and without the shift and keeps the better. The
    min/max centre removes asymmetry of the *channel ranges*, but with per-token activation
    quantization a channel centred by a rare extreme token can raise every other token's absmax, so
    the shift must earn its place on the same objective as the scale.
    """
    if stats.sample is None or stats.sample.shape[0] == 0:
        raise ValueError("OS+ needs sampled calibration tokens (collect statistics with sample_tokens > 0)")
    can_shift = params.shift and target.can_shift and shift_policy != "never"
    do_scale = params.scale and target.can_scale
    device = weights[0].device
    sample = stats.sample.to(device)
    loss_unmigrated = quantized_output_error(sample, weights, recipe)
    options: list[torch.Tensor | None] = [stats.center.float().cpu()] if can_shift else []
    if not can_shift or shift_policy == "auto":
        options.append(None)
    results: list[tuple[float, torch.Tensor | None, ScaleSearchResult | None]] = []
    for shift in options:
        x = sample if shift is None else sample - shift.to(device)
        if do_scale:
            half_range = (stats.absmax if shift is None else stats.half_range).to(device)
            search = search_scale(x, weights, half_range, recipe, params.search_grid)
            results.append((search.loss, shift, search))
        elif shift is None:
            results.append((loss_unmigrated, None, None))
        else:
            results.append((quantized_output_error(x, weights, recipe), shift, None))
    best = min(range(len(results)), key=lambda i: results[i][0])  # ties keep the earlier (shifted) option
    other = [r[0] for i, r in enumerate(results) if i != best]
    loss, shift, search = results[best]
    return GroupPlan(shift, search, loss, loss_unmigrated, other[0] if other else None)


def shift_keeps_layout(block: BlockInfo, group: LinearGroup, recipe: Recipe) -> bool:
    """A shift adds ``W z`` (or ``z``) to biases. A linear without a bias that the recipe keeps in
    floating point (``skip_modules``) would stay an ``nn.Linear`` with a bias its architecture does
    not have, which a saved artifact could not rebuild; such groups take no shift."""
    linears = dict(group.linears)
    if group.norm_feeds_residual and group.kind in RESIDUAL_OUTPUT_GROUP:
        try:
            linears.update(block.group(RESIDUAL_OUTPUT_GROUP[group.kind]).linears)  # type: ignore[arg-type]
        except KeyError:
            pass
    return all(lin.bias is not None or not is_skipped(name, recipe) for name, lin in linears.items())


@torch.no_grad()
def apply_osplus(
    model: nn.Module,
    calibration: CalibrationData,
    params: OSPlusParams,
    recipe: Recipe,
    report: MethodReport | None = None,
    progress: ProgressCallback = no_progress,
    shift_policy: ShiftPolicy = "auto",
    sample_budget_bytes: int = DEFAULT_SAMPLE_BUDGET_BYTES,
) -> list[GroupMigration]:
    """Compute and fold the OS+ shifts and scales into ``model`` (its FP function is unchanged)."""
    adapter = get_adapter(model)

    def wanted(block, group) -> bool:  # noqa: ANN001
        t = migration_target(adapter, block, group)
        return (params.shift and t.can_shift) or (params.scale and t.can_scale)

    blocks = adapter.iter_blocks()
    entries = [(block, group) for block in blocks for group in block.groups]
    metrics: dict[str, dict[str, float]] = {}
    done: list[GroupMigration] = []
    # one calibration pass per run of groups whose token samples fit the memory budget together
    for stats in iter_group_stats(
        model,
        adapter,
        calibration,
        select=wanted,
        sample_tokens=params.search_tokens,
        budget_bytes=sample_budget_bytes,
        seed=recipe.calibration.seed,
        progress=sub_progress(progress, 0.0, 0.4),
    ):
        for block, group in entries:
            key = group_key(block, group)
            if key not in stats:
                continue
            target = migration_target(adapter, block, group)
            if target.can_shift and not shift_keeps_layout(block, group, recipe):
                target = replace(target, can_shift=False, reason="bias-free linear kept in floating point")
            weights = [lin.weight.detach() for lin in group.linears.values()]
            plan = plan_group(stats[key], target, weights, params, recipe, shift_policy)
            scale = None if plan.search is None else plan.search.scale
            migrate_group(model, adapter, block, group, scale, plan.shift)
            done.append(GroupMigration(key, target, plan))
            metrics[key] = _group_metrics(stats[key], plan)
            progress(0.4 + 0.6 * len(metrics) / max(1, len(entries)), f"osplus: migrated {key}")
    if report is not None:
        for block, group in entries:
            key = group_key(block, group)
            report.add(key, **metrics.get(key, {"migrated": 0.0}))
    return done


def _group_metrics(stats: ChannelStats, plan: GroupPlan) -> dict[str, float]:
    metrics: dict[str, float] = {
        "migrated": 1.0,
        "act_absmax_before": float(stats.absmax.max()),
        "shifted": float(plan.shift is not None),
        "loss": plan.loss,
        "loss_unmigrated": plan.loss_unmigrated,
    }
    r = stats.absmax.cpu()
    if plan.shift is not None:
        r = stats.half_range.cpu()
        metrics["shift_absmax"] = float(plan.shift.abs().max())
    if plan.loss_other_shift is not None:
        metrics["loss_other_shift_option"] = plan.loss_other_shift
    search = plan.search
    if search is not None:
        r = r / search.scale
        metrics.update(
            threshold=search.threshold,
            scale_max=float(search.scale.max()),
            scaled_channels=float((search.scale > 1.0).sum()),
        )
    metrics["act_absmax_after"] = float(r.max())
    return metrics


@register_method
class OSPlusMethod(QuantizationMethod):
    name = "osplus"

    def calibrate(
        self,
        model: nn.Module,
        calibration: CalibrationData,
        recipe: Recipe,
        progress: ProgressCallback = no_progress,
    ) -> nn.Module:
        params = recipe.method
        if not isinstance(params, OSPlusParams):
            raise TypeError(f"osplus needs OSPlusParams, got {type(params).__name__}")
        start = time.perf_counter()
        report = MethodReport(method=self.name)
        progress(0.0, "osplus: collecting activation statistics")
        migrations = apply_osplus(model, calibration, params, recipe, report, sub_progress(progress, 0.0, 0.6))
        adapter = get_adapter(model)
        layers = quantize_linears(
            model, adapter, recipe, calibration=calibration, progress=sub_progress(progress, 0.6, 0.98)
        )
        finalize(model, adapter, recipe)
        plans = [m.plan for m in migrations]
        report.summary.update(
            shifted_groups=float(sum(p.shift is not None for p in plans)),
            scaled_groups=float(sum(p.search is not None for p in plans)),
            loss_ratio_mean=(
                sum(p.loss / max(p.loss_unmigrated, 1e-30) for p in plans) / len(plans) if plans else 1.0
            ),
            quantized_layers=float(len(layers)),
        )
        report.calibration_seconds = time.perf_counter() - start
        model.quant_report = report
        progress(1.0, f"osplus: {len(migrations)} groups migrated, {len(layers)} linears quantized")
        return model
