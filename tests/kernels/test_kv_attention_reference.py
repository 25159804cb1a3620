"""CPU checks of the quantized-KV-cache references (kernels.reference.kv_*), which define what the CUDA
kernels in kernels/csrc/kv_attention.cu compute: they must be the library's own KV fake quantization
(quant.modules.kv_cache.KVQuantizer) followed by SDPA, and quantization must round-trip within half a step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import reference
from quant.modules.kv_cache import KVQuantizer
from quant.quantizers.core import fake_quantize


def _cache(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """fp16 cache-like values: an offset, per-channel spread and a few outliers (never zeros)."""
    x = torch.randn(shape, generator=gen) * (0.5 + torch.rand(shape[-1], generator=gen)) + 0.2
    x.view(-1)[:: 97] *= 8.0
    return x.half()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_kv_quantize_ref_is_library_fake_quant(bits: int, symmetric: bool, clip: float) -> None:
    gen = torch.Generator().manual_seed(bits * 10 + symmetric)
    x = _cache((2, 3, 17, 64), gen)
    codes, scale, zero = reference.kv_quantize_ref(x, bits, symmetric, clip)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 3, 17, 64 if bits == 8 else 32)
    assert scale.shape == zero.shape == (2, 3, 17) and scale.dtype == zero.dtype == torch.float32
    deq = reference.kv_dequantize_ref(codes, scale, zero, bits, torch.float32)
    fq = fake_quantize(x.float(), bits, symmetric, clip)
    torch.testing.assert_close(deq, fq, rtol=1e-6, atol=1e-6)
    if symmetric:
        assert bool((zero == 2 ** (bits - 1)).all())
    else:
        assert bool((zero == zero.round()).all())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_kv_quantize_round_trip_within_half_step(bits: int, symmetric: bool) -> None:
    gen = torch.Generator().manual_seed(7 + bits + symmetric)
    x = _cache((3, 2, 40, 128), gen)
    codes, scale, zero = reference.kv_quantize_ref(x, bits, symmetric, 1.0)
    deq = reference.kv_dequantize_ref(codes, scale, zero, bits)
    err = (deq - x.double()).abs()
    half_step = scale.double().unsqueeze(-1) / 2
    assert bool((err <= half_step * (1 + 1e-4) + 1e-7).all()), float((err / half_step).max())


def _sdpa_of_fake_quant(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bits: int, symmetric: bool, clip: float,
    seq_lens: torch.Tensor, sm_scale: float,
) -> torch.Tensor:
    """What quant.modules.kv_cache computes: KVQuantizer fake quantization of K and V, then SDPA (masked)."""
    quantizer = KVQuantizer(bits, symmetric, clip)
    _, kq, vq = quantizer(q.float().unsqueeze(2), k.float(), v.float())
    groups = q.shape[1] // k.shape[1]
    kq, vq = kq.double().repeat_interleave(groups, 1), vq.double().repeat_interleave(groups, 1)
    mask = torch.arange(k.shape[2]).unsqueeze(0) < seq_lens.long().unsqueeze(1)
    out = F.scaled_dot_product_attention(
        q.double().unsqueeze(2), kq, vq, attn_mask=mask[:, None, None, :], scale=sm_scale
    )
    return out.squeeze(2)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (6, 2)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_kv_decode_attention_ref_is_fake_quant_sdpa(bits: int, hq: int, hkv: int, symmetric: bool) -> None:
    gen = torch.Generator().manual_seed(bits + hq * 3 + hkv + symmetric)
    b, lmax, d = 3, 45, 64
    q = torch.randn(b, hq, d, generator=gen).half()
    k, v = _cache((b, hkv, lmax, d), gen), _cache((b, hkv, lmax, d), gen)
    seq_lens = torch.tensor([1, 45, 23], dtype=torch.int32)
    kc, ks, kz = reference.kv_quantize_ref(k, bits, symmetric, 0.95)
    vc, vs, vz = reference.kv_quantize_ref(v, bits, symmetric, 0.95)
    out = reference.kv_decode_attention_f64(q, kc, ks, kz, vc, vs, vz, bits, seq_lens, d**-0.5)
    ref = _sdpa_of_fake_quant(q, k, v, bits, symmetric, 0.95, seq_lens, d**-0.5)
    assert float((out - ref).norm() / ref.norm()) < 1e-6
    # positions past seq_lens do not matter
    kc2 = kc.clone()
    kc2[2, :, 23:] = 255 if bits == 8 else 0xFF
    out2 = reference.kv_decode_attention_f64(q, kc2, ks, kz, vc, vs, vz, bits, seq_lens, d**-0.5)
    assert torch.equal(out, out2)


def test_ops_run_references_on_cpu() -> None:
    gen = torch.Generator().manual_seed(3)
    k = _cache((2, 2, 9, 64), gen)
    codes, scale, zero = torch.ops.qaas.kv_quantize(k, 4, False, 1.0)
    ref = reference.kv_quantize_ref(k, 4, False, 1.0)
    assert all(torch.equal(a, r) for a, r in zip((codes, scale, zero), ref))
    q = torch.randn(2, 4, 64, generator=gen).half()
    lens = torch.tensor([0, 9], dtype=torch.int32)
    out = torch.ops.qaas.kv_decode_attention(q, codes, scale, zero, codes, scale, zero, 4, lens, 0.125)
    assert out.dtype == torch.float16 and out.shape == q.shape
    assert bool((out[0] == 0).all()) and torch.isfinite(out).all()  # empty sequence -> 0
