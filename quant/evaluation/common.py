"""Helpers shared by the evaluators: device placement and model outputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> Any:
    kwargs: dict[str, Any] = {"input_ids": ids}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) is False and hasattr(model, "generate"):
        kwargs["use_cache"] = False
    return model(**kwargs)


def is_causal_lm(output: Any) -> bool:
    return getattr(output, "logits", None) is not None
