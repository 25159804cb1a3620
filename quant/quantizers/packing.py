"""Real integer storage: int8 codes one per byte, int4 codes two per byte.

Layout (shared with ``kernels/``): codes are unsigned (see ``quant.quantizers.core``). For 4-bit,
element ``2*j`` of a row goes to the LOW nibble of byte ``j`` and element ``2*j + 1`` to the HIGH
nibble; rows are packed independently along the last dimension, which must be even.
"""

from __future__ import annotations

import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] uint8 codes in [0, 15] -> [..., K // 2] uint8."""
    if codes.shape[-1] % 2:
        raise ValueError(f"last dimension must be even to pack int4, got {codes.shape[-1]}")
    if codes.dtype != torch.uint8:
        raise TypeError("pack_int4 expects uint8 codes")
    if int(codes.max()) > 15 if codes.numel() else False:
        raise ValueError("int4 codes must lie in [0, 15]")
    lo = codes[..., 0::2]
    hi = codes[..., 1::2]
    return (lo | (hi << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[..., K // 2] uint8 -> [..., K] uint8 codes in [0, 15]."""
    lo = packed & 0x0F
    hi = (packed >> 4) & 0x0F
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits <= 4:
        return pack_int4(codes)
    if bits <= 8:
        return codes.to(torch.uint8).contiguous()
    raise ValueError(f"cannot pack {bits}-bit codes")


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits <= 4:
        return unpack_int4(packed)
    if bits <= 8:
        return packed
    raise ValueError(f"cannot unpack {bits}-bit codes")
