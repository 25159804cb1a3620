"""Hadamard rotations: dense matrices, a fast Walsh–Hadamard transform and an online transform.

A normalized Hadamard matrix ``H`` (entries ``±1/sqrt(n)``) is orthogonal, so inserting ``H H^T = I``
between an activation and the weight that reads it leaves a linear layer unchanged in floating point
while spreading every channel over all the others: a single outlier channel becomes ``n`` channels of
size ``1/sqrt(n)`` of it, which is what QuaRot / OSTQuant rely on before low-bit quantization.

* Power-of-two ``n``: the Sylvester construction ``H_{2m} = [[H_m, H_m], [H_m, -H_m]] / sqrt(2)``
  (symmetric, ``H == H^T == H^{-1}``).
* Other ``n``: a block-diagonal Hadamard ``blockdiag(H_b, ..., H_b)`` with ``b`` the largest power of
  two dividing ``n`` (``b == n & -n``). It is still orthogonal and symmetric, but mixing happens only
  *within* blocks of ``b`` channels, so an outlier is spread over ``b`` channels instead of ``n`` (and for
  odd ``n`` the "Hadamard" is the identity: no mixing at all). Callers that care (QSUR reports, the
  methods' docs) should treat it as a weaker rotation.

The fast transform :func:`fwht` computes ``x @ H`` (block-diagonal as above, or with an explicit block)
over the last dimension in ``O(n log b)`` without materialising ``H``.
:func:`random_hadamard` returns ``diag(s) @ H`` with random signs ``s`` (QuaRot's randomized Hadamard).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from quant.transforms.base import InputTransform, register_transform


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def hadamard_block_size(n: int) -> int:
    """The largest power of two dividing ``n`` (the block of :func:`hadamard_matrix` for ``n``)."""
    if n < 1:
        raise ValueError(f"size must be positive, got {n}")
    return n & -n


def _check_block(n: int, block: int) -> None:
    if not is_power_of_two(block):
        raise ValueError(f"Hadamard block must be a power of two, got {block}")
    if n % block:
        raise ValueError(f"Hadamard block {block} does not divide size {n}")


def sylvester(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Normalized Sylvester Hadamard for a power-of-two ``n`` (built in float64, then cast)."""
    if not is_power_of_two(n):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


def hadamard_matrix(
    n: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Normalized (orthogonal, symmetric) Hadamard ``[n, n]``.

    Power-of-two ``n`` (and ``block`` unset): the full Sylvester matrix. Otherwise block-diagonal over
    ``block`` (default: the largest power of two dividing ``n``); see the module docstring for the
    weaker mixing of the block-diagonal form.
    """
    b = hadamard_block_size(n) if block is None else int(block)
    _check_block(n, b)
    h = sylvester(b, torch.float64)
    if b != n:
        h = torch.block_diag(*([h] * (n // b)))
    return h.to(dtype=dtype, device=device)


def random_signs(n: int, seed: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` random ±1 values from a private generator seeded with ``seed`` (deterministic on CPU)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    s = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) * 2 - 1
    return s.to(dtype=dtype, device=device)


def random_hadamard(
    n: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """QuaRot's randomized Hadamard ``diag(s) @ H`` (orthogonal; ``s`` random ±1 from ``seed``)."""
    s = random_signs(n, seed, torch.float64)
    return (s.unsqueeze(1) * hadamard_matrix(n, torch.float64, block=block)).to(dtype=dtype, device=device)


def fwht(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Normalized fast Walsh–Hadamard transform over the last dim: ``x @ hadamard_matrix(n, block=block)``.

    ``O(n log b)`` butterflies per row; any leading shape; differentiable (pure tensor ops).
    """
    n = x.shape[-1]
    b = hadamard_block_size(n) if block is None else int(block)
    _check_block(n, b)
    lead = x.shape[:-1]
    y = x.reshape(-1, n // b, b)
    h = 1
    while h < b:
        # pairs (i, i + h) inside every run of 2h: [a, c] -> [a + c, a - c] (Sylvester ordering)
        v = y.reshape(y.shape[0], n // b, b // (2 * h), 2, h)
        a, c = v[..., 0, :], v[..., 1, :]
        y = torch.stack((a + c, a - c), dim=-2).reshape(y.shape[0], n // b, b)
        h *= 2
    return (y / math.sqrt(b)).reshape(*lead, n)


@register_transform
class HadamardTransform(InputTransform):
    """Online ``forward(x) = (x * signs) @ blockdiag(H_b)`` via the fast transform.

    ``signs`` (optional ±1 vector, a buffer in the state dict) makes it a randomized Hadamard. The
    matrix is orthogonal, so the matching weight is ``W' = W @ T`` (:meth:`fold_into_weight`).
    Config: ``{"kind": "hadamard", "size": n, "block": b, "has_signs": bool}``.
    """

    kind = "hadamard"

    def __init__(self, size: int, block: int | None = None, signs: torch.Tensor | None = None) -> None:
        super().__init__()
        self.size = int(size)
        self.block = hadamard_block_size(self.size) if block is None else int(block)
        _check_block(self.size, self.block)
        if signs is not None:
            if signs.shape != (self.size,):
                raise ValueError(f"signs must have shape ({self.size},), got {tuple(signs.shape)}")
            self.register_buffer("signs", signs.detach().clone().float())
        else:
            self.signs = None

    @property
    def has_signs(self) -> bool:
        return self.signs is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            raise ValueError(f"expected last dim {self.size}, got {x.shape[-1]}")
        if self.signs is not None:
            x = x * self.signs.to(dtype=x.dtype, device=x.device)
        return fwht(x, self.block)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        h = hadamard_matrix(self.size, torch.float64, block=self.block)
        if self.signs is not None:
            h = self.signs.double().unsqueeze(1) * h
        return h.to(dtype)

    def fold_into_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W' = W @ T`` (float64, cast back) so that ``forward(x) @ W'^T == x @ W^T``."""
        return (weight.double() @ self.matrix(torch.float64).to(weight.device)).to(weight.dtype)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "size": self.size, "block": self.block, "has_signs": self.has_signs}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "HadamardTransform":
        size = int(config["size"])
        signs = torch.ones(size) if config.get("has_signs", False) else None
        return cls(size, int(config.get("block") or hadamard_block_size(size)), signs)

    def extra_repr(self) -> str:
        return f"size={self.size}, block={self.block}, signs={self.has_signs}"
