"""Pure-torch reference implementations of the qaas kernels (run on the CPU, or any device).

They define the functions the CUDA kernels compute, built on ``quant.quantizers`` so the kernels'
conventions are by construction those of the library: unsigned codes ``u`` with ``x = (u - z) * s``,
symmetric ``z = 2**(b-1)``, int4 two per byte with element ``2j`` in the low nibble of byte ``j``.
"""

from __future__ import annotations

import math

import torch

from quant.quantizers.core import compute_qparams, quantize_codes
from quant.quantizers.packing import pack_int4, tile_int4_rows, unpack_int4, untile_int4_rows

MODE_NONE = 0
MODE_HADAMARD = 1
MODE_KRONECKER = 2


def hadamard_blockdiag(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x @ blockdiag(H_b, ..., H_b)`` with ``H_b`` the normalised Sylvester Hadamard matrix of size ``block``
    (a power of two dividing the last dim), by fast Walsh-Hadamard butterflies."""
    n = x.shape[-1]
    if block < 1 or block & (block - 1) or n % block:
        raise ValueError(f"hadamard block {block} must be a power of two dividing {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n // block, block)
    h = 1
    while h < block:
        y = y.reshape(y.shape[0], n // block, block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return (y.reshape(*lead, n) / math.sqrt(block)).to(x.dtype)


def hadamard_matrix(block: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return hadamard_blockdiag(torch.eye(block, dtype=dtype), block)


def kronecker_transform(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor | None) -> torch.Tensor:
    """``x @ kron(P1, P2)`` computed as ``P1^T X P2`` with ``X = x.reshape(n1, n2)`` (FlatQuant). ``p2=None``:
    the right factor is the identity of size ``n / n1`` (``P1^T X``: FlatQuant's o_proj transform, heads only)."""
    n = x.shape[-1]
    n1 = p1.shape[0]
    if n % n1:
        raise ValueError(f"kronecker left factor of size {n1} does not divide {n}")
    n2 = p2.shape[0] if p2 is not None else n // n1
    lead = x.shape[:-1]
    xm = x.reshape(-1, n1, n2)
    y = p1.to(x.dtype).transpose(0, 1) @ xm
    if p2 is not None:
        y = y @ p2.to(x.dtype)
    return y.reshape(*lead, n1 * n2)


def apply_transform(
    x: torch.Tensor, mode: int, hb: int, p1: torch.Tensor | None, p2: torch.Tensor | None
) -> torch.Tensor:
    if mode == MODE_NONE:
        return x
    if mode == MODE_HADAMARD:
        return hadamard_blockdiag(x, hb)
    if mode == MODE_KRONECKER:
        if p1 is None:
            raise ValueError("kronecker transform needs p1 (and p2, or None for an identity right factor)")
        return kronecker_transform(x, p1, p2)
    raise ValueError(f"unknown transform mode {mode}")


def act_quant_ref(
    x: torch.Tensor,
    bits: int,
    clip: torch.Tensor,
    mode: int,
    hb: int,
    p1: torch.Tensor | None,
    p2: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transform (float32) then per-token symmetric quantization: (codes uint8 [M, K or K/2], scale f32 [M])."""
    if bits not in (4, 8):
        raise ValueError("act_quant supports 4 or 8 bits")
    xf = apply_transform(x.float(), mode, hb, None if p1 is None else p1.float(), None if p2 is None else p2.float())
    qp = compute_qparams(xf, bits, symmetric=True, clip_ratio=clip.float().to(xf.device))
    codes = quantize_codes(xf, qp)
    if bits == 4:
        codes = pack_int4(codes)
    return codes, qp.scale.reshape(-1).float()


def act_quant_s8_ref(
    x: torch.Tensor,
    clip: torch.Tensor,
    mode: int,
    hb: int,
    p1: torch.Tensor | None,
    p2: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`act_quant_ref` at 8 bits in the Hopper GEMM's input form: SIGNED codes ``q = u - 128``
    (int8 ``[M, K]``), the scale ``[M]``, and ``a_corr = 128 * sum_k q`` (int32 ``[M]``), the term that
    turns ``sum_k q * u_w`` (uint8 weight codes) into ``sum_k q * (u_w - 128)``."""
    codes, scale = act_quant_ref(x, 8, clip, mode, hb, p1, p2)
    q = signed_values(codes, 8)
    corr = (q.sum(dim=-1, dtype=torch.int64) * 128).to(torch.int32)
    return q.to(torch.int8), scale, corr


def unpack_w4_u8_ref(qweight: torch.Tensor) -> torch.Tensor:
    """int4 codes ``[N, K/2]`` -> uint8 codes ``u + 120`` ``[N, K]``: the symmetric int4 zero point 8 lands
    on 128, so :func:`w8a8_gemm_sm90_ref` (and the Hopper GEMM) computes W4A8 unchanged."""
    return (unpack_int4(qweight).to(torch.int16) + 120).to(torch.uint8)


def dequant_w4_ref(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """int4 codes ``[N, K/2]`` with per-group scale/zero ``[N, K/group]`` -> fp16 ``[N, K]``."""
    u = unpack_int4(qweight).float()
    n, k = u.shape
    w = (u.reshape(n, k // group_size, group_size) - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return w.reshape(n, k).to(torch.float16)


def w4a16_gemm_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    u = unpack_int4(qweight).float()
    n, k = u.shape
    w = ((u.reshape(n, k // group_size, group_size) - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)).reshape(n, k)
    out = x.float() @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def w4_sm90_nibble_offsets(n: int, k: int) -> torch.Tensor:
    """Where code ``(row, col)`` of an ``[n, k]`` int4 matrix lands (nibble index) in the reordered layout of the Hopper
    W4A16 GEMM (``kernels/csrc/w4a16_sm90.cuh``, ``W4LayoutReordered``): 16 x 16 atoms, atom ``(row // 16, col // 16)``
    at ``256 * (row // 16 + (n // 16) * (col // 16))``; inside one, lane ``4 g + t`` (``g = row % 8``, ``t = col % 8 // 2``)
    holds the 8 values of its wgmma A fragment (value ``v = col % 2 + 2 * (row % 16 // 8) + 4 * (col % 16 // 8)``)
    contiguously at ``8 * lane``, value ``v`` at position ``4 * (v % 2) + v // 2`` (the order [0,2,4,6,1,3,5,7])."""
    if n % 16 or k % 16:
        raise ValueError("w4_sm90_nibble_offsets: n and k must be multiples of 16")
    rows = torch.arange(n, dtype=torch.int64)[:, None]
    cols = torch.arange(k, dtype=torch.int64)[None, :]
    lane = 4 * (rows % 8) + cols % 8 // 2
    v = cols % 2 + 2 * (rows % 16 // 8) + 4 * (cols % 16 // 8)
    atom = rows // 16 + (n // 16) * (cols // 16)
    return 256 * atom + 8 * lane + 4 * (v % 2) + v // 2


def pack_w4_sm90(qweight: torch.Tensor) -> torch.Tensor:
    """int4 codes ``[N, K/2]`` in row order -> the Hopper W4A16 GEMM's reordered layout (same shape; nibble ``i`` of the
    flat result is byte ``i // 2``, low nibble first), as the extension's ``w4a16_sm90_reorder``."""
    u = unpack_int4(qweight)
    n, k = u.shape
    if n % 16 or k % 64:  # as the CUDA reorder (the GEMM's k tiles are 64 or 128)
        raise ValueError("w4a16_sm90_reorder: N must be a multiple of 16 and K of 64")
    flat = torch.empty(n * k, dtype=torch.uint8, device=qweight.device)
    flat[w4_sm90_nibble_offsets(n, k).to(qweight.device).flatten()] = u.flatten()
    return pack_int4(flat.reshape(n, k))


def unpack_w4_sm90(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_w4_sm90`: the codes ``[N, K/2]`` in row order."""
    n, k = codes.shape[0], codes.shape[1] * 2
    return pack_int4(unpack_int4(codes).flatten()[w4_sm90_nibble_offsets(n, k).to(codes.device)])


def w4a16_sm90_operands(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``scale`` and integer ``zero`` ``[N, G]`` -> the Hopper W4A16 GEMM's fp16 ``(scale, zero term)``
    ``[G, N]``: the scale rounded to fp16 and ``-zero * scale`` computed from that rounded scale, so that a code equal
    to its zero point dequantises to exactly 0 (``kernels/csrc/w4a16_sm90.cuh``: ``w = u * scale + zero term``)."""
    s16 = scale.detach().to(torch.float16)
    z16 = (-(zero.detach().float() * s16.float())).to(torch.float16)
    return s16.t().contiguous(), z16.t().contiguous()


def w4a16_gemm_sm90_ref(x: torch.Tensor, qweight: torch.Tensor, scale_t: torch.Tensor, zero_t: torch.Tensor,
                        group_size: int, bias: torch.Tensor | None) -> torch.Tensor:
    """Reference of ``qaas::w4a16_gemm_sm90``: codes ``[N, K/2]`` in row order, fp16 ``scale_t`` / ``zero_t``
    ``[G, N]`` (:func:`w4a16_sm90_operands`); the weight ``u * scale + zero term`` in fp32, products in fp32."""
    u = unpack_int4(qweight).float()
    n, k = u.shape
    s = scale_t.float().t().repeat_interleave(group_size, dim=1)
    z = zero_t.float().t().repeat_interleave(group_size, dim=1)
    out = x.float() @ (u * s + z).t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


W4_META_ZERO_BITS = 0xF  # low mantissa bits of a packed metadata word that carry the zero point


def w4_meta_packable(scale: torch.Tensor, zero: torch.Tensor) -> bool:
    """Whether per-group ``scale``/``zero`` ``[N, G]`` fit :func:`pack_w4_meta`'s words: finite scales and integer
    zero points in 0..15 (every asymmetric or symmetric int4 quantizer of ``quant.quantizers`` produces those)."""
    z = zero.float()
    return bool(
        scale.shape == zero.shape
        and scale.dim() == 2
        and torch.isfinite(scale.float()).all()
        and (z == torch.round(z)).all()
        and (z >= 0).all()
        and (z <= 15).all()
    )


def pack_w4_meta(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Per-group ``scale`` (float32) and integer ``zero`` (0..15), ``[N, G]`` -> int32 words ``[ceil(N/16), G, 8, 2]``.

    Word: the float32 scale rounded to nearest at 19 mantissa bits (relative change <= 2**-20), its 4 low bits
    replaced by the zero point. Index ``[tile, group, g, h]`` holds output row ``16 * tile + g + 8 * h`` (rows past
    N: scale 0, zero 0), so the decode kernel's lane ``(g, t)`` reads its rows ``g`` and ``g + 8`` as one 8-byte
    load (``kernels/csrc/w4a16_packed.cu``)."""
    if not w4_meta_packable(scale, zero):
        raise ValueError("pack_w4_meta: scales must be finite and zero points integers in 0..15, both [N, G]")
    n, g = scale.shape
    tiles = -(-n // 16)
    bits = scale.detach().float().contiguous().view(torch.int32).to(torch.int64)
    bits = ((bits + 8) & ~W4_META_ZERO_BITS) | zero.detach().to(torch.int64)
    words = torch.zeros(tiles * 16, g, dtype=torch.int32, device=scale.device)
    words[:n] = bits.to(torch.int32)  # finite scales: the rounded bit patterns stay inside int32
    return words.reshape(tiles, 2, 8, g).permute(0, 3, 2, 1).contiguous()


def pack_w4_tiled(qweight: torch.Tensor) -> torch.Tensor:
    """int4 codes ``[N, K/2]`` -> the decode kernel's tiled order (``quant.quantizers.packing.tile_int4_rows``)."""
    return tile_int4_rows(qweight)


def unpack_w4_tiled(tiled: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_w4_tiled`: the codes ``[n, K/2]`` in row order."""
    return untile_int4_rows(tiled, n)


def w4a16_gemm_packed_tiled_ref(x: torch.Tensor, qtiled: torch.Tensor, meta: torch.Tensor, group_size: int,
                                bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """:func:`w4a16_gemm_packed_ref` over codes in the tiled order of :func:`pack_w4_tiled`."""
    return w4a16_gemm_packed_ref(x, unpack_w4_tiled(qtiled, n), meta, group_size, bias)


def unpack_w4_meta(meta: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_w4_meta`: (scale float32, zero float32), ``[n, G]``."""
    tiles, g = meta.shape[0], meta.shape[1]
    words = meta.permute(0, 3, 2, 1).reshape(tiles * 16, g)[:n].contiguous()
    zero = (words & W4_META_ZERO_BITS).float()
    scale = (words & ~W4_META_ZERO_BITS).view(torch.float32)
    return scale, zero


def w4a16_gemm_packed_ref(
    x: torch.Tensor, qweight: torch.Tensor, meta: torch.Tensor, group_size: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """:func:`w4a16_gemm_ref` with the scale/zero of :func:`pack_w4_meta` words."""
    scale, zero = unpack_w4_meta(meta, qweight.shape[0])
    return w4a16_gemm_ref(x, qweight, scale, zero, group_size, bias)


def signed_values(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed integer values ``u - 2**(bits-1)`` of symmetric codes (int4 unpacked first), as int32."""
    u = unpack_int4(codes) if bits == 4 else codes
    return u.to(torch.int32) - (1 << (bits - 1))


def int8_gemm_ref(
    a: torch.Tensor,
    a_bits: int,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_bits: int,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``(qa @ qw^T) * a_scale[:, None] * w_scale[None, :] + bias`` in float64, returned as fp16."""
    qa = signed_values(a, a_bits).double()
    qw = signed_values(w, w_bits).double()
    out = (qa @ qw.t()) * a_scale.double().reshape(-1, 1) * w_scale.double().reshape(1, -1)
    if bias is not None:
        out = out + bias.double()
    return out.to(torch.float16)


def w8a8_gemm_sm90_ref(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    a_corr: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """What the Hopper W8A8 GEMM computes from SIGNED int8 activations ``a [M, K]`` and uint8 weight codes
    ``w [N, K]`` (symmetric, zero 128): ``((a @ w^T) - a_corr[:, None]) * a_scale[:, None] * w_scale[None, :]
    + bias``, float64 math, fp16 out. With ``a_corr = 128 * a.sum(-1)`` this equals :func:`int8_gemm_ref`."""
    acc = a.to(torch.int64).double() @ w.to(torch.int64).double().t()
    out = (acc - a_corr.double().reshape(-1, 1)) * a_scale.double().reshape(-1, 1) * w_scale.double().reshape(1, -1)
    if bias is not None:
        out = out + bias.double()
    return out.to(torch.float16)


def scale_epilogue_ref(
    acc: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    out = acc.double() * a_scale.double().reshape(-1, 1) * w_scale.double().reshape(1, -1)
    if bias is not None:
        out = out + bias.double()
    return out.to(torch.float16)


# ------------------------------------------------------------------------------ quantized KV cache
def kv_quantize_ref(
    x: torch.Tensor, bits: int, symmetric: bool, clip: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token-per-head quantization of a cache tensor ``[..., head_dim]`` (reduction over ``head_dim``),
    float32 math of :func:`compute_qparams` / :func:`quantize_codes`: (codes uint8 ``[..., D]`` (8 bits) or
    ``[..., D/2]`` (4 bits, element ``2j`` in the low nibble), scale f32 ``[...]``, zero f32 ``[...]``)."""
    if bits not in (4, 8):
        raise ValueError("kv_quantize supports 4 or 8 bits")
    xf = x.float()
    qp = compute_qparams(xf, bits, symmetric=symmetric, clip_ratio=clip)
    codes = quantize_codes(xf, qp)
    if bits == 4:
        codes = pack_int4(codes)
    return codes, qp.scale.squeeze(-1).float().contiguous(), qp.zero.squeeze(-1).float().contiguous()


def kv_dequantize_ref(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``(u - z) * s`` per row, in ``dtype`` (float64 by default): the inverse of :func:`kv_quantize_ref`."""
    u = unpack_int4(codes) if bits == 4 else codes
    return ((u.to(dtype) - zero.to(dtype).unsqueeze(-1)) * scale.to(dtype).unsqueeze(-1)).to(dtype)


def kv_decode_attention_f64(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    bits: int,
    seq_lens: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """float64 decode attention of ``q [B, Hq, D]`` over the first ``seq_lens[b]`` positions of the dequantized
    caches ``[B, Hkv, Lmax, ...]`` (GQA: query head ``h`` reads KV head ``h // (Hq / Hkv)``); an empty
    sequence gives 0."""
    k = kv_dequantize_ref(k_codes, k_scale, k_zero, bits)
    v = kv_dequantize_ref(v_codes, v_scale, v_zero, bits)
    b, hq, d = q.shape
    hkv, lmax = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"Hq ({hq}) must be a multiple of Hkv ({hkv})")
    qg = q.double().reshape(b, hkv, hq // hkv, d)
    scores = torch.einsum("bkgd,bkld->bkgl", qg, k) * sm_scale
    valid = torch.arange(lmax, device=q.device).unsqueeze(0) < seq_lens.to(q.device).long().unsqueeze(1)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bkgl,bkld->bkgd", p, v).reshape(b, hq, d)


def kv_decode_attention_ref(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    bits: int,
    seq_lens: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """:func:`kv_decode_attention_f64` returned in ``q``'s dtype (what the CUDA kernel computes)."""
    out = kv_decode_attention_f64(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, seq_lens, sm_scale)
    return out.to(q.dtype)
