"""Equivalent channel-wise migration shared by the scaling methods (SmoothQuant, OS+).

A linear group reads ``X [.., C]``. Replacing its input by ``X' = (X - z) / s`` (per channel ``j``)
and its linears by ``W' = W * s``, ``b' = b + W z`` leaves every output unchanged
(:func:`quant.methods.common.fold_into_linear_inputs`). ``X'`` must then be produced directly by the
module that produces ``X``:

- a norm (``attn_in`` / ``mlp_in``): ``weight' = weight / s``, ``bias' = (bias - z) / s``. A bias-free
  RMSNorm cannot take a shift, so it is replaced by :class:`quant.modules.norms.RMSNormWithBias`;
  a bias-free LayerNorm takes scales only.
- a producer linear whose output channels map 1:1 onto the input channels (``v_proj -> o_proj``
  without GQA, ``up_proj -> down_proj``): rows and bias divided by ``s``. Attention is linear in V
  per channel, and SwiGLU's ``act(gate) * up`` is linear in ``up``, so only scales pass (no shift).
- post-LN encoders (``norm_feeds_residual``, BERT): the norm output is also the residual that the
  block adds to its ``attn_out`` / ``mlp_out`` linear's output right before the next LayerNorm. A
  shift ``z`` is compensated exactly by adding ``z`` to that linear's bias
  (``out + z + (X - z) == out + X``); a per-channel scale is not (LayerNorm mixes channels), so such
  groups take shifts only.

Methods that search their transform (OS+ thresholds, SmoothQuant's per-group alpha) score candidates
with :func:`quantized_output_error`: the group's output error on sampled calibration tokens with
activations and weights fake-quantized as the recipe (and :class:`quant.modules.QuantLinear`) does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from quant.methods.common import fold_into_linear_inputs
from quant.models.adapters import BlockInfo, LinearGroup, ModelAdapter
from quant.modules.linear import set_module
from quant.modules.norms import RMSNormWithBias
from quant.quantizers.core import fake_quantize
from quant.quantizers.weight import quantize_weight_rtn
from quant.recipes.schema import Recipe

#: the group whose single linear adds the residual that a post-LN norm output feeds
RESIDUAL_OUTPUT_GROUP = {"attn_in": "attn_out", "mlp_in": "mlp_out"}
MIN_SCALE = 1e-5


@dataclass(frozen=True)
class MigrationTarget:
    """Where a group's input transform can be folded, and which parts of it."""

    site: Literal["norm", "producer", "none"]
    can_scale: bool
    can_shift: bool
    reason: str = ""

    @property
    def usable(self) -> bool:
        return self.can_scale or self.can_shift


NONE = MigrationTarget("none", False, False)


def _has_vector(module: nn.Module, attr: str, size: int) -> bool:
    t = getattr(module, attr, None)
    return isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == size


def _is_rms_norm(adapter: ModelAdapter, norm: nn.Module) -> bool:
    if isinstance(norm, RMSNormWithBias):
        return True
    return adapter.norm_type == "rms" and not isinstance(norm, nn.LayerNorm) and getattr(norm, "bias", None) is None


def residual_output_linear(block: BlockInfo, group: LinearGroup) -> nn.Linear | None:
    """For a post-LN group: the linear whose output the norm's output is added to (see module doc)."""
    kind = RESIDUAL_OUTPUT_GROUP.get(group.kind)
    if kind is None:
        return None
    try:
        out = block.group(kind)  # type: ignore[arg-type]
    except KeyError:
        return None
    if len(out.linears) != 1:
        return None
    linear = next(iter(out.linears.values()))
    return linear if isinstance(linear, nn.Linear) and linear.out_features == group.in_features else None


def migration_target(adapter: ModelAdapter, block: BlockInfo, group: LinearGroup) -> MigrationTarget:
    c = group.in_features
    if group.norm is not None:
        norm = group.norm
        if not _has_vector(norm, "weight", c):
            return MigrationTarget("none", False, False, "norm has no per-channel weight")
        has_bias = _has_vector(norm, "bias", c)
        if group.norm_feeds_residual:
            if has_bias and residual_output_linear(block, group) is not None:
                return MigrationTarget("norm", False, True, "post-LN: residual compensates shifts only")
            return MigrationTarget("none", False, False, "post-LN norm without a compensable residual")
        can_shift = has_bias or (_is_rms_norm(adapter, norm) and group.norm_name is not None)
        return MigrationTarget("norm", True, can_shift)
    producer = group.producer
    if producer is not None:
        if not group.producer_is_elementwise:
            return MigrationTarget("none", False, False, "producer is not elementwise (grouped-query attention)")
        if not isinstance(producer, nn.Linear) or producer.out_features != c:
            return MigrationTarget("none", False, False, "producer output does not match the input channels")
        return MigrationTarget("producer", True, False, "producer takes scales only")
    return MigrationTarget("none", False, False, "no producer can absorb a transform (nonlinearity)")


@torch.no_grad()
def weight_absmax(group: LinearGroup) -> torch.Tensor:
    """``max_i |W_ij|`` over all rows of all the group's linears: ``[C]`` float32."""
    cols = [lin.weight.detach().float().abs().amax(dim=0) for lin in group.linears.values()]
    return torch.stack(cols, 0).amax(dim=0)


@torch.no_grad()
def _norm_with_bias(model: nn.Module, adapter: ModelAdapter, group: LinearGroup) -> nn.Module:
    norm = group.norm
    assert norm is not None
    if _has_vector(norm, "bias", group.in_features):
        return norm
    if not _is_rms_norm(adapter, norm) or group.norm_name is None:
        raise ValueError(f"norm {group.norm_name!r} has no bias and cannot take a shift")
    replacement = RMSNormWithBias.from_rms_norm(norm)
    set_module(model, group.norm_name, replacement)
    group.norm = replacement
    return replacement


@torch.no_grad()
def migrate_group(
    model: nn.Module,
    adapter: ModelAdapter,
    block: BlockInfo,
    group: LinearGroup,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None = None,
) -> MigrationTarget:
    """Fold ``X' = (X - shift) / scale`` into the group's producer and its linears (FP-exact)."""
    target = migration_target(adapter, block, group)
    if scale is not None and not target.can_scale:
        raise ValueError(f"{group.kind} of {block.name}: cannot absorb a scale ({target.reason})")
    if shift is not None and not target.can_shift:
        raise ValueError(f"{group.kind} of {block.name}: cannot absorb a shift ({target.reason})")
    if scale is None and shift is None:
        return target
    c = group.in_features
    s = torch.ones(c) if scale is None else scale.detach().float().cpu()
    z = None if shift is None else shift.detach().float().cpu()
    if target.site == "norm":
        norm = _norm_with_bias(model, adapter, group) if z is not None else group.norm
        assert norm is not None
        dev, dt = norm.weight.device, norm.weight.dtype
        norm.weight.data = (norm.weight.data.float() / s.to(dev)).to(dt)
        bias = getattr(norm, "bias", None)
        if isinstance(bias, torch.Tensor):
            b = bias.data.float()
            if z is not None:
                b = b - z.to(dev)
            bias.data = (b / s.to(dev)).to(dt)
        if group.norm_feeds_residual and z is not None:
            out = residual_output_linear(block, group)
            assert out is not None
            add_to_bias(out, z)
    elif target.site == "producer":
        producer = group.producer
        assert producer is not None
        scale_output_channels(producer, 1.0 / s)
    for linear in group.linears.values():
        fold_into_linear_inputs(linear, s.to(linear.weight.device), None if z is None else z.to(linear.weight.device))
    return target


@torch.no_grad()
def scale_output_channels(linear: nn.Linear, factor: torch.Tensor) -> None:
    """Multiply output channel ``i`` (row ``i`` of the weight, and the bias) by ``factor[i]``."""
    w = linear.weight.data
    f = factor.float().to(w.device)
    linear.weight.data = (w.float() * f.unsqueeze(1)).to(w.dtype)
    if linear.bias is not None:
        linear.bias.data = (linear.bias.data.float() * f).to(linear.bias.dtype)


@torch.no_grad()
def add_to_bias(linear: nn.Linear, value: torch.Tensor) -> None:
    w = linear.weight
    v = value.float().to(w.device)
    if linear.bias is None:
        linear.bias = nn.Parameter(v.to(w.dtype), requires_grad=False)
    else:
        linear.bias.data = (linear.bias.data.float() + v).to(linear.bias.dtype)


# ------------------------------------------------------------------ search objective


def fake_quant_activation(x: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """Dynamic per-token fake-quant with the recipe's bits and clip ratio, as QuantLinear does."""
    act = recipe.activation
    if not act.enabled:
        return x
    return fake_quantize(x, act.bits, act.symmetric, act.clip_ratio)


def fake_quant_weight(w: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """RTN quantize-dequantize of ``w`` per the recipe's weight spec (clip search included)."""
    if not recipe.weight.enabled:
        return w
    return quantize_weight_rtn(w, recipe.weight).dequantize(torch.float32).to(w.device)


@torch.no_grad()
def quantized_output_error(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    recipe: Recipe,
    scale: torch.Tensor | None = None,
    reference: list[torch.Tensor] | None = None,
) -> float:
    """``sum_k mean_tokens ||Q(x / s) Q(W_k s)^T - x W_k^T||^2`` (biases cancel).

    ``reference`` (the FP outputs ``x W_k^T``) may be passed to avoid recomputing it per candidate.
    """
    xf = x.float()
    xs = xf if scale is None else xf / scale.to(xf.device)
    xq = fake_quant_activation(xs, recipe)
    total = 0.0
    for k, w in enumerate(weights):
        wf = w.float().to(xf.device)
        y = reference[k] if reference is not None else xf @ wf.T
        ws = wf if scale is None else wf * scale.to(xf.device).unsqueeze(0)
        yq = xq @ fake_quant_weight(ws, recipe).T
        total += float((yq - y).pow(2).sum(-1).mean())
    return total
