"""The static-cache decoder used by the end-to-end generation benchmark gives the same greedy tokens
as Hugging Face ``generate`` (tiny random LLaMA on the CPU: mechanics only)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.graph_decode import StaticDecoder


def _tiny_llama(kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=97, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_static_decoder_matches_hf_generate(kv_heads: int) -> None:
    model = _tiny_llama(kv_heads)
    prompt = [5, 17, 3, 88, 42, 9]
    new = 12
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                            pad_token_id=0)[0, len(prompt):].tolist()
    ours = StaticDecoder(model, max_len=32).generate(prompt, new)
    assert ours == hf


def test_static_decoder_refuses_overflow() -> None:
    with pytest.raises(ValueError, match="exceed the cache"):
        StaticDecoder(_tiny_llama(4), max_len=8).generate([1, 2, 3], 6)
