"""The finishing step every method shares: replace the blocks' linears by QuantLinear.

A method first transforms the floating-point model (folding scales/rotations into weights and
norms, learning transforms), then calls :func:`quantize_linears` with the online transforms and
learned activation clip ratios it wants per linear. Weight rounding follows
``recipe.weight.algorithm``: RTN here; GPTQ through :func:`quant.quantizers.gptq.gptq_blockwise`
(sequential over blocks with the calibration data, using the transformed inputs' Hessians).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from quant.calibration.data import CalibrationData
from quant.methods.base import ProgressCallback, no_progress
from quant.models.adapters import ModelAdapter
from quant.modules.linear import QuantLinear, set_module
from quant.quantizers.weight import QuantizedWeight, quantize_weight_rtn
from quant.recipes.schema import Recipe
from quant.transforms.base import InputTransform


def is_skipped(name: str, recipe: Recipe) -> bool:
    return any(name == s or name.endswith("." + s) or name.endswith(s) for s in recipe.skip_modules)


def block_linear_names(adapter: ModelAdapter) -> list[str]:
    return [name for block in adapter.iter_blocks() for group in block.groups for name in group.linears]


def build_quant_linear(
    linear: nn.Linear,
    recipe: Recipe,
    transform: InputTransform | None = None,
    act_clip_ratio: float | None = None,
    quantized: QuantizedWeight | None = None,
) -> QuantLinear:
    """QuantLinear for one float linear whose weight is already expressed in the transformed basis."""
    weight = linear.weight.detach().float()
    if quantized is None and recipe.weight.enabled:
        quantized = quantize_weight_rtn(weight, recipe.weight)
    bias = None if linear.bias is None else linear.bias.detach().float()
    layer = QuantLinear.from_quantized(
        quantized if quantized is not None else weight,
        bias,
        recipe.activation,
        transform=transform,
        act_clip_ratio=act_clip_ratio,
        weight_symmetric=recipe.weight.symmetric,
    )
    return layer.to(device=linear.weight.device, dtype=linear.weight.dtype)


def quantize_linears(
    model: nn.Module,
    adapter: ModelAdapter,
    recipe: Recipe,
    transforms: dict[str, InputTransform] | None = None,
    act_clips: dict[str, float] | None = None,
    calibration: CalibrationData | None = None,
    progress: ProgressCallback = no_progress,
    names: Iterable[str] | None = None,
) -> dict[str, QuantLinear]:
    """Replace the blocks' linears (all, or ``names``) by QuantLinear; returns them by name."""
    transforms = transforms or {}
    act_clips = act_clips or {}
    wanted = [n for n in (names if names is not None else block_linear_names(adapter)) if not is_skipped(n, recipe)]
    if recipe.weight.enabled and recipe.weight.algorithm == "gptq":
        if calibration is None:
            raise ValueError("GPTQ weight rounding needs calibration data")
        from quant.quantizers.gptq import gptq_blockwise

        return gptq_blockwise(model, adapter, recipe, calibration, transforms, act_clips, set(wanted), progress)
    done: dict[str, QuantLinear] = {}
    for i, name in enumerate(wanted):
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            continue
        layer = build_quant_linear(linear, recipe, transforms.get(name), act_clips.get(name))
        set_module(model, name, layer)
        done[name] = layer
        progress((i + 1) / len(wanted), f"quantized {name}")
    return done


def finalize(model: nn.Module, adapter: ModelAdapter, recipe: Recipe, rotate_kv: bool = False) -> nn.Module:
    """Attach KV-cache quantization when the recipe asks for it; put the model in eval mode."""
    if recipe.kv_cache.enabled:
        from quant.modules.kv_cache import attach_kv_quantizer

        attach_kv_quantizer(model, adapter, recipe.kv_cache, rotate=rotate_kv)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def fold_into_linear_inputs(linear: nn.Linear, scale: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """Rewrite ``linear`` so that ``linear'((x - shift) / scale) == linear(x)``.

    ``W' = W * scale`` (per input channel); ``b' = b + W @ shift``.
    """
    w = linear.weight.data
    if shift is not None:
        extra = (w.float() @ shift.float()).to(w.dtype)
        if linear.bias is None:
            linear.bias = nn.Parameter(extra, requires_grad=False)
        else:
            linear.bias.data += extra
    linear.weight.data = (w.float() * scale.float().unsqueeze(0)).to(w.dtype)
