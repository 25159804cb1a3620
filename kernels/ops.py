"""``torch.library`` custom ops of the qaas kernels (namespace ``qaas``).

Each op's default kernel is its pure-torch reference (:mod:`kernels.reference`), so every op runs on
the CPU; when the compiled extension loads, the CUDA kernel is registered for CUDA tensors.
(No ``from __future__ import annotations`` here: ``custom_op`` infers schemas from real annotations.)
"""

from typing import Optional

import torch
from torch import Tensor

from kernels import reference
from kernels._ext import extension


@torch.library.custom_op("qaas::act_quant", mutates_args=())
def act_quant(
    x: Tensor,
    bits: int,
    clip: Tensor,
    mode: int,
    hb: int,
    p1: Optional[Tensor],
    p2: Optional[Tensor],
    frags: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Online transform (mode 0 none, 1 block Hadamard of size ``hb``, 2 Kronecker ``p1``/``p2``; ``p2=None``: an
    identity right factor, which the CUDA kernel skips) fused with
    per-token symmetric quantization to ``bits`` (8, or 4 packed two per byte); clip ratio ``clip``.
    ``frags``: the transform's factors as the CUDA kernel stages them (the extension's ``act_quant_fragments``,
    built once per transform); the same result, without rebuilding them in every block. The reference ignores it."""
    return reference.act_quant_ref(x, bits, clip, mode, hb, p1, p2)


@act_quant.register_fake
def _act_quant_fake(x, bits, clip, mode, hb, p1, p2, frags=None):
    m, k = x.shape
    return x.new_empty((m, k if bits == 8 else k // 2), dtype=torch.uint8), x.new_empty((m,), dtype=torch.float32)


@torch.library.custom_op("qaas::w4a16_gemm", mutates_args=())
def w4a16_gemm(
    x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor, group_size: int, bias: Optional[Tensor]
) -> Tensor:
    """``x [M<=16, K] fp16 @ dequant(qweight [N, K/2] int4, scale/zero [N, K/group])^T + bias``."""
    return reference.w4a16_gemm_ref(x, qweight, scale, zero, group_size, bias)


@w4a16_gemm.register_fake
def _w4a16_fake(x, qweight, scale, zero, group_size, bias):
    return x.new_empty((x.shape[0], qweight.shape[0]))


@torch.library.custom_op("qaas::w4a16_gemm_packed", mutates_args=())
def w4a16_gemm_packed(x: Tensor, qweight: Tensor, meta: Tensor, group_size: int, bias: Optional[Tensor]) -> Tensor:
    """:func:`w4a16_gemm` with the scale/zero packed by ``reference.pack_w4_meta`` (one int32 word per row and
    group, tile-ordered); ``K`` and ``group_size`` multiples of 128."""
    return reference.w4a16_gemm_packed_ref(x, qweight, meta, group_size, bias)


@w4a16_gemm_packed.register_fake
def _w4a16_packed_fake(x, qweight, meta, group_size, bias):
    return x.new_empty((x.shape[0], qweight.shape[0]))


@torch.library.custom_op("qaas::w4a16_gemm_packed_tiled", mutates_args=())
def w4a16_gemm_packed_tiled(
    x: Tensor, qtiled: Tensor, meta: Tensor, group_size: int, bias: Optional[Tensor], n: int
) -> Tensor:
    """:func:`w4a16_gemm_packed` over codes in the tiled order of ``reference.pack_w4_tiled`` (``[ceil(n/16) * 16,
    K/2]``; ``n`` output features): each 16-byte load of the CUDA kernel covers whole 128-byte lines. Any number of
    rows: the CUDA decode kernel at <= 16, the batched GEMM (``w4a16_batched.cu``) above."""
    return reference.w4a16_gemm_packed_tiled_ref(x, qtiled, meta, group_size, bias, n)


@w4a16_gemm_packed_tiled.register_fake
def _w4a16_packed_tiled_fake(x, qtiled, meta, group_size, bias, n):
    return x.new_empty((x.shape[0], n))


@torch.library.custom_op("qaas::w4a16_sm90_reorder", mutates_args=())
def w4a16_sm90_reorder(qweight: Tensor) -> Tensor:
    """int4 codes ``[N, K/2]`` in row order -> the layout the Hopper W4A16 GEMM reads (``reference.pack_w4_sm90``;
    N a multiple of 16, K of 64)."""
    return reference.pack_w4_sm90(qweight)


@w4a16_sm90_reorder.register_fake
def _w4a16_sm90_reorder_fake(qweight):
    return torch.empty_like(qweight)


@torch.library.custom_op("qaas::w4a16_gemm_sm90", mutates_args=())
def w4a16_gemm_sm90(
    x: Tensor, codes: Tensor, scale: Tensor, zero: Tensor, group_size: int, bias: Optional[Tensor]
) -> Tensor:
    """``x [M, K] fp16 @ (u * scale + zero)^T + bias`` for any M: codes reordered by :func:`w4a16_sm90_reorder`, fp16
    ``scale`` and zero term ``[K / group_size, N]`` (``reference.w4a16_sm90_operands``). CUDA: the Hopper wgmma GEMM
    (``kernels/csrc/w4a16_sm90.cuh``), its configuration and decomposition chosen by M."""
    return reference.w4a16_gemm_sm90_ref(x, reference.unpack_w4_sm90(codes), scale, zero, group_size, bias)


@w4a16_gemm_sm90.register_fake
def _w4a16_gemm_sm90_fake(x, codes, scale, zero, group_size, bias):
    return x.new_empty((x.shape[0], codes.shape[0]))


@torch.library.custom_op("qaas::dequant_w4", mutates_args=())
def dequant_w4(qweight: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """int4 packed weight -> fp16 ``[N, K]`` (prefill path of W4A16: then cuBLAS)."""
    return reference.dequant_w4_ref(qweight, scale, zero, group_size)


@dequant_w4.register_fake
def _dequant_w4_fake(qweight, scale, zero, group_size):
    return qweight.new_empty((qweight.shape[0], qweight.shape[1] * 2), dtype=torch.float16)


@torch.library.custom_op("qaas::dequant_w4_tiled", mutates_args=())
def dequant_w4_tiled(qtiled: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """:func:`dequant_w4` of codes in the decode kernel's tiled order (``reference.pack_w4_tiled``; N a multiple of
    16, so ``[N, K/2]`` as the rows): W4A16 prefill of a layer whose codes a decode call tiled."""
    return reference.dequant_w4_ref(reference.unpack_w4_tiled(qtiled, qtiled.shape[0]), scale, zero, group_size)


@dequant_w4_tiled.register_fake
def _dequant_w4_tiled_fake(qtiled, scale, zero, group_size):
    return qtiled.new_empty((qtiled.shape[0], qtiled.shape[1] * 2), dtype=torch.float16)


@torch.library.custom_op("qaas::int8_gemm", mutates_args=())
def int8_gemm(
    a: Tensor, a_bits: int, a_scale: Tensor, w: Tensor, w_bits: int, w_scale: Tensor, bias: Optional[Tensor]
) -> Tensor:
    """Symmetric integer GEMM on int8 tensor cores (W8A8, W4A8, W4A4 storage) with the per-token x
    per-channel scale and bias epilogue, fp16 out."""
    return reference.int8_gemm_ref(a, a_bits, a_scale, w, w_bits, w_scale, bias)


@int8_gemm.register_fake
def _int8_gemm_fake(a, a_bits, a_scale, w, w_bits, w_scale, bias):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=torch.float16)


@torch.library.custom_op("qaas::scale_epilogue", mutates_args=())
def scale_epilogue(acc: Tensor, a_scale: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """int32 accumulators -> fp16 with per-token x per-channel scales (baseline: after ``torch._int_mm``)."""
    return reference.scale_epilogue_ref(acc, a_scale, w_scale, bias)


@scale_epilogue.register_fake
def _scale_epilogue_fake(acc, a_scale, w_scale, bias):
    return acc.new_empty(acc.shape, dtype=torch.float16)


@torch.library.custom_op("qaas::act_quant_s8", mutates_args=())
def act_quant_s8(
    x: Tensor,
    clip: Tensor,
    mode: int,
    hb: int,
    p1: Optional[Tensor],
    p2: Optional[Tensor],
    frags: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``act_quant`` at 8 bits for the Hopper GEMM: signed int8 codes ``[M, K]``, scale ``[M]`` and
    ``128 * row sum`` of the codes (int32 ``[M]``); ``frags`` as for ``act_quant``."""
    return reference.act_quant_s8_ref(x, clip, mode, hb, p1, p2)


@act_quant_s8.register_fake
def _act_quant_s8_fake(x, clip, mode, hb, p1, p2, frags=None):
    m, k = x.shape
    return (
        x.new_empty((m, k), dtype=torch.int8),
        x.new_empty((m,), dtype=torch.float32),
        x.new_empty((m,), dtype=torch.int32),
    )


@torch.library.custom_op("qaas::w8a8_gemm_sm90", mutates_args=())
def w8a8_gemm_sm90(
    a: Tensor, a_scale: Tensor, a_corr: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor], config: int
) -> Tensor:
    """W8A8 GEMM on Hopper wgmma tensor cores: signed int8 activations x uint8 weight codes, with the
    ``a_corr`` / per-token x per-channel scale / bias epilogue, fp16 out (``config`` picks a tile shape)."""
    return reference.w8a8_gemm_sm90_ref(a, a_scale, a_corr, w, w_scale, bias)


@w8a8_gemm_sm90.register_fake
def _w8a8_gemm_sm90_fake(a, a_scale, a_corr, w, w_scale, bias, config):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=torch.float16)


@torch.library.custom_op("qaas::unpack_w4_u8", mutates_args=())
def unpack_w4_u8(qweight: Tensor) -> Tensor:
    """int4 weight codes ``[N, K/2]`` -> uint8 ``u + 120`` ``[N, K]`` (zero point 128) for the Hopper GEMM."""
    return reference.unpack_w4_u8_ref(qweight)


@unpack_w4_u8.register_fake
def _unpack_w4_u8_fake(qweight):
    return qweight.new_empty((qweight.shape[0], qweight.shape[1] * 2))


@torch.library.custom_op("qaas::kv_quantize", mutates_args=())
def kv_quantize(x: Tensor, bits: int, symmetric: bool, clip: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token-per-head KV-cache quantization of ``x [..., head_dim]`` fp16 (reduction over ``head_dim``):
    uint8 codes ``[..., D]`` (8 bits) or ``[..., D/2]`` (4 bits), float32 scale and zero ``[...]``."""
    return reference.kv_quantize_ref(x, bits, symmetric, clip)


@kv_quantize.register_fake
def _kv_quantize_fake(x, bits, symmetric, clip):
    lead = x.shape[:-1]
    d = x.shape[-1] if bits == 8 else x.shape[-1] // 2
    return (
        x.new_empty((*lead, d), dtype=torch.uint8),
        x.new_empty(lead, dtype=torch.float32),
        x.new_empty(lead, dtype=torch.float32),
    )


@torch.library.custom_op("qaas::kv_decode_attention", mutates_args=())
def kv_decode_attention(
    q: Tensor,
    k_codes: Tensor,
    k_scale: Tensor,
    k_zero: Tensor,
    v_codes: Tensor,
    v_scale: Tensor,
    v_zero: Tensor,
    bits: int,
    seq_lens: Tensor,
    sm_scale: float,
) -> Tensor:
    """One decode step: ``q [B, Hq, D]`` attends over the first ``seq_lens[b]`` positions of the quantized
    caches ``[B, Hkv, Lmax, D*bits/8]`` (scale/zero ``[B, Hkv, Lmax]``; GQA), output ``[B, Hq, D]`` in q's dtype."""
    return reference.kv_decode_attention_ref(
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, seq_lens, sm_scale
    )


@kv_decode_attention.register_fake
def _kv_decode_attention_fake(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, seq_lens, sm_scale):
    return q.new_empty(q.shape)


def _register_cuda_kernels() -> bool:
    ext = extension()
    if ext is None:
        return False

    def _act_quant_cuda(x, bits, clip, mode, hb, p1, p2, frags=None):
        codes, scale = ext.act_quant(x, bits, clip, mode, hb, p1, p2, frags)
        return codes, scale

    def _w4a16_cuda(x, qweight, scale, zero, group_size, bias):
        return ext.w4a16_gemm(x, qweight, scale, zero, group_size, bias)

    def _w4a16_packed_cuda(x, qweight, meta, group_size, bias):
        return ext.w4a16_gemm_packed(x, qweight, meta, group_size, bias, False)

    def _w4a16_packed_tiled_cuda(x, qtiled, meta, group_size, bias, n):
        if x.shape[0] <= 16:
            return ext.w4a16_gemm_packed_tiled(x, qtiled, meta, group_size, bias, n, 0)
        return ext.w4a16_gemm_batched(x, qtiled, meta, group_size, bias, n)

    def _dequant_w4_cuda(qweight, scale, zero, group_size):
        return ext.dequant_w4(qweight, scale, zero, group_size, False)

    def _dequant_w4_tiled_cuda(qtiled, scale, zero, group_size):
        return ext.dequant_w4(qtiled, scale, zero, group_size, True)

    def _int8_gemm_cuda(a, a_bits, a_scale, w, w_bits, w_scale, bias):
        return ext.int8_gemm(a, a_bits, a_scale, w, w_bits, w_scale, bias)

    def _scale_epilogue_cuda(acc, a_scale, w_scale, bias):
        return ext.scale_epilogue(acc, a_scale, w_scale, bias)

    def _act_quant_s8_cuda(x, clip, mode, hb, p1, p2, frags=None):
        return tuple(ext.act_quant_s8(x, clip, mode, hb, p1, p2, frags))

    def _w8a8_gemm_sm90_cuda(a, a_scale, a_corr, w, w_scale, bias, config):
        return ext.w8a8_gemm_sm90(a, a_scale, a_corr, w, w_scale, bias, config)

    def _unpack_w4_u8_cuda(qweight):
        return ext.unpack_w4_u8(qweight)

    def _w4a16_sm90_reorder_cuda(qweight):
        return ext.w4a16_sm90_reorder(qweight)

    def _w4a16_gemm_sm90_cuda(x, codes, scale, zero, group_size, bias):
        return ext.w4a16_gemm_sm90(x, codes, scale, zero, group_size, bias, -1, -1)

    w4a16_sm90_reorder.register_kernel("cuda")(_w4a16_sm90_reorder_cuda)
    w4a16_gemm_sm90.register_kernel("cuda")(_w4a16_gemm_sm90_cuda)

    unpack_w4_u8.register_kernel("cuda")(_unpack_w4_u8_cuda)
    act_quant_s8.register_kernel("cuda")(_act_quant_s8_cuda)
    w8a8_gemm_sm90.register_kernel("cuda")(_w8a8_gemm_sm90_cuda)
    act_quant.register_kernel("cuda")(_act_quant_cuda)
    w4a16_gemm.register_kernel("cuda")(_w4a16_cuda)
    w4a16_gemm_packed.register_kernel("cuda")(_w4a16_packed_cuda)
    w4a16_gemm_packed_tiled.register_kernel("cuda")(_w4a16_packed_tiled_cuda)
    dequant_w4.register_kernel("cuda")(_dequant_w4_cuda)
    dequant_w4_tiled.register_kernel("cuda")(_dequant_w4_tiled_cuda)
    int8_gemm.register_kernel("cuda")(_int8_gemm_cuda)
    scale_epilogue.register_kernel("cuda")(_scale_epilogue_cuda)
    return True


CUDA_KERNELS_REGISTERED = _register_cuda_kernels()


def _register_kv_cuda_kernels() -> bool:
    """CUDA kernels of the quantized-KV-cache ops (kernels/csrc/kv_attention.cu), when the build has them."""
    ext = extension()
    if ext is None or not hasattr(ext, "kv_decode_attention"):
        return False

    def _kv_quantize_cuda(x, bits, symmetric, clip):
        return tuple(ext.kv_quantize(x, bits, symmetric, clip))

    def _kv_decode_attention_cuda(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, seq_lens, sm_scale):
        return ext.kv_decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, seq_lens, sm_scale)

    kv_quantize.register_kernel("cuda")(_kv_quantize_cuda)
    kv_decode_attention.register_kernel("cuda")(_kv_decode_attention_cuda)
    return True


KV_CUDA_KERNELS_REGISTERED = _register_kv_cuda_kernels()
