from __future__ import annotations

import pytest
import torch

from quant.quantizers.weight import quantize_weight_rtn
from quant.recipes.schema import WeightQuantSpec


def _w(seed: int = 0) -> torch.Tensor:
    return torch.randn(32, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_within_half_step(bits: int, symmetric: bool) -> None:
    W = _w()
    qw = quantize_weight_rtn(W, WeightQuantSpec(bits=bits, symmetric=symmetric, clip_search=False))
    assert qw.codes.shape == W.shape and qw.scale.shape == (32, 1) and qw.group_size == 64
    err = (qw.dequantize() - W).abs()
    assert bool((err <= qw.scale / 2 + 1e-6).all())  # no clipping: every weight within half a step


def test_error_shrinks_with_bits_and_groups() -> None:
    W = _w(1)

    def rel(spec: WeightQuantSpec) -> float:
        return float((quantize_weight_rtn(W, spec).dequantize() - W).norm() / W.norm())

    errs = [rel(WeightQuantSpec(bits=b)) for b in (2, 3, 4, 6, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 0.01  # 8-bit per-channel: under 1 %
    assert rel(WeightQuantSpec(bits=4, granularity="per_group", group_size=16)) < rel(WeightQuantSpec(bits=4))


def test_clip_search_never_hurts() -> None:
    W = _w(2)
    W[0, 0] = 25.0  # one outlier makes clipping worthwhile for its row
    for bits in (3, 4):
        plain = quantize_weight_rtn(W, WeightQuantSpec(bits=bits, clip_search=False)).dequantize()
        searched = quantize_weight_rtn(W, WeightQuantSpec(bits=bits, clip_search=True)).dequantize()
        row_plain = (plain - W).pow(2).sum(1)
        row_searched = (searched - W).pow(2).sum(1)
        assert bool((row_searched <= row_plain + 1e-6).all())


def test_group_size_must_divide() -> None:
    with pytest.raises(ValueError, match="divisible"):
        quantize_weight_rtn(torch.randn(4, 24), WeightQuantSpec(bits=4, granularity="per_group", group_size=16))
