"""KV-cache quantization through a registered transformers attention function.

Each attention module gets a :class:`KVQuantizer` child (``<attn>.kv_quantizer``) and the model's
``config._attn_implementation`` is switched to :data:`ATTENTION_NAME`. The registered attention
function receives the (RoPE-applied, cache-concatenated) query / key / value states
``[batch, heads, seq, head_dim]``; it

1. optionally rotates query AND key by the same orthogonal head-dim Hadamard ``H`` (QuaRot /
   OSTQuant): ``(qH)(kH)^T = q k^T``, so attention is unchanged in floating point while the key
   outliers are spread over the head dimension before quantization;
2. fake-quantizes key and value per token per head (reduction over ``head_dim``; asymmetric by
   default, 4 or 8 bits, with a clip ratio);
3. calls the SDPA (default) or eager attention.

Per-token quantization is position-independent, so quantizing the whole concatenated cache at each
step simulates storing quantized entries exactly. Attention modules without a quantizer pass through.

This fake-quant path is what calibration and evaluation (perplexity, KL) use: the HF cache
(``DynamicCache``) still stores fp16/fp32 K/V. Generation and serving use the REAL quantized cache,
:class:`quant.modules.quantized_kv_cache.QuantizedKVCache` (codes + per-token-per-head scale/zero,
appended with ``kernels.ops.kv_quantize``): its ``update`` returns a ``QuantizedKVView`` instead of
tensors, and this same registered function hands it to
:func:`quant.modules.quantized_kv_cache.quantized_cache_attention`, which runs
``kernels.ops.kv_decode_attention`` on the codes for single-token decode and dequantizes the cache
for prefill (see that module). Both paths compute the same function up to float rounding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from quant.models.adapters import ModelAdapter
from quant.modules.registry import register_module_type
from quant.quantizers.core import fake_quantize
from quant.recipes.schema import KVCacheQuantSpec

ATTENTION_NAME = "qaas_kv"
BASE_IMPLEMENTATIONS = ("sdpa", "eager")
CHILD_NAME = "kv_quantizer"


def sylvester_hadamard(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix (orthogonal, symmetric) for a power-of-two ``n``."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


def head_hadamard(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Orthogonal Hadamard for the head dimension: the shared transforms implementation when present."""
    try:
        from quant.transforms.hadamard import hadamard_matrix  # written by the transforms contributor
    except ImportError:
        return sylvester_hadamard(n, dtype, device)
    return hadamard_matrix(n, dtype=dtype, device=device)


class KVQuantizer(nn.Module):
    """Fake-quantizes K and V (per token per head) and optionally rotates Q and K by a Hadamard."""

    def __init__(
        self,
        bits: int,
        symmetric: bool = False,
        clip_ratio: float = 1.0,
        rotate: bool = False,
        head_dim: int = 0,
        base_impl: str = "sdpa",
    ) -> None:
        super().__init__()
        if base_impl not in BASE_IMPLEMENTATIONS:
            raise ValueError(f"base_impl must be one of {BASE_IMPLEMENTATIONS}, got {base_impl!r}")
        if rotate and head_dim <= 0:
            raise ValueError("head_dim is required when rotate=True")
        self.bits = int(bits)
        self.symmetric = bool(symmetric)
        self.clip_ratio = float(clip_ratio)
        self.rotate = bool(rotate)
        self.head_dim = int(head_dim)
        self.base_impl = base_impl
        if self.rotate:
            # persistent: an artifact restores exactly the matrix used at calibration time
            self.register_buffer("rotation", head_hadamard(self.head_dim, torch.float32))
        else:
            self.rotation = None

    @classmethod
    def from_spec(cls, spec: KVCacheQuantSpec, head_dim: int, rotate: bool, base_impl: str = "sdpa") -> "KVQuantizer":
        return cls(spec.bits, spec.symmetric, spec.clip_ratio, rotate, head_dim, base_impl)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.rotation is not None:
            rot = self.rotation.to(dtype=query.dtype, device=query.device)
            query = query @ rot
            key = key @ rot.to(key.dtype)
        key = fake_quantize(key, self.bits, self.symmetric, self.clip_ratio)
        value = fake_quantize(value, self.bits, self.symmetric, self.clip_ratio)
        return query, key, value

    def config(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "symmetric": self.symmetric,
            "clip_ratio": self.clip_ratio,
            "rotate": self.rotate,
            "head_dim": self.head_dim,
            "base_impl": self.base_impl,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "KVQuantizer":
        return cls(**config)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return f"KV{self.bits} {kind}, clip={self.clip_ratio}, rotate={self.rotate}, base={self.base_impl}"


# ---------------------------------------------------------------------------------- attention function
def _eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Architecture-independent eager attention (GQA, boolean or additive masks)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query @ key.transpose(-1, -2)) * scaling
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if attention_mask is None and getattr(module, "is_causal", False) and q_len > 1:
        # SDPA-style mask creation skips fully causal masks (SDPA's is_causal covers them)
        rows = torch.arange(q_len, device=query.device).unsqueeze(1) + (kv_len - q_len)
        attention_mask = torch.arange(kv_len, device=query.device).unsqueeze(0) <= rows
    if attention_mask is not None:
        mask = attention_mask[..., :kv_len]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = (weights @ value).transpose(1, 2).contiguous()
    return out, weights


def _is_quantized_view(key: object) -> bool:
    from quant.modules.quantized_kv_cache import QuantizedKVView

    return isinstance(key, QuantizedKVView)


def kv_quant_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The function registered as :data:`ATTENTION_NAME` in transformers' attention interface."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    quantizer = getattr(module, CHILD_NAME, None)
    if _is_quantized_view(key):  # the real quantized cache: K/V are codes, K already rotated
        from quant.modules.quantized_kv_cache import quantized_cache_attention

        return quantized_cache_attention(module, quantizer, query, key, attention_mask, **kwargs)
    base = "sdpa"
    if isinstance(quantizer, KVQuantizer):
        query, key, value = quantizer(query, key, value)
        base = quantizer.base_impl
    if base == "eager":
        return _eager_attention(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> None:
    """Register :data:`ATTENTION_NAME` (attention function + SDPA-style boolean masks). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, kv_quant_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _switch_attention(model: nn.Module, name: str, module: nn.Module) -> None:
    """Post-install hook: route the model's attention through :func:`kv_quant_attention`."""
    register_attention()
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) != ATTENTION_NAME:
        config._attn_implementation = ATTENTION_NAME


register_module_type("kv_quantizer", post_install=_switch_attention)(KVQuantizer)


def _base_implementation(model: nn.Module) -> str:
    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return current if current in BASE_IMPLEMENTATIONS else "sdpa"


def attach_kv_quantizer(
    model: nn.Module, adapter: ModelAdapter, spec: KVCacheQuantSpec, rotate: bool = False
) -> dict[str, KVQuantizer]:
    """Attach a :class:`KVQuantizer` to every attention module and switch the attention implementation.

    Returns the quantizers by module name. With ``spec.bits == 16`` nothing is attached.
    """
    if not spec.enabled:
        return {}
    base = _base_implementation(model)
    attached: dict[str, KVQuantizer] = {}
    for block in adapter.iter_blocks():
        info = block.attention
        if info is None:
            continue
        ref = next((p for p in info.module.parameters() if p.is_floating_point()), None)
        quantizer = KVQuantizer.from_spec(spec, info.head_dim, rotate, base)
        if ref is not None:
            quantizer = quantizer.to(device=ref.device, dtype=ref.dtype)
        info.module.add_module(CHILD_NAME, quantizer)
        attached[f"{info.name}.{CHILD_NAME}"] = quantizer
    if attached:
        _switch_attention(model, "", next(iter(attached.values())))
    return attached


def detach_kv_quantizer(model: nn.Module) -> int:
    """Remove every KV quantizer and restore the base attention implementation; returns how many."""
    removed, base = 0, "sdpa"
    for _, module in list(model.named_modules()):
        quantizer = module._modules.get(CHILD_NAME) if hasattr(module, "_modules") else None
        if isinstance(quantizer, KVQuantizer):
            base = quantizer.base_impl
            del module._modules[CHILD_NAME]
            removed += 1
    if removed and getattr(model, "config", None) is not None:
        model.config._attn_implementation = base
    return removed
