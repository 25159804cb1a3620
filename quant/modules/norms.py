"""Norm modules that methods install in place of a model's own norms.

:class:`RMSNormWithBias` is an RMSNorm (LLaMA / Mistral / Qwen2 arithmetic) with an additive bias.
OS+ needs it to fold a channel-wise *shift* into an RMSNorm-producing input: ``(norm(x) - z) / s``
is ``(w / s) * rmsnorm(x) + (-z / s)``, which a bias-free RMSNorm cannot express. It is a registered
qaas module type, so saved artifacts rebuild it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quant.modules.registry import register_module_type


def norm_eps(norm: nn.Module, default: float = 1e-6) -> float:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(norm, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return default


@register_module_type("rms_norm_with_bias")
class RMSNormWithBias(nn.Module):
    """``weight * x / sqrt(mean(x**2) + eps) + bias``, normalised in float32 like HF's LlamaRMSNorm."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    @classmethod
    def from_rms_norm(cls, norm: nn.Module) -> "RMSNormWithBias":
        """Same function as ``norm`` (a bias-free RMSNorm with ``weight``), with a zero bias."""
        weight = norm.weight.detach()
        layer = cls(int(weight.numel()), norm_eps(norm))
        with torch.no_grad():
            layer.weight.copy_(weight.float())
        return layer.to(device=weight.device, dtype=weight.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(input_dtype) + self.bias

    def config(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "eps": self.eps}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "RMSNormWithBias":
        return cls(int(config["hidden_size"]), float(config["eps"]))

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
