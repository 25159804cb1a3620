"""Perplexity: exp of the token-weighted mean next-token negative log-likelihood over the sequences."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

from quant.calibration.data import CalibrationData
from quant.evaluation.common import forward, is_causal_lm, model_device


class PerplexityResult(BaseModel):
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens counted


@torch.no_grad()
def perplexity(model: nn.Module, data: CalibrationData) -> PerplexityResult:
    """Token-weighted perplexity of a causal LM on ``data`` (padding positions excluded)."""
    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    for ids, mask in data.batches(device):
        out = forward(model, ids, mask)
        if not is_causal_lm(out):
            raise TypeError("perplexity needs a causal language model (an output with logits)")
        logits = out.logits[:, :-1].float()
        target = ids[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        valid = torch.ones_like(target, dtype=torch.bool) if mask is None else mask[:, 1:].bool() & mask[:, :-1].bool()
        nll = nll.reshape(target.shape)[valid]
        total_nll += float(nll.double().sum())
        total_tokens += int(valid.sum())
    if total_tokens == 0:
        raise ValueError("no tokens to evaluate: sequences must have at least two unpadded tokens")
    mean = total_nll / total_tokens
    return PerplexityResult(ppl=math.exp(min(mean, 700.0)), nll=mean, tokens=total_tokens)
