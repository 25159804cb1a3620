"""Batched forward passes of a (quantized) model: pure torch, synchronous, no asyncio.

:class:`DecoderRunner` does continuous-batching generation mechanics for causal LMs:

* ``prefill(prompts)`` runs ONE forward pass over several prompts, left-padded to a common length
  with an attention mask and per-row position ids, and returns a :class:`KVBatch` (the KV cache of
  every row, padded on the left) plus the last-position logits of every row;
* ``merge(a, b)`` joins two batches (new requests joining a running batch between decode steps) by
  left-padding the shorter cache;
* ``select(batch, rows)`` drops finished rows (and the all-padding columns that leaves);
* ``decode(batch)`` runs ONE forward pass of one token for every active row over its cached keys.

:class:`EncoderRunner` embeds a batch of texts in one forward pass (mean pooling over the attention
mask, L2-normalised).

Every forward pass goes through the model as loaded from the artifact, i.e. through QuantLinear
(CUDA kernels on a GPU, the reference path on CPU). ``forward_passes`` counts them.

KV cache: a model quantized with a KV-cache spec (it carries ``KVQuantizer`` children) gets a REAL
quantized cache, :class:`quant.modules.quantized_kv_cache.QuantizedKVCache` (int8/int4 codes +
per-token scale/zero; decode attention by ``kernels.ops.kv_decode_attention`` when no key position of
the batch is padding, else on the dequantized cache); other models get transformers' ``DynamicCache``.
``merge`` / ``select`` work on either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache

from quant.modules.quantized_kv_cache import QuantizedKVCache, has_quantized_kv, left_pad

CacheFactory = Callable[[], Cache]


@dataclass
class KVBatch:
    """The running batch: its KV cache (per layer [B, H, T, D], left-padded), mask [B, T], last tokens [B].

    The cache object is kept between decode steps (the model appends to it in place); it is rebuilt
    only when rows join (merge) or leave (select).
    """

    cache: Cache  # DynamicCache, or QuantizedKVCache for a KV-quantized model
    mask: torch.Tensor
    last_tokens: torch.Tensor

    @property
    def keys(self) -> list[torch.Tensor]:
        return _cache_tensors(self.cache)[0]

    @property
    def values(self) -> list[torch.Tensor]:
        return _cache_tensors(self.cache)[1]

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])


def _cache_tensors(cache: DynamicCache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [layer.keys for layer in layers], [layer.values for layer in layers]
    return list(cache.key_cache), list(cache.value_cache)  # older transformers


def _build_cache(keys: list[torch.Tensor], values: list[torch.Tensor]) -> DynamicCache:
    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, i)
    return cache


def kv_cache_factory(model: nn.Module) -> CacheFactory:
    """The cache a generation pass over ``model`` starts from: the quantized cache when the model was
    quantized with a KV-cache spec, else ``DynamicCache``."""
    if has_quantized_kv(model):
        return lambda: QuantizedKVCache.from_model(model)
    return DynamicCache


class DecoderRunner:
    def __init__(
        self, model: nn.Module, pad_token_id: int, max_positions: int, cache_factory: CacheFactory | None = None
    ) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.max_positions = max_positions
        self.cache_factory = cache_factory if cache_factory is not None else kv_cache_factory(model)
        self.device = next(model.parameters()).device
        self.forward_passes = 0
        self.batch_sizes: list[int] = []

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Cache):
        self.forward_passes += 1
        self.batch_sizes.append(int(input_ids.shape[0]))
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits[:, -1, :].float(), out.past_key_values

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> tuple[KVBatch, torch.Tensor]:
        """One forward pass over ``prompts`` (left padding + mask). Returns the batch and last logits [B, V]."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prefill needs non-empty prompts")
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, length - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, length - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, self.cache_factory())
        return KVBatch(cache=cache, mask=mask, last_tokens=ids[:, -1].clone()), logits

    @torch.inference_mode()
    def decode(self, batch: KVBatch, tokens: list[int]) -> torch.Tensor:
        """Feed one new token per row (``tokens``) through one forward pass; updates ``batch`` in place."""
        new = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)
        positions = batch.mask.sum(dim=1, keepdim=True)  # real tokens so far = the new token's position
        mask = torch.cat([batch.mask, torch.ones_like(new)], dim=1)
        logits, cache = self._forward(new, mask, positions, batch.cache)
        batch.cache, batch.mask, batch.last_tokens = cache, mask, new.squeeze(1)
        return logits

    @staticmethod
    def merge(a: KVBatch | None, b: KVBatch) -> KVBatch:
        """Concatenate two batches along the batch dimension (left-padding the shorter one)."""
        if a is None or a.size == 0:
            return b
        length = max(a.length, b.length)
        mask = torch.cat([left_pad(a.mask, length, 1), left_pad(b.mask, length, 1)])
        last = torch.cat([a.last_tokens, b.last_tokens])
        if isinstance(a.cache, QuantizedKVCache) and isinstance(b.cache, QuantizedKVCache):
            return KVBatch(QuantizedKVCache.merge(a.cache, b.cache, length), mask, last)
        keys = [torch.cat([left_pad(x, length, 2), left_pad(y, length, 2)]) for x, y in zip(a.keys, b.keys)]
        values = [torch.cat([left_pad(x, length, 2), left_pad(y, length, 2)]) for x, y in zip(a.values, b.values)]
        return KVBatch(_build_cache(keys, values), mask, last)

    @staticmethod
    def select(batch: KVBatch, rows: list[int]) -> KVBatch | None:
        """Keep only ``rows``; trims the leading columns that became padding in every remaining row."""
        if not rows:
            return None
        idx = torch.tensor(rows, dtype=torch.long, device=batch.mask.device)
        mask = batch.mask.index_select(0, idx)
        used = mask.any(dim=0).nonzero()
        start = int(used[0].item()) if used.numel() else 0
        if isinstance(batch.cache, QuantizedKVCache):
            return KVBatch(batch.cache.select_rows(idx, start), mask[:, start:], batch.last_tokens.index_select(0, idx))
        keys = [k.index_select(0, idx)[:, :, start:] for k in batch.keys]
        values = [v.index_select(0, idx)[:, :, start:] for v in batch.values]
        return KVBatch(_build_cache(keys, values), mask[:, start:], batch.last_tokens.index_select(0, idx))

    def row_lengths(self, batch: KVBatch) -> list[int]:
        return batch.mask.sum(dim=1).tolist()


class EncoderRunner:
    """Mean-pooled, L2-normalised sentence embeddings from an encoder, one forward pass per batch."""

    def __init__(self, model: nn.Module, pad_token_id: int, max_positions: int) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.max_positions = max_positions
        self.device = next(model.parameters()).device
        self.forward_passes = 0
        self.batch_sizes: list[int] = []

    @torch.inference_mode()
    def embed(self, inputs: list[list[int]]) -> torch.Tensor:
        if not inputs or any(len(p) == 0 for p in inputs):
            raise ValueError("embed needs non-empty inputs")
        length = max(len(p) for p in inputs)
        ids = torch.full((len(inputs), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), length), dtype=torch.long)
        for i, p in enumerate(inputs):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
            mask[i, : len(p)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        self.forward_passes += 1
        self.batch_sizes.append(len(inputs))
        out = self.model(input_ids=ids, attention_mask=mask)
        hidden = out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()
