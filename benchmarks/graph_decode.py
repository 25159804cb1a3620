"""Greedy decoding of a Hugging Face LLaMA-family model with a static KV cache, one token per step,
written with the model's own modules (norms, projections, MLP, rotary embedding) so that a whole
decode step can be captured in one CUDA graph and replayed without Python.

Used by ``benchmarks/e2e_generation.py`` to measure decode tokens/s where the GPU, not the Python
interpreter, sets the pace (HF ``generate`` in eager mode at batch 1 is launch-bound). Quantized
layers (``QuantLinear``) run through ``kernels.dispatch`` like anywhere else.

KV cache: fp16 (the model dtype; ``kv_bits=16``, the default), or a static QUANTIZED cache
(``kv_bits=8`` / ``4``): preallocated uint8 code buffers ``[1, Hkv, max_len, D*bits/8]`` and float32
scale/zero ``[1, Hkv, max_len]`` per layer; each step quantizes the new token's K/V with
``kernels.ops.kv_quantize`` (written at ``pos`` by ``index_copy_``) and attends with
``kernels.ops.kv_decode_attention`` over ``seq_lens = pos + 1`` (a device tensor): fixed shapes and no
host synchronisation, so the step stays CUDA-graph capturable. Where the model carries ``KVQuantizer``
children with a head-dim Hadamard (QuaRot-style KV recipes), q and k are rotated by it as in
``quant.modules.kv_cache``. Without CUDA the ops run their CPU references (tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KV_BITS = (16, 8, 4)


class QuantizedStaticKV:
    """Preallocated quantized K/V of one layer (batch 1) and the two ops that write and read it."""

    def __init__(self, kv_heads: int, max_len: int, head_dim: int, bits: int, symmetric: bool, clip: float,
                 device: torch.device) -> None:
        if bits not in (4, 8):
            raise ValueError(f"a quantized static KV cache has 4 or 8 bits, got {bits}")
        self.bits, self.symmetric, self.clip = bits, symmetric, clip
        lead = (1, kv_heads, max_len)
        rowb = head_dim * bits // 8
        self.k_codes = torch.zeros((*lead, rowb), dtype=torch.uint8, device=device)
        self.v_codes = torch.zeros((*lead, rowb), dtype=torch.uint8, device=device)
        self.k_scale, self.k_zero, self.v_scale, self.v_zero = (
            torch.zeros(lead, dtype=torch.float32, device=device) for _ in range(4)
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k_codes, self.v_codes, self.k_scale, self.k_zero,
                                                           self.v_scale, self.v_zero))

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Quantize ``k``, ``v`` ``[1, Hkv, 1, D]`` and store them at position ``pos`` (``[1]`` long tensor)."""
        from kernels import ops

        for x, codes, scale, zero in ((k, self.k_codes, self.k_scale, self.k_zero),
                                      (v, self.v_codes, self.v_scale, self.v_zero)):
            c, s, z = ops.kv_quantize(x.contiguous(), self.bits, self.symmetric, self.clip)
            codes.index_copy_(2, pos, c)
            scale.index_copy_(2, pos, s)
            zero.index_copy_(2, pos, z)

    def attend(self, q: torch.Tensor, seq_lens: torch.Tensor, sm_scale: float) -> torch.Tensor:
        """``q [1, Hq, 1, D]`` over the first ``seq_lens[0]`` positions -> ``[1, Hq, D]``."""
        from kernels import ops

        return ops.kv_decode_attention(q[:, :, 0, :].contiguous(), self.k_codes, self.k_scale, self.k_zero,
                                       self.v_codes, self.v_scale, self.v_zero, self.bits, seq_lens, sm_scale)


def _kv_rotation(attn: nn.Module) -> torch.Tensor | None:
    quantizer = getattr(attn, "kv_quantizer", None)
    return getattr(quantizer, "rotation", None)


class StaticDecoder:
    """Batch-1 greedy decoder over ``model`` (a ``LlamaForCausalLM``-like model) with a KV cache of
    ``max_len`` positions. State lives in tensors (``ids``, ``pos``) so :meth:`step` has no Python-side
    dependence on the position and can be captured in a CUDA graph."""

    def __init__(self, model: nn.Module, max_len: int, kv_bits: int = 16, kv_symmetric: bool = False,
                 kv_clip: float = 1.0) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        if kv_bits not in KV_BITS:
            raise ValueError(f"kv_bits must be one of {KV_BITS}, got {kv_bits}")

        self._rope = apply_rotary_pos_emb
        self.model = model
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        emb = model.get_input_embeddings().weight
        dev, dt = emb.device, emb.dtype
        self.max_len = max_len
        shape = (1, self.kv_heads, max_len, self.head_dim)
        layers = model.model.layers
        self.kv_bits = kv_bits
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.qkv: list[QuantizedStaticKV] = []
        self.rotations: list[torch.Tensor | None] = [None] * len(layers)
        if kv_bits == 16:
            self.k_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in layers]
            self.v_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in layers]
        else:
            self.qkv = [QuantizedStaticKV(self.kv_heads, max_len, self.head_dim, kv_bits, kv_symmetric, kv_clip, dev)
                        for _ in layers]
            self.rotations = [None if r is None else r.to(device=dev, dtype=dt)
                              for r in (_kv_rotation(layer.self_attn) for layer in layers)]
        self.sm_scale = self.head_dim ** -0.5
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(1, dtype=torch.int32, device=dev)
        self.positions = torch.arange(max_len, device=dev)

    def kv_cache_bytes(self) -> int:
        """Bytes of the whole preallocated KV cache (all layers)."""
        if self.qkv:
            return sum(c.nbytes() for c in self.qkv)
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    @torch.no_grad()
    def step(self) -> None:
        """Consume ``ids`` at position ``pos``; write the greedy next token to ``ids``; advance ``pos``."""
        m = self.model.model
        x = m.embed_tokens(self.ids)
        cos, sin = m.rotary_emb(x, self.pos.view(1, 1))
        mask = (self.positions <= self.pos).view(1, 1, 1, self.max_len)
        self.seq_lens.copy_(self.pos + 1)
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, 1, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rope(q, k, cos, sin)
            if self.qkv:
                rot = self.rotations[i]
                if rot is not None:  # as KVQuantizer: rotate q and k by the same head-dim Hadamard
                    q, k = q @ rot, k @ rot
                self.qkv[i].append(k, v, self.pos)
                o = self.qkv[i].attend(q, self.seq_lens, self.sm_scale)  # [1, Hq, D]
                x = x + attn.o_proj(o.reshape(1, 1, self.heads * self.head_dim))
            else:
                self.k_cache[i].index_copy_(2, self.pos, k)
                self.v_cache[i].index_copy_(2, self.pos, v)
                o = F.scaled_dot_product_attention(
                    q, self.k_cache[i], self.v_cache[i], attn_mask=mask, enable_gqa=self.kv_heads != self.heads
                )
                x = x + attn.o_proj(o.transpose(1, 2).reshape(1, 1, self.heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.model.lm_head(m.norm(x))
        self.ids.copy_(logits[:, -1:].argmax(dim=-1))
        self.pos.add_(1)

    @torch.no_grad()
    def prefill(self, prompt: list[int]) -> None:
        """Reset to position 0 and feed ``prompt`` token by token (through :meth:`step`); afterwards ``ids``
        holds the first generated token."""
        self.pos.zero_()
        for token in prompt:
            self.ids.fill_(int(token))
            self.step()

    def seek(self, position: int) -> None:
        """Jump to ``position`` without computing the positions before it (they keep whatever the cache holds:
        zeros when fresh). For timing decode at a long context only; the tokens then mean nothing."""
        if not 0 <= position < self.max_len:
            raise ValueError(f"position {position} outside the cache ({self.max_len})")
        self.pos.fill_(position)

    @torch.no_grad()
    def generate(self, prompt: list[int], new_tokens: int) -> list[int]:
        """Eager greedy generation (reference for the graph-replayed decoding)."""
        if len(prompt) + new_tokens > self.max_len:
            raise ValueError(f"prompt + new tokens exceed the cache ({self.max_len})")
        self.prefill(prompt)
        out = [int(self.ids.item())]
        for _ in range(new_tokens - 1):
            self.step()
            out.append(int(self.ids.item()))
        return out


class GraphedDecodeStep:
    """One :meth:`StaticDecoder.step` captured in a CUDA graph (after warm-up on a side stream)."""

    def __init__(self, decoder: StaticDecoder, warmup: int = 3) -> None:
        self.decoder = decoder
        saved_pos, saved_ids = decoder.pos.clone(), decoder.ids.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                decoder.step()
        torch.cuda.current_stream().wait_stream(stream)
        decoder.pos.copy_(saved_pos)
        decoder.ids.copy_(saved_ids)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            decoder.step()
        decoder.pos.copy_(saved_pos)  # capture does not run the kernels' effects reliably: restore
        decoder.ids.copy_(saved_ids)

    def replay(self, steps: int) -> None:
        for _ in range(steps):
            self.graph.replay()
