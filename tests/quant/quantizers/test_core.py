from __future__ import annotations

import pytest
import torch

from quant.quantizers.core import compute_qparams, dequantize_codes, fake_quantize, quantize_codes


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quant_equals_codes_round_trip(bits: int, symmetric: bool) -> None:
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits)) * 3
    qp = compute_qparams(x, bits, symmetric)
    codes = quantize_codes(x, qp)
    assert codes.dtype == torch.uint8
    lo = 1 if symmetric else 0
    assert int(codes.min()) >= lo and int(codes.max()) <= 2**bits - 1
    deq = dequantize_codes(codes, qp)
    torch.testing.assert_close(fake_quantize(x, bits, symmetric), deq, rtol=0, atol=1e-5)
    # round to nearest: error at most half a step inside the range
    assert bool(((deq - x).abs() <= qp.scale / 2 + 1e-6).all())
    # quantizing a quantized tensor is the identity
    torch.testing.assert_close(fake_quantize(deq, bits, symmetric), deq, rtol=0, atol=1e-5)


def test_symmetric_zero_point_and_range() -> None:
    x = torch.tensor([[-2.0, -1.2, 0.0, 1.2, 2.0]])
    qp = compute_qparams(x, 4, True)
    assert float(qp.zero) == 8.0 and float(qp.scale) == pytest.approx(2.0 / 7)
    assert quantize_codes(x, qp).tolist() == [[1, 4, 8, 12, 15]]


def test_clip_ratio_and_groups() -> None:
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    clipped = fake_quantize(x, 8, True, clip_ratio=0.5)
    assert float(clipped.abs().max()) <= 0.5 * float(x.abs().max()) + 1e-5
    grouped = fake_quantize(x, 4, True, group_size=8)
    per_group = torch.cat([fake_quantize(x[:, i : i + 8], 4, True) for i in range(0, 32, 8)], dim=1)
    torch.testing.assert_close(grouped, per_group)
    assert fake_quantize(x, 16, True) is x


def test_straight_through_gradients() -> None:
    x = torch.randn(3, 8, requires_grad=True)
    clip = torch.tensor(0.9, requires_grad=True)
    fake_quantize(x, 4, False, clip_ratio=clip).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    assert clip.grad is not None and torch.isfinite(clip.grad)
