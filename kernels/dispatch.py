"""GPU dispatch for :class:`quant.modules.QuantLinear` (called from its ``forward`` on CUDA inputs).

Paths (fp16 activations):
- **W4A16** (weights <= 4 bits packed two per byte, any per-group scale/zero with ``group_size % 32 == 0``,
  activations unquantized): <= 16 tokens -> ``qaas::w4a16_gemm_packed`` (memory-bound GEMV reading one packed
  scale/zero word per row and group, built once per layer by ``reference.pack_w4_meta``) where ``K`` and the
  group are multiples of 128 and the zero points integers in 0..15 (launched with programmatic dependent launch
  once the layer's weights are unchanged since its previous call, so that consecutive W4A16 layers overlap;
  ``QAAS_W4A16_PDL=0`` turns that off), else ``qaas::w4a16_gemm``. Where N is also a multiple of 16, the first call
  of at most ``W4A16_BATCHED_MAX_TOKENS`` tokens puts the layer's codes into the kernels' tiled order in place
  (``QuantLinear.tile_codes``: whole 128-byte lines per load, H200 run v11b); then ``qaas::w4a16_gemm_packed_tiled``
  runs at <= 16 tokens. Past 16 tokens, on an extension built with CUTLASS: the extension's ``w4a16_gemm_sm90``
  (Hopper wgmma, CUTLASS's mixed-input collective under its stream-K scheduler) over a second copy of the codes in its
  own order (``w4a16_sm90_reorder``) with fp16 scales and zero terms, where N is a multiple of 16 and the groups of a
  multiple of 128 (``QAAS_W4A16_SM90=0`` turns it off, and with it the second copy). Otherwise the extension's
  ``w4a16_gemm_batched`` (mma.sync GEMM, K split across a thread-block cluster) up to ``W4A16_BATCHED_MAX_TOKENS``,
  and more tokens: ``qaas::dequant_w4`` (of the tiled codes: ``qaas::dequant_w4_tiled``) + cuBLAS fp16.
- **W8A8 / W4A8 / W4A4** (symmetric per-channel weights of 8 or 4 bits, symmetric per-token activations
  of 8 or 4 bits): ``qaas::act_quant`` (online transform fused with the activation quantization; the
  transform's factors staged once per layer by ``act_quant_fragments``) ->
  ``qaas::int8_gemm`` (int8 tensor cores, scales and bias in the epilogue).
  W8A8 and W4A8 on an extension built with CUTLASS (Hopper): ``qaas::act_quant_s8`` (signed codes and
  the row-sum term) -> ``qaas::w8a8_gemm_sm90`` (wgmma + TMA, the same epilogue fused), reading the
  stored uint8 weight codes directly (W4: ``qaas::unpack_w4_u8`` first, codes + 120).
The layer's online transform is matched against the kernel's: block-diagonal Hadamard or Kronecker
``kron(P1, P2)`` found among the transform's square tensors, by probing it on random inputs once (an exact
identity ``P2``, FlatQuant's o_proj transform, is left out: the kernel skips that product);
any other transform runs in torch before the fused quantization kernel.

Everything else (asymmetric or group-wise activations/weights on the integer path, 6-bit, bf16/fp32
inputs) is not supported: ``supports`` returns False and ``QuantLinear`` uses its reference forward.
On a machine without the built extension ``supports`` always returns False.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from kernels import ops, reference
from kernels._ext import available, extension
from quant.modules.linear import tensor_stamp

if TYPE_CHECKING:
    from quant.modules.linear import QuantLinear

FP_BITS = 16
GEMV_MAX_TOKENS = 16
# W4A16 past GEMV_MAX_TOKENS where the Hopper wgmma GEMM does not run (_sm90_w4_operands: H200 v14c, 1.2-3.2x faster
# than these paths at 17-2048 tokens): up to this many tokens the batched GEMM over tiled codes (w4a16_batched.cu);
# more: dequantisation + cuBLAS fp16. H200 run v13f (the final kernel): at 128 tokens the batched GEMM was the faster on
# all three 7B shapes (29.9 / 78.5 / 67.2 us vs 38.3 / 89.6 / 92.9), at 256 the slower (56.2 / 145.0 / 129.5 vs
# 39.8 / 95.6 / 100.5; v13c alike).
W4A16_BATCHED_MAX_TOKENS = 128
SM90_GEMM_MIN_TOKENS = {8: 1, 4: 64}  # by weight bits: tokens from which W8A8 / W4A8 take the Hopper wgmma
# GEMM (when built with it). W4A8 unpacks its int4 codes per call (26 us for 4096x11008 on the H100), which
# only pays off once the GEMM dominates (run h100-v5b: at 1-16 tokens the mma.sync kernel is faster).
SMEM_LIMIT_BYTES = 220 * 1024
_PLAN_ATTR = "_qaas_kernel_plan"
_CACHE_ATTR = "_qaas_kernel_cache"


@dataclass(frozen=True)
class TransformPlan:
    kind: str  # "none" | "hadamard" | "kronecker" | "torch"
    hadamard_block: int = 0
    p1_name: str = ""
    p2_name: str = ""

    @property
    def mode(self) -> int:
        return {"hadamard": reference.MODE_HADAMARD, "kronecker": reference.MODE_KRONECKER}.get(
            self.kind, reference.MODE_NONE
        )


@dataclass(frozen=True)
class KernelPlan:
    path: str  # "w4a16" | "int"
    transform: TransformPlan
    transform_id: int


# ---------------------------------------------------------------------------------------------- plans
def _square_tensors(t: torch.nn.Module) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for name, tensor in list(t.named_parameters()) + list(t.named_buffers()):
        if tensor.dim() == 2 and tensor.shape[0] == tensor.shape[1] and tensor.is_floating_point():
            found[name] = tensor
    return found


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-2) -> bool:
    a, b = a.double(), b.double()
    return bool(torch.isfinite(a).all()) and float((a - b).norm() / b.norm().clamp_min(1e-30)) < tol


def detect_transform(transform: torch.nn.Module | None, n: int) -> TransformPlan:
    """Which fused-kernel transform computes ``transform`` (probed once on random inputs)."""
    if transform is None:
        return TransformPlan("none")
    tensors = _square_tensors(transform)
    ref = next(iter(tensors.values()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(1234)
    probe = torch.randn(4, n, generator=gen).to(device=device, dtype=dtype)
    with torch.no_grad():
        try:
            y = transform(probe).float()
        except Exception:  # a transform the probe cannot drive: keep it in torch
            return TransformPlan("torch")
        pf = probe.float()
        block = n & -n  # largest power of two dividing n
        while block >= 2:
            if block * 4 <= SMEM_LIMIT_BYTES and _close(reference.hadamard_blockdiag(pf, block), y):
                return TransformPlan("hadamard", hadamard_block=block)
            block //= 2
        for n1_name, p1 in tensors.items():
            for n2_name, p2 in tensors.items():
                if n1_name == n2_name or p1.shape[0] * p2.shape[0] != n:
                    continue
                smem = 4 * (2 * n + p1.shape[0] ** 2 + p2.shape[0] ** 2)
                if smem <= SMEM_LIMIT_BYTES and _close(reference.kronecker_transform(pf, p1.float(), p2.float()), y):
                    # an exact identity right factor (FlatQuant's o_proj: heads (x) I) is not passed: the kernel
                    # then skips that product
                    right_identity = torch.equal(p2, torch.eye(p2.shape[0], dtype=p2.dtype, device=p2.device))
                    return TransformPlan("kronecker", p1_name=n1_name, p2_name="" if right_identity else n2_name)
    return TransformPlan("torch")


def plan_for(layer: "QuantLinear") -> KernelPlan | None:
    """The kernel path for ``layer`` (None: not supported). Cached on the layer, recomputed when its
    transform module changes."""
    cached = layer.__dict__.get(_PLAN_ATTR)
    tid = id(layer.transform)
    if cached is not None and cached[0] == tid:
        return cached[1]
    plan = _make_plan(layer)
    layer.__dict__[_PLAN_ATTR] = (tid, plan)
    return plan


def _make_plan(layer: "QuantLinear") -> KernelPlan | None:
    k, n = layer.in_features, layer.out_features
    wb, ab = layer.weight_bits, layer.act_bits
    if wb >= FP_BITS:
        return None
    if ab >= FP_BITS:
        if wb > 4 or k % 32 or layer.group_size % 32 or k % layer.group_size:
            return None
        path = "w4a16"
    else:
        if ab not in (4, 8) or wb not in (4, 8) or not layer.act_symmetric or not layer.weight_symmetric:
            return None
        if layer.group_size != k or k % 64 or n % 2 or 4 * k > SMEM_LIMIT_BYTES:
            return None
        path = "int"
    tplan = detect_transform(layer.transform, k)
    if path == "w4a16" and tplan.kind != "none":
        tplan = TransformPlan("torch")  # unquantized activations: the transform runs in torch
    return KernelPlan(path=path, transform=tplan, transform_id=id(layer.transform))


# ---------------------------------------------------------------------------------------------- tensors
def _stamp(*tensors: torch.Tensor) -> tuple:
    """Identity, in-place version (``tensor_stamp``), dtype and device of ``tensors``: equal stamps mean unchanged
    tensors."""
    return tuple((*tensor_stamp(t), t.dtype, t.device) for t in tensors)


def _cached(layer: "QuantLinear", name: str, key: tuple, make: Callable[[], Any]) -> Any:
    """``make()`` cached on the layer under ``name`` while ``key`` (stamps of its sources, and whatever else it
    depends on) stays equal."""
    cache: dict[str, Any] = layer.__dict__.setdefault(_CACHE_ATTR, {})
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = make()
    cache[name] = (key, value)
    return value


def _is_cached(layer: "QuantLinear", name: str, key: tuple) -> bool:
    """Whether :func:`_cached` holds ``name`` for ``key`` (so that asking for it builds nothing)."""
    hit = layer.__dict__.get(_CACHE_ATTR, {}).get(name)
    return hit is not None and hit[0] == key


def _derived(layer: "QuantLinear", key: str, src: torch.Tensor, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``make(src)`` cached on the layer until ``src`` is replaced or modified in place."""
    return _cached(layer, key, _stamp(src), lambda: make(src))


def _derived_pair(
    layer: "QuantLinear", key: str, a: torch.Tensor, b: torch.Tensor, make: Callable[[torch.Tensor, torch.Tensor], Any]
) -> Any:
    """``make(a, b)`` cached on the layer until either source is replaced or modified in place."""
    return _cached(layer, key, _stamp(a, b), lambda: make(a, b))


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous()


# The extension's tiled-codes decode variants (kernels/csrc/w4a16_packed.cu launch_tiled_variant; odd = the same kernel
# launched with PDL): 16 warps per 16-row tile at two blocks per SM (default: the lean kernel with stepped pointers at
# <= 8 tokens and groups of 128); three per SM (40 registers); the persistent folded-zero-point kernel
# (w4a16_folded.cu); the lean kernel in blocks of 4 warps, 8 per SM (where the lean kernel does not apply, past 8
# tokens or with groups other than 128, the extension runs the default instead). (Two 128-k blocks per round, variant
# 3, is no longer dispatched: with the lean default it was slower everywhere in the H200 sweep v18e, e.g. 29.98 vs
# 24.21 us at 11008 outputs, K = 13824.)
TILED_DEFAULT, TILED_THREE_PER_SM, TILED_FOLDED_PDL, TILED_SMALL_BLOCKS = 0, 4, 9, 10
# 16-row tiles per SM past which the 4-warp blocks beat the default (H200 v19b: at 4 tiles per SM the default was ahead
# at K = 4096 / 5120 / 11008, at 5 and more the small blocks)
SMALL_BLOCKS_MIN_TILES_PER_SM = 4.5
# At 1 token with PDL, the band of tiles per SM (low exclusive, high inclusive) where the 4-warp blocks beat the folded
# kernel (H200 v19d: 6.55 tiles per SM at K = 5120 12.01 vs 13.10 us, 6.79 at K = 11008 23.93 vs 24.83; level at
# K = 4096, 10.28-10.37 vs 10.21-10.29 in v19b/c); below it and past one wave of 8 blocks per SM the folded kernel
SMALL_BLOCKS_ONE_TOKEN_BAND = (6, 7)
# The folded kernel's shared memory for the staged activations (w4a16_folded.cu kFoldSmemMax: 48 KB less its two
# 16 x 16 x 8 fp32 reduction buffers): tokens * K * 2 bytes of fragments plus 64 bytes of sums per 128-k block.
FOLDED_SMEM_BYTES = 48 * 1024 - 2 * 16 * 16 * 8 * 4


def folded_decode_fits(tokens: int, in_features: int) -> bool:
    """Whether the folded-zero-point decode kernel takes ``tokens`` rows of ``in_features`` (its C++ launcher
    otherwise falls back to the tiled kernel)."""
    return 1 <= tokens <= 8 and tokens * in_features * 2 + (in_features // 128) * 64 <= FOLDED_SMEM_BYTES


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def tiled_decode_variant(out_features: int, in_features: int, tokens: int, sms: int, pdl: bool) -> int:
    """The tiled decode kernel's variant for ``out_features`` x ``in_features`` and ``tokens`` rows on ``sms`` SMs
    (odd: launched with programmatic dependent launch). Past one token group (> 8 tokens) the default: the others are
    slower there (three per SM spills). Else by the number of 16-row tiles per SM, t (H200 sweeps v18e at K = 4096,
    5120, 11008, 13824 and t = 1.9-5.2, 1 token; v19b-d at K = 4096, 5120, 8192, 11008 and t = 3-13.6, 1-8 tokens):

    - 2 < t <= 3: three blocks per SM (one wave instead of two): with PDL 5.0-5.8 vs 5.3-6.3 us for the default at
      K = 4096, 12.4-12.7 vs 12.3-13.8 at 11008, 14.9-15.4 vs 14.2-16.4 at 13824; plain 6.6-6.7 vs 7.1-7.5 at 4096 from
      t = 2.4 (at t = 2.1 the default was up to 1.2 us faster plainly: a rarely run launch, on the first call after
      the weights change).
    - 1 token, t > 3 with PDL, where its staged activations fit (:func:`folded_decode_fits`), outside 6 < t <= 7: the
      persistent folded kernel (8.03 vs 9.22 us at 4096x11008; within 0.35 us of the default either way at t = 3.5-4;
      ahead of the 4-warp blocks at t = 5-5.2, 7.96-8.19 vs 8.50-8.94 at K = 4096 and 14.60 vs 15.51 at K = 8192, and
      past their one wave, 10.69 vs 11.22 at t = 8, K = 4096; 14.65 vs 17.90 at t = 8.5, K = 5120). At 2-3 tokens it
      was level with or behind the 4-warp blocks at t = 5.2-6.8 (v19d: 8.92-12.10 vs 8.91-10.61) and behind the
      default at t = 4 (7.43 / 8.30 vs 7.36 / 7.59 at 2 / 3 tokens), so it runs at 1 token only.
    - else t > 4.5: the lean kernel in blocks of 4 warps, 8 per SM (each warp a quarter of the k loop, up to 8 tiles
      per SM resident at once): plain at 1 token 9.03-11.60 vs 10.24-14.04 us for the default at K = 4096, t = 5-8
      (16.68 vs 17.90 at 10.4), 20.83 vs 21.68 at K = 11008, 12.64 vs 15.23 at K = 5120; with PDL at 2-8 tokens
      8.91-10.41 / 9.10-10.61 / 9.45-11.02 / 10.62-12.32 (2 / 3 / 4 / 8 tokens) vs 9.53-12.14 / 9.74-12.36 /
      10.25-12.98 / 11.71-14.59 for the default at K = 4096, t = 5.2-6.8; at 1 token with PDL in 6 < t <= 7
      (``SMALL_BLOCKS_ONE_TOKEN_BAND``: LLaMA-13B's 5120x13824 12.01 vs 13.10 for the folded kernel). At t = 3.5-4 the
      default was ahead (e.g. 8.10 vs 8.36 plainly at K = 4096, 16.19 vs 18.42 at K = 11008).
    - else the default (the lean kernel: from t = 3.5 it beat three per SM everywhere, plainly too)."""
    tiles = -(-out_features // 16)
    twin = 1 if pdl else 0
    if tokens > 8:
        return TILED_DEFAULT + twin
    if 2 * sms < tiles <= 3 * sms:
        return TILED_THREE_PER_SM + twin
    low, high = SMALL_BLOCKS_ONE_TOKEN_BAND
    in_band = low * sms < tiles <= high * sms
    if pdl and tokens == 1 and tiles > 3 * sms and not in_band and folded_decode_fits(tokens, in_features):
        return TILED_FOLDED_PDL
    if tiles > SMALL_BLOCKS_MIN_TILES_PER_SM * sms:
        return TILED_SMALL_BLOCKS + twin
    return TILED_DEFAULT + twin


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _packed_w4_meta(layer: "QuantLinear") -> tuple[torch.Tensor | None, bool]:
    """The layer's scale/zero as ``reference.pack_w4_meta`` words for ``w4a16_gemm_packed`` (None where the
    packed kernel does not apply: K or the group not a multiple of 128, or zero points outside 0..15), and
    whether the codes, scales and zero points are unchanged since this layer's previous call. Only then may the
    kernel be launched with programmatic dependent launch: it reads its weights and words before waiting for the
    previous kernel, which must therefore not be the one that wrote them (a rebuild of the words, an in-place
    edit of the weights)."""
    if layer.in_features % 128 or layer.group_size % 128:
        return None, False
    cache: dict[str, Any] = layer.__dict__.setdefault(_CACHE_ATTR, {})
    stamp = _stamp(layer.qweight, layer.w_scale, layer.w_zero)
    stable = cache.get("w4_weights_stamp") == stamp
    cache["w4_weights_stamp"] = stamp

    def make(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor | None:
        if not reference.w4_meta_packable(scale, zero):
            return None
        return reference.pack_w4_meta(scale, zero)

    return _derived_pair(layer, "w4_meta", layer.w_scale, layer.w_zero, make), stable


def _act_quant_fragments(
    layer: "QuantLinear", k: Any, x2: torch.Tensor, tp: TransformPlan, p1: torch.Tensor | None, p2: torch.Tensor | None
) -> torch.Tensor | None:
    """The layer's online transform staged once as the CUDA act_quant kernel holds it (``act_quant_fragments``:
    fp16 fragments of P1 / P2 or of the Hadamard factors), so that its blocks copy them instead of rebuilding them
    from the float32 factors on every call; None off the extension, without a transform, or where that kernel does
    not run. Cached on the layer until the factors are replaced or modified in place (or K / dtype / device
    change)."""
    if k is ops or tp.mode == reference.MODE_NONE:
        return None
    key = (_stamp(*(t for t in (p1, p2) if t is not None)), tp.mode, tp.hadamard_block, x2.shape[-1], x2.dtype,
           x2.device)

    def make() -> torch.Tensor | None:
        frags = k.act_quant_fragments(x2, tp.mode, tp.hadamard_block, p1, p2)
        return frags if frags.numel() else None

    return _cached(layer, "act_frags", key, make)


def w4a16_pdl_enabled() -> bool:
    """Programmatic dependent launch for the W4A16 decode kernel (environment ``QAAS_W4A16_PDL``, default on;
    ``0`` turns it off)."""
    return os.environ.get("QAAS_W4A16_PDL", "1") != "0"


@functools.lru_cache(maxsize=None)
def _has_sm90_w4a16(ext: Any) -> bool:
    """Whether the loaded extension was built with the Hopper W4A16 GEMM (CUTLASS)."""
    return int(ext.w4a16_sm90_num_configs()) > 0


def w4a16_sm90_enabled() -> bool:
    """The Hopper wgmma W4A16 GEMM past ``GEMV_MAX_TOKENS`` tokens (environment ``QAAS_W4A16_SM90``, default on; ``0``
    turns it off and with it the layer's second copy of its codes, see :func:`_sm90_w4_operands`)."""
    return os.environ.get("QAAS_W4A16_SM90", "1") != "0"


def w4a16_sm90_applies(ext: Any, out_features: int, in_features: int, group_size: int) -> bool:
    """Whether a W4A16 layer of this shape runs past ``GEMV_MAX_TOKENS`` on the extension's Hopper GEMM: built with it,
    not turned off (``QAAS_W4A16_SM90``), N a multiple of 16, groups of a multiple of 128 dividing K (scales too large
    for fp16 still keep a layer off it: :func:`_sm90_w4_operands`)."""
    return (w4a16_sm90_enabled() and _has_sm90_w4a16(ext) and out_features % 16 == 0 and group_size % 128 == 0
            and in_features % group_size == 0)


def _sm90_w4_operands(layer: "QuantLinear", k: Any, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The operands of the extension's Hopper W4A16 GEMM (``w4a16_gemm_sm90``) for this layer: its codes reordered
    (``w4a16_sm90_reorder`` of the row-order codes: a second copy of the codes next to the decode kernels' tiled
    ``qweight``, half a byte per weight) and the fp16 scale and zero term ``[G, N]`` (``reference.w4a16_sm90_operands``),
    each built once per layer and rebuilt when its sources change. None where the GEMM does not apply: the extension
    without it, ``QAAS_W4A16_SM90=0``, a shape it does not take (N a multiple of 16, groups of a multiple of 128 dividing
    K), scales whose fp16 rounding is not finite, or during CUDA-graph capture before the operands exist (they are
    never built inside a capture: a replay would rebuild them every time)."""
    if k is ops or not w4a16_sm90_applies(k, layer.out_features, layer.in_features, layer.group_size):
        return None
    if _capturing(x2) and not (_is_cached(layer, "w4_sm90_codes", _stamp(layer.qweight))
                               and _is_cached(layer, "w4_sm90_terms", _stamp(layer.w_scale, layer.w_zero))):
        return None

    def terms(scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        s16, z16 = reference.w4a16_sm90_operands(scale, zero)
        # the largest code times the scale within fp16 (also false for inf / NaN scales)
        ok = bool((s16.float() * 15).abs().max() < 65504 and torch.isfinite(z16).all())
        return (s16, z16) if ok else None

    st = _derived_pair(layer, "w4_sm90_terms", layer.w_scale, layer.w_zero, terms)
    if st is None:
        return None
    codes = _derived(layer, "w4_sm90_codes", layer.qweight, lambda q: k.w4a16_sm90_reorder(layer.packed_codes().contiguous()))
    return codes, st[0], st[1]


def _bias(layer: "QuantLinear") -> torch.Tensor | None:
    if layer.bias is None:
        return None
    return _derived(layer, "bias", layer.bias, lambda b: b.detach().to(torch.float16).contiguous())


# ---------------------------------------------------------------------------------------------- API
def supports(layer: "QuantLinear", x: torch.Tensor) -> bool:
    """True when the CUDA kernels compute this layer's forward for ``x`` (never without the extension)."""
    if not available() or not x.is_cuda or x.dtype != torch.float16 or x.shape[-1] != layer.in_features:
        return False
    if layer.qweight.device != x.device:
        return False
    return plan_for(layer) is not None


def _kernels_for(x: torch.Tensor) -> Any:
    """The compiled functions for CUDA inputs (skipping the custom-op Python layer, which costs
    microseconds per call at decode), else the ``qaas`` ops (references on CPU)."""
    ext = extension() if x.is_cuda else None
    return ext if ext is not None else ops


def quant_linear_forward(layer: "QuantLinear", x: torch.Tensor) -> torch.Tensor:
    """The layer's forward through the ``qaas`` kernels (CUDA kernels on CUDA, references elsewhere)."""
    plan = plan_for(layer)
    k = _kernels_for(x)
    if plan is None:
        raise ValueError(f"no kernel path for {layer!r}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features)
    if plan.transform.kind == "torch" and layer.transform is not None:
        x2 = layer.transform(x2).to(x.dtype)
    x2 = x2.contiguous()
    bias = _bias(layer)
    if plan.path == "w4a16":
        tokens = x2.shape[0]
        decode = tokens <= GEMV_MAX_TOKENS
        sm90 = None if decode else _sm90_w4_operands(layer, k, x2)
        if sm90 is not None:  # past decode: the Hopper wgmma GEMM (its own copy of the codes)
            out = k.w4a16_gemm_sm90(x2, sm90[0], sm90[1], sm90[2], layer.group_size, bias)
            return out.reshape(*lead, layer.out_features)
        packed = tokens <= W4A16_BATCHED_MAX_TOKENS  # the packed-metadata kernels: decode, then the batched GEMM
        meta, stable = _packed_w4_meta(layer) if packed else (None, False)
        tiled = layer.codes_tiled
        if meta is not None and not tiled and layer.tileable() and not _capturing(x2):
            # once: the decode and batched kernels read whole lines from the tiled order. Never while a CUDA graph is
            # captured: replays would permute the codes again
            tiled = layer.tile_codes()
            meta, stable = _packed_w4_meta(layer)  # the codes were just written: stamped again, not stable
        pdl = stable and w4a16_pdl_enabled()  # the extension only: when the weights are those of the last call
        n = layer.out_features
        if meta is not None and tiled:
            if k is ops:  # (the op itself takes any number of rows)
                out = k.w4a16_gemm_packed_tiled(x2, layer.qweight, meta, layer.group_size, bias, n)
            elif decode:
                v = tiled_decode_variant(n, layer.in_features, tokens, _sm_count(x2.device.index or 0), pdl)
                out = k.w4a16_gemm_packed_tiled(x2, layer.qweight, meta, layer.group_size, bias, n, v)
            else:
                out = k.w4a16_gemm_batched(x2, layer.qweight, meta, layer.group_size, bias, n)
        elif meta is not None and decode and k is ops:
            out = k.w4a16_gemm_packed(x2, layer.qweight, meta, layer.group_size, bias)
        elif meta is not None and decode:
            out = k.w4a16_gemm_packed(x2, layer.qweight, meta, layer.group_size, bias, pdl)
        else:
            scale = _derived(layer, "w_scale", layer.w_scale, _f32)
            zero = _derived(layer, "w_zero", layer.w_zero, _f32)
            if decode:  # (tiled codes come with packed words: this path reads rows)
                out = k.w4a16_gemm(x2, layer.packed_codes(), scale, zero, layer.group_size, bias)
            else:
                if not tiled:
                    w = k.dequant_w4(layer.qweight, scale, zero, layer.group_size)
                elif k is ops:
                    w = k.dequant_w4_tiled(layer.qweight, scale, zero, layer.group_size)
                else:  # the extension's dequantisation reads the tiled order itself
                    w = k.dequant_w4(layer.qweight, scale, zero, layer.group_size, True)
                out = F.linear(x2, w.to(x2.dtype), None if bias is None else bias.to(x2.dtype))
        return out.reshape(*lead, layer.out_features)
    tp = plan.transform
    p1 = p2 = None
    if tp.kind == "kronecker":
        assert layer.transform is not None
        tensors = _square_tensors(layer.transform)
        p1 = _derived(layer, "p1", tensors[tp.p1_name], _f32)
        p2 = _derived(layer, "p2", tensors[tp.p2_name], _f32) if tp.p2_name else None
    clip = _derived(layer, "clip", layer.act_clip, lambda c: c.detach().float().reshape(()).contiguous())
    w_scale = _derived(layer, "w_scale_ch", layer.w_scale, lambda s: s.detach()[:, 0].float().contiguous())
    frags = _act_quant_fragments(layer, k, x2, tp, p1, p2)
    if _use_sm90_gemm(layer, x2):
        qa, a_scale, a_corr = k.act_quant_s8(x2, clip, tp.mode, tp.hadamard_block, p1, p2, frags)
        w_u8 = layer.qweight if layer.weight_bits == 8 else k.unpack_w4_u8(layer.packed_codes())
        out = k.w8a8_gemm_sm90(qa, a_scale, a_corr, w_u8, w_scale, bias, -1)
        return out.to(x.dtype).reshape(*lead, layer.out_features)
    codes, a_scale = k.act_quant(x2, layer.act_bits, clip, tp.mode, tp.hadamard_block, p1, p2, frags)
    out = k.int8_gemm(codes, layer.act_bits, a_scale, layer.packed_codes(), layer.weight_bits, w_scale, bias)
    return out.to(x.dtype).reshape(*lead, layer.out_features)


def _use_sm90_gemm(layer: "QuantLinear", x2: torch.Tensor) -> bool:
    """W8A8 and W4A8 on CUDA through the Hopper wgmma GEMM (W4 codes unpacked to uint8 per call, zero
    point 128): extension built with CUTLASS, sm_90 device, K a multiple of 32 and N of 16, at least
    ``SM90_GEMM_MIN_TOKENS`` tokens."""
    if not x2.is_cuda or layer.act_bits != 8 or layer.weight_bits not in SM90_GEMM_MIN_TOKENS:
        return False
    if x2.shape[0] < SM90_GEMM_MIN_TOKENS[layer.weight_bits]:
        return False
    if layer.in_features % 32 or layer.out_features % 16:
        return False
    ext = extension()
    return ext is not None and bool(ext.has_sm90_gemm()) and torch.cuda.get_device_capability(x2.device) == (9, 0)


def hadamard_block_for(n: int) -> int:
    """Largest power-of-two block (<= 16384) dividing ``n``: the block-diagonal Hadamard fallback size."""
    return min(n & -n, 16384) if n > 0 else 0


__all__ = ["KernelPlan", "TransformPlan", "detect_transform", "hadamard_block_for", "plan_for", "quant_linear_forward", "supports"]
