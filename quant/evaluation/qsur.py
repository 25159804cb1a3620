"""QSUR: Quantization Space Utilization Rate (OSTQuant, Hu et al. 2025).

For ``d``-dimensional activations ``X`` (one row per token) with mean ``mu`` and covariance
``Sigma = U diag(lambda) U^T``, the data occupy (to first order) the hyperellipsoid
``{x : (x - mu)^T Sigma^{-1} (x - mu) <= r^2}`` whose volume is

    V_X = pi^(d/2) / Gamma(d/2 + 1) * r^d * prod_i sqrt(lambda_i).

Per-token uniform quantization spends one range on all ``d`` channels, so the quantization space is
the hypercube that encloses the ellipsoid: its half-side is the largest extent of the ellipsoid along
any coordinate axis, ``max_j (|mu_j| + r sqrt(Sigma_jj))``, and

    V_S = (2 max_j (|mu_j| + r sqrt(Sigma_jj)))^d,      QSUR = V_X / V_S.

QSUR is largest (``pi^(d/2) / (Gamma(d/2+1) 2^d)``, the ball in its cube) for zero-mean isotropic
data, and small when a few channels (outliers) or the mean stretch the cube; orthogonal rotations
even out the axis extents and scalings even out the eigenvalues, which is what OSTQuant optimises.

Volumes underflow for realistic ``d``, so everything is computed in the log domain:
``log_value`` is ``ln QSUR``, ``per_dim`` is ``QSUR^(1/d)`` and ``relative`` is
``(QSUR / QSUR_max)^(1/d)`` in ``(0, 1]`` (comparable across sizes). With fewer tokens than
dimensions (or exactly collinear channels) the sample covariance is singular; eigenvalues are
floored at ``ridge * mean(lambda)`` so the estimate stays finite (a regularised QSUR; use more tokens
than channels for the unregularised value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from quant.calibration.data import CalibrationData
from quant.models.adapters import ModelAdapter

DEFAULT_RIDGE = 1e-6
QSUR_TOKENS = 2048


@dataclass(frozen=True)
class QSUR:
    log_value: float  # ln QSUR
    dim: int
    tokens: int

    @property
    def value(self) -> float:
        """QSUR itself (underflows to 0.0 beyond a few hundred dimensions; prefer ``log_value``)."""
        return math.exp(self.log_value)

    @property
    def per_dim(self) -> float:
        return math.exp(self.log_value / self.dim)

    @property
    def relative(self) -> float:
        return math.exp((self.log_value - log_qsur_max(self.dim)) / self.dim)


def log_ball_volume(d: int, radius: float = 1.0) -> float:
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0) + d * math.log(radius)


def log_qsur_max(d: int) -> float:
    """ln QSUR of zero-mean isotropic data: the d-ball in its enclosing cube."""
    return log_ball_volume(d) - d * math.log(2.0)


@dataclass
class Moments:
    """Streaming first and second moments of rows of ``[.., d]`` activations (float64)."""

    dim: int
    count: int = 0
    total: torch.Tensor | None = None
    outer: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, self.dim).to(torch.float64)
        if self.total is None:
            self.total = torch.zeros(self.dim, dtype=torch.float64, device=rows.device)
            self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=rows.device)
        self.total += rows.sum(0)
        self.outer += rows.T @ rows
        self.count += rows.shape[0]

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count < 2 or self.total is None or self.outer is None:
            raise ValueError("QSUR needs at least two rows")
        mu = self.total / self.count
        cov = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu, 0.5 * (cov + cov.T)


def qsur_from_moments(
    mean: torch.Tensor, cov: torch.Tensor, tokens: int, radius: float = 1.0, ridge: float = DEFAULT_RIDGE
) -> QSUR:
    d = int(mean.shape[0])
    cov = cov.to(torch.float64)
    mean = mean.to(torch.float64)
    eig = torch.linalg.eigvalsh(cov)
    floor = max(float(eig.clamp(min=0).mean()) * ridge, 1e-300)
    log_vx = log_ball_volume(d, radius) + 0.5 * float(torch.log(eig.clamp(min=floor)).sum())
    extent = mean.abs() + radius * torch.diagonal(cov).clamp(min=0).sqrt()
    half = max(float(extent.max()), 1e-300)
    log_vs = d * math.log(2.0 * half)
    return QSUR(log_value=log_vx - log_vs, dim=d, tokens=int(tokens))


def qsur(x: torch.Tensor, radius: float = 1.0, ridge: float = DEFAULT_RIDGE) -> QSUR:
    """QSUR of the rows of ``x [..., d]`` (see the module docstring)."""
    m = Moments(int(x.shape[-1]))
    m.update(x)
    mu, cov = m.mean_cov()
    return qsur_from_moments(mu, cov, m.count, radius, ridge)


@torch.no_grad()
def linear_input_qsur(
    model: nn.Module,
    adapter: ModelAdapter,
    calibration: CalibrationData,
    transforms: dict[str, nn.Module] | None = None,
    max_tokens: int = QSUR_TOKENS,
) -> dict[str, QSUR]:
    """QSUR of every block linear's input (one block at a time; linears of a group share it).

    Rows are tokens (padding excluded) up to about ``max_tokens``; inputs of linears with an online
    transform are measured after it, as the activation quantizer sees them."""
    transforms = transforms or {}
    device = next(model.parameters()).device
    result: dict[str, QSUR] = {}
    current: dict[str, torch.Tensor | None] = {"keep": None}
    for block in adapter.iter_blocks():
        moments: dict[str, Moments] = {}
        hooks = []
        for group in block.groups:
            names = list(group.linears)
            first = names[0]
            m = Moments(group.in_features)
            moments[first] = m
            t = transforms.get(first)

            def hook(mod: nn.Module, args: tuple, m: Moments = m, t: nn.Module | None = t) -> None:
                x = args[0]
                keep = current["keep"]
                if keep is not None and keep.shape == x.shape[:-1]:
                    x = x[keep]
                m.update(t(x) if t is not None else x)

            hooks.append(model.get_submodule(first).register_forward_pre_hook(hook))
        try:
            for ids, mask in calibration.batches(device):
                current["keep"] = None if mask is None else mask.bool()
                model(ids, attention_mask=mask, use_cache=False)
                if next(iter(moments.values())).count >= max_tokens:
                    break
        finally:
            for h in hooks:
                h.remove()
        for group in block.groups:
            m = moments[next(iter(group.linears))]
            mu, cov = m.mean_cov()
            q = qsur_from_moments(mu, cov, m.count)
            for name in group.linears:
                result[name] = q
    return result


def qsur_report(before: QSUR, after: QSUR) -> dict[str, float]:
    """Per-layer report metrics: relative QSUR (``(QSUR / QSUR_max)^(1/d)``) and ln QSUR, before/after."""
    return {
        "qsur_before": before.relative,
        "qsur_after": after.relative,
        "qsur_log_before": before.log_value,
        "qsur_log_after": after.log_value,
    }
