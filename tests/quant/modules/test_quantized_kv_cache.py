"""The real quantized KV cache (codes + per-token scale/zero, ``kernels.ops`` append and decode attention)
reproduces the fake-quant attention path of ``quant.modules.kv_cache`` on a tiny random LLaMA."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kernels import reference
from quant.models.adapters import get_adapter
from quant.modules.kv_cache import attach_kv_quantizer
from quant.modules.quantized_kv_cache import (
    KVFormat,
    QuantizedKVCache,
    QuantizedKVLayer,
    QuantizedKVView,
    has_quantized_kv,
)
from quant.quantizers.core import fake_quantize
from quant.recipes.schema import KVCacheQuantSpec
from tests.conftest import make_tiny_llama


def _kv_llama(bits: int, rotate: bool, kv_heads: int = 2, base: str = "sdpa") -> torch.nn.Module:
    model = make_tiny_llama(kv_heads=kv_heads)
    model.config._attn_implementation = base
    attach_kv_quantizer(model, get_adapter(model), KVCacheQuantSpec(bits=bits), rotate=rotate)
    return model


def _count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = QuantizedKVLayer.decode_attention

    def counted(self, query, sm_scale):
        calls.append(int(query.shape[0]))
        return original(self, query, sm_scale)

    monkeypatch.setattr(QuantizedKVLayer, "decode_attention", counted)
    return calls


@pytest.mark.parametrize("bits", [8, 4])
def test_layer_stores_codes_smaller_than_fp16(bits: int) -> None:
    torch.manual_seed(0)
    layer = QuantizedKVLayer(KVFormat(bits, symmetric=False, clip_ratio=1.0))
    k, v = torch.randn(2, 4, 37, 64, dtype=torch.float16), torch.randn(2, 4, 37, 64, dtype=torch.float16)
    for t in range(0, 37, 5):  # appends of several sizes, through capacity growth
        view, same = layer.update(k[:, :, t : t + 5], v[:, :, t : t + 5])
        assert isinstance(view, QuantizedKVView) and same is view
    assert layer.get_seq_length() == 37 and layer.capacity >= 37
    stored = layer.valid()
    assert stored["k_codes"].dtype == torch.uint8 and stored["k_codes"].shape == (2, 4, 37, 64 * bits // 8)
    assert stored["v_scale"].dtype == torch.float32 and stored["v_scale"].shape == (2, 4, 37)
    # codes are exactly those of the op's reference on the whole tensor (per-token: append order irrelevant)
    codes, scale, zero = reference.kv_quantize_ref(k, bits, False, 1.0)
    assert torch.equal(stored["k_codes"], codes)
    torch.testing.assert_close(stored["k_scale"], scale, rtol=0, atol=0)
    torch.testing.assert_close(stored["k_zero"], zero, rtol=0, atol=0)
    # memory: per row D*bits/8 code bytes + 8 bytes of scale/zero, vs 2*D bytes in fp16
    fp16_bytes = 2 * k.numel() * 2
    assert layer.nbytes() == 2 * 2 * 4 * 37 * (64 * bits // 8 + 8)
    assert layer.nbytes() / fp16_bytes == pytest.approx((64 * bits / 8 + 8) / 128)
    assert layer.nbytes() < fp16_bytes * (0.57 if bits == 8 else 0.32)
    # dequantized cache == the fake quantizer's output, bit for bit
    dk, dv = layer.dequantize(torch.float16)
    assert torch.equal(dk, fake_quantize(k, bits, False, 1.0))
    assert torch.equal(dv, fake_quantize(v, bits, False, 1.0))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_decode_logits_match_fake_quant(bits: int, rotate: bool, kv_heads: int, monkeypatch) -> None:
    model = _kv_llama(bits, rotate, kv_heads)
    calls = _count_kernel_calls(monkeypatch)
    ids = torch.randint(0, 128, (2, 14), generator=torch.Generator().manual_seed(3))
    fake, real = DynamicCache(), QuantizedKVCache.from_model(model)
    with torch.no_grad():
        a = model(ids[:, :9], past_key_values=fake, use_cache=True).logits
        b = model(ids[:, :9], past_key_values=real, use_cache=True).logits
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)  # prefill: dequantized cache + SDPA
        assert calls == []
        for t in range(9, 14):
            a = model(ids[:, t : t + 1], past_key_values=fake, use_cache=True).logits
            b = model(ids[:, t : t + 1], past_key_values=real, use_cache=True).logits
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert len(calls) == 5 * 2  # every decode step, every layer, went through kv_decode_attention
    assert real.get_seq_length() == 14 == fake.get_seq_length()
    for layer, ref in zip(real.quantized_layers(), fake.layers):
        assert layer.nbytes() < ref.keys.numel() * 2 * 2  # smaller than an fp16 cache of the same K/V


def test_decode_differs_from_unquantized() -> None:
    """The agreement above is not vacuous: int4 storage changes the logits vs the fp cache."""
    model, fp = _kv_llama(4, False), make_tiny_llama()
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = QuantizedKVCache.from_model(model)
        model(ids[:, :-1], past_key_values=cache, use_cache=True)
        q = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
        ref = fp(ids).logits[:, -1:]
    assert float((q - ref).abs().max()) > 1e-3


@pytest.mark.parametrize("bits", [8, 4])
def test_generate_with_quantized_cache(bits: int, monkeypatch) -> None:
    model = _kv_llama(bits, rotate=True)
    calls = _count_kernel_calls(monkeypatch)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fake = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        real = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                              past_key_values=QuantizedKVCache.from_model(model))
    assert real.tolist() == fake.tolist()
    assert len(calls) == 5 * 2


def test_left_padded_decode_uses_dequantized_cache(monkeypatch) -> None:
    """A mask hiding key positions (left padding) cannot go to the prefix-only kernel: the dequantized
    cache + masked SDPA runs instead, and still matches the fake-quant path."""
    model = _kv_llama(8, rotate=True)
    calls = _count_kernel_calls(monkeypatch)
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    fake, real = DynamicCache(), QuantizedKVCache.from_model(model)
    with torch.no_grad():
        for cache in (fake, real):
            model(ids[:, :8], attention_mask=mask[:, :8], position_ids=pos[:, :8], past_key_values=cache, use_cache=True)
        a = model(ids[:, 8:], attention_mask=mask, position_ids=pos[:, 8:], past_key_values=fake, use_cache=True).logits
        b = model(ids[:, 8:], attention_mask=mask, position_ids=pos[:, 8:], past_key_values=real, use_cache=True).logits
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert calls == []


def test_eager_base_implementation_matches(monkeypatch) -> None:
    model = _kv_llama(4, rotate=True, base="eager")
    calls = _count_kernel_calls(monkeypatch)
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(7))
    fake, real = DynamicCache(), QuantizedKVCache.from_model(model)
    with torch.no_grad():
        for cache in (fake, real):
            model(ids[:, :6], past_key_values=cache, use_cache=True)
        a = model(ids[:, 6:], past_key_values=fake, use_cache=True).logits
        b = model(ids[:, 6:], past_key_values=real, use_cache=True).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2


def test_batch_ops_crop_and_select_rows() -> None:
    model = _kv_llama(8, rotate=False)
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(8))
    cache = QuantizedKVCache.from_model(model)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    layer = cache.quantized_layers()[0]
    full = {n: t.clone() for n, t in layer.valid().items()}
    sub = cache.select_rows(torch.tensor([2, 0]), start=2).quantized_layers()[0]
    assert sub.get_seq_length() == 4 and sub.batch == 2
    assert torch.equal(sub.valid()["k_codes"], full["k_codes"][[2, 0], :, 2:])
    merged = QuantizedKVCache.merge(cache, cache.select_rows(torch.tensor([1]), start=3), length=6)
    m = merged.quantized_layers()[0].valid()
    assert m["v_codes"].shape[0] == 4
    assert torch.equal(m["v_codes"][3, :, 3:], full["v_codes"][1, :, 3:])
    assert not m["v_scale"][3, :, :3].any()  # left padding: zero codes and scale
    cache.crop(-2)
    assert cache.get_seq_length() == 4
    cache.reorder_cache(torch.tensor([1, 1, 0]))
    assert torch.equal(layer.valid()["k_codes"][0], full["k_codes"][1, :, :4])
    cache.reset()
    assert cache.get_seq_length() == 0


def test_from_model_needs_kv_quantizers() -> None:
    plain = make_tiny_llama()
    assert not has_quantized_kv(plain)
    with pytest.raises(ValueError, match="no KV quantizers"):
        QuantizedKVCache.from_model(plain)
    model = _kv_llama(4, rotate=True)
    assert has_quantized_kv(model)
    cache = QuantizedKVCache.from_model(model)
    assert len(cache.quantized_layers()) == model.config.num_hidden_layers
    layer = cache.quantized_layers()[0]
    assert layer.fmt == KVFormat(4, False, 1.0) and layer.rotation is not None
    with pytest.raises(ValueError):
        KVFormat(6, False, 1.0)


def _gpu_llama(bits: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)  # head_dim 64
    model = LlamaForCausalLM(cfg).eval().to(device="cuda", dtype=torch.float16)
    attach_kv_quantizer(model, get_adapter(model), KVCacheQuantSpec(bits=bits), rotate=True)
    return model


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_decode_kernel_matches_fake_quant(bits: int, monkeypatch) -> None:
    """fp16 on the GPU: the CUDA kv_quantize / kv_decode_attention path vs fake-quant + SDPA in fp16."""
    from kernels import ops

    assert ops.KV_CUDA_KERNELS_REGISTERED, "the extension lacks the KV kernels: python -m kernels.build"
    model = _gpu_llama(bits)
    calls = _count_kernel_calls(monkeypatch)
    ids = torch.randint(0, 128, (3, 300), generator=torch.Generator().manual_seed(9)).cuda()
    fake, real = DynamicCache(), QuantizedKVCache.from_model(model)
    with torch.no_grad():
        for cache in (fake, real):
            model(ids[:, :290], past_key_values=cache, use_cache=True)
        for t in range(290, 300):
            a = model(ids[:, t : t + 1], past_key_values=fake, use_cache=True).logits.float()
            b = model(ids[:, t : t + 1], past_key_values=real, use_cache=True).logits.float()
            rel = float((b - a).norm() / a.norm())
            assert rel < 5e-3, (t, rel)
    assert len(calls) == 10 * 2
    assert real.quantized_layers()[0].buffers["k_codes"].is_cuda
