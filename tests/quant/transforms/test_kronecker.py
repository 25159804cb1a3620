from __future__ import annotations

import pytest
import torch

from quant.transforms.base import build_transform
from quant.transforms.kronecker import KroneckerTransform, kron_factors, kronecker_fold_weight


@pytest.mark.parametrize(
    "n, expected",
    [(4096, (64, 64)), (11008, (86, 128)), (64, (8, 8)), (128, (8, 16)), (96, (8, 12)), (13, (1, 13)), (1, (1, 1))],
)
def test_kron_factors(n: int, expected: tuple[int, int]) -> None:
    n1, n2 = kron_factors(n)
    assert (n1, n2) == expected
    assert n1 * n2 == n and n1 <= n2


def _random_transform(n1: int, n2: int, with_scale: bool, seed: int = 0) -> KroneckerTransform:
    g = torch.Generator().manual_seed(seed)
    left = torch.eye(n1) + 0.3 * torch.randn(n1, n1, generator=g)
    right = torch.eye(n2) + 0.3 * torch.randn(n2, n2, generator=g)
    scale = torch.rand(n1 * n2, generator=g) + 0.5 if with_scale else None
    return KroneckerTransform(left, right, scale)


@pytest.mark.parametrize("with_scale", [False, True])
def test_forward_equals_dense_kron(with_scale: bool) -> None:
    t = _random_transform(4, 6, with_scale)
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    dense = torch.kron(t.left.double(), t.right.double())
    if with_scale:
        dense = torch.diag(t.scale.double()) @ dense
    expected = x @ dense
    torch.testing.assert_close(t(x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(t.matrix(torch.float64), dense, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("with_scale", [False, True])
def test_inverse_folding_is_exact_in_fp(with_scale: bool) -> None:
    t = _random_transform(8, 8, with_scale, seed=1)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=g, dtype=torch.float64)
    x = torch.randn(10, 64, generator=g, dtype=torch.float64)
    w_folded = t.fold_into_weight(w)
    torch.testing.assert_close(t(x) @ w_folded.T, x @ w.T, rtol=1e-9, atol=1e-9)
    # the closed-form-inverse path agrees with the generic one
    li = torch.linalg.inv(t.left.double()).T
    ri = torch.linalg.inv(t.right.double()).T
    alt = kronecker_fold_weight(w, t.left, t.right, t.scale, left_inv_t=li, right_inv_t=ri)
    torch.testing.assert_close(alt, w_folded, rtol=1e-10, atol=1e-10)


def test_config_roundtrip_through_state_dict() -> None:
    t = _random_transform(4, 8, True, seed=3)
    cfg = t.config()
    assert cfg == {"kind": "kronecker", "size": 32, "n1": 4, "n2": 8, "has_scale": True}
    rebuilt = build_transform(cfg)
    assert isinstance(rebuilt, KroneckerTransform)
    rebuilt.load_state_dict(t.state_dict())
    x = torch.randn(7, 32)
    torch.testing.assert_close(rebuilt(x), t(x))
    assert set(t.state_dict()) == {"left", "right", "scale"}
    assert set(KroneckerTransform(torch.eye(2), torch.eye(3)).state_dict()) == {"left", "right"}


def test_half_precision_forward_close_to_fp32() -> None:
    t = _random_transform(8, 16, True, seed=4)
    x = torch.randn(4, 128)
    ref = t(x)
    out16 = t.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert out16.dtype == torch.float32
    assert (out16 - ref).norm() / ref.norm() < 2e-2


def test_rejects_wrong_sizes() -> None:
    with pytest.raises(ValueError):
        KroneckerTransform(torch.eye(2), torch.eye(3), torch.ones(5))
    with pytest.raises(ValueError):
        _random_transform(2, 3, False)(torch.randn(2, 5))
