"""Uniform integer quantization: scale/zero-point computation, fake-quant (simulation) and codes.

Conventions shared with the packing helpers and the CUDA kernels:
- a quantized value is an *unsigned code* ``u`` in ``[0, 2**bits - 1]`` with a floating scale ``s`` and
  zero point ``z`` (a float, integer-valued): ``x_hat = (u - z) * s``;
- symmetric quantization uses ``z = 2**(bits-1)`` and ``s = max|x| / (2**(bits-1) - 1)`` so signed
  values ``q = u - z`` lie in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` (the most negative code is unused);
- asymmetric quantization uses ``s = (max - min) / (2**bits - 1)``, ``z = round(-min / s)``.
Statistics are reduced over the last dimension of a view: callers reshape to
``[..., group]`` for per-group, ``[rows, in]`` for per-channel (weights) / per-token (activations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-8


@dataclass(frozen=True)
class QParams:
    scale: torch.Tensor  # broadcastable to the reduced view, last dim of size 1
    zero: torch.Tensor  # same shape as scale
    bits: int
    symmetric: bool

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1


def compute_qparams(
    x: torch.Tensor,
    bits: int,
    symmetric: bool,
    clip_ratio: float | torch.Tensor = 1.0,
) -> QParams:
    """Scale and zero point per row of ``x`` (reduction over the last dim)."""
    xf = x.float()
    if symmetric:
        amax = xf.abs().amax(dim=-1, keepdim=True) * clip_ratio
        half = 2 ** (bits - 1) - 1
        scale = (amax / half).clamp(min=EPS)
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        xmax = xf.amax(dim=-1, keepdim=True).clamp(min=0) * clip_ratio
        xmin = xf.amin(dim=-1, keepdim=True).clamp(max=0) * clip_ratio
        scale = ((xmax - xmin) / (2**bits - 1)).clamp(min=EPS)
        zero = torch.round(-xmin / scale)
    return QParams(scale=scale, zero=zero, bits=bits, symmetric=symmetric)


def quantize_codes(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Unsigned integer codes (uint8) of ``x`` under ``qp``."""
    lo, hi = (1, qp.qmax) if qp.symmetric else (0, qp.qmax)
    u = torch.clamp(torch.round(x.float() / qp.scale) + qp.zero, lo, hi)
    return u.to(torch.uint8)


def dequantize_codes(u: torch.Tensor, qp: QParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return ((u.float() - qp.zero) * qp.scale).to(dtype)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return (torch.round(x) - x).detach() + x


def fake_quantize(
    x: torch.Tensor,
    bits: int,
    symmetric: bool,
    clip_ratio: float | torch.Tensor = 1.0,
    group_size: int | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` per row of its last dim (or per group of ``group_size``).

    Differentiable: rounding uses a straight-through estimator, so gradients reach ``x`` and a
    learnable ``clip_ratio`` tensor (as in FlatQuant / OmniQuant learnable clipping).
    """
    if bits >= 16:
        return x
    shape = x.shape
    xv = x.reshape(-1, group_size) if group_size else x
    xf = xv.float()
    if symmetric:
        amax = xf.abs().amax(dim=-1, keepdim=True) * clip_ratio
        half = 2 ** (bits - 1) - 1
        scale = (amax / half).clamp(min=EPS)
        q = torch.clamp(round_ste(xf / scale), -half, half)
        out = q * scale
    else:
        xmax = xf.amax(dim=-1, keepdim=True).clamp(min=0) * clip_ratio
        xmin = xf.amin(dim=-1, keepdim=True).clamp(max=0) * clip_ratio
        qmax = 2**bits - 1
        scale = ((xmax - xmin) / qmax).clamp(min=EPS)
        zero = round_ste(-xmin / scale)
        q = torch.clamp(round_ste(xf / scale) + zero, 0, qmax)
        out = (q - zero) * scale
    return out.reshape(shape).to(x.dtype)
