"""A transformers ``Cache`` that really stores the KV cache quantized (int8, or int4 packed two per byte)
and an attention path that reads it: the generation / serving counterpart of the fake-quant
simulation in :mod:`quant.modules.kv_cache`.

Storage (per decoder layer, :class:`QuantizedKVLayer`): unsigned codes ``[B, Hkv, capacity, D*bits/8]``
uint8 plus float32 scale and zero ``[B, Hkv, capacity]`` for K and for V, exactly the layout of the
``qaas::kv_quantize`` / ``qaas::kv_decode_attention`` ops (``kernels/KV_ATTENTION.md``). The capacity
grows by doubling (amortised appends); positions past the current length are zero and never read.

``update(key, value)`` (called by the model's attention module after RoPE)

1. rotates the new key by the layer's head-dim Hadamard when the model's :class:`KVQuantizer` has one
   (the query is rotated by the same matrix in the attention function, so ``q k^T`` is unchanged);
2. quantizes the new K and V per token per head with ``kernels.ops.kv_quantize``;
3. appends the codes and returns a :class:`QuantizedKVView` (for both key and value) instead of
   float tensors; the registered attention function (:func:`quant.modules.kv_cache.kv_quant_attention`)
   recognises it and calls :func:`quantized_cache_attention`.

Attention over the stored codes:

* one query token (decode) with no padded key position: ``kernels.ops.kv_decode_attention`` on the
  codes (the split-K CUDA kernel on fp16 CUDA inputs with head_dim 64/128; its float64 reference on the
  CPU);
* otherwise (prefill ``q_len > 1``, a left-padded batch whose attention mask hides key positions, or
  shapes/dtypes the CUDA kernel does not take): the cache is dequantized ``(u - z) * s`` (float32, then
  the model dtype) and the base attention (SDPA or eager) runs with the mask. That is the function the
  fake-quant path computes, so it is exact, not an approximation, just not memory-saving at that step.

Because per-token quantization does not depend on the other tokens, the results equal the fake-quant
path (which re-quantizes the whole fp16 cache every step) up to float rounding; ``tests/quant/modules/
test_quantized_kv_cache.py`` checks it on a tiny LLaMA.

Not supported: cache offloading, ``torch.compile`` of the cache, sliding-window layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from kernels import ops, reference

BUFFERS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
SEQ_DIM = 2  # every buffer is [B, Hkv, capacity, ...]
CAPACITY_QUANTUM = 16


@dataclass(frozen=True)
class KVFormat:
    """How one layer's cache is quantized (the :class:`KVQuantizer` settings minus the base attention)."""

    bits: int
    symmetric: bool
    clip_ratio: float

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"a quantized KV cache stores 4 or 8 bits, got {self.bits}")

    def row_bytes(self, head_dim: int) -> int:
        return head_dim * self.bits // 8


# ------------------------------------------------------------------------------------------- op wrappers
def _cuda_kv_ops() -> bool:
    return bool(getattr(ops, "KV_CUDA_KERNELS_REGISTERED", False))


def quantize_kv(x: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``kernels.ops.kv_quantize`` where it runs (CPU: the reference; CUDA: fp16, head_dim 64/128/256, built
    extension), else the reference function itself (same math) on the tensor's device."""
    d = x.shape[-1]
    if not x.is_cuda or (_cuda_kv_ops() and x.dtype == torch.float16 and d in (64, 128, 256)):
        return ops.kv_quantize(x.contiguous(), fmt.bits, fmt.symmetric, fmt.clip_ratio)
    return reference.kv_quantize_ref(x, fmt.bits, fmt.symmetric, fmt.clip_ratio)


def decode_kernel_takes(query: torch.Tensor, head_dim: int) -> bool:
    """Whether ``kernels.ops.kv_decode_attention`` can run this query: always on the CPU (float64
    reference); on CUDA only with the built kernel, fp16 and head_dim 64 or 128."""
    if not query.is_cuda:
        return True
    return _cuda_kv_ops() and query.dtype == torch.float16 and head_dim in (64, 128)


# ------------------------------------------------------------------------------------------- cache layer
@dataclass(frozen=True)
class QuantizedKVView:
    """What :meth:`QuantizedKVLayer.update` returns in place of the key / value tensors: a handle on the
    layer, read by :func:`quantized_cache_attention`. Any other attention implementation fails on it."""

    layer: "QuantizedKVLayer"

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.layer.batch, self.layer.heads, self.layer.length, self.layer.head_dim))


class QuantizedKVLayer(CacheLayerMixin):
    """One decoder layer's K/V cache stored as codes + per-token-per-head scale/zero (see module doc)."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, fmt: KVFormat, rotation: torch.Tensor | None = None) -> None:
        super().__init__()
        self.fmt = fmt
        self.rotation = rotation
        self.length = 0
        self.batch = self.heads = self.head_dim = 0
        self.buffers: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------- storage
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch, self.heads, _, self.head_dim = key_states.shape
        if self.fmt.bits == 4 and self.head_dim % 2:
            raise ValueError("int4 KV codes need an even head_dim")
        self.buffers = self._allocate(0)
        self.length = 0
        self.is_initialized = True

    def _allocate(self, capacity: int) -> dict[str, torch.Tensor]:
        lead = (self.batch, self.heads, capacity)
        rowb = self.fmt.row_bytes(self.head_dim)
        out = {}
        for name in BUFFERS:
            if name.endswith("codes"):
                out[name] = torch.zeros((*lead, rowb), dtype=torch.uint8, device=self.device)
            else:
                out[name] = torch.zeros(lead, dtype=torch.float32, device=self.device)
        return out

    @property
    def capacity(self) -> int:
        return self.buffers["k_codes"].shape[SEQ_DIM] if self.buffers else 0

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        cap = max(needed, 2 * self.capacity, CAPACITY_QUANTUM)
        cap = -(-cap // CAPACITY_QUANTUM) * CAPACITY_QUANTUM
        grown = self._allocate(cap)
        for name, t in self.buffers.items():
            grown[name].narrow(SEQ_DIM, 0, self.length).copy_(t.narrow(SEQ_DIM, 0, self.length))
        self.buffers = grown

    def _set_storage(self, buffers: dict[str, torch.Tensor], length: int) -> None:
        """Replace the storage by ``buffers`` (``length`` valid positions), made contiguous."""
        self.buffers = {name: t.contiguous() for name, t in buffers.items()}
        self.batch = self.buffers["k_codes"].shape[0]
        self.length = length

    def valid(self) -> dict[str, torch.Tensor]:
        """Views of the buffers over the ``length`` stored positions."""
        return {name: t.narrow(SEQ_DIM, 0, self.length) for name, t in self.buffers.items()}

    def nbytes(self) -> int:
        """Bytes the stored positions occupy (codes + scale + zero, K and V)."""
        return sum(t.numel() * t.element_size() for t in self.valid().values())

    # ---------------------------------------------------------------- transformers API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Rotate (optional) and quantize the new K/V, append the codes; returns ``(view, view)``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.rotation is not None:
            key_states = key_states @ self.rotation.to(dtype=key_states.dtype, device=key_states.device)
        n = key_states.shape[SEQ_DIM]
        self._reserve(self.length + n)
        for prefix, x in (("k", key_states), ("v", value_states)):
            codes, scale, zero = quantize_kv(x, self.fmt)
            for name, t in ((f"{prefix}_codes", codes), (f"{prefix}_scale", scale), (f"{prefix}_zero", zero)):
                self.buffers[name].narrow(SEQ_DIM, self.length, n).copy_(t)
        self.length += n
        view = QuantizedKVView(self)
        return view, view

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.buffers, self.length, self.is_initialized = {}, 0, False

    def offload(self) -> None:
        raise NotImplementedError("QuantizedKVLayer does not support offloading")

    def prefetch(self) -> None:
        raise NotImplementedError("QuantizedKVLayer does not support offloading")

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' convention: a negative count of tokens to drop from the end."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self.length = max(0, self.length + tokens_to_remove)

    def _map_batch(self, fn) -> None:
        if self.is_initialized:
            self._set_storage({name: fn(t) for name, t in self.buffers.items()}, self.length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    # ---------------------------------------------------------------- reading
    def dequantize(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored K (rotated when the layer rotates) and V as ``[B, Hkv, length, D]`` in ``dtype``
        (``(u - z) * s`` in float32 first, as the fake quantizer computes it)."""
        b = self.valid()
        k = reference.kv_dequantize_ref(b["k_codes"], b["k_scale"], b["k_zero"], self.fmt.bits, torch.float32)
        v = reference.kv_dequantize_ref(b["v_codes"], b["v_scale"], b["v_zero"], self.fmt.bits, torch.float32)
        return k.to(dtype), v.to(dtype)

    def decode_attention(self, query: torch.Tensor, sm_scale: float) -> torch.Tensor:
        """``kernels.ops.kv_decode_attention`` for one query token: ``query [B, Hq, 1, D]`` (already rotated)
        -> ``[B, 1, Hq, D]`` (the layout attention functions return). Every row attends to all
        ``length`` stored positions."""
        b = self.buffers
        seq_lens = torch.full((self.batch,), self.length, dtype=torch.int32, device=query.device)
        out = ops.kv_decode_attention(
            query[:, :, 0, :].contiguous(), b["k_codes"], b["k_scale"], b["k_zero"],
            b["v_codes"], b["v_scale"], b["v_zero"], self.fmt.bits, seq_lens, float(sm_scale),
        )
        return out.unsqueeze(1)


# ------------------------------------------------------------------------------------------- attention
def _mask_hides_keys(mask: torch.Tensor | None) -> bool:
    """Whether an attention mask (boolean, True = attend; or additive) hides any key position."""
    if mask is None:
        return False
    if mask.dtype == torch.bool:
        return not bool(mask.all())
    return bool((mask < 0).any())


def quantized_cache_attention(
    module: nn.Module,
    quantizer: nn.Module | None,
    query: torch.Tensor,
    view: QuantizedKVView,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of ``query [B, Hq, q_len, D]`` over a :class:`QuantizedKVLayer` (see the module doc for
    when the decode kernel runs and when the cache is dequantized)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from quant.modules.kv_cache import _eager_attention

    layer = view.layer
    rotation = getattr(quantizer, "rotation", None)
    if rotation is not None:  # same expression as KVQuantizer.forward
        query = query @ rotation.to(dtype=query.dtype, device=query.device)
    sm_scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if (
        query.shape[-2] == 1
        and kwargs.get("dropout", 0.0) == 0.0
        and decode_kernel_takes(query, layer.head_dim)
        and not _mask_hides_keys(attention_mask)
    ):
        return layer.decode_attention(query, sm_scale), None
    key, value = layer.dequantize(query.dtype)
    if getattr(quantizer, "base_impl", "sdpa") == "eager":
        return _eager_attention(module, query, key, value, attention_mask, scaling=sm_scale, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=sm_scale, **kwargs)


# ------------------------------------------------------------------------------------------- the Cache
def kv_quantizers_by_layer(model: nn.Module) -> dict[int, nn.Module]:
    """The model's :class:`KVQuantizer` children by decoder-layer index (the attention module's
    ``layer_idx``, else its order among the attention modules that have one)."""
    from quant.modules.kv_cache import CHILD_NAME, KVQuantizer

    found: dict[int, nn.Module] = {}
    for order, module in enumerate(m for m in model.modules() if isinstance(m._modules.get(CHILD_NAME), KVQuantizer)):
        idx = getattr(module, "layer_idx", None)
        found[int(idx) if idx is not None else order] = module._modules[CHILD_NAME]
    return found


def has_quantized_kv(model: nn.Module) -> bool:
    """Whether ``model`` carries KV quantizers that a :class:`QuantizedKVCache` can serve (4 or 8 bits)."""
    quantizers = kv_quantizers_by_layer(model)
    return bool(quantizers) and all(q.bits in (4, 8) for q in quantizers.values())


class QuantizedKVCache(Cache):
    """A transformers ``Cache`` whose layers are :class:`QuantizedKVLayer` (layers whose attention has no
    quantizer get a plain fp ``DynamicLayer``). Build it with :meth:`from_model`; pass it as
    ``past_key_values`` to ``model(...)`` or ``model.generate(...)``."""

    def __init__(self, layers: Iterable[CacheLayerMixin]) -> None:
        super().__init__(layers=list(layers))

    @classmethod
    def from_model(cls, model: nn.Module) -> "QuantizedKVCache":
        quantizers = kv_quantizers_by_layer(model)
        if not quantizers:
            raise ValueError("the model has no KV quantizers (was it quantized with a kv_cache spec?)")
        config = getattr(model, "config", None)
        text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
        n_layers = max(int(getattr(text, "num_hidden_layers", 0) or 0), max(quantizers) + 1)
        layers: list[CacheLayerMixin] = []
        for i in range(n_layers):
            q = quantizers.get(i)
            if q is None:
                layers.append(DynamicLayer())
            else:
                layers.append(QuantizedKVLayer(KVFormat(q.bits, q.symmetric, q.clip_ratio), q.rotation))
        return cls(layers)

    def quantized_layers(self) -> list[QuantizedKVLayer]:
        return [layer for layer in self.layers if isinstance(layer, QuantizedKVLayer)]

    def nbytes(self) -> int:
        """Bytes of the stored positions over all quantized layers."""
        return sum(layer.nbytes() for layer in self.quantized_layers())

    # ------------------------------------------------------------- continuous batching (service runner)
    def select_rows(self, rows: torch.Tensor, start: int = 0) -> "QuantizedKVCache":
        """A new cache with batch rows ``rows`` and positions ``[start, length)`` of this one."""
        layers: list[CacheLayerMixin] = []
        for layer in self.layers:
            if isinstance(layer, QuantizedKVLayer):
                new = _empty_like(layer)
                if layer.is_initialized:
                    sel = {n: t.index_select(0, rows.to(t.device)).narrow(SEQ_DIM, start, layer.length - start)
                           for n, t in layer.valid().items()}
                    new._set_storage(sel, layer.length - start)
                layers.append(new)
            else:
                layers.append(_dynamic_from(layer.keys.index_select(0, rows)[:, :, start:],
                                            layer.values.index_select(0, rows)[:, :, start:]))
        return QuantizedKVCache(layers)

    @staticmethod
    def merge(a: "QuantizedKVCache", b: "QuantizedKVCache", length: int) -> "QuantizedKVCache":
        """Concatenate two caches along the batch, each left-padded (zero codes, zero scale) to ``length``."""
        layers: list[CacheLayerMixin] = []
        for la, lb in zip(a.layers, b.layers):
            if isinstance(la, QuantizedKVLayer):
                new = _empty_like(la)
                ta, tb = la.valid(), lb.valid()
                new._set_storage({n: torch.cat([left_pad(ta[n], length), left_pad(tb[n], length)]) for n in BUFFERS},
                                 length)
                layers.append(new)
            else:
                layers.append(_dynamic_from(torch.cat([left_pad(la.keys, length), left_pad(lb.keys, length)]),
                                            torch.cat([left_pad(la.values, length), left_pad(lb.values, length)])))
        return QuantizedKVCache(layers)


def _empty_like(layer: QuantizedKVLayer) -> QuantizedKVLayer:
    new = QuantizedKVLayer(layer.fmt, layer.rotation)
    if layer.is_initialized:
        new.dtype, new.device = layer.dtype, layer.device
        new.batch, new.heads, new.head_dim = layer.batch, layer.heads, layer.head_dim
        new.is_initialized = True
    return new


def _dynamic_from(keys: torch.Tensor, values: torch.Tensor) -> DynamicLayer:
    layer = DynamicLayer()
    layer.update(keys, values)
    return layer


def left_pad(t: torch.Tensor, length: int, dim: int = SEQ_DIM) -> torch.Tensor:
    """``t`` with zeros prepended along ``dim`` up to ``length`` (unchanged when already that long)."""
    extra = length - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)
