"""Test-local online transforms and layer builders for the kernel tests."""

from __future__ import annotations

from typing import Any

import torch

from kernels import reference
from quant.modules.linear import QuantLinear
from quant.quantizers.packing import pack_int4
from quant.quantizers.weight import quantize_weight_rtn
from quant.recipes.schema import ActivationQuantSpec, WeightQuantSpec
from quant.transforms.base import InputTransform


def poison_cuda(nbytes: int) -> None:
    """Fill the CUDA caching allocator's next block with NaN so an unwritten output cannot pass."""
    t = torch.full((nbytes // 4 + 64,), float("nan"), device="cuda")
    del t


def rand_codes(shape: tuple[int, int], bits: int, gen: torch.Generator) -> torch.Tensor:
    """Random codes 1 .. 2**bits - 1 (never zero) on the CPU; 4-bit codes packed two per byte."""
    u = torch.randint(1, 2**bits, shape, generator=gen, dtype=torch.uint8)
    return pack_int4(u) if bits == 4 else u


def w4a16_case(gen: torch.Generator, tokens: int, k: int, n: int, group: int, with_bias: bool = True):
    """Random int4 codes (1..15), per-group scale/zero, bias and activations on the CPU, drawn from ``gen`` in
    that order, and the float64 reference output (without the bias when not ``with_bias``; the bias is drawn either
    way, so the other tensors stay the same)."""
    qw = rand_codes((n, k), 4, gen)
    scale = torch.rand(n, k // group, generator=gen) * 0.02 + 0.001
    zero = torch.randint(0, 16, (n, k // group), generator=gen).float()
    bias = (torch.randn(n, generator=gen) * 0.1).half()
    x = torch.randn(tokens, k, generator=gen).half()
    return qw, scale, zero, bias, x, reference.w4a16_gemm_ref(x.double(), qw, scale, zero, group,
                                                              bias if with_bias else None)


class DenseHadamard(InputTransform):
    """x @ blockdiag(H_b): a dense-matrix stand-in for quant.transforms' Hadamard transform."""

    kind = "test-hadamard"

    def __init__(self, size: int, block: int) -> None:
        super().__init__()
        self.size, self.block = size, block
        h = reference.hadamard_matrix(block, torch.float32)
        self.register_buffer("matrix_", torch.block_diag(*([h] * (size // block))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix_.to(x.dtype)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "size": self.size, "block": self.block}


class KronTransform(InputTransform):
    """x @ kron(P1, P2) with learnable-style P1, P2 parameters (FlatQuant shape)."""

    kind = "test-kronecker"

    def __init__(self, n1: int, n2: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q1, _ = torch.linalg.qr(torch.randn(n1, n1, generator=g))
        q2, _ = torch.linalg.qr(torch.randn(n2, n2, generator=g))
        self.left = torch.nn.Parameter(q1 + 0.05 * torch.randn(n1, n1, generator=g), requires_grad=False)
        self.right = torch.nn.Parameter(q2 + 0.05 * torch.randn(n2, n2, generator=g), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.kronecker_transform(x, self.left, self.right)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "size": self.left.shape[0] * self.right.shape[0]}


def make_layer(
    in_f: int,
    out_f: int,
    w_bits: int,
    a_bits: int,
    group_size: int | None = None,
    w_symmetric: bool = True,
    transform: InputTransform | None = None,
    clip: float = 1.0,
    bias: bool = True,
    seed: int = 0,
) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    spec = WeightQuantSpec(
        bits=w_bits,
        granularity="per_group" if group_size else "per_channel",
        group_size=group_size,
        symmetric=w_symmetric,
        clip_search=False,
    )
    b = torch.randn(out_f, generator=g) * 0.1 if bias else None
    act = ActivationQuantSpec(bits=a_bits, symmetric=True, clip_ratio=clip)
    return QuantLinear.from_quantized(
        quantize_weight_rtn(w, spec), b, act, transform=transform, weight_symmetric=w_symmetric
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output (unwritten or NaN)"
    return float((out - ref).norm() / ref.norm())
