"""GPU checks of the quantized-KV-cache kernels (kernels/csrc/kv_attention.cu) against their references on
fresh random inputs, outputs poisoned first. Collected only where CUDA is (marker ``gpu``)."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import poison_cuda as _poison
from kernel_test_utils import rel_err

import kernels
from kernels import reference
from quant.quantizers.packing import unpack_int4

pytestmark = pytest.mark.gpu  # collected only where CUDA is (tests/conftest.py)
DEV = "cuda"


@pytest.fixture(autouse=True)
def _extension_built() -> None:
    assert kernels.available(), kernels.unavailable_reason()
    assert kernels.ops.KV_CUDA_KERNELS_REGISTERED, "extension built without kv_attention.cu"


def _cache(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """fp16 cache-like values on the CPU: offset, per-channel spread, sparse outliers (never zeros)."""
    x = torch.randn(shape, generator=gen) * (0.5 + torch.rand(shape[-1], generator=gen)) + 0.2
    x.view(-1)[::97] *= 8.0
    return x.half()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_kv_quantize(bits: int, symmetric: bool, d: int) -> None:
    gen = torch.Generator().manual_seed(bits * 100 + d + symmetric)
    x = _cache((3, 8, 301, d), gen)
    clip = 0.93
    codes_ref, scale_ref, zero_ref = reference.kv_quantize_ref(x, bits, symmetric, clip)
    _poison(x.numel() * 4)
    codes, scale, zero = torch.ops.qaas.kv_quantize(x.to(DEV), bits, symmetric, clip)
    torch.cuda.synchronize()
    codes, scale, zero = codes.cpu(), scale.cpu(), zero.cpu()
    assert codes.shape == codes_ref.shape and scale.shape == scale_ref.shape == zero.shape
    assert torch.isfinite(scale).all() and torch.isfinite(zero).all()
    assert rel_err(scale, scale_ref) < 1e-5
    assert rel_err(zero + 1, zero_ref + 1) < 1e-5
    u, u_ref = (unpack_int4(codes), unpack_int4(codes_ref)) if bits == 4 else (codes, codes_ref)
    diff = (u.int() - u_ref.int()).abs()
    # same float32 operations in the same order: identical codes, bar rare rounding-boundary flips
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-4


def _quantized_cache(
    b: int, hkv: int, lmax: int, d: int, bits: int, symmetric: bool, seq_lens: list[int], gen: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """K and V caches quantized by the reference; scales past each sequence's length set to NaN (and codes
    to random bytes), so a kernel that reads or weights masked positions fails."""
    out = []
    for _ in range(2):
        codes, scale, zero = reference.kv_quantize_ref(_cache((b, hkv, lmax, d), gen), bits, symmetric, 1.0)
        for i, n in enumerate(seq_lens):
            scale[i, :, n:] = float("nan")
            zero[i, :, n:] = float("nan")
            codes[i, :, n:] = torch.randint(0, 256, codes[i, :, n:].shape, generator=gen, dtype=torch.uint8)
        out += [codes, scale, zero]
    return tuple(out)


CASES = [
    # (batch, Hq, Hkv, seq_lens, Lmax)
    (1, 32, 32, [1], 64),
    (1, 32, 8, [77], 4096),
    (1, 32, 32, [4096], 4096),
    (1, 32, 8, [4096], 4096),
    (3, 32, 32, [1, 1000, 4096], 4096),
    (3, 32, 8, [77, 4096, 1000], 4096),
    (3, 32, 8, [4096, 1, 77], 4100),
]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("b,hq,hkv,seq_lens,lmax", CASES)
def test_kv_decode_attention(b: int, hq: int, hkv: int, seq_lens: list[int], lmax: int, d: int, bits: int) -> None:
    _check_decode(b, hq, hkv, seq_lens, lmax, d, bits, symmetric=False)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "hq,hkv,symmetric", [(12, 4, False), (40, 8, False), (64, 4, True), (8, 1, False), (16, 8, True)]
)
def test_kv_decode_attention_groups(hq: int, hkv: int, symmetric: bool, bits: int) -> None:
    """Other GQA group sizes (3 and 5 pad the block's heads; 16 takes two head chunks) and symmetric caches."""
    _check_decode(2, hq, hkv, [333, 1500], 1536, 128, bits, symmetric)


def _check_decode(
    b: int, hq: int, hkv: int, seq_lens: list[int], lmax: int, d: int, bits: int, symmetric: bool
) -> None:
    gen = torch.Generator().manual_seed(hash((b, hq, hkv, tuple(seq_lens), lmax, d, bits, symmetric)) % (1 << 31))
    q = (torch.randn(b, hq, d, generator=gen) * 1.5).half()
    cache = _quantized_cache(b, hkv, lmax, d, bits, symmetric, seq_lens, gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    sm_scale = d**-0.5
    clean = [t.nan_to_num(0.0) if t.is_floating_point() else t for t in cache]
    ref = reference.kv_decode_attention_f64(q, *clean[:3], *clean[3:], bits, lens, sm_scale)
    _poison(b * hq * d * 64)
    out = torch.ops.qaas.kv_decode_attention(q.to(DEV), *(t.to(DEV) for t in cache), bits, lens.to(DEV), sm_scale)
    torch.cuda.synchronize()
    assert out.dtype == torch.float16 and out.shape == (b, hq, d)
    assert rel_err(out, ref) < 2e-3
    # every sequence on its own too (a short one must not hide inside the batch norm)
    for i in range(b):
        assert rel_err(out[i], ref[i]) < 2e-3, i


def test_kv_quantize_then_attention_matches_fake_quant_pipeline() -> None:
    """GPU quantization feeding GPU attention == reference quantization feeding the float64 reference."""
    gen = torch.Generator().manual_seed(11)
    b, hq, hkv, lmax, d = 2, 32, 8, 700, 128
    k, v = _cache((b, hkv, lmax, d), gen), _cache((b, hkv, lmax, d), gen)
    q = torch.randn(b, hq, d, generator=gen).half()
    lens = torch.tensor([700, 513], dtype=torch.int32)
    for bits in (8, 4):
        kq = torch.ops.qaas.kv_quantize(k.to(DEV), bits, False, 1.0)
        vq = torch.ops.qaas.kv_quantize(v.to(DEV), bits, False, 1.0)
        out = torch.ops.qaas.kv_decode_attention(q.to(DEV), *kq, *vq, bits, lens.to(DEV), d**-0.5)
        kr, vr = reference.kv_quantize_ref(k, bits, False, 1.0), reference.kv_quantize_ref(v, bits, False, 1.0)
        ref = reference.kv_decode_attention_f64(q, *kr, *vr, bits, lens, d**-0.5)
        assert rel_err(out, ref) < 2e-3, bits


def test_kv_decode_attention_cuda_graph() -> None:
    """Capturable (no host sync): replay with new seq_lens in place gives the new answer."""
    gen = torch.Generator().manual_seed(5)
    b, hq, hkv, lmax, d, bits = 2, 32, 8, 2048, 128, 4
    cache = [t.to(DEV) for t in _quantized_cache(b, hkv, lmax, d, bits, False, [lmax, lmax], gen)]
    q = torch.randn(b, hq, d, generator=gen).half().to(DEV)
    lens = torch.tensor([2048, 100], dtype=torch.int32, device=DEV)
    torch.ops.qaas.kv_decode_attention(q, *cache, bits, lens, d**-0.5)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = torch.ops.qaas.kv_decode_attention(q, *cache, bits, lens, d**-0.5)
    lens.copy_(torch.tensor([5, 1999], dtype=torch.int32))
    g.replay()
    torch.cuda.synchronize()
    ref = reference.kv_decode_attention_f64(q.cpu(), *(t.cpu() for t in cache), bits, lens.cpu(), d**-0.5)
    assert rel_err(out, ref) < 2e-3
