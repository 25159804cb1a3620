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


def _kv_quantized(model, bits: int, rotate: bool):
    from quant.models.adapters import get_adapter
    from quant.modules.kv_cache import attach_kv_quantizer
    from quant.recipes.schema import KVCacheQuantSpec

    attach_kv_quantizer(model, get_adapter(model), KVCacheQuantSpec(bits=bits), rotate=rotate)
    return model


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_quantized_static_kv_matches_hf_generate(bits: int, rotate: bool, kv_heads: int) -> None:
    """The int8/int4 static cache (kv_quantize + kv_decode_attention, CPU references here) gives the greedy
    tokens of HF ``generate`` on the same model with the fake-quant KV attention (same bits, rotation)."""
    model = _kv_quantized(_tiny_llama(kv_heads), bits, rotate)
    prompt = [5, 17, 3, 88, 42, 9]
    new = 12
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                            pad_token_id=0)[0, len(prompt):].tolist()
    dec = StaticDecoder(model, max_len=32, kv_bits=bits)
    assert (dec.rotations[0] is not None) == rotate
    assert dec.generate(prompt, new) == hf


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_static_kv_stores_codes(bits: int) -> None:
    model = _tiny_llama(2)
    fp = StaticDecoder(model, max_len=64)
    dec = StaticDecoder(model, max_len=64, kv_bits=bits)
    assert not dec.k_cache and len(dec.qkv) == 2
    c = dec.qkv[0]
    assert c.k_codes.dtype == torch.uint8 and c.k_codes.shape == (1, 2, 64, 16 * bits // 8)
    assert c.k_scale.shape == (1, 2, 64) and c.k_scale.dtype == torch.float32
    # head_dim 16: (16*bits/8 + 8 bytes of scale/zero) per row vs 2*16 bytes in fp16... fp32 here: 4*16
    per_row = 16 * bits // 8 + 8
    assert dec.kv_cache_bytes() == 2 * 2 * 2 * 64 * per_row
    assert dec.kv_cache_bytes() < fp.kv_cache_bytes()
    # what is stored for the prompt dequantizes to the layer's keys/values within one quantization step
    # (the one-token-at-a-time projections differ from a full forward's only by float rounding)
    from kernels import reference

    prompt = [5, 17, 3, 88]
    dec.generate(prompt, 1)
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
    for layer, cache in enumerate(dec.qkv[:1]):  # layer 0: its K/V depend on the embeddings only
        for name, ref in (("k", out.past_key_values.layers[layer].keys), ("v", out.past_key_values.layers[layer].values)):
            codes, scale, zero = (getattr(cache, f"{name}_{part}")[:, :, :4] for part in ("codes", "scale", "zero"))
            _, ref_scale, _ = reference.kv_quantize_ref(ref, bits, False, 1.0)
            torch.testing.assert_close(scale, ref_scale, rtol=1e-4, atol=1e-7)
            err = (reference.kv_dequantize_ref(codes, scale, zero, bits, torch.float32) - ref).abs()
            assert bool((err <= 1.01 * scale.unsqueeze(-1)).all()), (layer, name)
    assert not dec.qkv[0].k_scale[:, :, 4:].any()  # nothing written past the sequence
    assert int(dec.seq_lens[0]) == len(prompt)


def test_quantized_static_kv_rejects_other_bits() -> None:
    with pytest.raises(ValueError, match="kv_bits"):
        StaticDecoder(_tiny_llama(4), max_len=8, kv_bits=6)


def _cuda_llama(kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=256, max_position_embeddings=512)  # head_dim 128
    return LlamaForCausalLM(cfg).eval().to(device="cuda", dtype=torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_static_kv_cuda_graph_replay(bits: int) -> None:
    """CUDA kernels: the graph-replayed int8/int4 decode gives the eager decoder's tokens, and its logits
    track HF's fake-quant KV attention (fp16) step by step."""
    from benchmarks.graph_decode import GraphedDecodeStep
    from kernels import ops

    assert ops.KV_CUDA_KERNELS_REGISTERED, "the extension lacks the KV kernels: python -m kernels.build"
    model = _kv_quantized(_cuda_llama(2), bits, rotate=True)
    prompt = list(range(3, 40))
    dec = StaticDecoder(model, max_len=128, kv_bits=bits)
    eager = dec.generate(prompt, 16)
    dec.prefill(prompt)
    graphed = GraphedDecodeStep(dec)
    replayed = [int(dec.ids.item())]
    for _ in range(15):
        graphed.replay(1)
        replayed.append(int(dec.ids.item()))
    assert replayed == eager
    # each greedy token is HF's (fake-quant KV attention, fp16) best next token up to fp16 rounding
    full = torch.tensor([prompt + eager], device="cuda")
    with torch.no_grad():
        logits = model(full).logits[0, len(prompt) - 1 : -1].float()  # predicts eager[0..15]
    chosen = logits.gather(1, torch.tensor(eager, device="cuda").unsqueeze(1)).squeeze(1)
    gap = logits.max(dim=1).values - chosen
    assert float(gap.max()) < 2e-2, gap
