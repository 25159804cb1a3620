from __future__ import annotations

import math

import pytest
import torch

from quant.evaluation.qsur import Moments, log_qsur_max, qsur, qsur_from_moments
from quant.transforms.hadamard import random_hadamard

F64 = torch.float64


def test_two_dimensional_closed_form() -> None:
    # ellipse with semi-axes 1 and 2 (area 2*pi) inside the square of side 2*2: QSUR = 2*pi / 16
    q = qsur_from_moments(torch.zeros(2, dtype=F64), torch.diag(torch.tensor([1.0, 4.0], dtype=F64)), tokens=100)
    assert q.value == pytest.approx(2 * math.pi / 16, rel=1e-12)
    # a mean shift moves the ellipse off-centre: the symmetric cube must reach |mu| + extent
    q_shift = qsur_from_moments(torch.tensor([0.0, 1.0], dtype=F64), torch.diag(torch.tensor([1.0, 4.0], dtype=F64)), 100)
    assert q_shift.value == pytest.approx(2 * math.pi / 36, rel=1e-12)


def test_maximum_is_the_ball_in_its_cube() -> None:
    for d in (1, 2, 3, 64):
        q = qsur_from_moments(torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64), tokens=10)
        assert q.log_value == pytest.approx(log_qsur_max(d), abs=1e-9)
        assert q.relative == pytest.approx(1.0, abs=1e-9)
    assert math.exp(log_qsur_max(2)) == pytest.approx(math.pi / 4)


def test_isotropic_samples_are_near_the_maximum() -> None:
    g = torch.Generator().manual_seed(0)
    assert qsur(torch.randn(8192, 32, generator=g)).relative > 0.9


def test_rotation_raises_qsur_of_an_outlier_distribution() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 64, generator=g, dtype=F64)
    x[:, [3, 17]] *= 25.0
    before = qsur(x)
    after = qsur(x @ random_hadamard(64, seed=2, dtype=F64))
    assert after.log_value > before.log_value
    assert after.relative > 3 * before.relative
    # the ellipsoid volume is rotation invariant: only the enclosing cube shrank
    assert before.dim == after.dim == 64 and before.tokens == 4096


def test_scaling_to_equal_variances_helps_and_mean_hurts() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4096, 16, generator=g, dtype=F64) * torch.logspace(0, 2, 16, dtype=F64)
    assert qsur(x / x.std(0)).relative > qsur(x).relative
    assert qsur(x + 50.0).relative < qsur(x).relative


def test_streaming_moments_match_one_shot_and_singular_is_finite() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 24, generator=g, dtype=F64)
    m = Moments(24)
    for chunk in x.split(70):
        m.update(chunk)
    mu, cov = m.mean_cov()
    assert torch.allclose(mu, x.mean(0)) and torch.allclose(cov, torch.cov(x.T))
    assert qsur_from_moments(mu, cov, m.count).log_value == pytest.approx(qsur(x).log_value, rel=1e-10)
    few = qsur(x[:5])  # 5 tokens in 24 dims: rank-deficient covariance, regularised and finite
    assert math.isfinite(few.log_value) and few.log_value < qsur(x).log_value
    with pytest.raises(ValueError):
        qsur(x[:1])
