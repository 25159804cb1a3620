from __future__ import annotations

import pytest
import torch

from quant.modules.linear import QuantLinear
from quant.recipes.schema import ActivationQuantSpec
from quant.transforms.base import build_transform
from quant.transforms.hadamard import (
    HadamardTransform,
    fwht,
    hadamard_block_size,
    hadamard_matrix,
    random_hadamard,
    random_signs,
)

F64 = torch.float64


@pytest.mark.parametrize("n", [1, 2, 4, 64, 256])
def test_power_of_two_is_orthogonal_symmetric_with_pm_entries(n: int) -> None:
    h = hadamard_matrix(n, F64)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=F64), atol=1e-12)
    assert torch.equal(h, h.T)
    assert torch.allclose(h.abs(), torch.full((n, n), n**-0.5, dtype=F64))


@pytest.mark.parametrize("n, block", [(48, 16), (96, 32), (12, 4), (80, 16), (7, 1)])
def test_non_power_of_two_is_block_diagonal_and_orthogonal(n: int, block: int) -> None:
    assert hadamard_block_size(n) == block
    h = hadamard_matrix(n, F64)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=F64), atol=1e-12)
    # mixing stays inside blocks of `block` channels
    mask = torch.block_diag(*([torch.ones(block, block, dtype=F64)] * (n // block)))
    assert torch.all(h[mask == 0] == 0)
    assert torch.all(h[mask == 1].abs() > 0)


def test_bad_block_rejected() -> None:
    with pytest.raises(ValueError):
        hadamard_matrix(48, block=32)
    with pytest.raises(ValueError):
        hadamard_matrix(48, block=3)
    with pytest.raises(ValueError):
        fwht(torch.randn(2, 48), block=32)


@pytest.mark.parametrize("n, block", [(64, None), (128, 16), (48, None), (96, 8), (6, None)])
def test_fwht_matches_dense_matrix(n: int, block: int | None) -> None:
    x = torch.randn(3, 5, n, dtype=F64)
    assert torch.allclose(fwht(x, block), x @ hadamard_matrix(n, F64, block=block), atol=1e-12)


def test_fwht_is_involution_and_differentiable() -> None:
    x = torch.randn(4, 32, dtype=F64, requires_grad=True)
    y = fwht(fwht(x))
    assert torch.allclose(y, x, atol=1e-12)
    (fwht(x) ** 2).sum().backward()  # orthogonal: d/dx ||xH||^2 = 2x
    assert torch.allclose(x.grad, 2 * x.detach(), atol=1e-12)


def test_random_hadamard_is_orthogonal_seeded_and_signed() -> None:
    q = random_hadamard(64, seed=3, dtype=F64)
    assert torch.allclose(q @ q.T, torch.eye(64, dtype=F64), atol=1e-12)
    assert torch.equal(q, random_hadamard(64, seed=3, dtype=F64))
    assert not torch.equal(q, random_hadamard(64, seed=4, dtype=F64))
    s = random_signs(64, 3, F64)
    assert set(s.tolist()) == {-1.0, 1.0}
    assert torch.allclose(q, s.unsqueeze(1) * hadamard_matrix(64, F64))


def test_transform_forward_matches_matrix_and_folds_exactly() -> None:
    t = HadamardTransform(64, signs=random_signs(64, 1)).double()
    x = torch.randn(7, 64, dtype=F64)
    assert torch.allclose(t(x), x @ t.matrix(), atol=1e-12)
    w = torch.randn(32, 64, dtype=F64)
    assert torch.allclose(t(x) @ t.fold_into_weight(w).T, x @ w.T, atol=1e-10)
    with pytest.raises(ValueError):
        t(torch.randn(2, 32, dtype=F64))


def test_transform_spreads_an_outlier() -> None:
    x = torch.randn(16, 128)
    x[:, 5] *= 100.0
    y = HadamardTransform(128)(x)
    ratio = lambda v: (v.abs().amax(-1) / v.pow(2).mean(-1).sqrt()).mean()  # noqa: E731
    assert ratio(y) < ratio(x) / 3


@pytest.mark.parametrize("signs", [False, True])
def test_config_and_state_dict_round_trip(signs: bool) -> None:
    t = HadamardTransform(96, block=16, signs=random_signs(96, 7) if signs else None)
    cfg = t.config()
    assert cfg == {"kind": "hadamard", "size": 96, "block": 16, "has_signs": signs}
    rebuilt = build_transform(cfg)
    assert isinstance(rebuilt, HadamardTransform)
    rebuilt.load_state_dict(t.state_dict())
    x = torch.randn(3, 96)
    assert torch.equal(rebuilt(x), t(x))
    assert torch.equal(rebuilt.matrix(), t.matrix())


def test_quant_linear_with_hadamard_rebuilds_from_config() -> None:
    t = HadamardTransform(64, signs=random_signs(64, 2))
    w = torch.randn(16, 64)
    layer = QuantLinear.from_quantized(t.fold_into_weight(w), None, ActivationQuantSpec(bits=16), transform=t)
    state = layer.state_dict()
    x = torch.randn(5, 64)
    assert torch.allclose(layer(x), x @ w.T, atol=1e-4)
    rebuilt = QuantLinear.from_config(layer.config())
    rebuilt.load_state_dict(state)
    assert torch.equal(rebuilt(x), layer(x))
