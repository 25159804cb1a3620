from __future__ import annotations

import math

import pytest
import torch

from quant.calibration.data import CalibrationData
from quant.evaluation import fp_agreement, model_size_bytes, perplexity, size_report
from quant.methods.base import get_method
from quant.recipes.presets import get_preset
from tests.conftest import VOCAB, make_calibration, make_tiny_bert, make_tiny_llama


def test_perplexity_matches_manual_token_weighted_nll() -> None:
    model = make_tiny_llama()
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding: only 5 predictions from this row
    data = CalibrationData(ids, attention_mask=mask, batch_size=2)
    res = perplexity(model, data)
    assert res.tokens == 9 + 5 + 9
    nll, n = 0.0, 0
    with torch.no_grad():
        for row in range(3):
            length = int(mask[row].sum())
            logits = model(ids[row : row + 1, :length]).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, ids[row, 1:length], reduction="sum"))
            n += length - 1
    assert res.nll == pytest.approx(nll / n, rel=1e-4)
    assert res.ppl == pytest.approx(math.exp(nll / n), rel=1e-4)
    # a random model is close to uniform over the vocabulary
    assert 0.3 * VOCAB < res.ppl < 3 * VOCAB


def test_agreement_identical_and_quantized() -> None:
    data = make_calibration(num_samples=4, seq_len=16)
    fp = make_tiny_llama()
    same = fp_agreement(fp, make_tiny_llama(), data)
    assert same.kind == "causal_lm" and same.kl_mean == pytest.approx(0.0, abs=1e-6)
    assert same.top1_agreement == 1.0 and same.positions == 64
    q8 = get_method("rtn").calibrate(make_tiny_llama(), data, get_preset("rtn-w8a8"))
    q4 = get_method("rtn").calibrate(make_tiny_llama(), data, get_preset("rtn-w4a4"))
    a8, a4 = fp_agreement(fp, q8, data), fp_agreement(fp, q4, data)
    assert 0.0 < a8.kl_mean < a4.kl_mean
    assert a4.top1_agreement <= a8.top1_agreement <= 1.0
    top = fp_agreement(fp, q4, data, top_k=10)
    assert top.kl_mean is not None and 0.0 < top.kl_mean
    assert set(a4.metrics()) == {"kl_mean", "top1_agreement"}


def test_encoder_cosine_similarity() -> None:
    data = make_calibration(num_samples=4, seq_len=16)
    fp = make_tiny_bert()
    same = fp_agreement(fp, make_tiny_bert(), data)
    assert same.kind == "encoder" and same.cosine_min == pytest.approx(1.0, abs=1e-5)
    q = get_method("rtn").calibrate(make_tiny_bert(), data, get_preset("rtn-w4a4"))
    res = fp_agreement(fp, q, data)
    assert res.sequences == 4 and -1.0 <= res.cosine_min <= res.cosine_mean < 1.0
    assert set(res.metrics()) == {"cosine_mean", "cosine_min"}


def test_model_size_shrinks_with_bits() -> None:
    fp = make_tiny_llama()
    fp_bytes = model_size_bytes(fp)
    assert fp_bytes == sum(p.numel() * 4 for p in fp.parameters())
    q8 = get_method("rtn").calibrate(make_tiny_llama(), make_calibration(), get_preset("rtn-w8a8"))
    q4 = get_method("rtn").calibrate(make_tiny_llama(), make_calibration(), get_preset("rtn-w4a4"))
    s8, s4 = size_report(fp, q8), size_report(fp, q4)
    assert s4.size_bytes_quant < s8.size_bytes_quant < fp_bytes
    # the block linears (not embeddings / lm_head) shrink: int4 is about an eighth of fp32
    block_fp = sum(m.weight.numel() * 4 for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n)
    assert fp_bytes - s4.size_bytes_quant > 0.8 * block_fp
    assert s4.compression > 1.0
