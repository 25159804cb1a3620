from __future__ import annotations

import pytest
import torch

from quant.quantizers.gptq import gptq_quantize, gptq_quantize_ex, relative_output_error
from quant.quantizers.weight import quantize_weight_rtn
from quant.recipes.schema import GPTQSpec, WeightQuantSpec


def _correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scales = torch.logspace(0, 1.3, d)[torch.randperm(d, generator=g)]  # uneven channel magnitudes
    return (torch.randn(n, d, generator=g) @ mix + 0.3 * torch.randn(n, d, generator=g)) * scales


def _out_err(W: torch.Tensor, Wq: torch.Tensor, X: torch.Tensor) -> float:
    return float((X @ (Wq - W).T).norm() / (X @ W.T).norm())


SPECS = {
    "w4-per-channel": dict(bits=4, symmetric=True),
    "w3-per-channel-no-actorder": dict(bits=3, symmetric=True, gptq=GPTQSpec(act_order=False)),
    "w4-g16-asym": dict(bits=4, granularity="per_group", group_size=16, symmetric=False),
    "w4-g16-static": dict(bits=4, granularity="per_group", group_size=16, gptq=GPTQSpec(static_groups=True)),
    "w4-g16-no-actorder-small-blocks": dict(
        bits=4, granularity="per_group", group_size=16, gptq=GPTQSpec(act_order=False, block_size=24)
    ),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_gptq_beats_rtn_on_layer_outputs(name: str) -> None:
    d_in, d_out = 64, 48
    X = _correlated_inputs(1024, d_in)
    W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(1))
    spec = WeightQuantSpec(**SPECS[name], clip_search=False)
    H = 2 * X.T @ X / X.shape[0]
    res = gptq_quantize_ex(W, H, spec)
    qw = res.weight
    assert qw.codes.shape == W.shape and qw.codes.dtype == torch.uint8
    assert qw.scale.shape == (d_out, d_in // qw.group_size)
    lo = 1 if spec.symmetric else 0
    assert int(qw.codes.min()) >= lo and int(qw.codes.max()) <= 2**spec.bits - 1
    gptq_err = _out_err(W, qw.dequantize(), X)
    rtn_err = _out_err(W, quantize_weight_rtn(W, spec).dequantize(), X)
    # measured here: ~0.65x RTN's error with act_order, ~0.84x without
    bound = 0.75 if spec.gptq.act_order else 0.9
    assert gptq_err < bound * rtn_err, (gptq_err, rtn_err)
    assert res.loss > 0
    # the Hessian-weighted error is the squared output error on the same inputs
    assert relative_output_error(W, qw.dequantize(), H) == pytest.approx(gptq_err**2, rel=1e-3)


def test_static_groups_use_original_weight_scales() -> None:
    X = _correlated_inputs(512, 32)
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    spec = WeightQuantSpec(bits=4, granularity="per_group", group_size=8, clip_search=False,
                           gptq=GPTQSpec(static_groups=True))
    qw = gptq_quantize(W, 2 * X.T @ X / 512, spec)
    torch.testing.assert_close(qw.scale, quantize_weight_rtn(W, spec).scale)


def test_dead_inputs_and_singular_hessian() -> None:
    X = _correlated_inputs(256, 32)
    X[:, :4] = 0.0  # dead input channels
    X[:, 4] = X[:, 5]  # rank deficiency
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    spec = WeightQuantSpec(bits=4)
    qw = gptq_quantize(W, 2 * X.T @ X / 256, spec)
    deq = qw.dequantize()
    assert torch.isfinite(deq).all()
    torch.testing.assert_close(deq[:, :4], torch.zeros(16, 4))


def test_hessian_shape_mismatch_rejected() -> None:
    with pytest.raises(ValueError, match="in_features"):
        gptq_quantize(torch.randn(4, 8), torch.eye(6), WeightQuantSpec(bits=4))


@pytest.mark.parametrize("act_order", [True, False])
def test_lazy_batches_match_column_by_column(act_order: bool) -> None:
    """Lazy block updates (and dynamic group scales across block edges) are an exact reordering of work."""
    X = _correlated_inputs(512, 64)
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(5))
    H = 2 * X.T @ X / 512
    codes = []
    for block_size in (1, 7, 128):
        spec = WeightQuantSpec(bits=4, granularity="per_group", group_size=16,
                               gptq=GPTQSpec(block_size=block_size, act_order=act_order))
        codes.append(gptq_quantize(W, H, spec).codes)
    assert torch.equal(codes[0], codes[1]) and torch.equal(codes[0], codes[2])


def test_hessian_of_transformed_inputs_with_padding_mask() -> None:
    from quant.quantizers.gptq import HessianAccumulator
    from quant.transforms.hadamard import HadamardTransform

    g = torch.Generator().manual_seed(6)
    t = HadamardTransform(16, signs=torch.randint(0, 2, (16,), generator=g).float() * 2 - 1)
    x = torch.randn(2, 5, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    acc = HessianAccumulator(16, torch.device("cpu"), t)
    acc.add(x, mask)
    kept = x[mask.bool()]  # 8 unpadded tokens
    T = t.matrix(torch.float32)
    expected = 2.0 * T.T @ kept.T @ kept @ T / 8
    assert acc.count == 8
    torch.testing.assert_close(acc.hessian(), expected, atol=1e-4, rtol=1e-4)


def _naive_obs_rounding(W: torch.Tensor, H: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    """GPTQ's defining recursion without the Cholesky / lazy-batch reformulation: quantize columns left
    to right, spread each column's error with the current inverse Hessian, then remove that column from
    the inverse Hessian (Gaussian elimination step). Float64, per-channel scales from the original W."""
    W = W.double().clone()
    n = W.shape[1]
    H = H.double() + spec.gptq.damp_percent * torch.diag(H.double()).mean() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    qw = quantize_weight_rtn(W.float(), spec)  # scales/zero of the original weight (per channel)
    scale, zero = qw.scale[:, 0].double(), qw.zero[:, 0].double()
    lo, hi = (1, 2**spec.bits - 1) if spec.symmetric else (0, 2**spec.bits - 1)
    Q = torch.zeros_like(W)
    for j in range(n):
        q = (torch.clamp(torch.round(W[:, j] / scale) + zero, lo, hi) - zero) * scale
        Q[:, j] = q
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j:] -= err.unsqueeze(1) * Hinv[j, j:].unsqueeze(0)
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return Q


def test_matches_the_naive_obs_recursion() -> None:
    X = _correlated_inputs(512, 32)
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(7))
    H = 2 * X.T @ X / 512
    spec = WeightQuantSpec(bits=4, clip_search=False, gptq=GPTQSpec(act_order=False, block_size=8))
    ours = gptq_quantize(W, H, spec).dequantize().double()
    naive = _naive_obs_rounding(W, H, spec)
    same = (ours - naive).abs() < 1e-4
    assert float(same.float().mean()) > 0.99  # identical up to rare rounding ties
