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


def tile_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Packed int4 rows ``[N, K/2]`` -> the W4A16 decode kernel's tiled order, ``[ceil(N/16) * 16, K/2]`` uint8.

    Unit ``((tile * K/128 + kb) * 2 + h) * 32 + 4 g + t`` (16 bytes) holds row ``16 tile + 8 h + g``, bytes
    ``64 kb + 16 t ..`` (rows past N zero): the codes of one 16-row x 128-k block are 1 KB contiguous in the order
    the kernel's lanes read them, so each 16-byte load of a warp covers four whole 128-byte lines
    (``kernels/csrc/w4a16_packed.cu``, TILED)."""
    n, half_k = packed.shape
    if half_k % 64:
        raise ValueError(f"tile_int4_rows: K must be a multiple of 128, got {2 * half_k}")
    tiles = -(-n // 16)
    padded = packed
    if tiles * 16 != n:
        padded = torch.zeros(tiles * 16, half_k, dtype=torch.uint8, device=packed.device)
        padded[:n] = packed
    return padded.reshape(tiles, 2, 8, half_k // 64, 4, 16).permute(0, 3, 1, 2, 4, 5).reshape(tiles * 16, half_k)


def untile_int4_rows(tiled: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`tile_int4_rows`: the packed rows ``[n, K/2]`` in row order."""
    rows, half_k = tiled.shape
    tiles = rows // 16
    return tiled.reshape(tiles, half_k // 64, 2, 8, 4, 16).permute(0, 2, 3, 1, 4, 5).reshape(rows, half_k)[:n]


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
