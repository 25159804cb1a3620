"""Weight quantization to real integer codes (round-to-nearest, with optional clip search).

``QuantizedWeight`` is what a :class:`quant.modules.QuantLinear` stores: unsigned codes
``[out, in]`` with per-(row, group) scales and zero points ``[out, n_groups]``.
Per-channel quantization is one group spanning all input channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.quantizers.core import EPS
from quant.recipes.schema import WeightQuantSpec

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # uint8 [out, in]
    scale: torch.Tensor  # float32 [out, n_groups]
    zero: torch.Tensor  # float32 [out, n_groups]
    bits: int
    group_size: int  # == in_features for per-channel

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, inp = self.codes.shape
        g = self.group_size
        u = self.codes.float().reshape(out, inp // g, g)
        w = (u - self.zero.unsqueeze(-1)) * self.scale.unsqueeze(-1)
        return w.reshape(out, inp).to(dtype)


def group_size_for(spec: WeightQuantSpec, in_features: int) -> int:
    if spec.granularity == "per_group":
        assert spec.group_size is not None
        if in_features % spec.group_size:
            raise ValueError(f"in_features {in_features} is not divisible by group_size {spec.group_size}")
        return spec.group_size
    return in_features


def _scale_zero(wg: torch.Tensor, bits: int, symmetric: bool, ratio: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    if symmetric:
        half = 2 ** (bits - 1) - 1
        amax = wg.abs().amax(dim=-1) * ratio
        scale = (amax / half).clamp(min=EPS)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        wmax = wg.amax(dim=-1).clamp(min=0) * ratio
        wmin = wg.amin(dim=-1).clamp(max=0) * ratio
        scale = ((wmax - wmin) / (2**bits - 1)).clamp(min=EPS)
        zero = torch.round(-wmin / scale)
    return scale, zero


def _codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    lo = 1 if symmetric else 0
    return torch.clamp(torch.round(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1), lo, 2**bits - 1)


def scale_zero_for_weight(weight: torch.Tensor, spec: WeightQuantSpec, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) scale and zero; with ``clip_search`` the clip ratio minimising the
    per-group squared reconstruction error is chosen from ``CLIP_GRID``."""
    out, inp = weight.shape
    wg = weight.float().reshape(out, inp // group_size, group_size)
    best_scale, best_zero = _scale_zero(wg, spec.bits, spec.symmetric, 1.0)
    if not spec.clip_search:
        return best_scale, best_zero
    best_err = torch.full_like(best_scale, float("inf"))
    for ratio in CLIP_GRID:
        scale, zero = _scale_zero(wg, spec.bits, spec.symmetric, ratio)
        deq = (_codes(wg, scale, zero, spec.bits, spec.symmetric) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
        err = (deq - wg).pow(2).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_weight_rtn(weight: torch.Tensor, spec: WeightQuantSpec) -> QuantizedWeight:
    out, inp = weight.shape
    g = group_size_for(spec, inp)
    scale, zero = scale_zero_for_weight(weight, spec, g)
    wg = weight.float().reshape(out, inp // g, g)
    codes = _codes(wg, scale, zero, spec.bits, spec.symmetric).reshape(out, inp).to(torch.uint8)
    return QuantizedWeight(codes=codes, scale=scale, zero=zero, bits=spec.bits, group_size=g)


def codes_with_params(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool
) -> torch.Tensor:
    """Codes of a ``[out, g]`` weight slice under given ``[out]`` scale/zero (used by GPTQ)."""
    lo = 1 if symmetric else 0
    return torch.clamp(torch.round(weight / scale.unsqueeze(-1)) + zero.unsqueeze(-1), lo, 2**bits - 1)
