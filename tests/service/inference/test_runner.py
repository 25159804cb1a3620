"""Batched prefill/decode with left padding, joins and leaves reproduce one-at-a-time full forwards."""

from __future__ import annotations

import pytest
import torch

from quant.modules.linear import QuantLinear
from service.inference.runner import DecoderRunner, EncoderRunner

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]


@torch.no_grad()
def _reference_logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("arch", ["qllama", "qopt", "qllama_kv4"])
def test_batched_steps_match_unbatched_forward(arch: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(arch)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    runner = DecoderRunner(model, pad_token_id=0, max_positions=256)
    seqs = [list(p) for p in PROMPTS]

    def check(rows: list[int], logits: torch.Tensor) -> None:
        for row, i in enumerate(rows):
            ref = _reference_logits(model, seqs[i])
            assert torch.allclose(logits[row], ref, atol=1e-4, rtol=1e-4), (arch, i)
            seqs[i].append(int(ref.argmax()))

    batch, logits = runner.prefill([PROMPTS[0], PROMPTS[1]])  # two prompts of different lengths
    assert batch.mask.tolist()[1][:5] == [0] * 5  # left padding, masked
    check([0, 1], logits)
    check([0, 1], runner.decode(batch, [seqs[0][-1], seqs[1][-1]]))
    joined, logits = runner.prefill([PROMPTS[2]])  # a request joins between decode steps
    check([2], logits)
    batch = runner.merge(batch, joined)
    for _ in range(2):
        check([0, 1, 2], runner.decode(batch, [seqs[i][-1] for i in range(3)]))
    batch = runner.select(batch, [1, 2])  # the longest sequence leaves: its padding columns go too
    assert batch.length == max(len(seqs[1]), len(seqs[2])) - 1
    check([1, 2], runner.decode(batch, [seqs[1][-1], seqs[2][-1]]))
    assert runner.forward_passes == 6
    assert runner.batch_sizes == [2, 2, 1, 3, 3, 2]


def test_encoder_runner_mean_pools_and_normalises(qbert) -> None:
    runner = EncoderRunner(qbert, pad_token_id=0, max_positions=512)
    inputs = [[5, 6, 7, 8], [9, 10]]
    vectors = runner.embed(inputs)
    assert vectors.shape == (2, 64)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(2), atol=1e-5)
    with torch.no_grad():
        solo = qbert(input_ids=torch.tensor([inputs[1]])).last_hidden_state[0].mean(0)
    assert torch.allclose(vectors[1], torch.nn.functional.normalize(solo, dim=0), atol=1e-4)
    assert runner.forward_passes == 1


def test_kv_quantized_model_decodes_from_a_quantized_cache(qllama_kv4, monkeypatch) -> None:
    """A model quantized with a KV-cache spec gets the real int4 cache (codes, not fp16); decode steps with
    no padded key go through kv_decode_attention, padded ones through the dequantized cache, and both
    match the fake-quant path (the same runner on transformers' fp DynamicCache)."""
    from transformers import DynamicCache

    from quant.modules.quantized_kv_cache import QuantizedKVCache, QuantizedKVLayer

    calls: list[int] = []
    original = QuantizedKVLayer.decode_attention
    monkeypatch.setattr(QuantizedKVLayer, "decode_attention",
                        lambda self, q, s: calls.append(1) or original(self, q, s))
    real = DecoderRunner(qllama_kv4, pad_token_id=0, max_positions=256)
    fake = DecoderRunner(qllama_kv4, pad_token_id=0, max_positions=256, cache_factory=DynamicCache)
    n_layers = qllama_kv4.config.num_hidden_layers

    rb, rl = real.prefill([PROMPTS[0]])
    fb, fl = fake.prefill([PROMPTS[0]])
    assert isinstance(rb.cache, QuantizedKVCache) and not isinstance(fb.cache, QuantizedKVCache)
    layer = rb.cache.quantized_layers()[0]
    assert layer.fmt.bits == 4 and layer.valid()["k_codes"].dtype == torch.uint8
    assert layer.valid()["k_codes"].shape[-1] == layer.head_dim // 2
    torch.testing.assert_close(rl, fl, rtol=1e-5, atol=1e-5)
    tok = int(fl.argmax())
    for _ in range(2):  # one row, no padding: the decode kernel
        rl, fl = real.decode(rb, [tok]), fake.decode(fb, [tok])
        torch.testing.assert_close(rl, fl, rtol=1e-4, atol=1e-4)
        tok = int(fl.argmax())
    assert len(calls) == 2 * n_layers
    # a shorter request joins: left padding -> dequantized path; then the long row leaves
    rj, _ = real.prefill([PROMPTS[1]])
    fj, _ = fake.prefill([PROMPTS[1]])
    rb, fb = real.merge(rb, rj), fake.merge(fb, fj)
    rl, fl = real.decode(rb, [tok, 3]), fake.decode(fb, [tok, 3])
    torch.testing.assert_close(rl, fl, rtol=1e-4, atol=1e-4)
    assert len(calls) == 2 * n_layers
    rb, fb = real.select(rb, [1]), fake.select(fb, [1])
    assert rb.cache.get_seq_length() == fb.cache.get_seq_length() == rb.length
    rl, fl = real.decode(rb, [4]), fake.decode(fb, [4])  # no padding left: the kernel again
    torch.testing.assert_close(rl, fl, rtol=1e-4, atol=1e-4)
    assert len(calls) == 3 * n_layers
