"""Agreement of a quantized model with its floating-point original on the same inputs.

Causal LMs: mean KL(P_fp || P_q) of the next-token distributions over unpadded positions (full
vocabulary, or with ``top_k > 0`` over the FP model's top-k tokens, both renormalised there) and the
top-1 agreement rate. Encoders: cosine similarity of mean-pooled embeddings per sequence (mean, min).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

from quant.calibration.data import CalibrationData
from quant.evaluation.common import forward, is_causal_lm, model_device


class EmbeddingSimilarity(BaseModel):
    cosine_mean: float
    cosine_min: float
    sequences: int


class AgreementResult(BaseModel):
    kind: str  # "causal_lm" | "encoder"
    kl_mean: float | None = None
    top1_agreement: float | None = None
    positions: int = 0
    cosine_mean: float | None = None
    cosine_min: float | None = None
    sequences: int = 0

    def metrics(self) -> dict[str, float]:
        keys = ("kl_mean", "top1_agreement") if self.kind == "causal_lm" else ("cosine_mean", "cosine_min")
        return {k: float(getattr(self, k)) for k in keys}


def _kl_and_top1(fp_logits: torch.Tensor, q_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(FP || Q) and top-1 match for ``[P, V]`` logits."""
    fp_logits, q_logits = fp_logits.float(), q_logits.float()
    if top_k and top_k < fp_logits.shape[-1]:
        idx = fp_logits.topk(top_k, dim=-1).indices
        fp_sel, q_sel = fp_logits.gather(-1, idx), q_logits.gather(-1, idx)
    else:
        fp_sel, q_sel = fp_logits, q_logits
    logp, logq = F.log_softmax(fp_sel, dim=-1), F.log_softmax(q_sel, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp(min=0.0)
    top1 = fp_logits.argmax(-1) == q_logits.argmax(-1)
    return kl, top1


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return hidden.float().mean(1)
    m = mask.unsqueeze(-1).float()
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


def _embeddings(output) -> torch.Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        raise TypeError("encoder agreement needs a model output with last_hidden_state")
    return hidden


@torch.no_grad()
def embedding_similarity(fp_model: nn.Module, q_model: nn.Module, data: CalibrationData) -> EmbeddingSimilarity:
    device_fp, device_q = model_device(fp_model), model_device(q_model)
    sims: list[torch.Tensor] = []
    for ids, mask in data.batches():
        e_fp = _mean_pool(_embeddings(forward(fp_model, ids.to(device_fp), None if mask is None else mask.to(device_fp))),
                          None if mask is None else mask.to(device_fp))
        e_q = _mean_pool(_embeddings(forward(q_model, ids.to(device_q), None if mask is None else mask.to(device_q))),
                         None if mask is None else mask.to(device_q))
        sims.append(F.cosine_similarity(e_fp.cpu(), e_q.cpu(), dim=-1))
    s = torch.cat(sims)
    return EmbeddingSimilarity(cosine_mean=float(s.mean()), cosine_min=float(s.min()), sequences=int(s.numel()))


@torch.no_grad()
def fp_agreement(fp_model: nn.Module, q_model: nn.Module, data: CalibrationData, top_k: int = 0) -> AgreementResult:
    """Compare ``q_model`` with ``fp_model`` on ``data`` (models may live on different devices)."""
    device_fp, device_q = model_device(fp_model), model_device(q_model)
    kl_sum, top1_sum, positions = 0.0, 0, 0
    for ids, mask in data.batches():
        m_fp = None if mask is None else mask.to(device_fp)
        out_fp = forward(fp_model, ids.to(device_fp), m_fp)
        if not is_causal_lm(out_fp):
            sim = embedding_similarity(fp_model, q_model, data)
            return AgreementResult(kind="encoder", cosine_mean=sim.cosine_mean, cosine_min=sim.cosine_min,
                                   sequences=sim.sequences)
        out_q = forward(q_model, ids.to(device_q), None if mask is None else mask.to(device_q))
        fp_logits = out_fp.logits.reshape(-1, out_fp.logits.shape[-1])
        q_logits = out_q.logits.reshape(-1, out_q.logits.shape[-1]).to(fp_logits.device)
        kl, top1 = _kl_and_top1(fp_logits, q_logits, top_k)
        valid = torch.ones_like(kl, dtype=torch.bool) if m_fp is None else m_fp.reshape(-1).bool()
        kl_sum += float(kl[valid].double().sum())
        top1_sum += int(top1[valid].sum())
        positions += int(valid.sum())
    if positions == 0:
        raise ValueError("no unpadded positions to compare")
    return AgreementResult(kind="causal_lm", kl_mean=kl_sum / positions, top1_agreement=top1_sum / positions,
                           positions=positions)
