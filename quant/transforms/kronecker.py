"""Kronecker-factored affine input transform (FlatQuant).

A dense ``n x n`` transform ``P`` is too expensive to run online, so FlatQuant restricts it to a
Kronecker product ``P = P1 (x) P2`` with ``P1 [n1, n1]``, ``P2 [n2, n2]`` and ``n1 * n2 == n``
(``n1`` the largest divisor of ``n`` not above ``sqrt(n)``). For a row vector ``x`` viewed as a
matrix ``X [n1, n2]`` (row-major), ``x @ (P1 (x) P2) == vec(P1^T X P2)``, which costs
``O(n * (n1 + n2))`` instead of ``O(n^2)`` and never materialises ``P``.

An optional per-channel scale ``d`` (FlatQuant's smoothing diagonal) is applied first::

    forward(x) = (x * d) @ (P1 (x) P2)

The matching inverse ``W' = (W / d) @ (P1 (x) P2)^{-T}`` is folded into the weight of the linear that
reads the transformed input (see :func:`kronecker_fold_weight`), so the pair is exact in floating point.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from quant.transforms.base import InputTransform, register_transform


def kron_factors(n: int) -> tuple[int, int]:
    """``(n1, n2)`` with ``n1 * n2 == n`` and ``n1 <= n2`` as close to ``sqrt(n)`` as possible."""
    if n < 1:
        raise ValueError(f"size must be positive, got {n}")
    n1 = math.isqrt(n)
    while n % n1:
        n1 -= 1
    return n1, n // n1


def kronecker_matmul(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``x @ kron(left, right)`` over the last dim of ``x``, computed as ``left^T X right``."""
    n1, n2 = left.shape[0], right.shape[0]
    shape = x.shape
    xv = x.reshape(*shape[:-1], n1, n2)
    out = torch.matmul(left.transpose(0, 1), torch.matmul(xv, right))
    return out.reshape(shape)


def kronecker_fold_weight(
    weight: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    scale: torch.Tensor | None = None,
    left_inv_t: torch.Tensor | None = None,
    right_inv_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W' = (W / d) @ (P1 (x) P2)^{-T}`` for a weight ``[out, n]`` (computed in float64).

    ``(P1 (x) P2)^{-T} = P1^{-T} (x) P2^{-T}``, so only the small factors are inverted; callers that
    know the inverses in closed form (e.g. from an SVD parametrisation) pass them as ``*_inv_t``.
    """
    w = weight.double()
    if scale is not None:
        w = w / scale.double()
    li = left_inv_t.double() if left_inv_t is not None else torch.linalg.inv(left.double()).transpose(0, 1)
    ri = right_inv_t.double() if right_inv_t is not None else torch.linalg.inv(right.double()).transpose(0, 1)
    return kronecker_matmul(w, li, ri)


@register_transform
class KroneckerTransform(InputTransform):
    """``forward(x) = (x * scale) @ (left (x) right)``; the factors and scale are buffers."""

    kind = "kronecker"

    def __init__(
        self,
        left: torch.Tensor,
        right: torch.Tensor,
        scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if left.dim() != 2 or left.shape[0] != left.shape[1] or right.dim() != 2 or right.shape[0] != right.shape[1]:
            raise ValueError("Kronecker factors must be square matrices")
        self.n1, self.n2 = int(left.shape[0]), int(right.shape[0])
        self.size = self.n1 * self.n2
        if scale is not None and scale.shape != (self.size,):
            raise ValueError(f"scale must have shape ({self.size},), got {tuple(scale.shape)}")
        self.register_buffer("left", left.detach().clone().float())
        self.register_buffer("right", right.detach().clone().float())
        if scale is not None:
            self.register_buffer("scale", scale.detach().clone().float())
        else:
            self.scale = None

    @property
    def has_scale(self) -> bool:
        return self.scale is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"expected last dim {self.size}, got {x.shape[-1]}")
        if self.scale is not None:
            x = x * self.scale.to(dtype=x.dtype, device=x.device)
        left = self.left.to(dtype=x.dtype, device=x.device)
        right = self.right.to(dtype=x.dtype, device=x.device)
        return kronecker_matmul(x, left, right)

    def fold_into_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight ``W'`` with ``forward(x) @ W'^T == x @ W^T`` (float64 inverse, cast back)."""
        return kronecker_fold_weight(weight, self.left, self.right, self.scale).to(weight.dtype)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "size": self.size, "n1": self.n1, "n2": self.n2, "has_scale": self.has_scale}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "KroneckerTransform":
        n1, n2 = int(config["n1"]), int(config["n2"])
        if n1 * n2 != int(config["size"]):
            raise ValueError(f"n1 * n2 = {n1 * n2} does not match size {config['size']}")
        scale = torch.ones(n1 * n2) if config.get("has_scale", False) else None
        return cls(torch.eye(n1), torch.eye(n2), scale)

    def extra_repr(self) -> str:
        return f"size={self.size}, n1={self.n1}, n2={self.n2}, scale={self.has_scale}"
